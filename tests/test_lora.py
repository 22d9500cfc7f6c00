"""LoRA against a plain-torch re-implementation of the paper's equation, on every host type."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
import peftkit.testing
from peftkit.zoo import build_model


def attach_one(module: nn.Module, **fields) -> nn.Module:
    model = nn.Sequential(module)
    peftkit.attach(model, {"adapters": {"default": [{"method": "lora", "target": "0", **fields}]}})
    return model


def factors(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    adapter = model[0].peftkit_adapters["default"]
    with torch.no_grad():
        adapter.lora_b.normal_()
    return adapter.lora_a, adapter.lora_b, adapter.scaling


@given(
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    r=st.integers(1, 6),
    alpha=st.floats(0.5, 16),
    rslora=st.booleans(),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
)
def test_linear_matches_the_paper(d_in, d_out, r, alpha, rslora, lead) -> None:
    model = attach_one(nn.Linear(d_in, d_out), r=r, alpha=alpha, rslora=rslora)
    a, b, scaling = factors(model)
    assert scaling == pytest.approx(alpha / (math.sqrt(r) if rslora else r))
    x = torch.randn(*lead, d_in)
    base = model[0]
    expected = F.linear(x, base.weight, base.bias) + scaling * (x @ a.T @ b.T)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_conv1d_uses_the_transposed_weight() -> None:
    model = attach_one(Conv1D(6, 5), r=3, alpha=6)
    a, b, scaling = factors(model)
    x = torch.randn(2, 4, 5)
    expected = x @ model[0].weight + model[0].bias + scaling * (x @ a.T @ b.T)
    torch.testing.assert_close(model(x), expected)


def test_embedding_looks_up_the_rows_of_a() -> None:
    model = attach_one(nn.Embedding(11, 7), r=2, alpha=4)
    a, b, scaling = factors(model)
    ids = torch.randint(0, 11, (3, 5))
    expected = model[0].weight[ids] + scaling * (a.T[ids] @ b.T)
    torch.testing.assert_close(model(ids), expected)


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), [(1, 1, 0, 1), (3, 2, 1, 1), (3, 1, 2, 2)])
def test_conv2d_matches_a_merged_kernel(kernel, stride, padding, dilation) -> None:
    conv = nn.Conv2d(3, 4, kernel, stride, padding, dilation)
    model = attach_one(conv, r=2, alpha=2)
    a, b, scaling = factors(model)
    x = torch.randn(2, 3, 9, 8)
    delta = (scaling * b @ a).reshape(conv.weight.shape)
    expected = F.conv2d(x, conv.weight + delta, conv.bias, stride, padding, dilation)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_grouped_conv2d_is_refused_with_a_reason() -> None:
    with pytest.raises(peftkit.TargetingError, match="grouped convolution"):
        attach_one(nn.Conv2d(4, 4, 3, groups=2))


def test_init_b_is_zero_and_a_follows_the_chosen_scheme() -> None:
    torch.manual_seed(0)
    kaiming = attach_one(nn.Linear(512, 64), r=16)[0].peftkit_adapters["default"]
    gaussian = attach_one(nn.Linear(512, 64), r=16, init="gaussian")[0].peftkit_adapters["default"]
    assert torch.count_nonzero(kaiming.lora_b) == 0 and torch.count_nonzero(gaussian.lora_b) == 0
    bound = 1 / math.sqrt(512)  # kaiming_uniform with a=sqrt(5), as nn.Linear
    assert kaiming.lora_a.abs().max() <= bound and kaiming.lora_a.abs().max() > 0.9 * bound
    assert gaussian.lora_a.std().item() == pytest.approx(1 / 16, rel=0.1)


def test_dropout_applies_to_the_lora_path_only_in_training() -> None:
    model = attach_one(nn.Linear(64, 64), r=4, dropout=0.5)
    a, b, scaling = factors(model)
    x = torch.randn(8, 64)
    base = F.linear(x, model[0].weight, model[0].bias)
    model.eval()
    torch.testing.assert_close(model(x), base + scaling * (x @ a.T @ b.T))
    model.train()
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, base + scaling * (F.dropout(x, 0.5, True) @ a.T @ b.T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_adapters_follow_the_base_dtype_and_device(dtype) -> None:
    model = attach_one(nn.Linear(8, 8).to(dtype), r=2)
    adapter = model[0].peftkit_adapters["default"]
    assert adapter.lora_a.dtype == adapter.lora_b.dtype == dtype
    assert model(torch.randn(2, 8, dtype=dtype)).dtype == dtype


def test_meta_models_get_meta_adapters() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4096, 4096))
    peftkit.attach(model, {"adapters": {"default": [{"method": "lora", "target": "0"}]}})
    assert model[0].peftkit_adapters["default"].lora_a.is_meta


def test_bf16_merge_computes_the_delta_in_fp32_and_casts_once() -> None:
    torch.manual_seed(0)
    model = attach_one(nn.Linear(64, 64).to(torch.bfloat16), r=4)
    adapter = model[0].peftkit_adapters["default"]
    with torch.no_grad():
        adapter.lora_b.normal_(std=0.01)
    expected = (model[0].weight.float() + adapter.delta_weight()).to(torch.bfloat16)
    peftkit.merge(model)
    assert torch.equal(model[0].weight, expected)


def test_unmerged_forward_adds_in_place_into_the_host_output() -> None:
    """The update is accumulated into the host's output tensor: no full-size temporary for W + BA or B(Ax)."""
    model = attach_one(nn.Linear(16, 16), r=2)
    seen = {}
    model[0].register_forward_hook(lambda m, args, out: seen.update(ptr=out.data_ptr()), prepend=True)
    out = model(torch.randn(3, 16))
    assert out.data_ptr() == seen["ptr"]


def test_merge_and_detach_leaves_a_plain_model_with_the_update_baked_in() -> None:
    model = build_model("gpt2-tiny").eval()
    peftkit.attach(model, {"adapters": {"default": [{"method": "lora", "target": "c_attn", "r": 4}]}})
    for name, parameter in model.named_parameters():
        if name.endswith("lora_b"):
            torch.nn.init.normal_(parameter)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        adapted = model(ids).logits
        peftkit.merge_and_detach(model)
        baked = model(ids).logits
    assert not hasattr(model, "_peftkit_state")
    assert not any("peftkit" in name for name in model.state_dict())
    assert torch.allclose(adapted, baked, atol=1e-5)
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_merge_and_detach_refuses_an_unmergeable_adapter_and_changes_nothing() -> None:
    model = build_model("gpt2-tiny")
    peftkit.attach(model, {"adapters": {"default": [{"method": "pfeiffer", "target": "@ffn_output"}]}})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.AttachError, match="not mergeable"):
        peftkit.merge_and_detach(model)
    assert hasattr(model, "_peftkit_state")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("dtype", "largest"), [(torch.float32, 1e-6), (torch.bfloat16, 5e-2)])
def test_merge_error_reports_the_rounding_a_merge_would_leave_and_changes_nothing(dtype, largest) -> None:
    model = build_model("llama-tiny").to(dtype)
    peftkit.attach(model, {"adapters": {"default": [{"method": "lora", "target": ["q_proj", "v_proj"], "r": 4}]}})
    peftkit.testing.randomise_adapters(model, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    errors = peftkit.merge_error(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # measured, not merged
    assert set(errors) == {p for p, _ in model.named_modules() if p.endswith(("q_proj", "v_proj"))}
    assert all(0 <= e <= largest for e in errors.values())
    if dtype == torch.bfloat16:
        assert max(errors.values()) > 0  # bf16 rounds the merged weights
        host = model.model.layers[0].self_attn.q_proj
        exact = host.weight.double() + host.peftkit_adapters["default"].delta_weight().double()
        peftkit.merge(model)  # the reported error is what merging then leaves
        measured = (host.weight.double() - exact).abs().max().item()
        assert measured == pytest.approx(errors["model.layers.0.self_attn.q_proj"], rel=1e-6, abs=1e-12)
        peftkit.unmerge(model)


def test_merge_error_refuses_what_cannot_be_merged() -> None:
    model = peftkit.attach(build_model("gpt2-tiny"), {"adapters": {"default": [{"method": "houlsby"}]}})
    with pytest.raises(peftkit.AttachError, match="not mergeable"):
        peftkit.merge_error(model)


def test_adapters_attached_to_a_model_in_eval_mode_start_in_eval_mode() -> None:
    """A new module is in training mode; attached to an eval model, LoRA's dropout would run at inference."""
    model = build_model("gpt2-tiny").eval()
    peftkit.attach(model, {"adapters": {"default": [{"method": "lora", "target": "c_attn", "dropout": 0.5}]}})
    peftkit.testing.randomise_adapters(model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
    assert not any(m.training for m in model.modules())
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout on the LoRA path, now training
