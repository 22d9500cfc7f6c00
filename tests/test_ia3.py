"""IA3 against a plain-torch model with the scaling vectors inserted by hand."""

from __future__ import annotations

import copy

import torch
from torch import nn

import peftkit
from peftkit.lifecycle.attach import get_state
from peftkit.testing import randomise_adapters
from peftkit.zoo import build_model


class Scale(nn.Module):
    def __init__(self, vector: torch.Tensor) -> None:
        super().__init__()
        self.vector = vector.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.vector


def test_ia3_on_llama_equals_scaling_inserted_by_hand() -> None:
    torch.manual_seed(0)
    model = build_model("llama-tiny").eval()
    reference = copy.deepcopy(model)
    peftkit.attach(model, {"adapters": {"default": [{"method": "ia3"}]}})
    randomise_adapters(model)
    for i, layer in enumerate(reference.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        for name in ("k_proj", "v_proj"):
            vector = model.get_submodule(f"model.layers.{i}.self_attn.{name}").peftkit_adapters["default"].ia3_scale
            assert vector.numel() == getattr(attention, name).out_features
            setattr(attention, name, nn.Sequential(getattr(attention, name), Scale(vector)))
        vector = model.get_submodule(f"model.layers.{i}.mlp.down_proj").peftkit_adapters["default"].ia3_scale
        assert vector.numel() == mlp.down_proj.in_features  # the intermediate activation, not the output
        mlp.down_proj = nn.Sequential(Scale(vector), mlp.down_proj)
    ids = torch.randint(0, 128, (2, 7))
    expected = reference(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    peftkit.merge(model)
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_ia3_default_targets_per_family() -> None:
    counts = {}
    for name in ("gpt2-tiny", "llama-tiny", "bert-tiny"):
        plan = peftkit.plan(build_model(name), {"adapters": {"a": [{"method": "ia3", "layers": [0]}]}})
        counts[name] = [(row.path.split(".0.", 1)[1], row.parameters) for row in plan.rows]
    assert counts["gpt2-tiny"] == [("attn.c_attn", 96), ("mlp.c_proj", 128)]
    assert counts["llama-tiny"] == [("self_attn.k_proj", 16), ("self_attn.v_proj", 16), ("mlp.down_proj", 64)]
    assert counts["bert-tiny"] == [("attention.self.key", 32), ("attention.self.value", 32), ("output.dense", 64)]


def test_ia3_trains_only_its_vectors() -> None:
    model = build_model("gpt2-tiny").train()
    peftkit.attach(model, {"adapters": {"default": [{"method": "ia3"}]}})
    assert peftkit.trainable_parameters(model).trainable == 2 * (96 + 128)
    ids = torch.randint(0, 128, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_explicit_targets_work_on_a_model_whose_feedforward_place_is_unknown() -> None:
    """The default ``feedforward`` place is optional: a model without one scales every explicit target's output."""
    model = build_model("mlp").eval()
    x = torch.randn(3, 16)
    before = model(x)
    entry = {"method": "ia3", "target": "*", "module_types": ["Linear"]}
    peftkit.attach(model, {"adapters": {"default": [entry]}})
    attached = get_state(model).attached
    assert [a.path for a in attached] == ["0", "2"] and not any(a.module.transforms_input for a in attached)
    torch.testing.assert_close(model(x), before)
    explicit = peftkit.attach(build_model("mlp"), {"adapters": {"default": [{**entry, "feedforward": ["2"]}]}})
    assert [a.path for a in get_state(explicit).attached if a.module.transforms_input] == ["2"]
