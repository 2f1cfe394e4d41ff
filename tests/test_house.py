"""The shape of the house: how deep the imports of everything that ships (`atlas/`, `pipelines/`) run, that they run
one way (the library never imports its orchestration), and how long a module grows.

Every import counts, lazy ones inside functions too, since they run all the same. A chain is counted in modules,
the package root `atlas` (AtlasError) included. `python -m tests.test_house` prints the measurement.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_CHAIN = 7  # issue 23: at most 7 import levels inside atlas/ (issue 41 asks it of everything that ships)
MAX_LINES = 600
PACKAGES = ("atlas", "pipelines")  # what ships (pyproject.toml), the library first


def modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted name -> file of every module of `packages` (default: all that ship; a package by its own name)."""
    found = {}
    for path in sorted(path for package in packages for path in (root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _runs(tree: ast.Module) -> list[ast.AST]:
    """The nodes of a module that run: all but the bodies of `if TYPE_CHECKING:` (imports for type hints only)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            node.body = []
    return list(ast.walk(tree))


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `found` it imports, anywhere in its file but under `if TYPE_CHECKING:`."""
    graph = {}
    for name, path in found.items():
        targets = set()
        for node in _runs(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {target for target in targets if target in found and target != name}
    return graph


def longest_chain(graph: dict[str, set[str]]) -> tuple[str, ...]:
    """The longest import chain; a ValueError naming the circle when there is one."""

    @cache
    def chain(name: str, stack: tuple[str, ...]) -> tuple[str, ...]:
        if name in stack:
            raise ValueError("import circle: " + " -> ".join((*stack[stack.index(name) :], name)))
        below = [chain(child, (*stack, name)) for child in sorted(graph[name])]
        return (name, *max(below, key=len, default=()))

    return max((chain(name, ()) for name in graph), key=len)


def test_longest_chain_follows_imports_and_names_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": set(), "d": {"c"}}
    assert longest_chain(graph) == ("a", "b", "c")
    graph["c"] = {"a"}
    with pytest.raises(ValueError, match="a -> b -> c -> a"):
        longest_chain(graph)


def test_library_imports_run_one_way_at_most_seven_deep() -> None:
    chain = longest_chain(import_graph(modules(packages=("atlas",))))
    assert len(chain) <= MAX_CHAIN, " -> ".join(chain)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Top-level package -> the other packages its modules import."""
    top = {name: name.split(".")[0] for name in graph}
    return {package: {top[t] for n in graph if top[n] == package for t in graph[n]} - {package} for package in PACKAGES}


def test_the_library_never_imports_the_orchestration() -> None:
    """atlas -> pipelines would make a package cycle: the command line and the runner sit over the library."""
    packages = package_graph(import_graph(modules()))
    assert packages["atlas"] == set(), packages
    longest_chain(packages)  # no package cycle (a ValueError names one)


def test_no_module_is_over_600_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_every_make_run_goes_through_the_one_entry_point() -> None:
    """The Makefile runs atlas, class-atlas, microscope and view through `atlas` (pipelines/cli.py), never a pipeline's
    module of its own."""
    import re
    import subprocess

    makefile = (ROOT / "Makefile").read_text()
    assert re.findall(r"-m pipelines\.\w+", makefile) == ["-m pipelines.cli"]  # the entry point, once
    for target, command in [
        ("atlas", "run atlas"),
        ("class-atlas", "run class-atlas"),
        ("microscope", "run microscope"),
    ]:
        dry = subprocess.run(["make", "-n", "-o", ".venv/.installed", target], cwd=ROOT, capture_output=True, text=True)
        assert re.search(rf"-m pipelines\.cli\s+{command}\b", dry.stdout), dry.stdout + dry.stderr


if __name__ == "__main__":
    found = modules()
    chain = longest_chain(import_graph(found))
    print(f"{len(found)} modules; longest import chain {len(chain)}: {' -> '.join(chain)}; no circle")
    sizes = sorted(((len(path.read_text().splitlines()), name) for name, path in found.items()), reverse=True)
    print("longest modules: " + ", ".join(f"{name} {lines}" for lines, name in sizes[:5]))
