"""Issue 28's bad values at the edge: each gives exit status 2 and one line on stderr that names the value and the
allowed range, never a traceback nor a run that looks fine; and the clean exits (Ctrl-C, a closed pipe)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from atlas.stages import collect as collect_stage
from atlas.stages.collect import collected_layers
from pipelines.cli import main
from tests.test_pipeline import TINY_RUN, make_atlas, write_folder

TINY = "tests.synthetic:tiny_classifier"  # relu3 is 4 x 4: 4 interior positions


def one_error_line(capsys, code: int, *expected: str) -> str:
    """Assert exit status 2 and a single stderr line holding every expected part; returns the line."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


def collect_args(tmp_path: Path, *extra: str) -> list[str]:
    images = write_folder(tmp_path / "images", 3)
    return ["collect", "--model", TINY, "--data", str(images), "--out", str(tmp_path / "s.h5"), *extra]


@pytest.mark.parametrize("limit", ["-5", "0"])
def test_a_limit_below_one_is_refused(tmp_path, capsys, limit):
    one_error_line(capsys, main(collect_args(tmp_path, "--limit", limit)), "--limit", "at least 1", f"not {limit}")
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize(
    ("positions", "allowed"),
    [("0", "at least 1"), ("-2", "at least 1"), ("5", "from 1 to 4"), ("500", "from 1 to 4")],
)
def test_positions_outside_the_layers_interior_are_refused(tmp_path, capsys, positions, allowed):
    """Below 1: CollectSettings, before the model loads; above the layer's interior: once its shape is known."""
    code = main(collect_args(tmp_path, "--device", "cpu", "--positions", positions))
    line = one_error_line(capsys, code, "positions", allowed, f"not {positions}")
    assert "4 interior positions" in line or int(positions) < 1
    assert not (tmp_path / "s.h5").exists()


def test_a_folder_without_one_readable_image_is_an_error_not_an_empty_store(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.jpg"):
        (images / name).write_bytes(b"not an image")
    argv = ["collect", "--model", TINY, "--data", str(images), "--out", str(tmp_path / "s.h5"), "--device", "cpu"]
    one_error_line(capsys, main(argv), "none of the 2 images could be read")
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("size", ["0", "1.5", "nan"])
def test_a_patch_size_outside_0_to_1_is_refused_before_any_work(tmp_path, capsys, size):
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    argv = ["run", "patch", "--patch", str(photo), "--data", "demo", "--target", "0", "--out", str(tmp_path / "r")]
    one_error_line(capsys, main([*argv, "--size", size]), "patch size", "(0, 1]", size)


def test_a_grid_larger_than_memory_allows_is_refused_with_the_estimate(synthetic_store, capsys):
    with h5py.File(synthetic_store, "r+") as f:
        f["mixed4c"].create_dataset("layout", data=np.random.default_rng(0).random((2000, 2), dtype=np.float32))
    line = one_error_line(capsys, main(["grid", str(synthetic_store), "--sizes", "50000"]), "grid size 50000")
    assert "2,500,000,000 cells (for 2,000 samples) need about 726 GiB" in line and "grid sizes from 1 to " in line
    one_error_line(capsys, main(["grid", str(synthetic_store), "--sizes", "0"]), "grid: sizes", "at least 1", "not 0")


@pytest.mark.parametrize("device", ["gpu", "cuda:99"])
def test_an_unknown_or_absent_device_names_the_devices_torch_sees(tmp_path, capsys, device):
    one_error_line(capsys, main(collect_args(tmp_path, "--device", device)), repr(device), "torch sees: cpu")


def test_a_viewerless_folder_suggests_a_compose_command_that_works(tmp_path, capsys):
    (tmp_path / "store.h5").write_bytes(b"")
    line = one_error_line(capsys, main(["view", str(tmp_path)]), "no index.html")
    assert f"atlas compose {tmp_path / 'store.h5'} --out {tmp_path}" in line


def test_a_bad_flag_is_one_line_too(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["collect", "--positions", "four"])
    one_error_line(capsys, stop.value.code, "--positions", "'four'")


def run_atlas_argv(tmp_path: Path, config: dict, *extra: str) -> list[str]:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", **config}))
    images = write_folder(tmp_path / "images", 6)
    argv = ["--config", str(path), "--model", TINY, "--device", "cpu", "--data", str(images)]
    return [*argv, "--out", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("collect", {"positions": "four"}, "collect: positions must be an integer at least 1, not 'four'"),
        ("collect", {"positions": 0}, "collect: positions must be an integer at least 1, not 0"),
        ("collect", {"positions": 500}, "positions (layer relu3 is 4x4: 4 interior positions) must be an integer"),
        ("grid", {"sizes": [3, 0]}, "grid: sizes must be an integer at least 1, not 0"),
        ("collect", {"attribution": "saliency"}, "collect: attribution 'saliency': choose one of gradient, integrated"),
        ("collect", {"attribution_steps": 0}, "collect: attribution_steps must be an integer at least 1, not 0"),
        # a wrong type is one line naming the key too, not a TypeError deep in a stage
        ("project", {"n_neighbors": "50"}, "project: n_neighbors must be an integer, not '50'"),
        ("compose", {"examples": "4"}, "compose: examples must be an integer, not '4'"),
        ("render", {"steps": 1.5}, "render: steps must be an integer, not 1.5"),
        ("grid", {"whitening": 1}, "grid: whitening must be true or false, not 1"),
        # a grid too large for this machine's memory is refused before collect, not after project
        ("grid", {"sizes": [3, 100_000]}, "grid size 100000 is too large"),
        # an icon of no steps is its starting noise: refused before collect, not drawn as an atlas
        ("render", {"steps": 0}, "render: steps 0 would draw each icon's starting image"),
    ],
)
def test_a_bad_config_number_stops_make_atlas_in_one_line_and_leaves_nothing(
    tmp_path, capsys, section, values, expected
):
    config = {**TINY_RUN, section: {**TINY_RUN[section], **values}}
    one_error_line(capsys, make_atlas(run_atlas_argv(tmp_path, config)), expected)
    assert not list((tmp_path / "run").glob("store.h5*"))


@pytest.mark.parametrize(
    ("section", "key"), [("collect", "out"), ("collect", "layers"), ("grid", "layer"), ("grid", "path")]
)
def test_a_key_the_run_sets_itself_is_refused_by_name(tmp_path, capsys, section, key):
    """`collect: {out: x}` or `grid: {layer: y}` name what the run gives the stage itself: one line naming the key,
    before any work, not a TypeError ("multiple values") once the model is loaded."""
    config = {**TINY_RUN, section: {**TINY_RUN[section], key: "x"}}
    one_error_line(capsys, make_atlas(run_atlas_argv(tmp_path, config)), f"unknown key {key!r}", f"({section}:)")
    assert not list((tmp_path / "run").glob("store.h5*"))


@pytest.mark.parametrize("flags", [["--limit", "-5"], ["--limit", "0"], ["--device", "gpu"]])
def test_make_atlas_refuses_bad_flags_in_one_line(tmp_path, capsys, flags):
    one_error_line(capsys, make_atlas(run_atlas_argv(tmp_path, TINY_RUN, *flags)), flags[1])


@pytest.mark.usefixtures("one_thread")
def test_ctrl_c_prints_one_line_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    argv = run_atlas_argv(tmp_path, TINY_RUN)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(collect_stage, "merge_parts", interrupted)  # after every batch's shard is written
        assert make_atlas(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "rerun the same command" in err[0]
    assert list((tmp_path / "run" / "store.h5.parts").glob("batch-*.npz"))
    assert make_atlas(argv) == 0
    assert "relu3" in collected_layers(tmp_path / "run" / "store.h5", None)


def test_a_closed_pipe_is_silent():
    """`atlas layers ... | head -1`: the reader goes after one line, while far more than a pipe buffer is to come."""
    many = "m.Classifier.layer_shapes = lambda self: [(f'layer{i}', 1, 1, 1) for i in range(100_000)]"
    run = f"from pipelines.cli import main; sys.exit(main(['layers', '{TINY}']))"
    script = f"import sys, atlas.models.classifier as m; {many}; {run}"
    command = f'set -o pipefail; {sys.executable} -c "{script}" | head -1'
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.stdout == "layer0\t1\t1\t1\n" and done.stderr == "" and done.returncode == 141


def test_stage_flags_come_from_the_settings_fields_with_their_defaults_stated_once():
    import dataclasses

    from atlas.config import Settings, add_flags, given
    from pipelines.cli import STAGE_FLAGS, build_parser

    @dataclasses.dataclass(frozen=True)
    class Example(Settings):
        sizes: tuple[int, ...] = (20, 40)
        steps: int = 7
        whiten: bool = True
        accentuate: float | None = None

    parser = argparse.ArgumentParser()
    add_flags(parser, Example, {"sizes": "grids", "steps": "steps", "whiten": "whiten", "accentuate": "distance"})
    assert "(default: 20,40)" in parser.format_help() and "(default: 7)" in parser.format_help()
    args = parser.parse_args(["--sizes", "6,12", "--no-whiten"])
    assert Example.from_config(given(args, ("sizes", "steps", "whiten", "accentuate"))) == Example((6, 12), 7, False)
    render = build_parser("render").parse_args(["render", "s.h5", "--grid", "3", "--steps", "9", "--no-whiten"])
    module, name, helps = STAGE_FLAGS["render"]
    assert set(helps) <= {field.name for field in dataclasses.fields(getattr(importlib.import_module(module), name))}
    assert (render.steps, render.whiten, render.size) == (9, False, None)  # not given: the class's default holds


def test_a_second_run_into_a_held_run_folder_stops_in_one_line_and_leaves_the_first_runs_work(tmp_path, capsys):
    """Two runs into one OUT: the one that finds the folder held exits 2 naming the holder's process, before it
    writes anything; once the folder is free the same command runs."""
    from filelock import FileLock

    from tests.test_pipeline import tiny_run

    argv, out = tiny_run(tmp_path)
    out.mkdir()
    (out / ".lock.pid").write_text("4242")
    with FileLock(out / ".lock"):
        one_error_line(capsys, make_atlas(argv), "another run (process 4242) is writing", str(out))
        assert not (out / "store.h5").exists() and not list(out.glob("store.h5*"))
    assert make_atlas(argv) == 0 and (out / "store.h5").is_file() and not (out / ".lock.pid").exists()


@pytest.mark.parametrize("kind", ["a file in the way", "missing data"])
def test_a_run_that_cannot_start_makes_no_run_folder(tmp_path, capsys, kind):
    """A data folder that does not exist, or an OUT under a file: one line, exit 2, and no OUT left behind."""
    from tests.test_pipeline import tiny_run

    argv, out = tiny_run(tmp_path)
    if kind == "missing data":
        argv[argv.index("--data") + 1] = str(tmp_path / "no such folder")
        one_error_line(capsys, make_atlas(argv), "no such folder")
        assert not out.exists()
    else:
        (tmp_path / "file").write_text("")
        argv[argv.index("--out") + 1] = str(tmp_path / "file" / "run")
        one_error_line(capsys, make_atlas(argv), "cannot make the run folder", "Not a directory")


def test_a_port_out_of_range_is_one_line(capsys):
    from pipelines.cli import main

    one_error_line(capsys, main(["view", ".", "--port", "99999"]), "--port must be an integer from 0 to 65,535")


def test_make_quotes_the_paths_it_passes():
    """OUT="data/runs/my run" reaches the command as one argument."""
    import shlex

    dry = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "atlas", "OUT=data/runs/my run", "DATA=my photos"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
    )
    words = shlex.split(dry.stdout.replace("\\\n", " "))
    assert words[words.index("--out") + 1] == "data/runs/my run" and words[words.index("--data") + 1] == "my photos"
