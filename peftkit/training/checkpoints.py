"""Training checkpoints that survive a crash at any moment.

A checkpoint is a folder: ``adapter.safetensors`` + ``spec.json`` (as :func:`peftkit.save` writes them) and
``state.safetensors`` (step, scheduler, the optimiser state keyed by parameter name so that any number of processes
can resume it, and one set of RNG states per process: tensors in safetensors, the numbers around them as JSON in
its metadata, so nothing is unpickled; see :mod:`peftkit.training.state_file`). It is written as ``checkpoint.new/`` with every file
fsynced and a ``COMPLETE`` marker last, then swapped in by two renames (``checkpoint`` -> ``checkpoint.old``,
``checkpoint.new`` -> ``checkpoint``). Whatever instant a crash hits, one complete checkpoint remains:
:func:`latest` finds it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from peftkit.errors import CheckpointError
from peftkit.training.state_file import read_tree, write_tree

MARKER = "COMPLETE"
STATE_FILE = "state.safetensors"
PICKLED_STATE_FILE = "state.pt"  # what peftkit 0.1 wrote; no longer read


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
    write_tree(new / STATE_FILE, state)
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


def read_state(folder: Path, steps: int) -> dict[str, Any]:
    """The training state in ``folder``, checked for the fields resuming reads; ``steps`` is the run's length."""
    path = folder / STATE_FILE
    if not path.is_file() and (folder / PICKLED_STATE_FILE).is_file():
        raise CheckpointError(
            f"{str(folder)!r} holds a pickled state.pt from an older peftkit, which is no longer read; "
            "remove the checkpoint to train afresh, or finish the run with the peftkit that wrote it"
        )
    state = read_tree(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, not a training state")
    missing = sorted({"step", "optimizer", "scheduler", "rng"} - set(state))
    if missing:
        raise CheckpointError(f"{str(path)!r} lacks {missing}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= steps:
        raise CheckpointError(
            f"{str(path)!r} is at step {step!r}, but this run has {steps} steps; a checkpoint's step is a whole "
            "number from 0 to the run's steps (raise steps to train on, or choose another output)"
        )
    if not isinstance(state["optimizer"], dict) or not isinstance(state["scheduler"], dict):
        raise CheckpointError(f"{str(path)!r}: the optimizer and scheduler states must be dictionaries")
    rng = state["rng"]
    if not isinstance(rng, list) or not rng or not all(isinstance(r, dict) and "torch" in r for r in rng):
        raise CheckpointError(f"{str(path)!r}: rng must be a non-empty list of per-process RNG states")
    return state
