"""Save and load adapters: safetensors for weights (never pickle) and the spec as JSON.

A checkpoint folder holds ``adapter.safetensors`` (the adapters' tensors and those of the spec's ``trainable``
modules, under the model's own state-dict keys) and ``spec.json``. The spec is also stored in the weights file's
metadata, and that copy is the one loaded: replacing one file is one atomic rename, so a save killed at any instant
leaves the old checkpoint or the new one, never new weights with an old spec (``spec.json`` is the readable copy).

Both files are untrusted on load: the spec goes through the same validation as any other; the sizes it asks for are
compared with the file's tensors before any adapter is built; every key, shape and dtype is checked, and every
value read and found finite, before a single value is copied; any failure detaches what was attached.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from peftkit.atomic import write_file_atomically
from peftkit.errors import AttachError, CheckpointError, PeftkitError
from peftkit.keys import ADAPTER_CONTAINER, SHARED_CHILD
from peftkit.lifecycle.attach import attach, detach, get_state, plan, plan_trainable_paths, require_state
from peftkit.lifecycle.rewrite import rewrites_base
from peftkit.spec import Spec
from peftkit.untrusted import parse_json

WEIGHTS_FILE = "adapter.safetensors"
SPEC_FILE = "spec.json"
MAX_SPEC_BYTES = 4 * 1024 * 1024
SPEC_METADATA = "peftkit_spec"  # the key of the spec's copy in the weights file's metadata


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


def save(
    model: nn.Module,
    directory: str | Path,
    *,
    tensors: dict[str, torch.Tensor] | None = None,
    portable: bool = True,
) -> Path:
    """Write the model's adapters (and ``trainable`` modules) and its spec to ``directory``; nothing else.

    ``tensors`` replaces the model's own adapter tensors (same keys), for a model whose parameters are shards that
    were gathered first (``peftkit train`` under FSDP2). An adapter that rewrote its host's weight at attach (PiSSA,
    OLoRA) is written, by default, as the adapter that makes the same change to the **original** weight (its
    method's ``portable_config``: for LoRA, a plain LoRA of twice the rank), so the checkpoint loads onto the base
    model anyone has; ``portable=False`` writes it as trained, for resuming (it loads onto the original base and
    recomputes the same residual).
    """
    state = require_state(model)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save to {str(directory)!r}: it is a file, not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    source, tensors = (_saved_parameters(model) if tensors is None else tensors), {}
    refuse_merged_writes(
        state, list(source), "save: the checkpoint would hold the merged update twice", adapters_too=False
    )
    for name, tensor in source.items():
        if tensor.is_meta:
            raise CheckpointError(f"{name} is on the meta device; materialise the model before saving")
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    spec = state.spec
    if portable and any(rewrites_base(a) for a in state.attached):
        spec = _write_portable(state, tensors)
    if portable:
        spec = _write_compact(state, spec, tensors)
    spec = spec.to_json()
    metadata = {"format": "peftkit", SPEC_METADATA: spec}  # the spec travels inside the one file renamed last
    write_file_atomically(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    write_file_atomically(directory / SPEC_FILE, lambda tmp: Path(tmp).write_text(spec, encoding="utf-8"))
    return directory


def _write_portable(state: Any, tensors: dict[str, torch.Tensor]) -> Spec:
    """Replace, in ``tensors``, each rewriting adapter's tensors by its portable ones; the spec that describes them."""
    adapters = {name: list(entries) for name, entries in state.spec.adapters.items()}
    for attached in (a for a in state.attached if rewrites_base(a)):
        prefix = f"{attached.path}.{ADAPTER_CONTAINER}.{attached.adapter_name}."
        own = {key[len(prefix) :]: tensors.pop(key) for key in [k for k in tensors if k.startswith(prefix)]}
        with torch.no_grad():
            for name, tensor in attached.module.portable_tensors(own).items():
                tensors[prefix + name] = tensor.detach().to("cpu").contiguous().clone()
        adapters[attached.adapter_name][attached.entry] = attached.method.portable_config(attached.config)
    return Spec(adapters=adapters, trainable=state.spec.trainable, compose=state.spec.compose)


def _write_compact(state: Any, spec: Spec, tensors: dict[str, torch.Tensor]) -> Spec:
    """Replace, in ``tensors``, the adapters of each entry whose method compacts them (``Method.compact_config``) by
    their compact tensors; the spec that describes them."""
    adapters = {name: list(entries) for name, entries in spec.adapters.items()}
    changed = False
    for members in state.entries():
        first = members[0]
        compact = first.method.compact_config(first.config, [(a.path, a.module) for a in members])
        if compact is None:
            continue
        changed = True
        adapters[first.adapter_name][first.entry] = compact
        for attached in members:
            prefix = f"{attached.path}.{ADAPTER_CONTAINER}.{attached.adapter_name}."
            own = {key[len(prefix) :]: tensors.pop(key) for key in [k for k in tensors if k.startswith(prefix)]}
            with torch.no_grad():
                for key, tensor in attached.module.compact_tensors(own).items():
                    tensors[prefix + key] = tensor.detach().to("cpu").contiguous().clone()
    return Spec(adapters=adapters, trainable=spec.trainable, compose=spec.compose) if changed else spec


def refuse_merged_writes(state: Any, keys: list[str], why: str, *, adapters_too: bool = True) -> None:
    """Refuse saving or filling tensors of hosts whose adapters are merged: a merged host's weight holds the update,
    so saving it stores the update twice, and filling it (or, with ``adapters_too``, its merged adapter) makes
    unmerge subtract an update that was never added. Unmerge first."""
    merged = {a.path for a in state.attached if a.module.merged}
    if not adapters_too:
        keys = [key for key in keys if ADAPTER_CONTAINER not in key.split(".")]
    hit = sorted({path for path in merged for key in keys if key.startswith(path + ".")})
    if hit:
        raise AttachError(f"{why}: adapters at {hit[:3]} are merged; call peftkit.unmerge(model) first")


def read_small_file(path: Path, max_bytes: int, holds: str) -> bytes:
    """An untrusted config file's bytes, refused before parsing when missing (``holds`` says what the folder
    should hold) or over ``max_bytes``."""
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} not found: {holds}")
    if path.stat().st_size > max_bytes:
        raise CheckpointError(f"{str(path)!r} is over {max_bytes} bytes; refusing to parse it")
    return path.read_bytes()


def read_json_object(
    path: Path, max_bytes: int, holds: str, error: type[PeftkitError] = CheckpointError
) -> dict[str, Any]:
    """A small untrusted JSON file that must hold one object (a config): bounded size and depth, finite numbers."""
    value = parse_json(read_small_file(path, max_bytes, holds), error, repr(str(path)))
    if not isinstance(value, dict):
        raise error(f"{str(path)!r} must hold a JSON object, got {type(value).__name__}")
    return value


def read_spec(directory: str | Path) -> Spec:
    """The checkpoint's spec: the copy inside the weights file when it has one (written in the same atomic step as
    the weights), else ``spec.json`` (checkpoints written before that copy existed)."""
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    embedded = _read_metadata(weights).get(SPEC_METADATA) if weights.is_file() else None
    if embedded is not None:
        if len(embedded) > MAX_SPEC_BYTES:
            raise CheckpointError(f"{str(weights)!r}: its spec is over {MAX_SPEC_BYTES} bytes; refusing to parse it")
        text, source = embedded, weights
    else:
        source = directory / SPEC_FILE
        holds = f"a peftkit checkpoint folder holds {SPEC_FILE} and {WEIGHTS_FILE}"
        text = read_small_file(source, MAX_SPEC_BYTES, holds)
    try:
        return Spec.from_json(text)
    except PeftkitError as error:
        raise CheckpointError(f"{str(source)!r}: {error}") from None


def _read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as stream:
            return stream.metadata() or {}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {error}") from None


# The dtypes a checkpoint tensor may have: each is cast to its parameter's floating dtype, exactly where it fits.
LOADABLE_DTYPES = {"F16", "BF16", "F32", "F64"}


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in a safetensors file; a tensor of a dtype peftkit does not load is refused."""
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} not found")
    if path.resolve().parent != path.parent.resolve():
        raise CheckpointError(f"{str(path)!r} links outside its folder; a checkpoint's files must be in the folder")
    try:
        with safe_open(str(path), framework="pt") as stream:
            slices = {key: stream.get_slice(key) for key in stream.keys()}  # noqa: SIM118
            dtypes = {key: str(piece.get_dtype()) for key, piece in slices.items()}
            shapes = {key: tuple(piece.get_shape()) for key, piece in slices.items()}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {error}") from None
    odd = {key: dtype for key, dtype in dtypes.items() if dtype not in LOADABLE_DTYPES}
    if odd:
        key = next(iter(odd))
        raise CheckpointError(
            f"{str(path)!r}: tensor {key!r} has dtype {odd[key]}; adapter weights load only from "
            f"{', '.join(sorted(LOADABLE_DTYPES))} ({len(odd)} such tensor(s))"
        )
    return shapes


def check_planned_sizes(planned: Any, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Refuse a spec whose adapters would be larger than the file's tensors, before any adapter is built: a 1 KB file
    whose spec asks for r = 10^8 must not allocate gigabytes to find out that nothing fits. A file may hold more
    than the parameters (an adapter's saved buffers, such as AdaLoRA's kept ranks); ``check_fits`` then compares
    every key and shape exactly, once the adapters are built."""
    held: dict[tuple[str, str], int] = {}
    for key, shape in shapes.items():
        parts = key.split(".")
        if ADAPTER_CONTAINER in parts and SHARED_CHILD not in parts:  # shared tensors: checked by check_fits
            at = parts.index(ADAPTER_CONTAINER)
            owner = (".".join(parts[:at]), parts[at + 1])
            held[owner] = held.get(owner, 0) + math.prod(shape)
    for row in planned.rows:
        found = held.get((row.path, row.adapter), 0)
        if row.parameters > found:
            raise CheckpointError(
                f"{source} does not fit its own spec (missing keys or shape mismatch): the spec gives adapter {row.adapter!r} at "
                f"{row.path!r} {row.parameters:,} parameters, its tensors hold {found:,}; nothing was built"
            )


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
    """Copy ``read(key)`` into every target (checked by :func:`check_fits` first).

    Every value is read and checked (finite, of a loadable dtype) before the first copy, so a bad tensor leaves
    every target, base modules in ``trainable`` included, as it was."""
    values = {}
    for key, target in targets.items():
        value = read(key)
        if not (value.is_floating_point() and target.is_floating_point()):
            raise CheckpointError(f"tensor {key!r} is {value.dtype}; adapter weights must be floating point")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"tensor {key!r} holds NaN or infinite values; refusing to load it")
        values[key] = value
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(values[key])


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
    refuse_merged_writes(state, list(expected), "restoring adapter weights")
    check_fits(expected, _read_shapes(directory / WEIGHTS_FILE), f"checkpoint {str(directory)!r}")
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as stream:
        fill(expected, stream.get_tensor)
    return model


def load(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach the checkpoint's spec to ``model`` and fill the adapters from its weights.

    Missing keys, unexpected keys and shape mismatches are errors that leave the model as it was.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    shapes = _read_shapes(weights)
    spec = read_spec(directory)
    check_planned_sizes(plan(model, spec), shapes, f"checkpoint {str(directory)!r}")
    existing = {a.adapter_name for a in get_state(model).attached} if get_state(model) else set()
    attach(model, spec)
    try:
        expected = _saved_parameters(model, set(spec.adapters) - existing)
        refuse_merged_writes(get_state(model), list(expected), "load")
        check_fits(expected, shapes, f"checkpoint {str(directory)!r}")
        with safe_open(str(weights), framework="pt") as stream:
            fill(expected, stream.get_tensor)
    except BaseException:
        detach(model, list(spec.adapters))
        raise
    return model
