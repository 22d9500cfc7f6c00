"""Peer libraries run in the same harness, on the same spec, for a like-for-like comparison.

Only HF PEFT's LoRA for now: a peftkit spec with one adapter holding one ``lora`` entry is translated to a
``peft.LoraConfig``. Anything it cannot express exactly is refused rather than approximated.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from peftkit_benchmarks.compare.experiment import Arm
from torch import nn


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def lora_entry(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The single LoRA entry of a spec, or None when the spec is anything else."""
    adapters = spec.get("adapters", {})
    if len(adapters) != 1:
        return None
    (entries,) = adapters.values()
    entries = [entries] if isinstance(entries, dict) else entries
    if len(entries) != 1 or entries[0].get("method") != "lora":
        return None
    return entries[0]


def peer_arms(arms: list[Arm]) -> list[Arm]:
    """A ``<name>-peft`` twin of every single-LoRA arm, with the same hyperparameters."""
    twins = []
    for arm in arms:
        if arm.spec is not None and arm.peer is None and lora_entry(arm.spec) is not None:
            twins.append(arm.model_copy(update={"name": f"{arm.name}-peft", "peer": "peft"}))
    return twins


def peft_model(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Wrap ``model`` with PEFT's LoRA configured like the peftkit spec."""
    from peft import LoraConfig, get_peft_model

    entry = lora_entry(spec)
    if entry is None:
        raise ValueError("--peer peft runs only arms whose spec has one adapter with one `lora` entry")
    unsupported = set(entry) - {"method", "target", "r", "alpha", "dropout", "rslora"}
    targets = entry.get("target", [])
    targets = [targets] if isinstance(targets, str) else list(targets)
    if unsupported or any(t.startswith("re:") or "*" in t for t in targets):
        raise ValueError(
            f"cannot translate LoRA entry {entry} to PEFT exactly (fields {sorted(unsupported)} or a regex/glob "
            "target); use plain module names"
        )
    config = LoraConfig(
        r=entry.get("r", 8),
        lora_alpha=entry.get("alpha", 16),
        lora_dropout=entry.get("dropout", 0.0),
        use_rslora=entry.get("rslora", False),
        target_modules=targets,
        modules_to_save=list(spec.get("trainable", [])) or None,
    )
    return get_peft_model(model, config)
