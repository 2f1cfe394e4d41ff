"""The public API the README lists: every name imports from where the README says, and moved names say where they
went."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC = {
    "atlas.models": ["load_model"],
    "atlas.optvis": ["visualize", "objectives"],
    "atlas.stages.collect": ["collect", "CollectSettings", "COLLECT"],
    "atlas.stages.project": ["project_store", "LayoutSettings", "PROJECT"],
    "atlas.stages.grid": ["grid_store", "GridSettings", "GRID"],
    "atlas.stages.render": ["render_store", "RenderSettings", "RENDER", "ACCENTUATE"],
    "atlas.stages.compose": ["compose_run", "ComposeSettings", "COMPOSE"],
    "atlas.store": ["fresh", "Layer", "Grid"],
    "pipelines.atlas": ["run_atlas"],
    "pipelines.class_atlas": ["run_class_atlas"],
    "pipelines.microscope": ["run_microscope"],
    "pipelines.runner": ["run_stage", "RunContext", "RunFolder"],
}


@pytest.mark.parametrize(("module", "names"), PUBLIC.items(), ids=list(PUBLIC))
def test_every_public_name_imports_from_where_the_readme_says(module, names):
    loaded = importlib.import_module(module)
    assert all(hasattr(loaded, name) for name in names), [n for n in names if not hasattr(loaded, n)]


def test_the_stages_declare_what_the_runner_asks():
    from atlas.stages.collect import COLLECT
    from atlas.stages.compose import COMPOSE
    from atlas.stages.grid import GRID
    from atlas.stages.project import PROJECT
    from atlas.stages.render import ACCENTUATE, RENDER

    stages = [COLLECT, PROJECT, GRID, RENDER, ACCENTUATE, COMPOSE]
    assert [s.name for s in stages] == ["collect", "project", "grid", "render", "accentuate", "compose"]
    for stage in stages:
        assert all(callable(getattr(stage, m)) for m in ("products", "record", "complete", "run"))


def test_the_old_command_line_module_says_where_it_went():
    import atlas.cli

    with pytest.raises(AttributeError, match="moved to pipelines.cli"):
        atlas.cli.main  # noqa: B018
    done = subprocess.run([sys.executable, "-m", "atlas.cli", "render"], capture_output=True, text=True)
    assert done.returncode == 1 and "moved to pipelines.cli" in done.stderr


@pytest.mark.parametrize("command", ["class-atlas", "microscope", "patch"])
def test_an_old_sub_command_prints_one_line_naming_its_run(command, capsys):
    from pipelines.cli import main

    assert main([command, "--class", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"atlas {command}: moved: use `atlas run {command}` (same arguments)"]
