"""The shape of the house: how deep `atlas/` imports run, that they run one way, and how long a module grows.

Every import counts, lazy ones inside functions too, since they run all the same. A chain is counted in modules,
the package root `atlas` (AtlasError) included. `python -m tests.test_house` prints the measurement.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_CHAIN = 7  # issue 23: at most 7 import levels inside atlas/
MAX_LINES = 600


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module in atlas/ (a package by its own name)."""
    found = {}
    for path in sorted((root / "atlas").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `found` it imports, anywhere in its file."""
    graph = {}
    for name, path in found.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
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


def test_atlas_imports_run_one_way_at_most_seven_deep() -> None:
    chain = longest_chain(import_graph(modules()))
    assert len(chain) <= MAX_CHAIN, " -> ".join(chain)


def test_no_module_is_over_600_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_every_make_run_goes_through_the_one_entry_point() -> None:
    """The Makefile runs atlas, class-atlas, microscope and view through `atlas` (atlas/cli.py), never a pipeline's
    module of its own."""
    import re
    import subprocess

    makefile = (ROOT / "Makefile").read_text()
    assert "-m pipelines" not in makefile
    for target, command in [
        ("atlas", "run atlas"),
        ("class-atlas", "run class-atlas"),
        ("microscope", "run microscope"),
    ]:
        dry = subprocess.run(["make", "-n", "-o", ".venv/.installed", target], cwd=ROOT, capture_output=True, text=True)
        assert re.search(rf"-m atlas\.cli\s+{command}\b", dry.stdout), dry.stdout + dry.stderr


if __name__ == "__main__":
    found = modules()
    chain = longest_chain(import_graph(found))
    print(f"{len(found)} modules; longest import chain {len(chain)}: {' -> '.join(chain)}; no circle")
    sizes = sorted(((len(path.read_text().splitlines()), name) for name, path in found.items()), reverse=True)
    print("longest modules: " + ", ".join(f"{name} {lines}" for lines, name in sizes[:5]))
