"""A tree of plain values and tensors (a training state) in one safetensors file, so that no pickle is ever read.

A training checkpoint's state — the step, the optimiser's per-parameter tensors and hyper-parameters, the
scheduler's numbers, the RNG states — is dictionaries, lists and tuples of numbers, strings, booleans, ``None`` and
tensors. The tensors are stored as safetensors tensors; the tree around them is JSON in the file's metadata, where a
tensor is ``{"$tensor": key}`` and a tuple ``{"$tuple": [...]}``. Reading parses the JSON as untrusted input
(bounded depth, finite numbers) and checks that every referenced tensor exists.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from peftkit.errors import CheckpointError
from peftkit.untrusted import parse_json

TREE_METADATA = "peftkit_tree"
_TENSOR, _TUPLE = "$tensor", "$tuple"


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(value, dict):
        if set(value) in ({_TENSOR}, {_TUPLE}):
            raise CheckpointError(f"{where}: a dictionary whose only key is {next(iter(value))!r} cannot be stored")
        if not all(isinstance(key, str) for key in value):
            raise CheckpointError(f"{where}: dictionary keys must be strings, got {sorted(map(repr, value))[:3]}")
        return {key: _encode(item, tensors, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"{where} is {value}, which a checkpoint does not store")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise CheckpointError(f"{where} is a {type(value).__name__}, which a checkpoint does not store")


def write_tree(path: Path | str, tree: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors, "state")
    save_file(tensors, str(path), metadata={"format": "peftkit-tree", TREE_METADATA: json.dumps(skeleton)})


def _decode(node: Any, read: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(node, dict):
        if set(node) == {_TENSOR}:
            key = node[_TENSOR]
            if not isinstance(key, str) or key not in read:
                raise CheckpointError(f"{where} names tensor {key!r}, which the file does not hold")
            return read[key]
        if set(node) == {_TUPLE}:
            if not isinstance(node[_TUPLE], list):
                raise CheckpointError(f"{where} is a tuple whose items are not a list")
            return tuple(_decode(item, read, f"{where}[{i}]") for i, item in enumerate(node[_TUPLE]))
        return {key: _decode(item, read, f"{where}.{key}") for key, item in node.items()}
    if isinstance(node, list):
        return [_decode(item, read, f"{where}[{i}]") for i, item in enumerate(node)]
    return node


def read_tree(path: Path | str) -> Any:
    """The tree :func:`write_tree` wrote, or a :class:`CheckpointError` naming what is wrong with the file."""
    try:
        with safe_open(str(path), framework="pt") as stream:
            metadata = stream.metadata() or {}
            tensors = {key: stream.get_tensor(key) for key in stream.keys()}  # noqa: SIM118 (a safe_open handle)
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {error}") from None
    if TREE_METADATA not in metadata:
        raise CheckpointError(f"{str(path)!r} holds no {TREE_METADATA!r} metadata; it was not written by peftkit")
    skeleton = parse_json(metadata[TREE_METADATA], CheckpointError, f"the state tree in {str(path)!r}")
    return _decode(skeleton, tensors, "state")
