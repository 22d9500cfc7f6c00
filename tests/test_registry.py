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


@pytest.fixture
def broken_plugin_installed(tmp_path, monkeypatch):
    """A package installed after the first lookup, with one working and one broken entry point."""
    (tmp_path / "late_plugin.py").write_text("from scale_method import Scale as Late\n")
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('needs libfoo 3')\n")
    info = tmp_path / "late_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: late-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[peftkit.methods]\nscale = late_plugin:Late\nbroken = broken_plugin:Broken\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    from peftkit import registry

    peftkit.unregister_method("scale")
    registry._broken.pop("broken", None)  # the package is gone with tmp_path: forget it for the other tests
    registry._loaded_entries.discard("late_plugin:Late")


def test_a_broken_plugin_does_not_hide_the_others_and_says_why(broken_plugin_installed, capsys) -> None:
    from peftkit.cli import main

    assert "scale" not in peftkit.known_methods()  # installed after the first lookup
    assert "scale" in peftkit.rediscover()
    assert peftkit.get_method("lora").__module__ == "peftkit_methods.lora"
    assert "needs libfoo 3" in peftkit.broken_plugins()["broken"]
    with pytest.raises(RegistryError, match=r"method 'broken' is not available: .*ImportError: needs libfoo 3"):
        peftkit.get_method("broken")
    with pytest.raises(peftkit.SpecError, match="needs libfoo 3"):
        peftkit.Spec.model_validate({"adapters": {"a": [{"method": "broken", "target": "x"}]}})
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "scale" in out and "broken       BROKEN: plugin 'broken'" in out
