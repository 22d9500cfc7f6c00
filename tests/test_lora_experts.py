"""LoRA on fused mixture-of-experts parameters (``method: lora-experts``) on a tiny Qwen3-MoE.

The conformance suite checks the general properties on the same model; here: HF PEFT's ``target_parameters`` LoRA
as the oracle in both directions (max abs difference <= 1e-5), every experts implementation transformers dispatches
to, the transposed layout against a plain-torch reference, and the refusals, each with the model unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit
from peftkit.lifecycle.state import get_state
from peftkit.zoo import build_model

peft = pytest.importorskip("peft", reason="the HF peft package (the oracle for these tests) is not installed")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOLERANCE = 1e-5
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _base(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model("qwen3-moe-tiny", **overrides).eval() if overrides else build_model("qwen3-moe-tiny").eval()


def _output(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _randomise(parameters) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and (a - b).abs().max().item() <= TOLERANCE, (a - b).abs().max().item()


def _spec(targets=EXPERTS, **fields) -> dict:
    return {"adapters": {"default": [{"method": "lora-experts", "target": targets, "r": 2, "alpha": 4.0, **fields}]}}


@pytest.mark.parametrize("modules", [[], ["q_proj", "v_proj"]], ids=["experts", "experts+attention"])
@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_target_parameters_adapter_loads_with_equal_outputs(modules, rslora, tmp_path):
    base = _base()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=modules, target_parameters=EXPERTS, use_rslora=rslora)
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    _randomise([p for p in peft_model.parameters() if p.requires_grad])
    expected = _output(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    model = peftkit.from_peft(copy.deepcopy(base), tmp_path / "peft")
    assert {a.method.name for a in get_state(model).attached} == (
        {"lora-experts", "lora"} if modules else {"lora-experts"}
    )
    assert (_output(model) - _output(base)).abs().max() > 1e-2  # the adapter does something
    _close(_output(model), expected)


@pytest.mark.parametrize("targets", [EXPERTS, EXPERTS[1:]], ids=["both", "down_proj"])
def test_a_peftkit_adapter_exports_to_peft_with_equal_outputs(targets, tmp_path):
    base = _base()
    model = peftkit.attach(copy.deepcopy(base), _spec(targets))
    _randomise([p for p in model.parameters() if p.requires_grad])
    expected = _output(model)
    peftkit.to_peft(model, tmp_path / "export")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export").eval()
    _close(_output(loaded), expected)
    back = peftkit.from_peft(copy.deepcopy(base), tmp_path / "export")
    _close(_output(back), expected)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_every_experts_implementation_sees_the_update(implementation):
    eager = peftkit.attach(_base(), _spec())
    _randomise([p for p in eager.parameters() if p.requires_grad])
    other = copy.deepcopy(eager)
    other.set_experts_implementation(implementation)
    assert other.config._experts_implementation == implementation
    _close(_output(other), _output(eager))
    peftkit.merge(other)
    _close(_output(other), _output(eager))


class TransposedExperts(nn.Module):
    """Experts stored as (E, in, out), as transformers declares with ``is_transposed=True`` (GPT-OSS)."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.num_experts = 3
        self.up = nn.Parameter(torch.randn(3, 6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # every expert on every row, summed: enough to compare
        return torch.einsum("b i, e i o -> b o", x, self.up)


def test_the_transposed_layout_adapts_each_experts_map_as_a_plain_reference_does():
    torch.manual_seed(0)
    model = nn.Sequential(TransposedExperts())
    x = torch.randn(4, 6)
    peftkit.attach(model, _spec(["0.up"]))
    adapter = get_state(model).attached[0].module
    _randomise(adapter.parameters())
    weight = model[0].up.detach().clone()
    update = torch.bmm(adapter.lora_b["up"], adapter.lora_a["up"]).detach() * adapter.scaling  # (E, out, in)
    reference = torch.einsum("b i, e i o -> b o", x, weight + update.transpose(1, 2))
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(model[0].up, weight)  # the update lives for the forward only


def _refused(model, spec, *needles):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftkit.PeftkitError) as raised:
        peftkit.attach(model, spec)
    for needle in needles:
        assert needle in str(raised.value), str(raised.value)
    assert get_state(model) is None and list(model.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class UndeclaredExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.Parameter(torch.randn(2, 4, 4))


def test_a_parameter_of_unknown_layout_is_refused_by_name_with_the_model_unchanged():
    _refused(_base(), _spec(["self_attn.q_proj.weight"]), "q_proj.weight", "declares no experts layout")
    _refused(nn.Sequential(UndeclaredExperts()), _spec(["0.experts"]), "'0.experts'", "UndeclaredExperts")
    _refused(_base(), _spec(["mlp.experts.gate_up"]), "matched no", "mlp.experts.gate_up_proj")
    gated = {
        "adapters": {
            "x": [{"method": "lora-experts", "target": EXPERTS}],
            "y": [{"method": "lora-experts", "target": EXPERTS}],
        },
        "compose": [{"rule": "gate", "adapters": ["x", "y"]}],
    }
    _refused(_base(), gated, "cannot be composed by 'gate'")


def test_two_adapters_on_one_experts_module_add_up_and_routing_is_refused():
    model = _base()
    peftkit.attach(model, _spec())
    peftkit.attach(model, {"adapters": {"other": [{"method": "lora-experts", "target": EXPERTS[:1], "r": 1}]}})
    _randomise([p for p in model.parameters() if p.requires_grad])
    both = _output(model)
    merged = copy.deepcopy(model)
    peftkit.merge(merged)
    _close(_output(merged), both)
    peftkit.activate(model, "default")
    assert (_output(model) - both).abs().max() > 1e-3
    with pytest.raises(peftkit.AttachError, match="parameter site"), peftkit.route(model, ["default", "other"]):
        pass


def test_routing_other_adapters_leaves_the_experts_alone_at_any_sequence_length():
    model = _base()
    spec = {
        "adapters": {
            "e": [{"method": "lora-experts", "target": EXPERTS}],
            "q": [{"method": "lora", "target": "q_proj", "r": 2}],
        }
    }
    peftkit.attach(model, spec)
    _randomise([p for p in model.parameters() if p.requires_grad])
    alone = peftkit.attach(_base(), {"adapters": {"q": spec["adapters"]["q"]}})
    with torch.no_grad():
        for name, parameter in alone.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(dict(model.named_parameters())[name])
    for length in (1, 5):
        ids = torch.randint(3, 100, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad(), peftkit.route(model, ["q", None]):
            routed = model(input_ids=ids).logits
        with torch.no_grad():
            _close(routed[0], alone(input_ids=ids).logits[0])
            with peftkit.disabled(alone):
                _close(routed[1], alone(input_ids=ids).logits[1])


def test_an_interrupted_forward_leaves_no_adapted_parameter_behind():
    model = _base()
    base = _output(model)
    peftkit.attach(model, _spec())
    _randomise([p for p in model.parameters() if p.requires_grad])
    adapted = _output(model)
    experts = model.model.layers[0].mlp.experts

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    handle = experts.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        _output(model)
    handle.remove()
    _close(_output(model), adapted)  # the next forward starts from the original parameter, not W + update
    assert isinstance(experts._parameters["gate_up_proj"], nn.Parameter)
    with pytest.raises(KeyboardInterrupt):
        handle = experts.register_forward_hook(interrupt)
        _output(model)
    handle.remove()
    peftkit.detach(model)
    assert isinstance(experts._parameters["gate_up_proj"], nn.Parameter)
    assert torch.equal(_output(model), base)
