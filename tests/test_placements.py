"""Named places (`@query`, `@ffn`...) are found from a model's structure, on every transformers family that has them.

Each family is a tiny model built from its config. For each: layer 0's module paths per place, and that LoRA on
`@query`+`@value`, IA3 with its defaults and bottleneck adapters on `@ffn` attach and leave the output unchanged
at init; a place the family lacks is refused with the place, the model class and what to do instead.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel

import peftkit
from peftkit.patterns import compile_pattern
from peftkit.sites.placements import PLACEMENT_NAMES, places_of

transformers.logging.set_verbosity_error()

# The smallest sizes every family accepts; each family's config takes the keys it knows.
TINY = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 32,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
    # other spellings of the same sizes
    "n_embd": 16,
    "n_inner": 32,
    "n_layer": 2,
    "n_head": 2,
    "n_positions": 32,
    "d_model": 16,
    "d_ff": 32,
    "d_kv": 8,
    "num_layers": 2,
    "num_heads": 2,
    "ffn_dim": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "embedding_size": 16,
    "emb_dim": 16,
    "rotary_dim": 4,
    "dim": 16,
    "hidden_dim": 32,
    "n_layers": 2,
    "n_heads": 2,
    "max_seq_len": 32,
    # vision and audio
    "image_size": 8,
    "patch_size": 4,
    "num_channels": 3,
    "num_mel_bins": 8,
    "max_source_positions": 8,
    "max_target_positions": 32,
    # mixtures of experts
    "num_local_experts": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
}
OVERRIDES = {
    "deepseek_v3": {
        "n_routed_experts": 4,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 8,
        "q_lora_rank": 8,
        "qk_rope_head_dim": 4,
        "head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 8,
        "n_group": 1,
        "topk_group": 1,
    },
    "bloom": {"n_head": 2},
}


def tiny_model(family: str) -> torch.nn.Module:
    known = AutoConfig.for_model(family)
    names = set(known.to_dict()) | set(getattr(known, "attribute_map", {}))
    fields = {k: v for k, v in TINY.items() if k in names} | OVERRIDES.get(family, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(family, **fields)
        torch.manual_seed(0)
        return AutoModel.from_config(config).eval()


def inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    config = model.config
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 5), generator=generator)
    if config.model_type == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=generator)}
    if config.model_type == "whisper":
        features = torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions, generator=generator)
        return {"input_features": features, "decoder_input_ids": ids}
    if config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    return {"input_ids": ids}


# Layer 0's module paths per place (several for an encoder-decoder's two stacks); None: the family has no such place.
LLAMA_LIKE = {
    "input_embeddings": ["embed_tokens"],
    "query": ["layers.0.self_attn.q_proj"],
    "key": ["layers.0.self_attn.k_proj"],
    "value": ["layers.0.self_attn.v_proj"],
    "self_attention": ["layers.0.self_attn"],
    "attention": ["layers.0.self_attn"],
    "attention_output": ["layers.0.self_attn.o_proj"],
    "ffn": ["layers.0.mlp"],
    "ffn_output": ["layers.0.mlp.down_proj"],
}
BERT_LIKE = {
    "input_embeddings": ["embeddings.word_embeddings"],
    "query": ["encoder.layer.0.attention.self.query"],
    "key": ["encoder.layer.0.attention.self.key"],
    "value": ["encoder.layer.0.attention.self.value"],
    "self_attention": ["encoder.layer.0.attention.self"],
    "attention": ["encoder.layer.0.attention.output.dense"],  # BertSelfOutput adds the residual after its dense
    "attention_output": ["encoder.layer.0.attention.output.dense"],
    "ffn": ["encoder.layer.0.output.dense"],
    "ffn_output": ["encoder.layer.0.output.dense"],
}


def _fused(prefix: str, fused: str, output: str, ffn: str, ffn_output: str, embeddings: str) -> dict:
    return {
        "input_embeddings": [embeddings],
        **{place: [f"{prefix}.{fused}"] for place in ("query", "key", "value")},
        "self_attention": [prefix],
        "attention": [prefix],
        "attention_output": [f"{prefix}.{output}"],
        "ffn": [ffn],
        "ffn_output": [ffn_output],
    }


def _seq2seq(encoder: str, decoder: str, ffn: str, ffn_output: str, attention: str = "self_attn") -> dict:
    def both(suffix: str) -> list[str]:
        return [f"{encoder}.{suffix}", f"{decoder}.{suffix}"]

    return {
        "query": both(f"{attention}.q_proj"),
        "key": both(f"{attention}.k_proj"),
        "value": both(f"{attention}.v_proj"),
        "self_attention": both(attention),
        "attention": both(attention),
        "attention_output": both(f"{attention}.out_proj"),
        "ffn": both(ffn),
        "ffn_output": both(ffn_output),
    }


EXPECTED: dict[str, dict[str, list[str] | None]] = {
    "gpt2": _fused("h.0.attn", "c_attn", "c_proj", "h.0.mlp", "h.0.mlp.c_proj", "wte"),
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "gemma": LLAMA_LIKE,
    "phi3": _fused(
        "layers.0.self_attn", "qkv_proj", "o_proj", "layers.0.mlp", "layers.0.mlp.down_proj", "embed_tokens"
    ),
    "opt": {
        "input_embeddings": ["decoder.embed_tokens"],
        # fc1/fc2 sit on the layer: the feed-forward sub-layer is fc2, its input read at fc1
        **{k: v[:1] for k, v in _seq2seq("decoder.layers.0", "-", "fc2", "fc2").items()},
    },
    "gpt_neox": _fused(
        "layers.0.attention", "query_key_value", "dense", "layers.0.mlp", "layers.0.mlp.dense_4h_to_h", "embed_in"
    ),
    "falcon": _fused(
        "h.0.self_attention", "query_key_value", "dense", "h.0.mlp", "h.0.mlp.dense_4h_to_h", "word_embeddings"
    ),
    "bloom": {
        **_fused("h.0.self_attention", "query_key_value", "dense", "-", "h.0.mlp.dense_4h_to_h", "word_embeddings"),
        # BLOOM's attention and MLP take the residual and add it: the sub-layers are their output projections
        "attention": ["h.0.self_attention.dense"],
        "ffn": ["h.0.mlp.dense_4h_to_h"],
    },
    "bert": BERT_LIKE,
    "roberta": BERT_LIKE,
    "electra": BERT_LIKE,
    "deberta-v2": {
        **BERT_LIKE,
        "query": ["encoder.layer.0.attention.self.query_proj"],
        "key": ["encoder.layer.0.attention.self.key_proj"],
        "value": ["encoder.layer.0.attention.self.value_proj"],
    },
    "distilbert": {
        "input_embeddings": ["embeddings.word_embeddings"],
        "query": ["transformer.layer.0.attention.q_lin"],
        "key": ["transformer.layer.0.attention.k_lin"],
        "value": ["transformer.layer.0.attention.v_lin"],
        "self_attention": ["transformer.layer.0.attention"],
        "attention": ["transformer.layer.0.attention"],
        "attention_output": ["transformer.layer.0.attention.out_lin"],
        "ffn": ["transformer.layer.0.ffn"],
        "ffn_output": ["transformer.layer.0.ffn.lin2"],
    },
    "albert": {  # AlbertAttention adds the residual itself; the FFN's two projections sit on the layer
        "input_embeddings": ["embeddings.word_embeddings"],
        **{
            place: [f"encoder.albert_layer_groups.0.albert_layers.0.{suffix}"]
            for place, suffix in {
                "query": "attention.query",
                "key": "attention.key",
                "value": "attention.value",
                "self_attention": "attention",
                "attention": "attention.dense",
                "attention_output": "attention.dense",
                "ffn": "ffn_output",
                "ffn_output": "ffn_output",
            }.items()
        },
    },
    "t5": {  # self-attention only (not EncDecAttention); the feed-forward is DenseReluDense inside T5LayerFF
        "input_embeddings": ["shared"],
        **{
            place: [f"encoder.block.0.layer.0.SelfAttention{s}", f"decoder.block.0.layer.0.SelfAttention{s}"]
            for place, s in {"query": ".q", "key": ".k", "value": ".v", "self_attention": "", "attention": ""}.items()
        },
        "attention_output": ["encoder.block.0.layer.0.SelfAttention.o", "decoder.block.0.layer.0.SelfAttention.o"],
        "ffn": ["encoder.block.0.layer.1.DenseReluDense", "decoder.block.0.layer.2.DenseReluDense"],
        "ffn_output": ["encoder.block.0.layer.1.DenseReluDense.wo", "decoder.block.0.layer.2.DenseReluDense.wo"],
    },
    "bart": {"input_embeddings": ["shared"], **_seq2seq("encoder.layers.0", "decoder.layers.0", "fc2", "fc2")},
    "whisper": {
        "input_embeddings": ["decoder.embed_tokens"],
        **_seq2seq("encoder.layers.0", "decoder.layers.0", "fc2", "fc2"),
    },
    "vit": {
        "input_embeddings": None,  # patch embeddings, not a token embedding
        "query": ["layers.0.attention.q_proj"],
        "key": ["layers.0.attention.k_proj"],
        "value": ["layers.0.attention.v_proj"],
        "self_attention": ["layers.0.attention"],
        "attention": ["layers.0.attention"],
        "attention_output": ["layers.0.attention.o_proj"],
        "ffn": ["layers.0.mlp"],
        "ffn_output": ["layers.0.mlp.fc2"],
    },
    "gptj": {
        **_fused("h.0.attn", "q_proj", "out_proj", "h.0.mlp", "h.0.mlp.fc_out", "wte"),
        "key": ["h.0.attn.k_proj"],
        "value": ["h.0.attn.v_proj"],
    },
    "xlm": {  # the exceptions table: a layer's attention and feed-forward sit in parallel lists
        "input_embeddings": ["embeddings"],
        "query": ["attentions.0.q_lin"],
        "key": ["attentions.0.k_lin"],
        "value": ["attentions.0.v_lin"],
        "self_attention": ["attentions.0"],
        "attention": ["attentions.0"],
        "attention_output": ["attentions.0.out_lin"],
        "ffn": ["ffns.0"],
        "ffn_output": ["ffns.0.lin2"],
    },
    "mixtral": {**LLAMA_LIKE, "ffn_output": None},  # the experts' projections are fused 3-D parameters
    "qwen2_moe": {**LLAMA_LIKE, "ffn_output": None},
    "deepseek_v3": {  # multi-head latent attention: the up-projections are the query and the keys and values
        **LLAMA_LIKE,
        "query": ["layers.0.self_attn.q_b_proj"],
        "key": ["layers.0.self_attn.kv_b_proj"],
        "value": ["layers.0.self_attn.kv_b_proj"],
        "ffn_output": None,  # layer 1 is a mixture of experts with fused expert weights
    },
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only waits for the first (20-40x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def family(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, tiny_model(request.param)


def _first_layer(path: str) -> bool:
    """In layer 0 of its stack: the first list index on the path is 0 (T5's sub-layer index may be anything)."""
    indices = [part for part in path.split(".") if part.isdigit()]
    return not indices or indices[0] == "0"


def test_places_resolve_to_the_family_modules(family) -> None:
    name, model = family
    places = places_of(model)
    paths = [p for p, _ in model.named_modules() if p]
    for place in PLACEMENT_NAMES:
        if place == "block":
            continue  # test_block_is_each_repeated_block_holding_an_attention below
        expected = EXPECTED[name][place]
        if expected is None:
            with pytest.raises(peftkit.TargetingError, match=rf"'@{place}'.*{type(model).__name__}.*explicit module"):
                places.pattern(place)
            continue
        match = compile_pattern(places.pattern(place))
        found = [p for p in paths if match(p)]
        assert [p for p in found if _first_layer(p)] == expected, (name, place, found)
        layers = 1 if place == "input_embeddings" or name == "albert" else 2  # ALBERT shares one layer
        assert len(found) == layers * len(expected), (name, place, found)


def test_block_is_each_repeated_block_holding_an_attention(family) -> None:
    name, model = family
    places = places_of(model)
    modules = dict(model.named_modules())
    lists = {path for path, module in modules.items() if isinstance(module, torch.nn.ModuleList)}
    if name == "xlm":  # attentions and feed-forwards in parallel lists: no one module is a block
        with pytest.raises(peftkit.TargetingError, match="'@block'"):
            places.pattern("block")
        return
    attention = compile_pattern(places.pattern("self_attention")) if EXPECTED[name]["self_attention"] else None
    blocks = [p for p in modules if p and compile_pattern(places.pattern("block"))(p)]
    assert blocks, name
    for block in blocks:
        assert block.rpartition(".")[0] in lists, (name, block)  # an entry of a list of repeated blocks
        if attention is not None:
            assert any(attention(p) for p in modules if p.startswith(block + ".")), (name, block)


def _output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch)[0]


SPECS = {
    "lora": [{"method": "lora", "target": ["@query", "@value"], "r": 2}],
    "ia3": [{"method": "ia3"}],
    "pfeiffer": [{"method": "pfeiffer", "target": "@ffn", "bottleneck": 4}],
    "parallel": [{"method": "parallel", "bottleneck": 4}],
}
# What each method needs, in EXPECTED's terms.
NEEDS = {"lora": ("query", "value"), "ia3": ("key", "value", "ffn_output"), "pfeiffer": ("ffn",), "parallel": ("ffn",)}


@pytest.mark.parametrize("method", sorted(SPECS))
def test_attaching_on_places_is_identity_at_init(family, method: str) -> None:
    name, model = family
    spec = {"adapters": {method: SPECS[method]}}
    missing = [place for place in NEEDS[method] if EXPECTED[name][place] is None]
    if missing:
        with pytest.raises(peftkit.TargetingError, match=rf"'@{missing[0]}'.*{type(model).__name__}"):
            peftkit.plan(model, spec)
        return
    batch = inputs(model)
    before = _output(model, batch)
    peftkit.attach(model, spec)
    try:
        torch.testing.assert_close(_output(model, batch), before, rtol=0, atol=1e-6)
    finally:
        peftkit.detach(model)
    torch.testing.assert_close(_output(model, batch), before, rtol=0, atol=0)


def test_a_place_the_model_lacks_is_refused_with_what_to_do() -> None:
    model = tiny_model("vit")
    with pytest.raises(peftkit.TargetingError) as refused:
        peftkit.plan(model, {"adapters": {"p": [{"method": "prompt", "length": 2}]}})
    message = str(refused.value)
    assert "@input_embeddings" in message and "ViTModel" in message and "ViTPatchEmbeddings" in message
    assert "give explicit module paths" in message


def test_cross_attention_is_not_a_self_attention_place() -> None:
    model = tiny_model("bart")
    plan = peftkit.plan(model, {"adapters": {"l": [{"method": "lora", "target": ["@query", "@attention_output"]}]}})
    assert plan.rows and not any("encoder_attn" in row.path for row in plan.rows)
    cross = peftkit.plan(model, {"adapters": {"l": [{"method": "lora", "target": "encoder_attn.q_proj"}]}})
    assert [row.path for row in cross.rows] == [
        "decoder.layers.0.encoder_attn.q_proj",
        "decoder.layers.1.encoder_attn.q_proj",
    ]


def test_a_parallel_adapter_reads_the_sublayer_input_where_the_family_computes_it() -> None:
    """OPT's fc1/fc2 sit on the layer: the adapter on fc2 reads fc1's input, f(x) + s * up(act(down(x)))."""
    model = tiny_model("opt")
    places = places_of(model)
    assert places.sublayer_input_path("decoder.layers.1.fc2") == "decoder.layers.1.fc1"
    assert places.sublayer_input_path("decoder.layers.1.self_attn") == "decoder.layers.1.self_attn"
    bloom = places_of(tiny_model("bloom"))
    assert bloom.sublayer_input_path("h.0.mlp.dense_4h_to_h") == "h.0.mlp"
    assert bloom.sublayer_input_path("h.0.self_attention.dense") == "h.0.self_attention"


def test_the_hidden_size_of_a_sublayer_comes_from_its_block() -> None:
    """A mixture of experts' first and last projections are its router and a shared expert's gate (16 -> 1)."""
    places = places_of(tiny_model("qwen2_moe"))
    assert places.hidden_size("layers.0.mlp") == 16
    assert places.hidden_size("layers.0.self_attn") == 16
    assert places.hidden_size("layers.0.mlp.shared_expert_gate") is None  # not a sub-layer host
