"""The helpers a plugin author builds on: dense updates and feature scales on a weight site (checked against the host
run with a rewritten weight, in plain torch), the merge precision, the composition rules, variants of a registered
method, and the suite's randomisation scaled to the method."""

from __future__ import annotations

import typing

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scale_method import Scale
from torch import nn
from torch.func import functional_call
from weight_hosts import hosts, weight_in_layout

import peftkit
from peftkit import compose, testing
from peftkit.interop.peft import method_for_peft_type
from peftkit.sites import make_site, widened
from peftkit.zoo import build_model

DTYPES = st.sampled_from([torch.float32, torch.float64])


@given(host=hosts(DTYPES), scale=st.floats(-3.0, 3.0), seed=st.integers(0, 1000))
def test_a_dense_update_is_the_host_run_with_the_updated_weight(host, scale: float, seed: int) -> None:
    module, x, _ = host
    site = make_site("weight", module)
    delta = torch.randn(site.out_features, site.in_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = site.add_dense_update_(module(x), x, delta, scale)
        updated = {**dict(module.named_parameters()), "weight": module.weight + scale * weight_in_layout(module, delta)}
        want = functional_call(module, updated, (x,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_dense_update_passes_gradients_to_the_factors_it_is_built_from() -> None:
    module = nn.Embedding(6, 4)
    site = make_site("weight", module)
    a, b = torch.randn(2, 6, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    ids = torch.tensor([[0, 5, 2]])
    site.add_dense_update_(module(ids), ids, widened(b) @ widened(a)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad is not None


@given(host=hosts(DTYPES), side=st.sampled_from(["out", "in"]), seed=st.integers(0, 1000))
def test_scaling_features_rescales_the_output_or_the_input(host, side: str, seed: int) -> None:
    module, x, dtype = host
    if side == "in" and isinstance(module, nn.Embedding | nn.Conv2d):
        return  # an id or a patch has no per-feature input to rescale by a weight-free reference
    site = make_site("weight", module)
    size = site.out_features if side == "out" else site.in_features
    factor = torch.rand(size, generator=torch.Generator().manual_seed(seed), dtype=dtype) + 0.5
    with torch.no_grad():
        if side == "out":
            shape = (1, -1, 1, 1) if isinstance(module, nn.Conv2d) else (-1,)
            want = module(x) * factor.reshape(shape)
        else:
            want = module(x * factor)
        site.scale_features_(factor, side)
        torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-5)


def test_the_merge_precision_is_float32_or_wider() -> None:
    assert widened(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert widened(torch.ones(2, dtype=torch.float16)).dtype == torch.float32
    assert widened(torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    same = torch.ones(2)
    assert widened(same) is same  # no copy for a float32 tensor


def test_the_rules_are_importable_and_the_default_is_sum() -> None:
    assert peftkit.ALL_RULES == frozenset(typing.get_args(compose.Rule)) == {"sum", "stack", "gate", "average", "fuse"}
    assert {"sum"} == peftkit.DEFAULT_RULES
    plain = peftkit.Capabilities(site="weight", module_types=(nn.Linear,), mergeable=False, identity_at_init=False)
    assert plain.compose_rules == peftkit.DEFAULT_RULES


# -- variants of a registered method -----------------------------------------------------------------------------
def test_a_variant_needs_no_config_class_of_its_own() -> None:
    class Rank2LoRA(peftkit.get_method("lora")):
        name = "lora-rank2"

    with peftkit.registered(Rank2LoRA):
        spec = peftkit.Spec.model_validate({"adapters": {"a": [{"method": "lora-rank2", "target": "c_attn", "r": 2}]}})
        entry = spec.adapters["a"][0]
        assert entry.method == "lora-rank2" and entry.r == 2  # the parent's fields, under the variant's name
        model = build_model("gpt2-tiny")
        peftkit.attach(model, spec)
        assert peftkit.trainable_parameters(model).trainable > 0
    assert peftkit.get_method("lora").config.model_fields["method"].default == "lora"  # the parent is untouched


def test_a_config_declared_for_another_name_is_refused_with_the_fix() -> None:
    class Misnamed(Scale):
        name = "misnamed"
        config = Scale.config  # declared on the class, pinned to "scale"

    with pytest.raises(peftkit.RegistryError, match=r"pins `method` to 'scale'.*name is 'misnamed'"):
        peftkit.register_method(Misnamed)
    assert "misnamed" not in peftkit.known_methods()


def test_a_variant_does_not_claim_its_parents_peft_format() -> None:
    lora = peftkit.get_method("lora")

    class Variant(lora):
        name = "lora-variant"

    with peftkit.registered(Variant):
        assert method_for_peft_type({"peft_type": "LORA"}) is lora
        model = build_model("gpt2-tiny")
        peftkit.attach(model, {"adapters": {"default": [{"method": "lora-variant", "target": "c_attn"}]}})
        with pytest.raises(peftkit.CheckpointError, match="has no HF PEFT format"):
            peftkit.to_peft(model, "/nonexistent/never-written")


def test_checking_a_class_whose_name_another_class_holds_is_refused() -> None:
    class Impostor(Scale):
        name = "lora"

    with pytest.raises(peftkit.RegistryError, match="already registered"):
        testing.check("identity_at_init", Impostor, max_examples=1)


# -- the suite's randomisation, scaled to the method ------------------------------------------------------------
def moved(model: nn.Module, ids: torch.Tensor, before: torch.Tensor) -> float:
    with torch.no_grad():
        after = model(input_ids=ids).logits
    return ((after - before).abs().max() / before.abs().max()).item()


@pytest.mark.parametrize(
    "entry",
    [
        {"method": "lora", "target": "c_attn", "r": 1, "alpha": 32.0},  # a fixed std makes updates ~100x W
        {"method": "loha", "target": "c_attn", "r": 1, "alpha": 0.01},  # a tiny product of factors
    ],
)
def test_randomising_with_a_run_moves_the_output_by_about_the_asked_change(entry: dict) -> None:
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))

    def run(model: nn.Module) -> torch.Tensor:
        return model(input_ids=ids).logits

    moves = {}
    for calibrated in (False, True):
        model = build_model("gpt2-tiny").eval()
        with torch.no_grad():
            before = run(model)
        peftkit.attach(model, {"adapters": {"default": [entry]}})
        testing.randomise_adapters(model, run=run if calibrated else None)
        moves[calibrated] = moved(model, ids, before)
    assert 0.2 / 20 <= moves[True] <= 0.2 * 2.5, moves
    assert not 0.2 / 20 <= moves[False] <= 0.2 * 2.5, moves  # the fixed std misses for these two
