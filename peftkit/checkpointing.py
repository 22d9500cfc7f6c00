"""Training checkpoints that survive a crash at any moment.

A checkpoint is a folder: ``adapter.safetensors`` + ``spec.json`` (as :func:`peftkit.save` writes them) and
``state.pt`` (step, scheduler, the optimiser state keyed by parameter name so that any number of processes can
resume it, and one set of RNG states per process: tensors and plain numbers, read back with
``torch.load(weights_only=True)``, which unpickles no code). It is written as ``checkpoint.new/`` with every file
fsynced and a ``COMPLETE`` marker last, then swapped in by two renames (``checkpoint`` -> ``checkpoint.old``,
``checkpoint.new`` -> ``checkpoint``). Whatever instant a crash hits, one complete checkpoint remains:
:func:`latest` finds it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

MARKER = "COMPLETE"


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as stream:
            os.fsync(stream.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write(output: Path, save_adapters, state: dict[str, Any]) -> Path:
    """Write a checkpoint under ``output`` atomically; ``save_adapters(folder)`` writes the adapter files."""
    new, current, old = output / "checkpoint.new", output / "checkpoint", output / "checkpoint.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    save_adapters(new)
    torch.save(state, new / "state.pt")
    (new / MARKER).write_text(str(state.get("step", "")))
    _fsync_tree(new)
    if current.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(current, old)
    os.replace(new, current)
    shutil.rmtree(old, ignore_errors=True)
    return current


def latest(output: Path) -> Path | None:
    """The newest complete checkpoint under ``output``, whatever moment a previous run stopped at."""
    for name in ("checkpoint", "checkpoint.old"):
        folder = output / name
        if (folder / MARKER).is_file():
            return folder
    return None


def read_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / "state.pt", weights_only=True)
