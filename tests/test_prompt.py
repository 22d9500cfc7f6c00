"""Prompt tuning and P-tuning: virtual tokens before the input embeddings, with masks, labels and generate()."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peftkit
from peftkit.testing import randomise_adapters
from peftkit.zoo import TINY_MODELS


def build(family: str) -> torch.nn.Module:
    return TINY_MODELS[f"{family}-tiny"]().eval()


def adapter_of(model: torch.nn.Module):
    return model.get_input_embeddings().peftkit_adapters["p"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_virtual_tokens_equal_prepending_embeddings_by_hand(family, method):
    torch.manual_seed(0)
    model = build(family)
    base = copy.deepcopy(model)
    peftkit.attach(model, {"adapters": {"p": [{"method": method, "length": 3}]}})
    randomise_adapters(model)
    ids = torch.randint(2, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    virtual = adapter_of(model).virtual_tokens().detach()
    embeds = torch.cat([virtual.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    wide_mask = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], dim=1)
    expected = base(inputs_embeds=embeds, attention_mask=wide_mask)[0]
    got = model(input_ids=ids, attention_mask=mask)[0]
    assert got.shape[1] == 3 + 6
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_labels_of_virtual_positions_are_ignored(family):
    torch.manual_seed(0)
    model = build(family)
    base = copy.deepcopy(model)
    peftkit.attach(model, {"adapters": {"p": [{"method": "prompt", "length": 4}]}})
    ids = torch.randint(2, 128, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss
    virtual = adapter_of(model).virtual_tokens().detach()
    embeds = torch.cat([virtual.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    labels = torch.cat([torch.full((2, 4), -100), ids], dim=1)
    torch.testing.assert_close(loss, base(inputs_embeds=embeds, labels=labels).loss)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_greedy_generate_with_cache_equals_stepwise_argmax(family, method):
    torch.manual_seed(0)
    model = build(family)
    peftkit.attach(model, {"adapters": {"p": [{"method": method, "length": 4}]}})
    randomise_adapters(model)
    ids = torch.randint(2, 128, (1, 5))
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    running = ids
    for _ in range(6):
        next_token = model(input_ids=running, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        running = torch.cat([running, next_token], dim=1)
    assert torch.equal(generated, running)


def test_left_padded_generation_matches_each_row_alone():
    torch.manual_seed(0)
    model = build("llama")
    peftkit.attach(model, {"adapters": {"p": [{"method": "prompt", "length": 3}]}})
    randomise_adapters(model)
    ids = torch.randint(2, 128, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for row in range(2):
        alone = ids[row : row + 1, mask[row].bool()]
        single = model.generate(alone, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[row, -4:], single[0, -4:])


def test_initialisation_from_vocabulary_and_from_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "the": 5, "movie": 9, "was": 17}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path)
    for fields, ids in [
        ({"init": "vocab", "init_tokens": [7, 11]}, [7, 11, 7, 11, 7]),
        ({"init": "text", "init_text": "the movie was", "tokenizer": str(tmp_path)}, [5, 9, 17, 5, 9]),
    ]:
        model = build("llama")
        peftkit.attach(model, {"adapters": {"p": [{"method": "prompt", "length": 5, **fields}]}})
        rows = model.get_input_embeddings().weight[torch.tensor(ids)]
        assert torch.equal(adapter_of(model).prompt_embedding, rows)
    with pytest.raises(peftkit.SpecError, match="init: vocab needs init_tokens"):
        peftkit.Spec.model_validate({"adapters": {"p": [{"method": "prompt", "init": "vocab"}]}})


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_encoder_folds_for_inference_and_saving(encoder, tmp_path):
    torch.manual_seed(0)
    model = build("gpt2")
    peftkit.attach(model, {"adapters": {"p": [{"method": "ptuning", "length": 4, "encoder": encoder}]}})
    randomise_adapters(model)
    ids = torch.randint(2, 128, (2, 5))
    before = model(input_ids=ids).logits
    peftkit.fold(model)
    assert peftkit.trainable_parameters(model).trainable == 4 * 32
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)
    peftkit.save(model, tmp_path)
    assert peftkit.read_spec(tmp_path).adapters["p"][0].encoder == "none"
    torch.manual_seed(0)
    fresh = peftkit.load(build("gpt2"), tmp_path)
    torch.testing.assert_close(fresh(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)


def test_virtual_tokens_only_before_the_input_embeddings():
    with pytest.raises(peftkit.TargetingError, match="virtual tokens go before the model's input embeddings"):
        peftkit.plan(build("gpt2"), {"adapters": {"p": [{"method": "prompt", "target": "wpe"}]}})


def test_a_sequence_classifier_keeps_its_per_sequence_labels():
    """Labels of shape (batch,) belong to whole sequences: nothing to pad, and the loss is the head's."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    )
    peftkit.attach(model, {"adapters": {"default": [{"method": "prompt", "length": 3}]}})
    ids, labels = torch.randint(0, 100, (4, 6)), torch.tensor([0, 1, 1, 0])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits, labels)
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert model.bert.embeddings.word_embeddings.peftkit_adapters["default"].prompt_embedding.grad is not None


# -- virtual tokens after the left pads: a padded row computes what it computes alone ------------------------------


def sliding_window_model(family: str, window: int) -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    fields = dict(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        sliding_window=window,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**fields, use_sliding_window=True, max_window_layers=0)).eval()
    return MistralForCausalLM(MistralConfig(**fields)).eval()


def left_padded(rows: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(rows)
    ids = torch.randint(2, 128, (len(rows), width), generator=generator)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, n in enumerate(rows):
        mask[i, width - n :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@settings(max_examples=max(settings.default.max_examples // 3, 8))
@given(
    family=st.sampled_from(["mistral", "qwen2", "llama"]),
    window=st.integers(2, 6),
    rows=st.lists(st.integers(1, 8), min_size=2, max_size=3),
    length=st.integers(1, 4),
    method=st.sampled_from(["prompt", "ptuning"]),
    seed=st.integers(0, 100),
)
def test_left_padded_rows_equal_each_row_alone(family, window, rows, length, method, seed):
    """Virtual tokens sit right before each row's first real token, so sliding windows see what the row alone sees."""
    torch.manual_seed(seed)
    model = sliding_window_model(family, window) if family != "llama" else build("llama")
    peftkit.attach(model, {"adapters": {"p": [{"method": method, "length": length}]}})
    randomise_adapters(model, seed)
    ids, mask = left_padded(rows, torch.Generator().manual_seed(seed))
    labels = ids.masked_fill(mask == 0, -100)
    batch = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), labels=labels)
    losses = []
    for row in range(len(rows)):
        keep = mask[row].bool()
        alone = model(input_ids=ids[row : row + 1, keep], labels=ids[row : row + 1, keep])
        real = torch.cat([torch.zeros(ids.shape[1] - rows[row], dtype=torch.bool), torch.ones(length + rows[row])])
        torch.testing.assert_close(batch.logits[row][real.bool()], alone.logits[0], rtol=1e-4, atol=1e-5)
        losses.append(alone.loss)
    if len(set(rows)) == 1:  # rows of one length weigh alike in the batch's mean loss
        torch.testing.assert_close(batch.loss, torch.stack(losses).mean(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_left_padded_generation_with_a_sliding_window_matches_each_row_alone(family):
    torch.manual_seed(0)
    model = sliding_window_model(family, 3)
    peftkit.attach(model, {"adapters": {"p": [{"method": "prompt", "length": 3}]}})
    randomise_adapters(model)
    ids, mask = left_padded([6, 2, 4], torch.Generator().manual_seed(1))
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row in range(3):
        alone = ids[row : row + 1, mask[row].bool()]
        single = model.generate(alone, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[row, -6:], single[0, -6:])


def test_virtual_tokens_go_after_the_left_pads_in_every_input():
    """The layout a left-padded row gets: pads, virtual tokens, real tokens, in the mask, labels and types alike."""
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=128)
    ).eval()
    peftkit.attach(model, {"adapters": {"p": [{"method": "prompt", "length": 2}]}})
    seen = {}
    model.bert.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    ids, mask = torch.tensor([[7, 8, 9], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    types, labels = torch.tensor([[1, 0, 1], [0, 1, 1]]), torch.tensor([[-100, 3, 4], [5, 6, 7]])
    model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert seen["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert seen["token_type_ids"].tolist() == [[1, 0, 0, 0, 1], [0, 0, 0, 1, 1]]
    embeds, virtual = seen["inputs_embeds"], adapter_of(model).virtual_tokens()
    assert torch.equal(embeds[0, 1:3], virtual) and torch.equal(embeds[1, 0:2], virtual)
    words = model.get_input_embeddings()
    assert torch.equal(embeds[0, [0, 3, 4]], words(ids[0])) and torch.equal(embeds[1, 2:], words(ids[1]))


# -- encoder-decoders: virtual tokens on the encoder input; the decoder and its labels as they were ---------------


def encoder_decoder(family: str) -> torch.nn.Module:
    from test_prefix import bart, t5

    return {"t5": t5, "bart": bart}[family]()


EMBEDDINGS = {"t5": "shared", "bart": "model.shared"}


def encoder_inputs_by_hand(model, base, ids, mask, length):
    """The encoder input with the virtual tokens after each row's left pads, and its mask, built by hand."""
    virtual = adapter_of(model).virtual_tokens().detach()
    words = base.get_encoder().get_input_embeddings()(ids)
    embeds, wide = [], []
    for row in range(ids.shape[0]):
        start = int(mask[row].argmax())
        embeds.append(torch.cat([words[row, :start], virtual, words[row, start:]]))
        wide.append(torch.cat([mask[row, :start], torch.ones(length, dtype=mask.dtype), mask[row, start:]]))
    return torch.stack(embeds), torch.stack(wide)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_virtual_tokens_on_an_encoder_decoder_go_on_the_encoder_input_only(family, method):
    torch.manual_seed(0)
    model = encoder_decoder(family)
    base = copy.deepcopy(model)
    peftkit.attach(model, {"adapters": {"p": [{"method": method, "length": 3, "target": EMBEDDINGS[family]}]}})
    randomise_adapters(model)
    ids, mask = left_padded([6, 4], torch.Generator().manual_seed(0))
    labels = torch.randint(2, 128, (2, 5))
    embeds, wide = encoder_inputs_by_hand(model, base, ids, mask, 3)
    expected = base(inputs_embeds=embeds, attention_mask=wide, labels=labels)
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits.shape[:2] == labels.shape  # the decoder and its labels are the user's
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    assert got.encoder_last_hidden_state.shape[1] == 6 + 3


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_generate_with_cache_matches_stepwise_argmax_and_each_row_alone(family):
    torch.manual_seed(0)
    model = encoder_decoder(family)
    peftkit.attach(model, {"adapters": {"p": [{"method": "prompt", "length": 3, "target": EMBEDDINGS[family]}]}})
    randomise_adapters(model)
    ids, mask = left_padded([6, 3], torch.Generator().manual_seed(1))
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    running = generated[:, :1]
    for _ in range(5):
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=running, use_cache=False).logits
        running = torch.cat([running, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, running)
    for row in range(2):
        alone = ids[row : row + 1, mask[row].bool()]
        single = model.generate(alone, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert torch.equal(generated[row], single[0])


def test_virtual_tokens_are_refused_on_an_encoder_that_reads_no_token_ids():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    spec = {"adapters": {"p": [{"method": "prompt", "target": "model.decoder.embed_tokens"}]}}
    with pytest.raises(peftkit.TargetingError, match=r"WhisperForConditionalGeneration.*input_features.*not token ids"):
        peftkit.plan(WhisperForConditionalGeneration(config), spec)
