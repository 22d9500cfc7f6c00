"""Tiny models built from configs, for tests, the conformance suite and the CLI's dry runs.

Nothing here downloads weights: every model is built from a config with random weights, or on the meta device
when only its structure matters (``peftkit plan`` on a 7B-shaped model costs no memory).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.io import read_json_object
from peftkit.quantization import Quantization, load_quantized, quantize_built_model, require_backend


def _gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = dict(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(GPT2Config(**{**fields, **overrides}))


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **overrides}))


def _bert(**overrides):
    from transformers import BertConfig, BertModel

    fields = dict(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(BertConfig(**{**fields, **overrides}))


def _roberta(**overrides):
    from transformers import RobertaConfig, RobertaModel

    fields = dict(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=70,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=1,
    )
    return RobertaModel(RobertaConfig(**{**fields, **overrides}))


def _qwen3_moe(**overrides):
    """Qwen3-MoE with 4 experts (2 per token) in every layer: its experts are fused 3-D parameters,
    ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I). The experts run transformers'
    eager loop (it runs in every dtype; the grouped-matmul kernel has no float64); ``experts_implementation=...``
    picks another."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    fields = dict(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        experts_implementation="eager",
    )
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**fields, **overrides}))


def _mlp(**overrides):
    sizes = overrides.get("sizes", (16, 32, 8))
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _llama_7b_shape(**overrides):
    """Llama-2-7B's shape (hidden 4096, 32 layers, intermediate 11008), for meta-device dry runs and benchmarks."""
    fields = dict(
        num_hidden_layers=32,
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    return _llama(**{**fields, **overrides})


TINY_MODELS: dict[str, Callable[..., nn.Module]] = {
    "gpt2-tiny": _gpt2,
    "llama-tiny": _llama,
    "bert-tiny": _bert,
    "roberta-tiny": _roberta,
    "qwen3-moe-tiny": _qwen3_moe,
    "mlp": _mlp,
    "llama-7b-shape": _llama_7b_shape,
}


MAX_CONFIG_BYTES = 4 * 1024 * 1024
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _read_config(config_file: Path) -> dict:
    """A transformers config.json, read as untrusted input: bounded size and depth, a JSON object with a model_type."""
    fields = read_json_object(config_file, MAX_CONFIG_BYTES, "a model folder holds config.json", PeftkitError)
    if not isinstance(fields.get("model_type"), str):
        raise PeftkitError(f"{str(config_file)!r} needs a 'model_type' string (it is not a transformers config)")
    return fields


def build_model(name_or_path: str, *, meta: bool = False) -> nn.Module:
    """A model by zoo name, or from a folder/file holding a transformers ``config.json`` (random weights)."""

    def construct() -> nn.Module:
        if name_or_path in TINY_MODELS:
            return TINY_MODELS[name_or_path]()
        path = Path(name_or_path)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise PeftkitError(
                f"model {name_or_path!r} is neither a zoo name ({', '.join(TINY_MODELS)}) nor a folder or file "
                "holding a transformers config.json"
            )
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        fields = _read_config(config_file)
        try:
            config = AutoConfig.for_model(**fields)
        except (ValueError, KeyError, TypeError) as error:
            raise PeftkitError(f"{str(config_file)!r} is not a config transformers can build: {error}") from None
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)

    if meta:
        with torch.device("meta"):
            return construct()
    return construct()


def load_model(
    name_or_path: str,
    *,
    pretrained: bool = False,
    quantization: Quantization | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """``build_model``, or with ``pretrained`` a local transformers folder's weights (never fetched from a hub).

    The class is the folder's first ``architectures`` entry when transformers knows it (so a sequence classifier
    keeps its head), else a causal LM. With ``quantization`` the model is loaded quantised onto ``device`` through
    transformers' ``quantization_config`` path (a built model is written to a temporary folder first); without it,
    ``device`` is ignored (the caller moves the model)."""
    if quantization is not None:
        require_backend(quantization.backend)  # before a large model is built or read
    if not pretrained:
        model = build_model(name_or_path)
        return model if quantization is None else quantize_built_model(model, quantization, device=device)
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise PeftkitError(f"model {name_or_path!r}: pretrained needs a local folder with config.json and weights")
    import transformers

    architectures = _read_config(path / "config.json").get("architectures") or []
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise PeftkitError(
            f"model {name_or_path!r}: pretrained needs the folder's weights ({' or '.join(WEIGHT_FILES[:2])}), and "
            "it holds none; save the model there with save_pretrained, or drop pretrained to use random weights"
        )
    first = architectures[0] if isinstance(architectures, list) and architectures else None
    model_class = getattr(transformers, first, None) if isinstance(first, str) else None
    if not (isinstance(model_class, type) and hasattr(model_class, "from_pretrained")):
        model_class = transformers.AutoModelForCausalLM
    if quantization is not None:
        return load_quantized(path, quantization, device=device, model_class=model_class)
    try:
        return model_class.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # damaged or mismatched weight files
        raise PeftkitError(f"model {name_or_path!r}: transformers could not load its weights: {error}") from None
