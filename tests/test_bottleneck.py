"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) against adapters inserted by hand in plain torch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit.testing import randomise_adapters
from peftkit.zoo import build_model


class HandAdapter(nn.Module):
    """Houlsby's adapter written out: h + s * up(act(down(h)))."""

    def __init__(self, down: nn.Linear, up: nn.Linear, scaling: float = 1.0) -> None:
        super().__init__()
        self.down, self.up, self.scaling = copy.deepcopy(down), copy.deepcopy(up), scaling

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.scaling * self.up(torch.relu(self.down(h)))


def adapter_at(model: nn.Module, path: str, name: str = "default"):
    return model.get_submodule(path).peftkit_adapters[name]


def test_houlsby_on_bert_equals_adapters_inserted_by_hand() -> None:
    torch.manual_seed(0)
    model = build_model("bert-tiny").eval()
    reference = copy.deepcopy(model)
    peftkit.attach(model, {"adapters": {"default": [{"method": "houlsby", "bottleneck": 8}]}})
    randomise_adapters(model)
    for i, layer in enumerate(reference.encoder.layer):
        for where in ("attention.output.dense", "output.dense"):
            adapter = adapter_at(model, f"encoder.layer.{i}.{where}")
            parent_path, leaf = where.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            setattr(parent, leaf, nn.Sequential(getattr(parent, leaf), HandAdapter(adapter.down, adapter.up)))
    ids = torch.randint(0, 128, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(got, build_model("bert-tiny").eval()(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_default_placements_per_family() -> None:
    expect = {
        "gpt2-tiny": {"houlsby": ["attn.c_proj", "mlp.c_proj"], "pfeiffer": ["mlp.c_proj"], "parallel": ["mlp"]},
        "llama-tiny": {
            "houlsby": ["self_attn.o_proj", "mlp.down_proj"],
            "pfeiffer": ["mlp.down_proj"],
            "parallel": ["mlp"],
        },
        "bert-tiny": {
            "houlsby": ["attention.output.dense", "output.dense"],
            "pfeiffer": ["output.dense"],
            "parallel": ["output.dense"],
        },
    }
    for name, methods in expect.items():
        model = build_model(name)
        for method, suffixes in methods.items():
            plan = peftkit.plan(model, {"adapters": {"a": [{"method": method, "layers": [1]}]}})
            got = [row.path.split(".1.", 1)[1] for row in plan.rows]
            assert got == suffixes, (name, method, got)


@pytest.mark.parametrize(
    ("name", "host", "source"),
    [
        ("bert-tiny", "encoder.layer.0.output.dense", "encoder.layer.0.intermediate"),
        ("llama-tiny", "model.layers.0.mlp", "model.layers.0.mlp"),
        ("gpt2-tiny", "transformer.h.0.attn", "transformer.h.0.attn"),  # returns a tuple
    ],
)
def test_parallel_adapter_reads_the_sublayer_input(name: str, host: str, source: str) -> None:
    """f(x) + s * up(act(down(x))): on BERT the FFN input is read at `intermediate`, on Llama at `mlp` itself."""
    torch.manual_seed(0)
    model = build_model(name).eval()
    ids = torch.randint(0, 128, (2, 5))
    seen: dict[str, list] = {"x": [], "out": []}
    model.get_submodule(source).register_forward_pre_hook(
        lambda m, a, k: seen["x"].append(a[0] if a else k["hidden_states"]), with_kwargs=True
    )

    def record_output(m, a, k, out) -> None:
        seen["out"].append(out if torch.is_tensor(out) else out[0])

    with torch.no_grad():
        handle = model.get_submodule(host).register_forward_hook(record_output, with_kwargs=True)
        model(input_ids=ids)  # f(x)
        handle.remove()
        peftkit.attach(model, {"adapters": {"p": [{"method": "parallel", "target": "re:" + host.replace(".", r"\.")}]}})
        randomise_adapters(model)
        model.get_submodule(host).register_forward_hook(record_output, with_kwargs=True)  # after peftkit's hook
        model(input_ids=ids)  # f(x) + update; layer 0 sees the same x both times
        adapter = adapter_at(model, host, "p")
        x = seen["x"][1]
        update = adapter.scaling * adapter.up(torch.relu(adapter.down(x)))
    assert update.abs().sum() > 0
    torch.testing.assert_close(seen["out"][1], seen["out"][0] + update, rtol=1e-5, atol=1e-5)


def test_bottleneck_adapters_cannot_merge_and_say_so() -> None:
    model = build_model("llama-tiny")
    peftkit.attach(model, {"adapters": {"h": [{"method": "houlsby"}], "l": [{"method": "lora", "target": "q_proj"}]}})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        peftkit.AttachError, match=r"cannot merge \[\('h', 'houlsby'\)\]: these methods are not mergeable"
    ):
        peftkit.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before touching weights
    peftkit.merge(model, ["l"])  # the mergeable one, by name


def test_unknown_family_without_explicit_target_is_a_clear_error() -> None:
    with pytest.raises(peftkit.TargetingError, match="does not know where the ffn_output of a 'non-transformers'"):
        peftkit.plan(build_model("mlp"), {"adapters": {"a": [{"method": "pfeiffer"}]}})
    plan = peftkit.plan(build_model("mlp"), {"adapters": {"a": [{"method": "pfeiffer", "target": "2"}]}})
    assert [row.path for row in plan.rows] == ["2"]


@pytest.mark.parametrize(("fields", "width"), [({"bottleneck": 5}, 5), ({"reduction_factor": 4}, 8), ({}, 2)])
def test_width_from_bottleneck_or_reduction_factor(fields, width) -> None:
    plan = peftkit.plan(
        build_model("gpt2-tiny"), {"adapters": {"a": [{"method": "pfeiffer", "layers": [0], **fields}]}}
    )
    assert plan.rows[0].parameters == 32 * width + width + width * 32 + 32
    with pytest.raises(peftkit.SpecError, match="either bottleneck or reduction_factor"):
        peftkit.Spec.model_validate(
            {"adapters": {"a": [{"method": "houlsby", "bottleneck": 4, "reduction_factor": 2}]}}
        )


def test_options_layer_norm_activation_dropout() -> None:
    model = build_model("llama-tiny").train()
    spec = {"method": "houlsby", "layer_norm": True, "activation": "gelu", "dropout": 0.1, "scaling": 0.5}
    peftkit.attach(model, {"adapters": {"a": [spec]}})
    adapter = adapter_at(model, "model.layers.0.mlp.down_proj", "a")
    assert isinstance(adapter.activation, nn.GELU) and adapter.layer_norm is not None and adapter.scaling == 0.5
    ids = torch.randint(0, 128, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert adapter.down.weight.grad is None or adapter.up.weight.grad.abs().sum() > 0
