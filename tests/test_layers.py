"""The layering DESIGN.md promises, read from the source with ``ast`` (imports inside functions count):

- core (``onestep/``) imports nothing from trainers, samplers, eval or demo (its entry points
  ``cli.py`` and ``quickstart.py`` excepted);
- samplers import core only; trainers import core and samplers; eval imports core and samplers,
  never trainers; demo imports core, samplers and eval;
- no import cycle between the project's modules;
- no module much over ~400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: source folder -> the package it is installed as (pyproject.toml's package-dir)
PACKAGES = {"onestep": "onestep", "trainers": "onestep.trainers", "samplers": "onestep.samplers", "eval": "onestep.eval", "demo": "onestep.demo"}
OUTER = ("onestep.trainers", "onestep.samplers", "onestep.eval", "onestep.demo")
ENTRY_POINTS = {"onestep.cli", "onestep.quickstart"}
#: layer -> the outer layers it may import (core is always allowed)
ALLOWED = {
    "core": set(),
    "onestep.samplers": set(),
    "onestep.trainers": {"onestep.samplers"},
    "onestep.eval": {"onestep.samplers"},
    "onestep.demo": {"onestep.samplers", "onestep.eval"},
}
MAX_LINES = 420


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the installed namespace."""
    mods = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "onestep" and parts and parts[0] in ("trainers", "samplers", "eval", "demo", "configs"):
                continue
            mods[".".join([package, *parts])] = path
    return mods


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (absolute or relative, at any depth of the file)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import onestep.eval.fidelity.x` -> the deepest module that exists
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer_of(module: str) -> str:
    return next((o for o in OUTER if module == o or module.startswith(o + ".")), "core")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_the_project(graph):
    # the reader must resolve the package-dir mapping, or every rule below passes vacuously
    assert {"onestep.trainers.base", "onestep.samplers.student", "onestep.eval.commands", "onestep.demo.app"} <= set(graph)
    assert "onestep.triad" in graph["onestep.trainers.base"]
    assert "onestep.samplers.student" in graph["onestep.demo.model"]


def test_each_layer_imports_only_the_layers_below_it(graph):
    wrong = []
    for module, targets in graph.items():
        if module in ENTRY_POINTS:
            continue
        layer = layer_of(module)
        for t in targets:
            tl = layer_of(t)
            if tl != "core" and tl != layer and tl not in ALLOWED[layer]:
                wrong.append(f"{module} -> {t}")
    assert not wrong, "imports across the layers DESIGN.md forbids:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles(graph):
    # Package __init__ files that re-export their submodules are the usual Python pattern; an edge
    # from a submodule back to its own package's __init__ is not a cycle of code, so it is skipped.
    def edges(m: str) -> set[str]:
        return {t for t in graph[m] if not m.startswith(t + ".")}

    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges(m)):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_much_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in project_modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their jobs): {long}"
