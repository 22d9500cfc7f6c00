"""The conformance suite: hypothesis properties that every method, built-in or third-party, is checked with.

Which properties apply is read from the method's :class:`~peftkit.Capabilities` (identity at init only where it
is declared, merge properties only for mergeable methods), never from its name. Host models, shapes, dtypes and
selectors are generated; a method's own config fields come from a strategy its author passes in.

    from hypothesis import strategies as st
    from peftkit import testing

    CONFIGS = st.fixed_dictionaries({"r": st.integers(1, 4)})

    @pytest.mark.parametrize("prop", testing.properties_for("my_method"))
    def test_my_method_conforms(prop):
        testing.check(prop, "my_method", configs=CONFIGS)
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import peftkit
from peftkit.keys import ADAPTER_CONTAINER
from peftkit.lifecycle.attach import get_state
from peftkit.method import Method
from peftkit.registry import get_method, known_methods, registered
from peftkit.testing_cases import Case, cases

# Worst relative error (max |merged - unmerged| / max |unmerged|) accepted per dtype.
# bfloat16 keeps 8 bits: a merged weight W + dW is rounded once more than the unmerged product, and whole layers and a
# softmax amplify that (benchmarks/merge_tolerance.py: worst 1.05 % over 1000 derandomised cases, 9.2 % once in random
# draws; docs/rules.md); float32 and float64 show the merge itself is exact up to their own rounding.
MERGE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-1}


def randomise_adapters(
    model: nn.Module, seed: int = 0, *, run: Callable[[nn.Module], torch.Tensor] | None = None, change: float = 0.2
) -> None:
    """Move every adapter parameter away from its initialisation, so that merge and save are not checked on a no-op.

    Without ``run``, each parameter gets noise of std 0.3. With ``run`` (the model's output on a fixed input), the
    noise is scaled to the method: one direction is drawn at std 0.3, then shortened while the output moves by more
    than 2.5x ``change`` of its size and lengthened while it moves by less than ``change / 20`` (within 1/256 and 16
    times the start). A fixed std cannot fit every method: on LoRA with alpha / r = 26 it makes updates ~100x the
    weights, on a product of small factors (LoHa) a change that rounding hides. It is lengthened only from rounding
    level, since a scale initialised at one crosses zero as its noise grows. The suite's properties use ``run``."""
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for n, p in model.named_parameters() if ADAPTER_CONTAINER in n.split(".")]
    noise = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in parameters]
    with torch.no_grad():
        if run is None or not parameters:
            for parameter, direction in zip(parameters, noise, strict=True):
                parameter.add_(direction.mul_(0.3))
            return
        start = [p.clone() for p in parameters]
        before = run(model).double()
        length = 0.3
        for _ in range(_CALIBRATION_ROUNDS):
            # bounded: a method whose output saturates (a normalised direction) would otherwise grow without end
            length = min(max(length, 0.3 / 256), 0.3 * 16)
            for parameter, origin, direction in zip(parameters, start, noise, strict=True):
                parameter.copy_(origin + length * direction)
            moved = relative_error(run(model), before)
            if math.isnan(moved) or moved > 2.5 * change:  # the square root: a product of two factors moves ~ length²
                length /= 4.0 if math.isnan(moved) else min(4.0, (moved / change) ** 0.5)
            elif moved < change / 20:  # rounding-level: grow; above that, keep the std that fits the parameter
                length *= 4.0 if moved == 0 else min(4.0, (change / moved) ** 0.5)
            else:
                return


_CALIBRATION_ROUNDS = 8


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: how the merge properties measure a merged output against the unmerged one."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def weight_drift(
    before: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], after: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Per floating-point state-dict entry, max |after - before| over the largest magnitude it took, merged or not
    (rounding scales with that): how far a merge and unmerge moved the model's weights."""
    drift = {}
    for key, value in after.items():
        if value.is_floating_point():
            scale = torch.maximum(before[key].double().abs().max(), merged[key].double().abs().max()).clamp_min(1e-12)
            drift[key] = ((value.double() - before[key].double()).abs().max() / scale).item()
    return drift


def _rewrites_base(case: Case) -> bool:
    method = get_method(case.entry["method"])
    return method.capabilities_for(method.config.model_validate(case.entry)).rewrites_base


def _reproduces(output: torch.Tensor, expected: torch.Tensor, case: Case) -> bool:
    """Equal, or for an adapter that rewrote its host, within the merge tolerance: the residual it leaves in the
    host is rounded once, so the base comes back from it and a portable checkpoint only up to that rounding."""
    if _rewrites_base(case):
        return relative_error(output, expected) <= MERGE_TOLERANCE[case.dtype]
    return torch.equal(output, expected)


def _attached(case: Case) -> tuple[nn.Module, torch.Tensor]:
    model = case.fresh()
    base = case.run(model)
    peftkit.attach(model, case.spec())
    return model, base


# -- the properties --------------------------------------------------------------------------------------------
def identity_at_init(case: Case) -> None:
    method = get_method(case.entry["method"])
    config = method.config.model_validate({k: v for k, v in case.entry.items()})
    assume(method.capabilities_for(config).identity_at_init)  # e.g. only a gated prefix is an identity at init
    model = case.fresh()
    base = case.run(model)
    peftkit.attach(model, case.spec())
    assert _reproduces(case.run(model), base, case), "a freshly attached adapter changed the output"


def merge_refused(model: nn.Module) -> bool:
    """Whether a host refuses merges (a quantised weight): the merge properties do not apply to it."""
    sites = (getattr(a.module, "site", None) for a in get_state(model).attached)
    return any(callable(getattr(site, "merge_refusal", None)) and site.merge_refusal() for site in sites)


def merge_equivalence(case: Case) -> None:
    model, _ = _attached(case)
    assume(not merge_refused(model))
    randomise_adapters(model, run=case.run)
    unmerged = case.run(model)
    peftkit.merge(model)
    merged = case.run(model)
    error = relative_error(merged, unmerged)
    assert error <= MERGE_TOLERANCE[case.dtype], f"merged output differs from unmerged by {error:.3g} (relative)"


def unmerge_restores_weights(case: Case) -> None:
    model, _ = _attached(case)
    assume(not merge_refused(model))
    randomise_adapters(model, run=case.run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftkit.merge(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(before[k], v) for k, v in merged.items()), "merge changed no weight"
    peftkit.unmerge(model)
    for key, error in weight_drift(before, merged, model.state_dict()).items():
        assert error <= MERGE_TOLERANCE[case.dtype], f"{key} differs after merge+unmerge by {error:.3g}"


def save_load_roundtrip(case: Case) -> None:
    model, base = _attached(case)
    randomise_adapters(model, run=case.run)
    expected = case.run(model)
    assert not torch.equal(expected, base), "randomised adapters did not change the output"
    with tempfile.TemporaryDirectory() as directory:
        peftkit.save(model, directory)
        fresh = case.fresh()
        peftkit.load(fresh, directory)
    reproduced = _reproduces(case.run(fresh), expected, case)
    assert reproduced, "a loaded checkpoint does not reproduce the saved model's output"


def gradient_isolation(case: Case) -> None:
    model, _ = _attached(case)
    randomise_adapters(model, run=case.run)
    model.train()
    case.run(model).float().pow(2).mean().backward()
    for name, parameter in model.named_parameters():
        is_adapter = ADAPTER_CONTAINER in name.split(".")
        assert parameter.requires_grad == is_adapter, f"{name}: requires_grad={parameter.requires_grad}"
        if not is_adapter:
            assert parameter.grad is None, f"base parameter {name} received a gradient"
    grads = [p.grad for n, p in model.named_parameters() if ADAPTER_CONTAINER in n.split(".")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no adapter parameter received a gradient"


def detach_restores(case: Case) -> None:
    model = case.fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    base = case.run(model)
    peftkit.attach(model, case.spec())
    randomise_adapters(model, run=case.run)
    peftkit.detach(model)
    after = model.state_dict()
    assert list(after) == list(before), "detach left state-dict keys behind or lost some"
    assert all(torch.equal(before[k], v) for k, v in after.items()), "detach changed a base value"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags, "requires_grad flags differ"
    assert {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()} == hooks, (
        "hooks left behind"
    )
    config = getattr(model, "config", None)
    if config is not None:
        assert config._attn_implementation == implementation, "the attention implementation was not restored"
    assert get_state(model) is None and torch.equal(case.run(model), base)


def parameter_count_matches_formula(case: Case) -> None:
    model = case.fresh()
    planned = peftkit.plan(model, case.spec())
    peftkit.attach(model, case.spec())
    built = sum(p.numel() for n, p in model.named_parameters() if ADAPTER_CONTAINER in n.split("."))
    assert built == planned.adapter_parameters, (
        f"built {built} parameters, the formula says {planned.adapter_parameters}"
    )
    assert peftkit.trainable_parameters(model).trainable == built


def failed_attach_leaves_model_unchanged(case: Case) -> None:
    model = case.fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = {"adapters": {"default": [case.entry, {**case.entry, "target": "no_such_module_anywhere"}]}}
    try:
        peftkit.attach(model, broken)
    except peftkit.TargetingError:
        pass
    else:
        raise AssertionError("a spec with a selector that matches nothing was attached")
    assert get_state(model) is None and list(model.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def adapters_follow_the_host_device_and_dtype(case: Case) -> None:
    """On a meta model every adapter parameter is meta too, in its host's dtype: a method must build on
    ``site.device`` and ``site.dtype``, or it would put CPU float32 adapters on a GPU or bf16 model."""
    model = case.fresh()
    assume(all(p.is_floating_point() for p in model.parameters()))  # packed (quantised) weights have no meta form
    model = model.to("meta")
    if _rewrites_base(case):  # it reads the weight's values: refused, by name, with the model unchanged
        try:
            peftkit.attach(model, case.spec())
        except peftkit.AttachError as error:
            assert "meta" in str(error) and get_state(model) is None, str(error)
            return
        raise AssertionError("an adapter that rewrites its host was attached to a weight with no values")
    peftkit.attach(model, case.spec())
    modules = dict(model.named_modules())
    for attached in get_state(model).attached:
        host = modules[attached.path]
        own = [p for n, p in host.named_parameters() if ADAPTER_CONTAINER not in n.split(".")]
        for name, parameter in attached.module.named_parameters():
            where = f"{attached.path}: adapter parameter {name!r}"
            assert parameter.is_meta, f"{where} is on {parameter.device}, its host on meta"
            assert parameter.dtype == own[0].dtype, f"{where} is {parameter.dtype}, its host {own[0].dtype}"


def fusion_of_one_is_the_adapter(case: Case) -> None:
    """AdapterFusion over the adapter alone, at its initial (identity) value map, computes the adapter; the member
    is frozen and the fusion trains (``peftkit.add_rule`` with rule ``fuse``)."""
    method = get_method(case.entry["method"])
    assume("fuse" in method.capabilities_for(method.config.model_validate(case.entry)).compose_rules)
    model = case.fresh()
    peftkit.attach(model, case.spec())
    assume(not any(a.module.transforms_input for a in get_state(model).attached))  # an input change only stacks
    randomise_adapters(model, run=case.run)
    expected = case.run(model)
    peftkit.add_rule(model, {"rule": "fuse", "adapters": ["default"]})
    output = case.run(model)
    assert relative_error(output, expected) <= MERGE_TOLERANCE[case.dtype], "fusing one adapter changed its output"
    members = [p for a in get_state(model).attached for p in a.module.parameters()]
    assert members and not any(p.requires_grad for p in members), "a fused adapter is still trainable"
    fusion = [p for n, p in model.named_parameters() if p.requires_grad]
    assert fusion and all(ADAPTER_CONTAINER in n.split(".") for n, p in model.named_parameters() if p.requires_grad)
    output.float().square().mean().backward()
    assert all(p.grad is None for p in members), "a fused adapter received a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion), "the fusion received no gradient"


PROPERTIES: dict[str, Callable[[Case], None]] = {
    "identity_at_init": identity_at_init,
    "merge_equivalence": merge_equivalence,
    "unmerge_restores_weights": unmerge_restores_weights,
    "save_load_roundtrip": save_load_roundtrip,
    "gradient_isolation": gradient_isolation,
    "detach_restores": detach_restores,
    "parameter_count_matches_formula": parameter_count_matches_formula,
    "failed_attach_leaves_model_unchanged": failed_attach_leaves_model_unchanged,
    "adapters_follow_the_host_device_and_dtype": adapters_follow_the_host_device_and_dtype,
    "fusion_of_one_is_the_adapter": fusion_of_one_is_the_adapter,
}

_NEEDS = {
    "identity_at_init": lambda c: c.identity_at_init,
    "merge_equivalence": lambda c: c.mergeable,
    "unmerge_restores_weights": lambda c: c.mergeable,
    "fusion_of_one_is_the_adapter": lambda c: "fuse" in c.compose_rules,
}


def properties_for(method: str | type[Method]) -> list[str]:
    """The names of the properties that apply to ``method`` (a registered name or a method class), by its declared
    capabilities."""
    capabilities = (get_method(method) if isinstance(method, str) else method).capabilities
    return [name for name in PROPERTIES if _NEEDS.get(name, lambda c: True)(capabilities)]


@contextlib.contextmanager
def _registered_for_the_check(method: str | type[Method]) -> Iterator[str]:
    """The name to check ``method`` under: a class that is not registered yet (a variant being tried) is
    registered for the duration of the check, so that a spec naming it resolves."""
    if isinstance(method, str):
        yield method
        return
    if method.name in known_methods() and get_method(method.name) is method:
        yield method.name
        return
    with registered(method):
        yield method.name


@contextlib.contextmanager
def _hypothesis_files_outside_the_working_directory() -> Iterator[None]:
    """Hypothesis keeps caches in ``./.hypothesis`` unless told otherwise; a plugin author's folder is not ours to
    write to, so unless they chose a place (``HYPOTHESIS_STORAGE_DIRECTORY`` or ``set_hypothesis_home_dir``) the
    caches go under the user's cache folder for the duration of a check."""
    from hypothesis import configuration

    if getattr(configuration, "__hypothesis_home_directory", None) or os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        yield
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftkit" / "hypothesis"
    configuration.set_hypothesis_home_dir(cache)
    try:
        yield
    finally:
        configuration.set_hypothesis_home_dir(None)


def check(
    prop: str,
    method: str | type[Method],
    configs: st.SearchStrategy[dict[str, Any]] | None = None,
    *,
    max_examples: int | None = None,
) -> None:
    """Check one property of ``method`` over generated cases; raises (with a minimal failing case) on failure.

    ``method`` is a registered name or a method class; an unregistered class (a variant) is registered for the
    check only. The example count follows the active hypothesis profile unless ``max_examples`` is given. Nothing is written
    to the working directory: no example database (a failure prints its minimal case and a ``@reproduce_failure``
    blob), and hypothesis's caches go to ``~/.cache/peftkit/hypothesis`` unless you chose a place for them.
    """
    if prop not in PROPERTIES:
        raise KeyError(f"unknown property {prop!r}; properties: {', '.join(PROPERTIES)}")
    if prop not in properties_for(method):
        name = method if isinstance(method, str) else method.name
        raise ValueError(f"{prop!r} does not apply to {name!r} by its declared capabilities")
    extra = {} if max_examples is None else {"max_examples": max_examples}

    with _registered_for_the_check(method) as name, _hypothesis_files_outside_the_working_directory():
        too_slow = [HealthCheck.too_slow, HealthCheck.data_too_large]

        @settings(deadline=None, suppress_health_check=too_slow, database=None, **extra)
        @given(case=cases(name, configs if configs is not None else st.just({})))
        def run(case: Case) -> None:
            with torch.random.fork_rng():  # adapter initialisation draws from the global generator
                torch.manual_seed(0)
                PROPERTIES[prop](copy.copy(case))

        run()


def check_method(
    method: str | type[Method], configs: st.SearchStrategy[dict[str, Any]] | None = None, **kwargs: Any
) -> None:
    """Every applicable property of ``method``, one after another."""
    for prop in properties_for(method):
        check(prop, method, configs, **kwargs)
