"""DoRA against a plain-torch re-implementation of eq. (5) of the paper that materialises the adapted weight, on every
host kind, in float64; its gradients with the norm held constant (sec. 4.3); and its refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from weight_hosts import host_function, hosts, weight_as_matrix

import peftkit
from peftkit.lifecycle.attach import get_state


@st.composite
def adapted_hosts(draw: st.DrawFn):
    """A float64 host of each weight-site kind with a DoRA adapter moved off its initialisation, and an input."""
    host, x, _ = draw(hosts(st.just(torch.float64)))
    model = nn.Sequential(host)
    entry = {"method": "dora", "target": "0", "r": draw(st.integers(1, 4)), "alpha": draw(st.floats(0.5, 16.0))}
    peftkit.attach(model, {"adapters": {"default": [entry]}})
    adapter = get_state(model).attached[0].module
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model, host, adapter, x


def reference(host: nn.Module, adapter, x: torch.Tensor, *, detach_norm: bool = True) -> torch.Tensor:
    """Eq. (5): the host run with W' = m ⊙ V / ‖V‖_c, V = W0 + s B A, built in full."""
    direction = weight_as_matrix(host) + adapter.scaling * adapter.lora_b @ adapter.lora_a
    norm = direction.norm(dim=1, keepdim=True)
    return host_function(
        host, adapter.lora_magnitude[:, None] * direction / (norm.detach() if detach_norm else norm), x
    )


@given(case=adapted_hosts())
def test_dora_is_the_host_run_with_the_magnitude_times_the_unit_direction(case) -> None:
    model, host, adapter, x = case
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(host, adapter, x), rtol=1e-9, atol=1e-9)


@given(case=adapted_hosts())
def test_gradients_treat_the_norm_as_a_constant(case) -> None:
    model, host, adapter, x = case
    model(x).square().sum().backward()
    got = [p.grad.clone() for p in (adapter.lora_a, adapter.lora_b, adapter.lora_magnitude)]
    for p in adapter.parameters():
        p.grad = None
    reference(host, adapter, x).square().sum().backward()
    want = [adapter.lora_a.grad, adapter.lora_b.grad, adapter.lora_magnitude.grad]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8)


def test_the_norm_held_constant_differs_from_the_full_gradient() -> None:
    """The property above can fail: through the norm, the gradients of A and B are different."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    peftkit.attach(model, {"adapters": {"default": [{"method": "dora", "target": "0", "r": 2}]}})
    adapter = get_state(model).attached[0].module
    with torch.no_grad():
        adapter.lora_b.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    reference(model[0], adapter, x, detach_norm=False).square().sum().backward()
    full = adapter.lora_a.grad.clone()
    adapter.lora_a.grad = None
    model(x).square().sum().backward()
    assert not torch.allclose(full, adapter.lora_a.grad)


def test_dropout_rescales_the_base_term_on_the_dropped_input_as_peft_does() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    peftkit.attach(model, {"adapters": {"default": [{"method": "dora", "target": "0", "r": 2, "dropout": 0.5}]}})
    adapter = get_state(model).attached[0].module
    with torch.no_grad():
        adapter.lora_b.normal_()
        adapter.lora_magnitude.mul_(1.5)
    x = torch.randn(4, 6, dtype=torch.float64)
    model.train()
    torch.manual_seed(7)
    got = model(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    host = model[0]
    factor = adapter.lora_magnitude / adapter.weight_norm()
    update = adapter.scaling * dropped @ adapter.lora_a.t() @ adapter.lora_b.t()
    want = F.linear(x, host.weight, host.bias) + (factor - 1) * F.linear(dropped, host.weight) + factor * update
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_a_zero_magnitude_row_merges_and_unmerges_and_a_nan_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    before = model[0].weight.detach().clone()
    peftkit.attach(model, {"adapters": {"default": [{"method": "dora", "target": "0", "r": 2}]}})
    adapter = get_state(model).attached[0].module
    with torch.no_grad():
        adapter.lora_b.normal_()
        adapter.lora_magnitude[1] = 0.0
    x = torch.randn(3, 6)
    unmerged = model(x)
    peftkit.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
    peftkit.unmerge(model)
    torch.testing.assert_close(model[0].weight, before, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        adapter.lora_magnitude[0] = float("nan")
    with pytest.raises(peftkit.AttachError, match="magnitude holds a NaN"):
        peftkit.merge(model)
    assert not adapter.merged


def test_dora_on_a_host_it_cannot_adapt_names_the_types_and_leaves_the_model_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(peftkit.TargetingError, match="LayerNorm") as error:
        peftkit.attach(model, {"adapters": {"default": [{"method": "dora", "target": "1"}]}})
    assert "Linear" in str(error.value)
    assert get_state(model) is None


def test_float32_adapters_over_a_bfloat16_base_run_and_start_as_the_base() -> None:
    """peftkit train's bf16 mode keeps adapters in float32 over a bf16 base: the norm mixes the two dtypes."""
    from peftkit.zoo import build_model

    model = build_model("llama-tiny").to(torch.bfloat16)
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    peftkit.attach(model, {"adapters": {"d": [{"method": "dora", "target": ["q_proj", "down_proj"], "r": 2}]}})
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = model(input_ids=ids).logits
    torch.testing.assert_close(adapted.float(), base.float(), rtol=2e-2, atol=2e-2)
