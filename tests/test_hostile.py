"""Hostile and careless input: names, failures injected at every step of attach, and what must stay untouched."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import peftkit
from peftkit import SpecError, compose
from peftkit.attach import get_state
from peftkit.zoo import build_model

attach_module = importlib.import_module("peftkit.attach")  # `peftkit.attach` is the function
IDS = torch.tensor([[3, 14, 15, 92, 65]])


@pytest.mark.parametrize("name", ["keys", "forward", "to", "training", "items", "default\n", "a" * 65, "0a", "a.b"])
def test_names_that_cannot_be_container_keys_are_refused_at_validation(name: str) -> None:
    with pytest.raises(SpecError, match="adapter name"):
        peftkit.Spec.model_validate({"adapters": {name: [{"method": "lora", "target": "c_attn"}]}})


def test_a_name_is_one_name_not_its_letters() -> None:
    model = build_model("llama-tiny")
    peftkit.attach(model, {"adapters": {"ab": [{"method": "lora", "target": "q_proj"}]}})
    peftkit.detach(model, "ab")
    assert get_state(model) is None


def snapshot(model: nn.Module) -> dict:
    state = get_state(model)
    return {
        "values": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "children": {n: sorted(m._modules) for n, m in model.named_modules()},
        "state": None
        if state is None
        else (sorted(state.active), sorted(state.spec.adapters), len(state.attached), len(state.hooks)),
    }


def assert_same(before: dict, after: dict) -> None:
    assert after["values"].keys() == before["values"].keys()
    assert all(torch.equal(before["values"][k], v) for k, v in after["values"].items())
    for key in ("flags", "hooks", "children", "state"):
        assert after[key] == before[key], key


SECOND = {
    "adapters": {
        "second": [{"method": "lora", "target": "v_proj"}],
        "fourth": [{"method": "lora", "target": "v_proj", "r": 2}],
        "third": [{"method": "ia3", "target": "down_proj", "feedforward": ["down_proj"]}],  # an input pre-hook
    },
    "compose": [{"rule": "gate", "adapters": ["second", "fourth"]}],
}
# Every call that changes the model during attach; a failure is injected at each call of each in turn.
STEPS = [
    (nn.Module, "add_module"),
    (nn.Module, "register_forward_hook"),
    (nn.Module, "register_forward_pre_hook"),
    (nn.ModuleDict, "__setitem__"),
    (compose.Gates, "__init__"),
    (attach_module, "AttachedAdapter"),
    (attach_module, "_set_training_state"),
]


def first_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("llama-tiny").eval()
    return peftkit.attach(model, {"adapters": {"first": [{"method": "lora", "target": "q_proj"}]}})


def calls_during_attach(owner: object, attribute: str, monkeypatch) -> int:
    original, count = getattr(owner, attribute), [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    model = first_model()
    with monkeypatch.context() as patch:
        patch.setattr(owner, attribute, counting)
        peftkit.attach(model, SECOND)
    return count[0]


@pytest.mark.parametrize(("owner", "attribute"), STEPS, ids=[a for _, a in STEPS])
def test_a_failure_at_any_step_of_attach_leaves_the_model_as_it_was(owner, attribute, monkeypatch) -> None:
    calls = calls_during_attach(owner, attribute, monkeypatch)
    assert calls > 0, f"{attribute} is not called by attach: the step list is stale"
    original = getattr(owner, attribute)
    for failing in range(calls):
        model = first_model()
        before = snapshot(model)
        seen = [0]

        def failing_call(*args, _at=failing, _seen=seen, **kwargs):
            _seen[0] += 1
            if _seen[0] == _at + 1:
                raise RuntimeError("injected")
            return original(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(owner, attribute, failing_call)
            with pytest.raises(RuntimeError, match="injected"):
                peftkit.attach(model, SECOND)
        assert_same(before, snapshot(model))
        peftkit.attach(model, SECOND)  # the same attach now works, and every adapter runs
        assert {"first", "second", "third", "fourth"} == set(peftkit.active_adapters(model))
        assert model(IDS).logits.isfinite().all()
        peftkit.detach(model)
        assert get_state(model) is None


LORA = {"method": "lora", "target": "q_proj"}


@pytest.mark.parametrize(
    "entry",
    [
        {**LORA, "alpha": float("inf")},
        {**LORA, "alpha": float("nan")},
        {"method": "houlsby", "scaling": float("nan")},
    ],
)
def test_non_finite_numbers_are_refused(entry: dict) -> None:
    with pytest.raises(SpecError, match="finite"):
        peftkit.Spec.model_validate({"adapters": {"a": [entry]}})


@pytest.mark.parametrize(
    "compose",
    [
        {"rule": "gate", "adapters": ["a", "b"], "gate_init": float("nan")},
        {"rule": "average", "adapters": ["a", "b"], "weights": [float("nan"), 1.0]},
    ],
)
def test_non_finite_composition_numbers_are_refused(compose: dict) -> None:
    spec = {"adapters": {"a": [LORA], "b": [{**LORA, "target": "v_proj"}]}, "compose": [compose]}
    with pytest.raises(SpecError, match="finite"):
        peftkit.Spec.model_validate(spec)


def test_json_infinity_and_yaml_inf_are_refused() -> None:
    with pytest.raises(SpecError, match="Infinity is not a number JSON allows"):
        peftkit.Spec.from_json('{"adapters": {"a": [{"method": "lora", "target": "q", "alpha": Infinity}]}}')
    with pytest.raises(SpecError, match="finite"):
        peftkit.Spec.from_yaml("adapters: {a: [{method: lora, target: q, alpha: .inf}]}")


@pytest.mark.parametrize("depth", [40, 5000, 200_000])
def test_deep_nesting_is_a_peftkit_error(depth: int, tmp_path) -> None:
    text = '{"adapters": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(SpecError, match="nested too deeply"):
        peftkit.Spec.from_json(text)
    with pytest.raises(SpecError, match="nested too deeply"):
        peftkit.Spec.from_yaml("adapters: " + "[" * depth + "]" * depth)
    (tmp_path / "adapter_config.json").write_text(text)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(peftkit.CheckpointError, match="nested too deeply"):
        peftkit.from_peft(build_model("llama-tiny"), tmp_path)


def test_a_huge_layer_range_is_refused_without_being_expanded() -> None:
    with pytest.raises(SpecError, match="beyond 65535"):
        peftkit.Spec.model_validate({"adapters": {"a": [{**LORA, "layers": "0-999999999"}]}})
    with pytest.raises(SpecError, match="not an index or a range"):
        peftkit.Spec.model_validate({"adapters": {"a": [{**LORA, "layers": "0-" + "9" * 5000}]}})
    assert peftkit.Spec.model_validate({"adapters": {"a": [{**LORA, "layers": "0-3,8"}]}}).adapters["a"][0].layers == [
        0, 1, 2, 3, 8,
    ]  # fmt: skip
