"""The layout of docs/architecture.md holds: every import in peftkit/ (those inside functions included) goes down
the layers or stays in its room, no modules import each other in a circle, and the core names no method."""

from __future__ import annotations

import ast
from pathlib import Path

import peftkit

ROOT = Path(peftkit.__file__).resolve().parent
# Bottom to top, as drawn in docs/architecture.md; a module may import its own layer and the layers below.
LAYERS = [
    {"errors", "keys", "regex", "untrusted", "atomic"},
    {"sites"},
    {"patterns"},
    {"spec", "registry", "method", "compose", "layers"},
    {"targeting"},
    {"lifecycle"},
    {"io", "zoo", "quantization"},
    {"interop"},
    {"training"},
    {"__init__", "__main__", "cli", "testing", "testing_cases"},
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each peftkit module and the peftkit modules it imports (TYPE_CHECKING blocks aside)."""
    modules = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)
        }
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate not in (name, "peftkit"):
                    targets.add(candidate)
        graph[name] = targets
    return graph


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_room_in_the_picture() -> None:
    assert sorted({room(m) for m in imports()} - set(RANK)) == []


def test_imports_go_down_the_layers_or_stay_in_their_room() -> None:
    upward = [
        f"{module} (layer {RANK[room(module)]}) imports {target} (layer {RANK[room(target)]})"
        for module, targets in imports().items()
        for target in targets
        if RANK[room(target)] > RANK[room(module)]
    ]
    assert upward == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    graph = imports()
    circles = []
    for start in graph:
        seen, stack = set(), [(start, [start])]
        while stack:
            node, path = stack.pop()
            for target in graph[node]:
                if target == start:
                    circles.append(" -> ".join([*path, start]))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    assert circles == []


def test_the_core_names_no_built_in_method() -> None:
    from peftkit.sites import site_kinds

    names = set(peftkit.known_methods()) - set(site_kinds())  # "parallel" is also a site kind
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}"
        for path in ROOT.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in names
    ]
    assert offenders == []
