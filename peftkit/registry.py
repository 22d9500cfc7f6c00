"""Name -> method class, filled from the ``peftkit.methods`` entry-point group and by :func:`register_method`.

Built-in methods come in through the same entry-point group a third-party package uses, so nothing in the core
imports them by name. Discovery is lazy (first lookup) so ``import peftkit`` stays cheap; :func:`rediscover` looks again, for plugins
installed after the first lookup. A plugin that fails to load is set aside with its reason (:func:`broken_plugins`)
and never hides the others.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Literal, TypeVar, get_args, get_origin

from pydantic import create_model

from peftkit.errors import RegistryError
from peftkit.method import Capabilities, Method, MethodConfig

ENTRY_POINT_GROUP = "peftkit.methods"
# Host types (a quantised linear layer of another library): each entry point is a callable that registers its
# weight sites with peftkit.sites.register_weight_site when its library is installed, and does nothing otherwise.
HOST_ENTRY_POINT_GROUP = "peftkit.hosts"

_methods: dict[str, type[Method]] = {}
_broken: dict[str, str] = {}  # entry-point name -> why it could not be registered
_loaded_entries: set[str] = set()  # entry-point values registered already, so that a second lookup skips them
_discovered = False

M = TypeVar("M", bound=type[Method])


def _check_method_class(method: type[Method]) -> None:
    """Refuse a class that does not fill the contract, so the error points at the plugin, not at a later forward."""
    problems = []
    if not isinstance(getattr(method, "name", None), str) or not method.name:
        problems.append("a non-empty string class attribute `name`")
    config = getattr(method, "config", None)
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        problems.append("a class attribute `config` that subclasses peftkit.MethodConfig")
    if not isinstance(getattr(method, "capabilities", None), Capabilities):
        problems.append("a class attribute `capabilities` that is a peftkit.Capabilities")
    if problems:
        raise RegistryError(f"{method!r} is not a peftkit method: it needs " + "; ".join(problems))
    _config_takes_the_name(method)


def _config_takes_the_name(method: type[Method]) -> None:
    """Make sure a spec entry ``{"method": method.name}`` validates with ``method.config``.

    A variant of a registered method (a subclass under a new name, changing its adapter or its capabilities)
    inherits a config pinned to its parent's name; it gets a config subclass pinned to its own name, so a variant
    needs no config class of its own. A config declared on the class itself must pin the class's name."""
    annotation = method.config.model_fields["method"].annotation
    if get_origin(annotation) is not Literal or method.name in get_args(annotation):
        return
    if "config" in vars(method):
        raise RegistryError(
            f"{method.__qualname__}.config pins `method` to {', '.join(map(repr, get_args(annotation)))}, but the "
            f"method's name is {method.name!r}: write `method: Literal[{method.name!r}] = {method.name!r}` in "
            "the config, or leave `config` out of the class to inherit its parent's under the new name"
        )
    parent = method.config
    method.config = create_model(  # type: ignore[misc]
        f"{method.__name__}Config",
        __base__=parent,
        __module__=method.__module__,
        method=(Literal[method.name], method.name),
    )


def _add(method: type[Method], source: str) -> None:
    _check_method_class(method)
    existing = _methods.get(method.name)
    if existing is method:
        return
    if existing is not None:
        raise RegistryError(
            f"method {method.name!r} from {source} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}; choose another name"
        )
    _methods[method.name] = method


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    _load_entry_points()


def _load_entry_points() -> None:
    """Register every entry point of the group that is not registered yet; record the ones that fail.

    One broken plugin (an import error, a name that disagrees with its entry point, a clash) must not make the
    others unusable: it is kept aside with its reason, reported when its name is asked for and by
    ``peftkit methods``, and the rest load normally.
    """
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.value in _loaded_entries:
            continue
        try:
            method = entry.load()
            if getattr(method, "name", None) != entry.name:
                raise RegistryError(
                    f"it loads a class whose name is {getattr(method, 'name', None)!r}; the entry-point name and "
                    "the method's `name` must agree"
                )
            _add(method, f"entry point {entry.value}")
        except Exception as error:  # any failure of third-party code is reported, not raised
            _broken[entry.name] = (
                f"plugin {entry.name!r} ({entry.value}) failed to load: {type(error).__name__}: {error}"
            )
        else:
            _loaded_entries.add(entry.value)
            _broken.pop(entry.name, None)
    for entry in entry_points(group=HOST_ENTRY_POINT_GROUP):
        if entry.value in _loaded_entries:
            continue
        try:
            entry.load()()
        except Exception as error:  # a host plugin's failure leaves its hosts unregistered, reported by name
            _broken[f"host:{entry.name}"] = (
                f"host plugin {entry.name!r} ({entry.value}) failed to load: {type(error).__name__}: {error}"
            )
        else:
            _loaded_entries.add(entry.value)
            _broken.pop(f"host:{entry.name}", None)


def rediscover() -> list[str]:
    """Look through the ``peftkit.methods`` entry points again: plugins installed after the first lookup, and
    broken ones that were fixed, are registered. Returns the known method names."""
    import importlib

    _discover()
    importlib.invalidate_caches()  # a package installed while this process runs is on sys.path's finders now
    _load_entry_points()
    return known_methods()


def broken_plugins() -> dict[str, str]:
    """Entry points that could not be registered, by name, each with the reason."""
    _discover()
    return dict(_broken)


def register_method(method: M) -> M:
    """Class decorator: register a method in this process (tests, notebooks, plugins not yet packaged)."""
    _discover()
    _add(method, f"{method.__module__}.{method.__qualname__}")
    return method


def unregister_method(name: str) -> None:
    """Remove a method registered in this process (tests use it to clean up)."""
    _discover()
    _methods.pop(name, None)


@contextmanager
def registered(method: type[Method]) -> Iterator[type[Method]]:
    """Register ``method`` for the duration of a ``with`` block."""
    register_method(method)
    try:
        yield method
    finally:
        unregister_method(method.name)


def known_methods() -> list[str]:
    _discover()
    return sorted(_methods)


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; an unknown name lists the known ones and the closest."""
    _discover()
    try:
        return _methods[name]
    except KeyError:
        if name in _broken:
            raise RegistryError(
                f"method {name!r} is not available: {_broken[name]}. Fix or uninstall that package, then call "
                "peftkit.rediscover() (or restart)"
            ) from None
        close = difflib.get_close_matches(name, list(_methods), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RegistryError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(_methods)) or '(none)'}.{hint} "
            f"A plugin registers through the {ENTRY_POINT_GROUP!r} entry-point group or peftkit.register_method."
        ) from None
