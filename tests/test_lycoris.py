"""LoHa and LoKr beyond the conformance suite: LoKr's factorisation rule against PEFT's (the oracle), the training-time
dropouts both methods share, and the shapes LoKr refuses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import peftkit
from peftkit.lifecycle.state import get_state
from peftkit.zoo import build_model

lokr = pytest.importorskip("peftkit_methods.lokr")


@given(dimension=st.integers(1, 5000), factor=st.sampled_from([-1, 1, 2, 3, 4, 8, 16, 64]))
def test_lokr_splits_each_dimension_as_peft_does(dimension, factor):
    factorization = pytest.importorskip("peft.tuners.lokr.layer").factorization
    if factor > 0 and dimension % factor:
        return  # refused by peftkit at plan (test below); PEFT falls back to a bounded search
    assert lokr.split(dimension, factor) == factorization(dimension, factor)


def test_a_decompose_factor_that_does_not_divide_the_weight_is_refused_by_name():
    model = build_model("llama-tiny")  # 32 wide
    before = {k: v.clone() for k, v in model.state_dict().items()}
    entry = {"method": "lokr", "target": "q_proj", "decompose_factor": 3}
    with pytest.raises(peftkit.PeftkitError, match=r"decompose_factor 3 does not divide the host's 32 x 32 weight"):
        peftkit.attach(model, {"adapters": {"default": [entry]}})
    assert get_state(model) is None and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _randomised_adapter(method: str, **fields):
    """One adapter of ``method`` on a 32-wide projection, its factors drawn at random (so that dW is not zero)."""
    torch.manual_seed(0)
    model = build_model("llama-tiny")
    entry = {"method": method, "target": "layers.0.self_attn.q_proj", **fields}
    peftkit.attach(model, {"adapters": {"default": [entry]}})
    adapter = get_state(model).attached[0].module
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_()
    return adapter


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_rank_dropout_zeroes_rows_of_the_update_in_training_only(method):
    adapter = _randomised_adapter(method, rank_dropout=0.5)
    x = torch.randn(3, 32)
    out = torch.zeros(3, 32)
    adapter.eval()
    full = adapter(x, out.clone())
    assert torch.equal(full, adapter(x, out.clone()))  # no dropout in eval
    adapter.train()
    dropped = adapter(x, out.clone())
    zero_columns = (dropped.abs().sum(dim=0) == 0).sum().item()  # a dropped row of dW is a silent output feature
    assert 4 <= zero_columns <= 28


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_module_dropout_skips_the_whole_adapter_about_as_often_as_asked(method):
    adapter = _randomised_adapter(method, module_dropout=0.3)
    adapter.train()
    x, out = torch.randn(2, 32), torch.zeros(2, 32)
    skipped = sum(bool((adapter(x, out.clone()) == 0).all()) for _ in range(400))
    assert 80 <= skipped <= 160  # 30 % of 400 = 120


def test_lokr_on_a_gpt2_conv1d_trains_but_is_not_exported_to_peft(tmp_path):
    model = build_model("gpt2-tiny")
    peftkit.attach(model, {"adapters": {"default": [{"method": "lokr", "target": "c_attn", "r": 2}]}})
    assert any(p.requires_grad for p in model.parameters())
    with pytest.raises(peftkit.PeftkitError, match=r"LoKr on .*c_attn' \(Conv1D\) is not exported"):
        peftkit.to_peft(model, tmp_path / "export")


@given(
    d_in=st.sampled_from([4, 6, 12, 16, 30]),
    d_out=st.sampled_from([4, 8, 9, 20]),
    r=st.integers(1, 6),
    decompose_both=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_lokr_on_a_linear_computes_the_kronecker_update_without_building_it(d_in, d_out, r, decompose_both, seed):
    """The factored forward equals the host running the dense W1 ⊗ W2, outputs and gradients (float64)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out)).double()
    entry = {"method": "lokr", "target": "0", "r": r, "decompose_both": decompose_both}
    peftkit.attach(model, {"adapters": {"default": [entry]}})
    adapter = get_state(model).attached[0].module
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_()
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    factored = adapter(x, torch.zeros(3, 5, d_out, dtype=torch.float64))
    dense = lokr.DenseUpdateAdapter.forward(adapter, x, torch.zeros(3, 5, d_out, dtype=torch.float64))
    torch.testing.assert_close(factored, dense, rtol=1e-10, atol=1e-10)
    grads = [torch.autograd.grad(y.square().sum(), list(adapter.parameters())) for y in (factored, dense)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
