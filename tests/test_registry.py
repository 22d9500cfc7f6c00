"""The registry: entry-point discovery, the in-process decorator, duplicates and unknown names."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Literal

import pytest
from scale_method import Scale, ScaleConfig

import peftkit
from peftkit import RegistryError


def test_builtin_lora_comes_from_the_entry_point_group() -> None:
    points = {e.name: e.value for e in entry_points(group="peftkit.methods")}
    assert points["lora"] == "peftkit_methods.lora:LoRA"
    assert peftkit.get_method("lora").__module__ == "peftkit_methods.lora"
    assert "lora" in peftkit.known_methods()


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(RegistryError, match=r"unknown method 'lroa'; known methods: .*lora.*Did you mean 'lora'"):
        peftkit.get_method("lroa")


def test_duplicate_name_is_an_error() -> None:
    class OtherConfig(ScaleConfig):
        method: Literal["lora"] = "lora"

    class Impostor(Scale):
        name = "lora"
        config = OtherConfig

    with pytest.raises(RegistryError, match="already registered"):
        peftkit.register_method(Impostor)
    assert peftkit.get_method("lora").__module__ == "peftkit_methods.lora"


def test_registering_the_same_class_twice_is_harmless() -> None:
    with peftkit.registered(Scale):
        peftkit.register_method(Scale)
        assert peftkit.get_method("scale") is Scale
    assert "scale" not in peftkit.known_methods()


def test_a_class_that_breaks_the_contract_is_refused() -> None:
    class NoConfig(peftkit.Method):
        name = "broken"

    with pytest.raises(RegistryError, match="config"):
        peftkit.register_method(NoConfig)
