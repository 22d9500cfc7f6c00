"""Variants of the documented outside method (docs/examples/scale_method.py) with one thing changed, for tests that
show the suite or attach catching a method that gets something wrong."""

from __future__ import annotations

from scale_method import Scale


def scale_variant(name: str, adapter_class: type) -> type[Scale]:
    """The Scale method under ``name``, building ``adapter_class(site)``: a plain subclass, since the registry gives
    a variant that inherits its config a copy pinned to the new name (docs/writing-a-method.md)."""

    def create(cls, config, site):
        return adapter_class(site)

    return type(f"{adapter_class.__name__}Method", (Scale,), {"name": name, "create": classmethod(create)})
