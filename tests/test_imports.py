"""The import graph: packages only import downwards (`ldm` <- `cldm` <- `training` <- scripts), and no module imports
itself through others. Read from the source with `ast`, function-level imports included: a lazy import that
points up is still an upward dependency."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

#: Each package's floor; anything else of the repository (top-level scripts, benchmarks) stands on top.
LAYERS = {"ldm": 0, "cldm": 1, "training": 2}
TOP = 3
SCRIPTS = ("demo", "tool_add_control", "tool_export_control", "tool_transfer_control", "tutorial_dataset",
           "tutorial_train")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [ROOT / f"{name}.py" for name in SCRIPTS]
    for package in (*LAYERS, "benchmarks"):
        files += sorted((ROOT / package).rglob("*.py"))
    return {module_name(path): path for path in files}


def layer(module: str) -> int:
    return LAYERS.get(module.split(".")[0], TOP)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules that `path` imports (module-level and inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a package: the deepest module we have
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def test_the_graph_sees_the_project() -> None:
    graph = import_graph()
    assert {"ldm.models.diffusion.ddpm", "cldm.cldm", "training.cache", "tutorial_train"} <= graph.keys()
    assert "ldm.models.diffusion.ddpm" in graph["cldm.cldm"]  # an arrow the code certainly has


def test_imports_only_point_down() -> None:
    upward = sorted(f"{source} imports {target}" for source, targets in import_graph().items()
                    for target in targets if layer(target) > layer(source))
    assert upward == []


def test_no_circular_imports() -> None:
    graph = import_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
