"""Prefix tuning against a plain-torch attention that concatenates the prefix by hand; generation; padding."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import peftkit
from peftkit.testing import randomise_adapters
from peftkit.zoo import TINY_MODELS

_PADDING: dict[str, torch.Tensor] = {}


def _padding_of_keys(module, kv_len: int) -> torch.Tensor:
    return _PADDING["mask"][:, -kv_len:]


def reference_attention(module, query, key, value, attention_mask, scaling=None, position_bias=None, **kwargs):
    """softmax(Q [Pk; K]^T * scale + mask) [Pv; V], written out; the mask is rebuilt from the 2-D padding mask."""
    adapter = module.peftkit_adapters["p"]
    prefix_keys, prefix_values = adapter.prefixes()
    batch, heads, q_len, dim = query.shape
    length = prefix_keys.shape[1]
    keys = torch.cat([prefix_keys.expand(batch, -1, -1, -1), key], dim=2)
    values = torch.cat([prefix_values.expand(batch, -1, -1, -1), value], dim=2)
    groups = heads // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    kv_len = key.shape[2]
    allowed = torch.ones(batch, q_len, kv_len, dtype=torch.bool)
    if getattr(module, "is_causal", False):
        allowed &= torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    allowed &= _PADDING.get("of", _padding_of_keys)(module, kv_len)[:, None].bool()
    allowed = torch.cat([torch.ones(batch, q_len, length, dtype=torch.bool), allowed], dim=-1)[:, None]
    scores = (query @ keys.transpose(-1, -2)) * (scaling if scaling is not None else dim**-0.5)
    if position_bias is not None:  # T5: a bias per (query, real key); prefix keys carry no position, so none
        scores = scores + torch.cat([position_bias.new_zeros(*position_bias.shape[:-1], length), position_bias], -1)
    probabilities = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probabilities @ values).transpose(1, 2).contiguous(), probabilities


AttentionInterface.register("reference_prefix", reference_attention)
AttentionMaskInterface.register("reference_prefix", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def build(family: str, kv_heads: int) -> torch.nn.Module:
    if family == "llama":
        return TINY_MODELS["llama-tiny"](num_key_value_heads=kv_heads).eval()
    return TINY_MODELS[f"{family}-tiny"]().eval()


def padded_batch(rows: list[int], side: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(rows)
    ids = torch.randint(2, 128, (len(rows), width), generator=generator)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, n in enumerate(rows):
        mask[i, width - n :] = 1 if side == "left" else 0
        mask[i, :n] = 1 if side == "right" else mask[i, :n]
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@settings(max_examples=max(settings.default.max_examples, 20))
@given(
    family=st.sampled_from(["llama", "gpt2", "bert"]),
    kv_heads=st.sampled_from([4, 2, 1]),
    implementation=st.sampled_from(["sdpa", "eager"]),
    side=st.sampled_from(["left", "right"]),
    rows=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    length=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_prefix_attention_equals_a_hand_written_reference(family, kv_heads, implementation, side, rows, length, seed):
    torch.manual_seed(seed)
    model = build(family, kv_heads)
    model.config._attn_implementation = implementation
    peftkit.attach(model, {"adapters": {"p": [{"method": "prefix", "length": length}]}})
    randomise_adapters(model, seed)
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "reference_prefix"
    ids, mask = padded_batch(rows, side, torch.Generator().manual_seed(seed))
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family != "bert":
        inputs["position_ids"] = positions(mask)
    _PADDING["mask"] = mask
    got, expected = model(**inputs)[0], reference(**inputs)[0]
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("gate", [False, True])
def test_greedy_generate_with_cache_equals_stepwise_argmax(family, implementation, gate):
    torch.manual_seed(0)
    model = build(family, 2)
    model.config._attn_implementation = implementation
    peftkit.attach(model, {"adapters": {"p": [{"method": "prefix", "length": 4, "gate": gate}]}})
    randomise_adapters(model)
    ids = torch.randint(2, 128, (1, 5))
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    running = ids
    for _ in range(6):  # no cache: a full forward per step
        next_token = model(input_ids=running, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        running = torch.cat([running, next_token], dim=1)
    assert torch.equal(generated, running)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_generation_matches_each_row_alone(family):
    torch.manual_seed(0)
    model = build(family, 2)
    peftkit.attach(model, {"adapters": {"p": [{"method": "prefix", "length": 3}]}})
    randomise_adapters(model)
    ids, mask = padded_batch([5, 2], "left", torch.Generator().manual_seed(1))
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for row in range(2):
        alone = ids[row : row + 1, mask[row].bool()]
        single = model.generate(alone, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[row, -4:], single[0, -4:])


@pytest.mark.parametrize(("family", "side"), [("bert", "right"), ("llama", "left"), ("gpt2", "right")])
def test_padded_batch_rows_equal_each_row_alone(family, side):
    torch.manual_seed(0)
    model = build(family, 2)
    peftkit.attach(model, {"adapters": {"p": [{"method": "prefix", "length": 3, "gate": True}]}})
    randomise_adapters(model)
    ids, mask = padded_batch([6, 3, 1], side, torch.Generator().manual_seed(2))
    extra = (lambda m: {"position_ids": positions(m)}) if family != "bert" else (lambda m: {})
    batch = model(input_ids=ids, attention_mask=mask, **extra(mask))[0]
    for row in range(3):
        keep = mask[row].bool()
        alone = model(input_ids=ids[row : row + 1, keep], **extra(mask[row : row + 1, keep]))[0][0]
        torch.testing.assert_close(batch[row][keep], alone, rtol=1e-4, atol=1e-5)


def test_reparametrisation_folds_into_plain_prefixes(tmp_path):
    torch.manual_seed(0)
    model = build("llama", 2)
    peftkit.attach(model, {"adapters": {"p": [{"method": "prefix", "length": 3, "reparametrize": True}]}})
    randomise_adapters(model)
    ids = torch.randint(2, 128, (2, 5))
    before = model(input_ids=ids).logits
    trained = peftkit.trainable_parameters(model).trainable
    peftkit.fold(model)
    assert peftkit.trainable_parameters(model).trainable < trained
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)
    peftkit.save(model, tmp_path)
    assert peftkit.read_spec(tmp_path).adapters["p"][0].reparametrize is False
    torch.manual_seed(0)
    fresh = peftkit.load(build("llama", 2), tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)


def test_attention_that_cannot_host_a_prefix_is_refused():
    with pytest.raises(peftkit.TargetingError, match="is not a transformers attention module"):
        peftkit.plan(TINY_MODELS["mlp"](), {"adapters": {"p": [{"method": "prefix", "target": "0"}]}})
    model = build("llama", 2)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(peftkit.TargetingError, match="cannot host extra keys; use 'sdpa' or 'eager'"):
        peftkit.plan(model, {"adapters": {"p": [{"method": "prefix"}]}})


def test_lora_on_early_layers_and_prefix_on_late_layers_train_save_load_generate(tmp_path):
    torch.manual_seed(0)
    model = TINY_MODELS["llama-tiny"](num_hidden_layers=4)
    spec = {
        "adapters": {
            "lora": [{"method": "lora", "target": ["q_proj", "v_proj"], "layers": "0-1", "r": 4}],
            "prefix": [{"method": "prefix", "layers": "2-3", "length": 4}],
        }
    }
    peftkit.attach(model, spec)
    rows = peftkit.plan(TINY_MODELS["llama-tiny"](num_hidden_layers=4), spec).rows
    assert {(r.method, r.layer) for r in rows} == {("lora", 0), ("lora", 1), ("prefix", 2), ("prefix", 3)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, 128, (4, 10))
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    peftkit.save(model, tmp_path)
    torch.manual_seed(0)
    fresh = peftkit.load(TINY_MODELS["llama-tiny"](num_hidden_layers=4).eval(), tmp_path)
    prompt = ids[:1, :4]
    assert torch.equal(
        fresh.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0),
        model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0),
    )


# -- encoder-decoders: T5's position bias, BART's per-stack head counts ------------------------------------------


def t5(implementation: str = "sdpa") -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return set_implementation(T5ForConditionalGeneration(config).eval(), implementation)


def bart(implementation: str = "sdpa") -> torch.nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return set_implementation(BartForConditionalGeneration(config).eval(), implementation)


def set_implementation(model: torch.nn.Module, implementation: str) -> torch.nn.Module:
    """T5's encoder and decoder stacks hold copies of the config: each attention reads its own."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    for config in configs.values():
        config._attn_implementation = implementation
    return model


ENCODER_DECODER_TARGETS = {
    "t5": ["SelfAttention", "EncDecAttention"],
    "bart": ["self_attn", "encoder_attn"],
}


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_prefix_on_encoder_decoders_equals_a_hand_written_reference(family, implementation):
    """Every self- and cross-attention gets its own heads' prefix; T5's relative position bias stays on real keys."""
    torch.manual_seed(0)
    model = {"t5": t5, "bart": bart}[family](implementation)
    target = ENCODER_DECODER_TARGETS[family]
    peftkit.attach(model, {"adapters": {"p": [{"method": "prefix", "length": 3, "target": target}]}})
    randomise_adapters(model)
    reference = set_implementation(copy.deepcopy(model), "reference_prefix")
    ids, mask = padded_batch([6, 3], "left", torch.Generator().manual_seed(3))
    decoder_ids = torch.randint(2, 128, (2, 4))
    source = mask.bool()
    _PADDING["of"] = lambda module, kv_len: torch.ones(2, kv_len) if module.is_causal else mask
    try:
        inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
        got, expected = model(**inputs), reference(**inputs)
    finally:
        del _PADDING["of"]
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
    encoded = got.encoder_last_hidden_state
    torch.testing.assert_close(encoded[source], expected.encoder_last_hidden_state[source], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("gate", [False, True])
def test_prefix_on_encoder_decoders_generates_with_cache_as_stepwise_argmax(family, gate):
    torch.manual_seed(0)
    model = {"t5": t5, "bart": bart}[family]()
    target = ENCODER_DECODER_TARGETS[family]
    peftkit.attach(model, {"adapters": {"p": [{"method": "prefix", "length": 3, "target": target, "gate": gate}]}})
    randomise_adapters(model)
    ids = torch.randint(2, 128, (1, 6))
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    running = generated[:, :1]
    for _ in range(5):
        logits = model(input_ids=ids, decoder_input_ids=running, use_cache=False).logits
        running = torch.cat([running, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, running)


def test_prefix_reads_each_attentions_own_heads():
    """BART's decoder has 2 heads of 16 where its encoder has 4 of 8: each layer's prefix has its own shape."""
    model = bart()
    peftkit.attach(model, {"adapters": {"p": [{"method": "prefix", "length": 3, "target": "self_attn"}]}})
    shapes = {
        path.rsplit(".peftkit_adapters", 1)[0]: tuple(p.shape)
        for path, p in model.named_parameters()
        if path.endswith("prefix_keys")
    }
    assert shapes == {"model.encoder.layers.0.self_attn": (4, 3, 8), "model.decoder.layers.0.self_attn": (2, 3, 16)}


def test_attention_whose_heads_disagree_with_its_projections_is_refused():
    model = build("llama", 2)
    attention = model.model.layers[0].self_attn
    attention.k_proj = torch.nn.Linear(32, 24, bias=False)  # 3 heads of 8 where num_key_value_groups says 2
    with pytest.raises(peftkit.TargetingError, match=r"model\.layers\.0\.self_attn.*k_proj.*24"):
        peftkit.plan(model, {"adapters": {"p": [{"method": "prefix"}]}})
    del attention.head_dim
    with pytest.raises(peftkit.TargetingError, match=r"model\.layers\.0\.self_attn.*head size"):
        peftkit.plan(model, {"adapters": {"p": [{"method": "prefix"}]}})


def test_prefix_that_does_not_fit_the_keys_is_a_peftkit_error_not_a_torch_error():
    """A guard in the attend path: whatever got out of step (a hand-edited prefix here), the error names it."""
    model = build("llama", 2)
    peftkit.attach(model, {"adapters": {"p": [{"method": "prefix", "length": 3}]}})
    adapter = model.model.layers[0].self_attn.peftkit_adapters["p"]
    adapter.prefix_keys = torch.nn.Parameter(torch.zeros(4, 3, 8))  # 4 heads where the keys have 2
    with pytest.raises(peftkit.AttachError, match=r"prefix.*4 heads.*keys.*2 heads"):
        model(input_ids=torch.randint(2, 128, (1, 4)))
