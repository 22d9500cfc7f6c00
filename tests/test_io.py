"""Save and load: safetensors + JSON only, exact round-trips, and clear errors that leave the model untouched."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit import CheckpointError
from peftkit.testing import randomise_adapters
from peftkit.zoo import build_model

SPEC = {"adapters": {"default": [{"method": "lora", "target": ["q_proj", "v_proj"], "r": 4}]}, "trainable": ["lm_head"]}


def trained(tmp_path):
    torch.manual_seed(0)
    model = build_model("llama-tiny").eval()
    peftkit.attach(model, SPEC)
    randomise_adapters(model)
    peftkit.save(model, tmp_path)
    return model


def fresh():
    torch.manual_seed(0)
    return build_model("llama-tiny").eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert peftkit.attach.__module__ and not hasattr(model, "_peftkit_state")


def test_checkpoint_holds_only_adapters_trainable_modules_and_the_spec(tmp_path) -> None:
    model = trained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "spec.json"]
    keys = set(load_file(tmp_path / "adapter.safetensors"))
    assert len([k for k in keys if "peftkit_adapters" in k]) == 2 * 2 * 2
    assert keys - {k for k in keys if "peftkit_adapters" in k} == {"lm_head.weight"}
    assert peftkit.Spec.from_file(tmp_path / "spec.json") == peftkit.Spec.model_validate(SPEC)
    ids = torch.randint(0, 128, (2, 6))
    loaded = peftkit.load(fresh(), tmp_path)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def tamper(tmp_path, change) -> None:
    tensors = load_file(tmp_path / "adapter.safetensors")
    change(tensors)
    save_file(tensors, tmp_path / "adapter.safetensors")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop(next(k for k in t if k.endswith("lora_a"))), "missing keys"),
        (lambda t: t.update(extra=torch.zeros(1)), "unexpected keys \\['extra'\\]"),
        (lambda t: t.update({k: torch.zeros(3, 3) for k in list(t)[:1]}), "shape mismatch"),
    ],
)
def test_bad_checkpoints_leave_the_model_as_it_was(tmp_path, change, message) -> None:
    trained(tmp_path)
    tamper(tmp_path, change)
    model = fresh()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        peftkit.load(model, tmp_path)
    assert_unchanged(model, before)


def test_corrupt_or_missing_files(tmp_path) -> None:
    trained(tmp_path)
    model = fresh()
    before = snapshot(model)
    (tmp_path / "adapter.safetensors").write_bytes(b"\x80\x04not safetensors, maybe a pickle")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        peftkit.load(model, tmp_path)
    trained(tmp_path)
    tamper(tmp_path, lambda tensors: None)  # rewritten without the spec copy inside: spec.json is read
    (tmp_path / "spec.json").write_text(json.dumps({"adapters": {"d": [{"method": "evil", "target": "x"}]}}))
    with pytest.raises(CheckpointError, match="unknown method 'evil'"):
        peftkit.load(model, tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        peftkit.load(model, tmp_path / "nowhere")
    assert_unchanged(model, before)


def test_wrong_architecture_is_refused(tmp_path) -> None:
    trained(tmp_path)
    model = build_model("gpt2-tiny")
    before = snapshot(model)
    with pytest.raises(peftkit.TargetingError, match="matched no module"):
        peftkit.load(model, tmp_path)
    assert_unchanged(model, before)


def test_save_requires_adapters(tmp_path) -> None:
    with pytest.raises(peftkit.AttachError, match="no peftkit adapters"):
        peftkit.save(fresh(), tmp_path)
