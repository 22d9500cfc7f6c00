"""Save and load adapters: safetensors for weights (never pickle) and the spec as JSON.

A checkpoint folder holds ``adapter.safetensors`` (the adapters' tensors and those of the spec's ``trainable``
modules, under the model's own state-dict keys) and ``spec.json``. Both files are untrusted on load: the spec goes
through the same validation as any other, the tensor file is checked key by key and shape by shape against what
the spec builds before a single value is copied, and any mismatch detaches what was attached.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from peftkit.attach import attach, detach, get_state, plan_trainable_paths, require_state
from peftkit.errors import CheckpointError, PeftkitError
from peftkit.spec import Spec
from peftkit.targeting import ADAPTER_CONTAINER

WEIGHTS_FILE = "adapter.safetensors"
SPEC_FILE = "spec.json"
MAX_SPEC_BYTES = 4 * 1024 * 1024


def _saved_parameters(model: nn.Module, adapter_names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """State-dict key -> tensor for every adapter parameter and every ``trainable`` module's parameter."""
    state = require_state(model)
    trainable_paths = plan_trainable_paths(model, state.spec)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        parts = name.split(".")
        if ADAPTER_CONTAINER in parts:
            owner = parts[parts.index(ADAPTER_CONTAINER) + 1]
            is_gate = owner[0].isdigit()  # a composition rule's gates (see peftkit.compose.gate_name)
            if adapter_names is None or owner in adapter_names or (is_gate and state.spec.compose):
                tensors[name] = tensor
        elif any(name.startswith(path + ".") for path in trainable_paths):
            tensors[name] = tensor
    return tensors


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def save(model: nn.Module, directory: str | Path, *, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters (and ``trainable`` modules) and its spec to ``directory``; nothing else.

    ``tensors`` replaces the model's own adapter tensors (same keys), for a model whose parameters are shards that
    were gathered first (``peftkit train`` under FSDP2).
    """
    state = require_state(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source, tensors = (_saved_parameters(model) if tensors is None else tensors), {}
    for name, tensor in source.items():
        if tensor.is_meta:
            raise CheckpointError(f"{name} is on the meta device; materialise the model before saving")
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "peftkit"}))
    _atomic_write(directory / SPEC_FILE, lambda tmp: Path(tmp).write_text(state.spec.to_json(), encoding="utf-8"))
    return directory


def read_small_file(path: Path, max_bytes: int, holds: str) -> bytes:
    """An untrusted config file's bytes, refused before parsing when missing (``holds`` says what the folder
    should hold) or over ``max_bytes``."""
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} not found: {holds}")
    if path.stat().st_size > max_bytes:
        raise CheckpointError(f"{str(path)!r} is over {max_bytes} bytes; refusing to parse it")
    return path.read_bytes()


def read_spec(directory: str | Path) -> Spec:
    path = Path(directory) / SPEC_FILE
    text = read_small_file(path, MAX_SPEC_BYTES, f"a peftkit checkpoint folder holds {SPEC_FILE} and {WEIGHTS_FILE}")
    try:
        return Spec.from_json(text)
    except PeftkitError as error:
        raise CheckpointError(f"{str(path)!r}: {error}") from None


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as stream:
            return {key: tuple(stream.get_slice(key).get_shape()) for key in stream.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {error}") from None


def check_fits(expected: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Refuse, naming them, missing keys, unexpected keys and shape mismatches, before any value is copied."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        (k, shapes[k], tuple(expected[k].shape))
        for k in expected
        if k in shapes and tuple(shapes[k]) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, found, wanted in wrong[:5]:
        problems.append(f"shape mismatch for {key}: checkpoint has {list(found)}, model needs {list(wanted)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit this model: "
            + "; ".join(problems)
            + ". Load it onto the architecture it was saved from."
        )


def fill(targets: Mapping[str, torch.Tensor], read: Callable[[str], torch.Tensor]) -> None:
    """Copy ``read(key)`` into every target (checked by :func:`check_fits` first)."""
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(read(key))


def restore_adapter_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Fill the adapters already attached to ``model`` from a ``save`` folder (resuming a run).

    The folder's spec must equal the model's, and every key and shape must match, before any value is copied."""
    directory = Path(directory)
    state = require_state(model)
    if read_spec(directory).to_dict() != state.spec.to_dict():
        raise CheckpointError(
            f"checkpoint {str(directory)!r} was saved with another spec than the model's; "
            "attach the same spec before resuming"
        )
    expected = _saved_parameters(model)
    check_fits(expected, _read_shapes(directory / WEIGHTS_FILE), f"checkpoint {str(directory)!r}")
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as stream:
        fill(expected, stream.get_tensor)
    return model


def load(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach the checkpoint's spec to ``model`` and fill the adapters from its weights.

    Missing keys, unexpected keys and shape mismatches are errors that leave the model as it was.
    """
    directory = Path(directory)
    spec = read_spec(directory)
    weights = directory / WEIGHTS_FILE
    shapes = _read_shapes(weights)
    existing = {a.adapter_name for a in get_state(model).attached} if get_state(model) else set()
    attach(model, spec)
    try:
        expected = _saved_parameters(model, set(spec.adapters) - existing)
        check_fits(expected, shapes, f"checkpoint {str(directory)!r}")
        with safe_open(str(weights), framework="pt") as stream:
            fill(expected, stream.get_tensor)
    except BaseException:
        detach(model, list(spec.adapters))
        raise
    return model
