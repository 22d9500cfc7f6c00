"""BitFit and LayerNorm tuning (deltas beside 1-D parameters, on the vector site) beyond the conformance suite: the
base's vectors never change, the targets are parameter paths, refusals name the problem and leave the model as it
was, any family's norm is followed through its own forward, and HF PEFT's LN_TUNING checkpoints go both ways (the
`peft` package as the oracle, max abs diff <= 1e-5 in float32, all four families)."""

from __future__ import annotations

import pytest
import torch
from test_peft_interop import FAMILIES, _base, _close, _peft_to_peftkit, _peftkit_to_peft

import peftkit
from peftkit.lifecycle.state import get_state


def _unchanged(model, before) -> bool:
    return list(model.state_dict()) == list(before) and all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )


def test_bitfit_trains_a_delta_beside_every_bias_and_the_base_bias_never_changes():
    model = _base("bert-tiny")
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".bias")}
    peftkit.attach(model, {"adapters": {"b": [{"method": "bitfit"}]}})
    assert peftkit.trainable_parameters(model).trainable == sum(t.numel() for t in biases.values())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(torch.randint(0, 100, (2, 6))).last_hidden_state.square().mean().backward()
    optimizer.step()
    assert all(torch.equal(p, biases[n]) for n, p in model.named_parameters() if n in biases)
    x = torch.randint(0, 100, (2, 6))
    model.eval()
    with torch.no_grad():
        adapted = model(x).last_hidden_state
        peftkit.merge(model)
        torch.testing.assert_close(model(x).last_hidden_state, adapted)
        assert any(not torch.equal(p, biases[n]) for n, p in model.named_parameters() if n in biases)
        peftkit.unmerge(model)
    assert all(torch.allclose(p, biases[n], atol=1e-7) for n, p in model.named_parameters() if n in biases)


def test_bitfit_trains_exactly_as_unfreezing_the_biases_would():
    """AdamW on a delta that starts at zero beside b takes the steps it would take on b itself: the same losses."""
    import copy

    base = _base("bert-tiny")
    ours = peftkit.attach(copy.deepcopy(base), {"adapters": {"b": [{"method": "bitfit"}]}}).train()
    plain = copy.deepcopy(base).train()
    for name, parameter in plain.named_parameters():
        parameter.requires_grad_(name.endswith(".bias"))
    optimizers = [
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        for model in (ours, plain)
    ]
    ids = torch.randint(3, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    for step in range(4):
        losses = []
        for model, optimizer in zip((ours, plain), optimizers, strict=True):
            torch.manual_seed(step)  # the same dropout masks
            loss = model(ids).last_hidden_state.square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_bitfit_on_a_model_without_biases_in_the_target_is_refused_and_the_model_left_as_it_was():
    model = _base("llama-tiny")  # no bias in any projection
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.TargetingError, match=r"target '\*\.bias' matched no module this method can adapt"):
        peftkit.attach(model, {"adapters": {"b": [{"method": "bitfit"}]}})
    assert get_state(model) is None and _unchanged(model, before)


def test_bitfit_refuses_a_parameter_that_is_not_a_bias():
    model = _base("gpt2-tiny")
    with pytest.raises(peftkit.TargetingError, match=r"BitFit trains biases, and \['weight'\] of LayerNorm are not"):
        peftkit.attach(model, {"adapters": {"b": [{"method": "bitfit", "target": "*ln_f.weight"}]}})
    assert get_state(model) is None


def test_bitfit_and_lora_on_one_projection_add_up_and_merge():
    model = _base("gpt2-tiny").double()
    spec = {
        "adapters": {
            "lora": [{"method": "lora", "target": "c_attn", "r": 2}],
            "bias": [{"method": "bitfit", "target": "*c_attn.bias"}],
        }
    }
    peftkit.attach(model, spec)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    x = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        adapted = model(x).logits
        with peftkit.disabled(model):
            base = model(x).logits
        assert (adapted - base).abs().max() > 1e-4
        peftkit.merge(model)
        torch.testing.assert_close(model(x).logits, adapted)


class ShiftedRMSNorm(torch.nn.Module):
    """A family's norm that scales by ``1 + weight`` (as Gemma's does), unknown to peftkit by type."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_ln_tuning_follows_a_norm_it_finds_by_name_through_its_own_forward():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), ShiftedRMSNorm(8), torch.nn.Linear(8, 3)).double()
    plan = peftkit.plan(model, {"adapters": {"n": [{"method": "ln-tuning"}]}})
    assert [(row.path, row.parameters) for row in plan.rows] == [("1", 8)]  # the norm only, not the linears
    peftkit.attach(model, {"adapters": {"n": [{"method": "ln-tuning"}]}})
    delta = get_state(model).attached[0].module.deltas["weight"]
    with torch.no_grad():
        delta.normal_()
    x = torch.randn(4, 8, dtype=torch.float64)
    reference = ShiftedRMSNorm(8).double()
    with torch.no_grad():
        reference.weight.copy_(model[1].weight + delta)
        torch.testing.assert_close(model(x), model[2](reference(model[0](x))))


def test_ln_tuning_refuses_a_target_that_is_no_norm_and_names_the_norms_there_are():
    model = _base("llama-tiny")
    with pytest.raises(
        peftkit.TargetingError, match=r"'q_proj\.weight' matched no module .* closest: .*layernorm\.weight"
    ):
        peftkit.attach(model, {"adapters": {"n": [{"method": "ln-tuning", "target": "q_proj.weight"}]}})


# -- HF PEFT -----------------------------------------------------------------------------------------------------
peft = pytest.importorskip("peft")
from peft import LNTuningConfig  # noqa: E402

LN_TARGETS = {"gpt2-tiny": None, "llama-tiny": None, "bert-tiny": ["LayerNorm"], "roberta-tiny": ["LayerNorm"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_ln_tuning_loads_in_peftkit_with_equal_outputs(family, tmp_path):
    _close(*_peft_to_peftkit(family, LNTuningConfig(target_modules=LN_TARGETS[family]), tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", ["*", "*.weight"])
def test_peftkit_ln_tuning_exports_to_peft_with_equal_outputs(family, target, tmp_path):
    spec = {"adapters": {"default": [{"method": "ln-tuning", "target": target}]}}
    _close(*_peftkit_to_peft(family, spec, tmp_path))
