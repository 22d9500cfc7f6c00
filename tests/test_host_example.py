"""The one-file host plugin of docs/examples/int8_host.py: a quantised layer type peftkit has never seen becomes a
host for every weight-site method, refuses merges by name, and merges into a dequantised model."""

from __future__ import annotations

import pytest
import torch
from int8_host import RowInt8Linear, quantize_linears, quantize_rows, register
from torch import nn

import peftkit
from peftkit.zoo import TINY_MODELS

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture
def model():
    register()
    torch.manual_seed(0)
    return quantize_linears(TINY_MODELS["llama-tiny"](), TARGETS).train()


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def _randomise(model) -> None:
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(parameter.numel()))


def test_an_unregistered_quantised_type_is_refused_at_attach_naming_it():
    class Unknown(nn.Module):  # another library's quantised linear, which no host plugin registered
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.register_buffer("weight", quantize_rows(linear.weight)[0])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.float().t()

    torch.manual_seed(0)
    model = TINY_MODELS["llama-tiny"]()
    layer = model.model.layers[0].self_attn
    layer.q_proj = Unknown(layer.q_proj)
    with pytest.raises(
        peftkit.PeftkitError, match=r"\(Unknown\), which 'lora' cannot adapt.*int8.*register_weight_site"
    ):
        peftkit.attach(model, {"adapters": {"d": [{"method": "lora", "target": "layers.0.self_attn.q_proj"}]}})
    assert peftkit.lifecycle.state.get_state(model) is None


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_weight_site_methods_run_beside_the_registered_host_and_merge_only_into_a_dequantised_copy(model, method):
    ids = _ids()
    with torch.no_grad():
        base = model(input_ids=ids).logits
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.attach(model, {"adapters": {"d": [{"method": method, "target": list(TARGETS)}]}})
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=1e-6)  # identity at init
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(b.grad is None for n, b in model.named_parameters() if not b.requires_grad)
    _randomise(model)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    with pytest.raises(peftkit.AttachError, match=r"stored as int8 rows.*dequantize=torch\.float32"):
        peftkit.merge(model)
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items() if k in stored)
    errors = peftkit.merge_error(model)
    assert set(errors) and all(e > 0 for e in errors.values())  # a round trip through int8 rows loses something
    merged = peftkit.merge_and_detach(model, dequantize=torch.float32)
    assert not any(isinstance(m, RowInt8Linear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_detach_leaves_the_int8_rows_and_scales_bit_for_bit(model):
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.attach(model, {"adapters": {"d": [{"method": "lora", "target": list(TARGETS), "r": 2}]}})
    _randomise(model)
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    peftkit.detach(model)
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
