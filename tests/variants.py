"""Variants of the documented outside method (docs/examples/scale_method.py) with one thing changed, for tests that
show the suite or attach catching a method that gets something wrong."""

from __future__ import annotations

from typing import Literal

from pydantic import create_model
from scale_method import Scale, ScaleConfig


def scale_variant(name: str, adapter_class: type) -> type[Scale]:
    """The Scale method under ``name``, building ``adapter_class(site)`` as its adapter."""
    config = create_model(f"{adapter_class.__name__}Config", __base__=ScaleConfig, method=(Literal[name], name))

    def create(cls, config, site):
        return adapter_class(site)

    members = {"name": name, "config": config, "create": classmethod(create)}
    return type(f"{adapter_class.__name__}Method", (Scale,), members)
