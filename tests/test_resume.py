"""Interrupted, changed and forced runs make what an uninterrupted run makes (issue 40, part 1).

Each stage of `make atlas` on the tiny classifier is stopped (KeyboardInterrupt, as Ctrl-C) at every call of the
functions it is made of in turn, then the run is resumed; the store's datasets, the atlas images and the run
folder's files must equal those of a run that was never stopped. A changed input (photos, or a settings section)
remakes exactly the products made from it (read from their own `made` stamps, not from the log), `--force collect`
collects again, and a lost file of the run folder is made again.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.test_pipeline import TINY_RUN, make_atlas, write_folder

# (stage, module, function): the calls a stage makes, any of which Ctrl-C may interrupt
POINTS = {
    "collect": [("atlas.stages.collect", "collect_batch"), ("atlas.stages.collect", "write_batches")],
    "project": [("atlas.stages.project", "embed"), ("atlas.stages.project", "replace_dataset")],
    "grid": [("atlas.stages.grid", "_stream_sums"), ("atlas.stages.grid", "replace_dataset")],
    "render": [("atlas.stages.render", "render_icons"), ("atlas.stages.render", "store_finished")],
    "compose": [("atlas.stages.compose", "_save_atlas"), ("atlas.stages.compose", "write_dzi")],
}
RUN = {**TINY_RUN, "render": {**TINY_RUN["render"], "attempts": 2}}


def run_argv(tmp_path: Path, out: Path, images: Path, **sections: dict) -> list[str]:
    config = tmp_path / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", **{k: {**v, **sections.get(k, {})} for k, v in RUN.items()}}))
    argv = ["--config", str(config), "--model", "tests.synthetic:tiny_classifier", "--device", "cpu"]
    return [*argv, "--data", str(images), "--out", str(out)]


def products(out: Path) -> dict[str, np.ndarray]:
    """Every dataset of the run's store and the pixels of every atlas image, by name."""
    found: dict[str, np.ndarray] = {}
    with h5py.File(out / "store.h5") as f:
        f.visititems(lambda name, node: found.setdefault(name, node[()]) if isinstance(node, h5py.Dataset) else None)
    for png in sorted(out.glob("layer-*/**/atlas.png")):
        found[png.relative_to(out).as_posix()] = np.asarray(Image.open(png))
    files = sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())
    found["files"] = np.array([name for name in files if not name.endswith(".lock")])  # the tiles, pages, manifest
    return found


def stamps(out: Path) -> dict[str, str]:
    """The `made` stamp of every product in the store, by name."""
    found: dict[str, str] = {}

    def visit(name: str, node: h5py.Group | h5py.Dataset) -> None:
        if "made" in node.attrs:
            found[name] = str(node.attrs["made"])

    with h5py.File(out / "store.h5") as f:
        f.visititems(visit)
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("uninterrupted")
    images = write_folder(root / "images", 10)
    assert make_atlas(run_argv(root, root / "run", images)) == 0
    return images, products(root / "run")


def counted_calls(monkeypatch, target: ModuleType, name: str) -> list[int]:
    """Count the calls of target.name for the rest of the test."""
    original, calls = getattr(target, name), [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, counting)
    return calls


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("module", "name"), [point for points in POINTS.values() for point in points])
def test_a_run_stopped_at_any_call_of_a_stage_resumes_to_the_products_of_an_uninterrupted_run(
    module, name, tmp_path, monkeypatch, uninterrupted
):
    """Every call of the function is a stopping point in turn: a stop before its first, between any two, or in its
    last call."""
    images, expected = uninterrupted
    monkeypatch.setattr("atlas.optvis.DEFAULT_CPU_BATCH", 4)  # several render batches: a stop can fall between them
    target = importlib.import_module(module)
    original = getattr(target, name)
    with monkeypatch.context() as counting:  # how many calls the stage makes, in a run of its own
        calls = counted_calls(counting, target, name)
        assert make_atlas(run_argv(tmp_path, tmp_path / "counted", images)) == 0
    assert calls[0] > 0, f"{module}.{name} is never called: re-anchor POINTS"
    for stop_at in range(calls[0]):
        seen = [0]

        def stopping(*args, _stop_at=stop_at, _seen=seen, **kwargs):
            _seen[0] += 1
            if _seen[0] - 1 == _stop_at:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        out = tmp_path / f"run-{stop_at}"
        with monkeypatch.context() as stopped:
            stopped.setattr(target, name, stopping)
            assert make_atlas(run_argv(tmp_path, out, images)) != 0  # Ctrl-C: one line, a non-zero exit
        assert make_atlas(run_argv(tmp_path, out, images)) == 0
        resumed = products(out)
        where = f"stopped at call {stop_at} of {name}"
        assert sorted(resumed) == sorted(expected), where
        for key, value in expected.items():
            np.testing.assert_array_equal(resumed[key], value, err_msg=f"{key}, {where}")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("change", "remade"),
    [
        ("photos", {"relu3", "relu3/layout", "relu3/grid/3", "relu3/grid/3/icons"}),
        ("collect", {"relu3", "relu3/layout", "relu3/grid/3", "relu3/grid/3/icons"}),
        ("project", {"relu3/layout", "relu3/grid/3", "relu3/grid/3/icons"}),
        ("grid", {"relu3/grid/3", "relu3/grid/3/icons"}),
        ("render", {"relu3/grid/3/icons"}),
        ("compose", set()),
    ],
)
def test_a_changed_input_remakes_exactly_the_products_made_from_it(change, remade, tmp_path, capsys):
    images = write_folder(tmp_path / "images", 10)
    out = tmp_path / "run"
    assert make_atlas(run_argv(tmp_path, out, images)) == 0
    before, atlas_before = stamps(out), json.loads((out / "atlases.json").read_text())["atlases"][0]
    sections: dict[str, dict] = {
        "collect": {"seed": 1},
        "project": {"seed": 4},
        "grid": {"min_count": 2},
        "render": {"steps": 3},
        "compose": {"examples": 0},
    }
    if change == "photos":  # as many photos, other pixels
        Image.fromarray(np.full((40, 48, 3), 7, np.uint8)).save(images / "img03.png")
        argv = run_argv(tmp_path, out, images)
    else:
        argv = run_argv(tmp_path, out, images, **{change: sections[change]})
    if change in ("photos", "collect"):  # finished work is never dropped unasked: one line, then --force collect
        assert make_atlas(argv) == 2
        error = capsys.readouterr().err
        assert "holds a different collection" in error and "--force collect" in error and len(error.splitlines()) == 1
        argv = [*argv, "--force", "collect"]
    assert make_atlas(argv) == 0
    after = stamps(out)
    changed = {name for name in before if before[name] != after.get(name)}
    watched = {"relu3", "relu3/layout", "relu3/grid/3", "relu3/grid/3/icons"}
    assert changed & watched == remade
    atlas_after = json.loads((out / "atlases.json").read_text())["atlases"][0]
    assert atlas_after != atlas_before  # every change reaches the atlas


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("lost", ["index.html", "layer-relu3/grid-3/atlas.png", "layer-relu3/grid-3/tiles.dzi"])
def test_a_lost_file_of_the_run_folder_is_made_again(lost, tmp_path, uninterrupted):
    images, expected = uninterrupted
    out = tmp_path / "run"
    assert make_atlas(run_argv(tmp_path, out, images)) == 0
    (out / lost).unlink()
    assert make_atlas(run_argv(tmp_path, out, images)) == 0
    assert (out / lost).is_file()
    resumed = products(out)
    for key, value in expected.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)
