"""Every registered method, built-in or outside the package, passes the same conformance suite."""

from __future__ import annotations

from typing import Literal

import pytest
from hypothesis import strategies as st
from scale_method import Scale

import peftkit
from peftkit import testing

LORA_CONFIGS = st.fixed_dictionaries(
    {
        "r": st.integers(1, 6),
        "alpha": st.floats(0.5, 32.0),
        "rslora": st.booleans(),
        "init": st.sampled_from(["kaiming", "gaussian"]),
    }
)


@pytest.mark.parametrize("prop", testing.properties_for("lora"))
def test_lora_conforms(prop: str) -> None:
    testing.check(prop, "lora", configs=LORA_CONFIGS)


@pytest.fixture
def scale_method():
    with peftkit.registered(Scale):
        yield Scale


@pytest.mark.parametrize("prop", list(testing.PROPERTIES))
def test_outside_method_conforms(scale_method, prop: str) -> None:
    testing.check(prop, "scale")


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
    """The suite is not vacuous: a method whose merge is wrong fails merge_equivalence."""
    from scale_method import ScaleAdapter, ScaleConfig

    class BrokenMerge(ScaleAdapter):
        def merge(self) -> None:  # forgets the bias
            factor = self.scale.detach().float()
            self.site.add_to_weight_((factor[:, None] - 1.0) * self.site.weight_as_matrix())

    class BrokenConfig(ScaleConfig):
        method: Literal["broken-scale"] = "broken-scale"

    class Broken(Scale):
        name = "broken-scale"
        config = BrokenConfig

        @classmethod
        def create(cls, config, site):
            return BrokenMerge(site)

    with peftkit.registered(Broken), pytest.raises(AssertionError, match="merged output differs"):
        testing.check("merge_equivalence", "broken-scale", max_examples=50)
