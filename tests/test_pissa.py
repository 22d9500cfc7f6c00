"""PiSSA and OLoRA (LoRA's ``init: pissa | olora``): an adapter that rewrites its host's weight at attach.

The conformance suite checks the general properties (identity at init, merge, detach bit for bit, portable save);
here: the factors and residual against HF PEFT (the oracle, 1e-5), checkpoints both ways against the original base,
what the core does around a rewritten host, and every refusal, with the model unchanged.
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
TARGETS = {
    "gpt2-tiny": ["c_attn", "c_proj"],
    "llama-tiny": ["q_proj", "v_proj", "down_proj"],
    "bert-tiny": ["query", "value"],
}
CAUSAL = {"gpt2-tiny", "llama-tiny"}


def _base(family: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(family).eval()


def _output(model: nn.Module, family: str) -> torch.Tensor:
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if family in CAUSAL else out.last_hidden_state


def _spec(family: str, init: str, **fields) -> dict:
    entry = {"method": "lora", "target": TARGETS[family], "r": 4, "alpha": 8.0, "init": init, **fields}
    return {"adapters": {"default": [entry]}}


def _peft_config(family: str, init: str) -> LoraConfig:
    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[family],
        init_lora_weights=init,
        fan_in_fan_out=family == "gpt2-tiny",
    )


def _train(parameters, seed: int = 2) -> None:
    """Move the factors as training would (the same values in both libraries)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and (a - b).abs().max().item() <= TOLERANCE, (a - b).abs().max().item()


def _peft_factors(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name.removeprefix("base_model.model."): (module.lora_A["default"].weight, module.lora_B["default"].weight)
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


# PEFT's OLoRA factors a GPT-2 Conv1D weight as stored, (d_in, d_out), without its fan_in_fan_out transpose, so its
# factors get the wrong shapes there; peftkit factors the (d_out, d_in) map (the conformance suite checks Conv1D)
ORACLE_CASES = [(f, i) for f in sorted(TARGETS) for i in ("pissa", "olora") if (f, i) != ("gpt2-tiny", "olora")]


@pytest.mark.parametrize(("family", "init"), ORACLE_CASES)
def test_factors_residual_and_trained_outputs_equal_peft(family, init):
    base = _base(family)
    peft_model = get_peft_model(copy.deepcopy(base), _peft_config(family, init)).eval()
    model = peftkit.attach(copy.deepcopy(base), _spec(family, init)).eval()
    theirs = _peft_factors(peft_model)
    modules = dict(model.named_modules())
    peft_modules = dict(peft_model.base_model.model.named_modules())
    for attached in get_state(model).attached:
        a, b = theirs[attached.path]
        scaling = attached.module.scaling
        _close(scaling * attached.module.lora_b @ attached.module.lora_a, scaling * b @ a)  # the principal part
        _close(modules[attached.path].weight, peft_modules[attached.path].base_layer.weight)  # the residual
        with torch.no_grad():  # the same starting factors in both (an SVD's signs are its own choice)
            attached.module.lora_a.copy_(a)
            attached.module.lora_b.copy_(b)
    _close(_output(model, family), _output(base, family))
    _train([p for p in model.parameters() if p.requires_grad])
    _train([p for p in peft_model.parameters() if p.requires_grad])
    _close(_output(model, family), _output(peft_model, family))


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_a_peft_pissa_adapter_converted_by_peft_loads_on_the_original_base(family, tmp_path):
    base = _base(family)
    peft_model = get_peft_model(copy.deepcopy(base), _peft_config(family, "pissa")).eval()
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: keep the initial adapter
    peft_model.save_pretrained(tmp_path / "initial")
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    _train([p for p in peft_model.parameters() if p.requires_grad])
    expected = _output(peft_model, family)
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    model = peftkit.from_peft(copy.deepcopy(base), tmp_path / "converted")
    assert {a.config.r for a in get_state(model).attached} == {8}
    _close(_output(model, family), expected)


@pytest.mark.parametrize("family", sorted(TARGETS))
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_peftkit_adapter_exports_as_plain_lora_that_peft_loads_on_the_original_base(family, init, tmp_path):
    base = _base(family)
    model = peftkit.attach(copy.deepcopy(base), _spec(family, init, rslora=init == "olora")).eval()
    _train([p for p in model.parameters() if p.requires_grad])
    expected = _output(model, family)
    peftkit.to_peft(model, tmp_path / "export")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export").eval()
    assert loaded.peft_config["default"].r == 8 and loaded.peft_config["default"].init_lora_weights is True
    _close(_output(loaded, family), expected)


def test_plan_says_which_base_weights_change_and_attach_changes_only_those():
    model = _base("llama-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    planned = peftkit.plan(model, _spec("llama-tiny", "pissa"))
    assert all(row.rewrites_base for row in planned.rows)
    assert "base weight changed at attach" in str(planned) and "model.layers.0.mlp.down_proj" in str(planned)
    assert not any(r.rewrites_base for r in peftkit.plan(model, _spec("llama-tiny", "kaiming")).rows)
    peftkit.attach(model, _spec("llama-tiny", "pissa"))
    rewritten = {f"{row.path}.weight" for row in planned.rows}
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value) == (key not in rewritten), key


def test_an_inactive_or_disabled_pissa_adapter_leaves_the_base_model_and_others_run_beside_it():
    model = _base("llama-tiny")
    base = _output(model, "llama-tiny")
    peftkit.attach(model, _spec("llama-tiny", "pissa"))
    other = {"adapters": {"other": [{"method": "lora", "target": "k_proj", "r": 2}]}}  # a module PiSSA left alone
    peftkit.attach(model, other)
    _train([p for p in model.parameters() if p.requires_grad])
    with peftkit.disabled(model):
        _close(_output(model, "llama-tiny"), base)
    peftkit.activate(model, [])
    _close(_output(model, "llama-tiny"), base)
    reference = peftkit.attach(_base("llama-tiny"), other)  # "other" alone on the original base
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(dict(model.named_parameters())[name])
    peftkit.activate(model, "other")
    _close(_output(model, "llama-tiny"), _output(reference, "llama-tiny"))
    with pytest.raises(peftkit.AttachError, match="rewrote the weight"), peftkit.route(model, ["default", None]):
        pass
    with peftkit.route(model, ["other", None]):  # routing the others is unaffected
        routed = _output(model, "llama-tiny")
    _close(routed[0], _output(reference, "llama-tiny")[0])
    _close(routed[1], base[1])


def test_a_checkpoint_as_trained_resumes_exactly_and_the_portable_one_is_plain_lora(tmp_path):
    model = _base("gpt2-tiny")
    peftkit.attach(model, _spec("gpt2-tiny", "pissa", pissa_iterations=2))
    _train([p for p in model.parameters() if p.requires_grad])
    expected = _output(model, "gpt2-tiny")
    peftkit.save(model, tmp_path / "as-trained", portable=False)
    peftkit.save(model, tmp_path / "portable")
    assert peftkit.read_spec(tmp_path / "as-trained").adapters["default"][0].init == "pissa"
    portable = peftkit.read_spec(tmp_path / "portable").adapters["default"][0]
    assert (portable.init, portable.r, portable.alpha) == ("kaiming", 8, 16.0)
    resumed = peftkit.load(_base("gpt2-tiny"), tmp_path / "as-trained")
    assert torch.equal(_output(resumed, "gpt2-tiny"), expected)  # the same residual, recomputed from a fixed seed
    _close(_output(peftkit.load(_base("gpt2-tiny"), tmp_path / "portable"), "gpt2-tiny"), expected)


def test_merge_and_detach_keeps_the_adapted_weight_and_detach_restores_the_original_bit_for_bit():
    model = _base("llama-tiny")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.attach(model, _spec("llama-tiny", "olora"))
    _train([p for p in model.parameters() if p.requires_grad])
    adapted = _output(model, "llama-tiny")
    baked = peftkit.merge_and_detach(copy.deepcopy(model))
    _close(_output(baked, "llama-tiny"), adapted)
    peftkit.merge(model)
    _close(_output(model, "llama-tiny"), adapted)
    peftkit.detach(model)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def test_the_randomised_svd_is_deterministic_and_finds_the_principal_part():
    from peftkit_methods.lora import randomized_svd

    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(48, 48, generator=generator))
    singular = 0.7 ** torch.arange(48.0)
    weight = u[:, :48] * singular @ v.T
    exact = u[:, :4] * singular[:4] @ v[:, :4].T
    for iterations in (0, 2):
        left, found, right = randomized_svd(weight, 4, iterations)
        again = randomized_svd(weight, 4, iterations)
        assert all(torch.equal(x, y) for x, y in zip((left, found, right), again, strict=True))
        approximation = left[:, :4] * found[:4] @ right[:4]
        assert (approximation - exact).abs().max() < (1e-3 if iterations else 5e-2)


def _refused(model, spec, error, *needles):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as raised:
        peftkit.attach(model, spec)
    for needle in needles:
        assert needle in str(raised.value), str(raised.value)
    assert list(model.state_dict()) == list(before)
    assert all(v.is_meta or torch.equal(before[k], v) for k, v in model.state_dict().items())
    return raised.value


def test_bad_input_is_refused_by_name_with_the_model_unchanged():
    small = nn.Sequential(nn.Linear(6, 3))
    _refused(
        small,
        {"adapters": {"d": [{"method": "lora", "target": "0", "r": 4, "init": "pissa"}]}},
        peftkit.TargetingError,
        "r=4",
        "set r to 3 or less",
    )
    spec = {"adapters": {"d": [{"method": "lora", "target": "0", "r": 2, "init": "olora", "pissa_iterations": 2}]}}
    _refused(small, spec, peftkit.SpecError, "pissa_iterations")
    _refused(
        small, {"adapters": {"d": [{"method": "dora", "target": "0", "init": "pissa"}]}}, peftkit.SpecError, "init"
    )
    gpt2 = _base("gpt2-tiny")  # lm_head is the input embedding's tensor
    _refused(
        gpt2,
        {"adapters": {"d": [{"method": "lora", "target": "lm_head", "r": 2, "init": "pissa"}]}},
        peftkit.AttachError,
        "tied",
        "wte",
    )
    meta = _base("llama-tiny").to("meta")
    _refused(meta, _spec("llama-tiny", "pissa"), peftkit.AttachError, "meta device")
    model = _base("llama-tiny")
    peftkit.attach(model, _spec("llama-tiny", "pissa"))
    second = {"adapters": {"second": [{"method": "lora", "target": "q_proj", "r": 2, "init": "olora"}]}}
    _refused(model, second, peftkit.AttachError, "'second' (lora) is on that module too", "'default'")
    weighted = {
        "adapters": {
            "x": [{"method": "lora", "target": "k_proj", "r": 2, "init": "pissa"}],
            "y": [{"method": "lora", "target": "k_proj", "r": 2}],
        },
        "compose": [{"rule": "gate", "adapters": ["x", "y"]}],
    }
    _refused(_base("llama-tiny"), weighted, peftkit.AttachError, "cannot be composed by 'gate'")


def test_a_rewritten_host_takes_no_other_adapter_and_is_not_trained_in_full_in_either_order():
    model = _base("llama-tiny")
    peftkit.attach(model, {"adapters": {"other": [{"method": "dora", "target": "q_proj", "r": 2}]}})
    _refused(model, _spec("llama-tiny", "pissa"), peftkit.AttachError, "'other' (dora) is on that module too")
    peftkit.merge(model, "other")
    _refused(model, _spec("llama-tiny", "olora"), peftkit.AttachError, "and merged into it")
    model = peftkit.attach(_base("llama-tiny"), _spec("llama-tiny", "pissa"))
    later = {"adapters": {"later": [{"method": "ia3", "target": "v_proj"}]}}
    _refused(model, later, peftkit.AttachError, "'later' (ia3) is on that module too")
    trained = {**_spec("llama-tiny", "pissa"), "trainable": ["layers.0.self_attn"]}
    _refused(_base("llama-tiny"), trained, peftkit.AttachError, "trainable 'model.layers.0.self_attn'")
