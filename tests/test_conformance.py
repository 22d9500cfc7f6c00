"""Every registered method, built-in or outside the package, passes the same conformance suite."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st
from scale_method import Scale

import peftkit
from peftkit import testing

_BOTTLENECK = st.fixed_dictionaries(
    {},
    optional={
        "bottleneck": st.integers(1, 8),
        "activation": st.sampled_from(["relu", "gelu", "tanh", "silu"]),
        "layer_norm": st.booleans(),
        "scaling": st.floats(0.1, 4.0),
    },
)
BUILTIN_CONFIGS = {
    "lora": st.one_of(
        st.fixed_dictionaries(
            {
                "r": st.integers(1, 6),
                "alpha": st.floats(0.5, 32.0),
                "rslora": st.booleans(),
                "init": st.sampled_from(["kaiming", "gaussian", "pissa", "olora"]),
            },
            optional={"lora_plus_ratio": st.floats(1.0, 32.0), "freeze_a": st.booleans()},
        ),
        # PiSSA by the randomised SVD (pissa_iterations needs init pissa)
        st.fixed_dictionaries(
            {"r": st.integers(1, 6), "init": st.just("pissa"), "pissa_iterations": st.integers(0, 4)},
            optional={"alpha": st.floats(0.5, 32.0), "rslora": st.booleans()},
        ),
    ),
    "lora-experts": st.fixed_dictionaries(
        {"r": st.integers(1, 4), "alpha": st.floats(0.5, 32.0), "rslora": st.booleans()},
        optional={"init": st.sampled_from(["kaiming", "gaussian"]), "lora_plus_ratio": st.floats(1.0, 32.0)},
    ),
    "dora": st.fixed_dictionaries(
        {"r": st.integers(1, 6), "alpha": st.floats(0.5, 32.0), "rslora": st.booleans()},
        optional={"dropout": st.sampled_from([0.0, 0.1]), "freeze_a": st.booleans()},
    ),
    "trainable-tokens": st.fixed_dictionaries({"indices": st.lists(st.integers(0, 1), min_size=1, unique=True)}),
    "houlsby": _BOTTLENECK,
    "pfeiffer": _BOTTLENECK,
    "parallel": _BOTTLENECK,
    # the dropouts of LoHa and LoKr act in training only (the quantised family runs in train mode): tests/test_lycoris.py
    "loha": st.fixed_dictionaries({"r": st.integers(1, 4), "alpha": st.floats(0.5, 16.0)}),
    "lokr": st.fixed_dictionaries(
        {"r": st.integers(1, 6), "alpha": st.floats(0.5, 16.0)},
        optional={"decompose_both": st.booleans(), "decompose_factor": st.sampled_from([-1, 2])},
    ),
    # block sizes that divide some of every family's widths; the block dropouts act in training only (see above)
    "oft": st.fixed_dictionaries(
        {"block_size": st.sampled_from([2, 3, 4])},
        optional={
            "block_share": st.booleans(),
            "cayley": st.sampled_from(["neumann", "exact"]),
            "neumann_terms": st.integers(2, 6),
            "coft": st.booleans(),
            "eps": st.floats(1e-3, 1.0),
        },
    ),
    "boft": st.fixed_dictionaries({"block_size": st.sampled_from([2, 4]), "butterfly_factors": st.integers(1, 2)}),
    "vera": st.fixed_dictionaries(
        {"r": st.integers(1, 8)},
        optional={
            "projection_seed": st.integers(0, 2**20),
            "save_projection": st.booleans(),
            "d_initial": st.floats(-1.0, 1.0),
        },
    ),
    "adalora": st.integers(1, 6).flatmap(
        lambda r: st.fixed_dictionaries(
            {"init_r": st.just(r), "target_r": st.integers(1, r)}, optional={"alpha": st.floats(0.5, 16.0)}
        )
    ),
    "bitfit": st.just({}),
    "ln-tuning": st.just({}),
    "reft": st.fixed_dictionaries(
        {"r": st.integers(1, 4), "first": st.integers(1, 2), "last": st.integers(0, 2)},
        optional={"kind": st.sampled_from(["loreft", "direft"]), "init": st.sampled_from(["identity", "random"])},
    ),
    "ia3": st.fixed_dictionaries({}, optional={"feedforward": st.sampled_from([["optional:@ffn_output"], ["*"], []])}),
    "prompt": st.fixed_dictionaries({"length": st.integers(1, 4)}),
    "ptuning": st.fixed_dictionaries(
        {
            "length": st.integers(1, 4),
            "encoder": st.sampled_from(["mlp", "lstm", "none"]),
            "encoder_hidden": st.integers(1, 6),
        }
    ),
    "prefix": st.fixed_dictionaries(
        {"length": st.integers(1, 4), "gate": st.booleans()},
        optional={"reparametrize": st.booleans(), "encoder_hidden": st.integers(1, 8)},
    ),
}


def test_every_builtin_method_has_a_config_strategy() -> None:
    assert set(BUILTIN_CONFIGS) == {
        m for m in peftkit.known_methods() if peftkit.get_method(m).__module__.startswith("peftkit_methods")
    }


@pytest.mark.parametrize(
    ("method", "prop"), [(m, p) for m in sorted(BUILTIN_CONFIGS) for p in testing.properties_for(m)]
)
def test_builtin_methods_conform(method: str, prop: str) -> None:
    testing.check(prop, method, configs=BUILTIN_CONFIGS[method])


# The method of docs/examples, as a plugin author writes it (a multiplicative scale).
OUTSIDE_METHODS = {Scale: st.just({})}


@pytest.mark.parametrize(
    ("method", "prop"),
    [(m, p) for m in OUTSIDE_METHODS for p in testing.properties_for(m)],
    ids=lambda value: getattr(value, "name", value),
)
def test_outside_methods_conform(method, prop: str) -> None:
    testing.check(prop, method, configs=OUTSIDE_METHODS[method])  # registered for the check, then removed


def test_the_suite_writes_nothing_into_the_working_directory(tmp_path) -> None:
    """As a plugin author runs it: a fresh process in their own folder, with hypothesis's default settings."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "docs" / "examples"
    script = (
        "import peftkit; from peftkit import testing; from scale_method import Scale\n"
        "with peftkit.registered(Scale):\n"
        "    testing.check('identity_at_init', 'scale', max_examples=3)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPOTHESIS")}
    env["PYTHONPATH"] = os.pathsep.join([str(examples), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert list(tmp_path.iterdir()) == []  # no .hypothesis/ example database


def test_properties_follow_capabilities() -> None:
    class NotMergeable(Scale):
        name = "scale-unmergeable"
        capabilities = peftkit.Capabilities(
            site="weight", module_types=Scale.capabilities.module_types, mergeable=False, identity_at_init=False
        )

    with peftkit.registered(NotMergeable):
        props = testing.properties_for("scale-unmergeable")
        assert "merge_equivalence" not in props and "identity_at_init" not in props
        assert "save_load_roundtrip" in props
        with pytest.raises(ValueError, match="does not apply"):
            testing.check("merge_equivalence", "scale-unmergeable")


def test_suite_catches_a_broken_method() -> None:
    """The suite is not vacuous: a method whose merge is wrong fails merge_equivalence. The broken method is a
    variant of Scale (a subclass under a new name, no config class of its own), checked without registering it."""
    from scale_method import ScaleAdapter
    from variants import scale_variant

    class BrokenMerge(ScaleAdapter):
        def merge(self) -> None:  # forgets the bias
            factor = self.scale.detach().float()
            self.site.add_to_weight_((factor[:, None] - 1.0) * self.site.weight_as_matrix())

    with pytest.raises(AssertionError, match="merged output differs"):
        testing.check("merge_equivalence", scale_variant("broken-scale", BrokenMerge), max_examples=50)
    assert "broken-scale" not in peftkit.known_methods()  # registered for the check only


def test_suite_catches_a_method_that_ignores_the_host_device() -> None:
    """A method that builds its parameters on the CPU in float32, whatever ``site.device``/``site.dtype`` say."""
    from scale_method import ScaleAdapter
    from variants import scale_variant

    class CPUAdapter(ScaleAdapter):
        def __init__(self, site) -> None:
            super().__init__(site)
            self.scale = torch.nn.Parameter(torch.ones(site.out_features))  # the slip: no device, no dtype

    with pytest.raises(AssertionError, match="is on cpu, its host on meta"):
        testing.check(
            "adapters_follow_the_host_device_and_dtype", scale_variant("cpu-scale", CPUAdapter), max_examples=20
        )
