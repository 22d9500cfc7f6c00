"""The training state's file: any tree of plain values and tensors comes back equal, and a damaged one is refused."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from peftkit.errors import CheckpointError
from peftkit.training.state_file import TREE_METADATA, read_tree, write_tree

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
tensors = st.builds(
    lambda dtype, shape, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 5).to(dtype),
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.integers(0, 2**16),
)
leaves = st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.floats(allow_nan=False, allow_infinity=False)
leaves = leaves | st.text(max_size=8) | tensors
trees = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6).filter(lambda k: not k.startswith("$")), children, max_size=4)
    ),
    max_leaves=20,
)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@given(tree=trees)
def test_every_tree_of_plain_values_and_tensors_comes_back_equal(tree, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("tree") / "state.safetensors"
    write_tree(path, {"root": tree})
    assert same(read_tree(path), {"root": tree})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), "is nan"),
        ({1: 2}, "keys must be strings"),
        ({"$tensor": "t0"}, "cannot be stored"),
        (object(), "is a object"),
    ],
)
def test_values_a_checkpoint_cannot_hold_are_refused_when_written(value, message, tmp_path) -> None:
    with pytest.raises(CheckpointError, match=message):
        write_tree(tmp_path / "state.safetensors", {"x": value})


@pytest.mark.parametrize(
    ("tensors", "skeleton", "message"),
    [
        ({}, {"a": {"$tensor": "t9"}}, "names tensor 't9', which the file does not hold"),
        ({}, {"a": {"$tuple": 3}}, "items are not a list"),
        ({"t0": torch.zeros(1)}, None, "holds no 'peftkit_tree' metadata"),
        ({"t0": torch.zeros(1)}, "[" * 40 + "]" * 40, "nested too deeply"),
        ({}, '{"a": Infinity}', "not valid JSON"),
    ],
)
def test_a_damaged_state_file_is_a_checkpoint_error(tensors, skeleton, message, tmp_path) -> None:
    path = tmp_path / "state.safetensors"
    metadata = (
        {} if skeleton is None else {TREE_METADATA: skeleton if isinstance(skeleton, str) else json.dumps(skeleton)}
    )
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=message):
        read_tree(path)


def test_a_file_that_is_not_safetensors_is_a_checkpoint_error(tmp_path) -> None:
    (tmp_path / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_tree(tmp_path / "state.safetensors")
