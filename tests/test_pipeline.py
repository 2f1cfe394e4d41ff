"""`make atlas` end to end on the tiny classifier, the shipped configs, and the demo image set."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from atlas import AtlasError
from atlas.config import CONFIG_DIR, load_config
from atlas.images import list_images, load_rgb
from atlas.stages.collect import collected_layers
from pipelines import atlas as pipeline
from pipelines.class_atlas import class_settings


def make_atlas(argv: list[str]) -> int:
    """`make atlas` with these flags: `atlas run atlas ...`."""
    from pipelines.cli import main

    return main(["run", "atlas", *argv])


CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
TINY_RUN = {
    "collect": {"positions": 4, "seed": 0, "batch_size": 4},  # relu3 is 4 x 4: its whole 2 x 2 interior
    "project": {"method": "umap", "n_neighbors": 5, "min_dist": 0.1, "sgd": "torch", "n_epochs": 30, "seed": 0},
    "grid": {"sizes": [3], "min_count": 1},
    "render": {"size": 32, "steps": 2, "attempts": 1, "transforms": "none"},
    "compose": {},
}


def write_folder(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.mark.usefixtures("one_thread")
def test_make_atlas_runs_every_stage_and_a_rerun_skips_them(tmp_path, capsys, caplog):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", **TINY_RUN}))
    out = tmp_path / "run"
    argv = ["--config", str(config), "--model", "tests.synthetic:tiny_classifier", "--device", "cpu"]
    argv += ["--data", str(write_folder(tmp_path / "images", 12)), "--out", str(out)]
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert make_atlas(argv) == 0
    plan = next(r.message for r in caplog.records if r.message.startswith("plan: "))
    assert plan.startswith("plan: 12 images x 4 positions = 48 samples; grids 3x3 (9 cells); at most 9 icons x 1 ")
    assert re.search(
        r"attempts x 2 steps; estimate \d+ s \(collect \d+ s, render \d+ s, from a timed warm-up on cpu\)", plan
    )
    assert (out / "index.html").is_file()
    assert str(out / "index.html") in capsys.readouterr().out
    assert [p.relative_to(out).as_posix() for p in out.glob("layer-*/grid-*/atlas.png")] == [
        "layer-relu3/grid-3/atlas.png"
    ]
    with h5py.File(out / "store.h5") as f:
        assert f["relu3/activations"].shape == (48, 16)  # 12 images x 4 positions
        assert f["relu3/layout"].shape == (48, 2)
        assert f["relu3/grid/3/icon_done"][()].sum() == (f["relu3/grid/3/count"][()] >= 1).sum() > 0
    stamp = (out / "store.h5").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert make_atlas(argv) == 0
    assert stages_run(caplog) == []  # the store says every stage is up to date
    assert not [r for r in caplog.records if r.message.startswith("plan: ")]  # and no warm-up was timed for a plan
    assert (out / "store.h5").stat().st_mtime_ns == stamp  # nothing rewritten
    assert not (out / "pipeline.json").exists()  # the store is the only record


@pytest.mark.usefixtures("one_thread")
def test_a_run_opens_its_store_at_most_three_times_a_rerun_once_and_measures_the_layers_once(tmp_path, monkeypatch):
    """The runner opens the store once and hands it to every stage (pipelines.runner.RunContext): a fresh run opens
    it to merge the collection, to ask the stages and to write their products; a rerun that finds everything fresh
    only to ask. The model's layer shapes (a forward pass) are measured once per run."""
    from atlas.models.classifier import Classifier

    opens, measured = [], []
    open_file, measure = h5py.File.__init__, Classifier._measure_layer_shapes

    def counting_open(self, name, *args, **kwargs):
        open_file(self, name, *args, **kwargs)
        if Path(str(name)).name.startswith("store.h5"):  # the store, or the new store merged under a temporary name
            opens.append(Path(str(name)).name)

    def counting_measure(self):
        measured.append(self.name)
        return measure(self)

    monkeypatch.setattr(h5py.File, "__init__", counting_open)
    monkeypatch.setattr(Classifier, "_measure_layer_shapes", counting_measure)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump({"model": "tiny", **TINY_RUN, "accentuated": {**TINY_RUN["render"], "accentuate": 0.2}})
    )
    argv = ["--config", str(config), "--model", "tests.synthetic:tiny_classifier", "--device", "cpu"]
    argv += ["--data", str(write_folder(tmp_path / "images", 8)), "--out", str(tmp_path / "run")]
    assert make_atlas(argv) == 0
    assert len(opens) <= 3 and len(measured) == 1, (opens, measured)
    opens.clear(), measured.clear()
    assert make_atlas(argv) == 0
    assert opens == ["store.h5"] and len(measured) == 1


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_every_stage_key_is_a_setting(path):
    raw = yaml.safe_load(path.read_text())
    for layer in [raw.get("layer"), *(raw.get("layers") or {})]:
        config = load_config(path, pipeline.stage_settings(), layer)  # raises on a key the stage does not accept
        assert all(isinstance(config[name], kind) for name, kind in pipeline.stage_settings().items())
        # issue 37: an atlas icon is a feature visualisation from noise; accentuated photos are a second icon set
        assert config["render"].accentuate is None
        accentuated = pipeline.accentuated_settings(config.get("accentuated"), str(path))
        assert accentuated is None or accentuated.accentuate is not None
    assert raw["collect"] and raw["project"] and raw["grid"] and raw["render"]
    if "class_atlas" in raw:
        for comparison in (False, True):
            assert class_settings(path, raw.get("layer"), comparison)


def test_a_misspelt_stage_key_is_caught(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "render": {"stpes": 3}}))
    with pytest.raises(AtlasError, match="did you mean steps"):
        load_config(config, pipeline.stage_settings())


def test_demo_set_is_22_readable_photos_with_labels():
    records = list_images("demo")
    assert len(records) == 22
    labelled = [r for r in records if r.label >= 0]
    assert len(labelled) == 20 and all(0 <= r.label < 1000 for r in labelled)
    for record in records:
        image = load_rgb(record.path, min_side=64)
        assert image.mode == "RGB" and min(image.size) >= 64


def test_the_paper_config_on_the_demo_photos_runs_at_its_cpu_demo_settings(tmp_path, monkeypatch, caplog):
    """configs/inceptionv1.yaml takes one position per image: on the 22 demo photos it runs inceptionv1-cpu.yaml."""
    seen = {}
    monkeypatch.setattr(pipeline, "_run_stages", lambda ctx, configs: seen.update(configs=configs, records=ctx.records))
    monkeypatch.chdir(tmp_path)  # the config's data folder, data/imagenet/train, is not there
    with caplog.at_level(logging.INFO, logger="pipelines"):
        pipeline.run_atlas(CONFIG_DIR / "inceptionv1.yaml", None, ["mixed4c"], None, None, "cpu", tmp_path, "random")
    cpu_demo = yaml.safe_load((CONFIG_DIR / "inceptionv1-cpu.yaml").read_text())
    assert list(seen["configs"]) == ["mixed4c"]
    config = seen["configs"]["mixed4c"]
    assert config["collect"].positions == cpu_demo["collect"]["positions"] == 64
    assert list(config["grid"].sizes) == cpu_demo["grid"]["sizes"]
    assert len(seen["records"]) == 22
    fallback = [r.message for r in caplog.records if "demo photos" in r.message]
    assert len(fallback) == 1 and "at the settings of configs/inceptionv1-cpu.yaml" in fallback[0]


def stages_run(caplog) -> list[str]:
    """The stages that the last run logged as running, in order."""
    return [r.message.split(":")[0] for r in caplog.records if r.message.endswith(": running")]


@pytest.mark.usefixtures("one_thread")
def test_the_store_decides_a_deleted_or_truncated_store_is_rebuilt_and_force_redoes_stages(tmp_path, caplog):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", **TINY_RUN}))
    out = tmp_path / "run"
    argv = ["--config", str(config), "--model", "tests.synthetic:tiny_classifier", "--device", "cpu"]
    argv += ["--data", str(write_folder(tmp_path / "images", 8)), "--out", str(out)]
    store = out / "store.h5"
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert make_atlas(argv) == 0
        complete = store.read_bytes()
        for damage in (lambda: store.write_bytes(complete[: len(complete) // 2]), store.unlink):
            damage()
            caplog.clear()
            assert make_atlas(argv) == 0
            assert stages_run(caplog) == list(pipeline.STAGES)
            assert "relu3" in collected_layers(store, None) and all_icons_done(store)
        caplog.clear()
        assert make_atlas([*argv, "--force", "render"]) == 0
        assert stages_run(caplog) == ["render", "compose"]
        caplog.clear()
        assert make_atlas([*argv, "--force"]) == 0
        assert stages_run(caplog) == list(pipeline.STAGES)


def all_icons_done(store: Path) -> bool:
    with h5py.File(store) as f:
        grid = f["relu3/grid/3"]
        return bool(grid["icon_done"][()][grid["count"][()] >= grid.attrs["min_count"]].all())


def tiny_run(tmp_path: Path, **render: object) -> tuple[list[str], Path]:
    """argv of `make atlas` on the tiny classifier (render settings overridden), and its run folder."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", **TINY_RUN, "render": {**TINY_RUN["render"], **render}}))
    out = tmp_path / "run"
    argv = ["--config", str(config), "--model", "tests.synthetic:tiny_classifier", "--device", "cpu"]
    return [*argv, "--data", str(write_folder(tmp_path / "images", 8)), "--out", str(out)], out


@pytest.mark.usefixtures("one_thread")
def test_a_render_after_a_new_layout_renders_again_and_a_compose_after_new_icons_composes_again(tmp_path, caplog):
    from pipelines.cli import main as cli

    argv, out = tiny_run(tmp_path)
    store = out / "store.h5"
    assert make_atlas(argv) == 0
    manifest = json.loads((out / "atlases.json").read_text())["atlases"]
    with h5py.File(store) as f:
        icons_made = f["relu3/grid/3/icons"].attrs["made"]
        assert manifest[0]["made_from"] == {"3": icons_made}  # the atlas records the icons it shows
    # a manual `atlas project`: the grid and its icons are of the old layout, so `atlas render` grids and renders
    assert cli(["project", str(store), "--method", "umap", "--n-neighbors", "5", "--seed", "3", "--device", "cpu"]) == 0
    render = ["render", str(store), "--grid", "3", "--size", "32", "--steps", "2", "--attempts", "1"]
    assert cli([*render, "--transforms", "none", "--device", "cpu", "--model", "tests.synthetic:tiny_classifier"]) == 0
    with h5py.File(store) as f:
        grid, layout = f["relu3/grid/3"], f["relu3/layout"]
        assert grid.attrs["made_from"] == layout.attrs["made"]  # gridded again from the new layout
        assert grid["icons"].attrs["made_from"] == grid.attrs["made"]  # and every icon rendered again from it
        assert grid["icons"].attrs["made"] != icons_made
    assert all_icons_done(store)
    # the pipeline sees new icons under an old atlas: it composes again, and only that
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert make_atlas(argv) == 0
    assert "compose" in stages_run(caplog) and "collect" not in stages_run(caplog)
    with h5py.File(store) as f:
        assert json.loads((out / "atlases.json").read_text())["atlases"][0]["made_from"] == {
            "3": f["relu3/grid/3/icons"].attrs["made"]
        }


@pytest.mark.usefixtures("one_thread")
def test_changed_settings_redo_their_stage_and_every_later_one_and_a_missing_atlas_image_is_composed_again(
    tmp_path, caplog
):
    argv, out = tiny_run(tmp_path)
    assert make_atlas(argv) == 0
    changed, _ = tiny_run(tmp_path, steps=3)
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert make_atlas(changed) == 0
        assert stages_run(caplog) == ["render", "compose"]
        caplog.clear()
        (out / "layer-relu3" / "grid-3" / "atlas.png").unlink()
        assert make_atlas(changed) == 0
        assert stages_run(caplog) == ["compose"]
        caplog.clear()
        config = yaml.safe_load(Path(changed[1]).read_text())
        config["project"]["seed"] = 5  # a new layout: everything made from it is made again
        Path(changed[1]).write_text(yaml.safe_dump(config))
        assert make_atlas(changed) == 0
        assert stages_run(caplog) == ["project", "grid", "render", "compose"]
        caplog.clear()
        config["compose"] = {"examples": 0}  # a changed compose: section composes again, once
        Path(changed[1]).write_text(yaml.safe_dump(config))
        assert make_atlas(changed) == 0 and make_atlas(changed) == 0
        assert stages_run(caplog) == ["compose"]
        caplog.clear()
        config["project"]["perplexity"] = 7  # t-SNE's parameter: a UMAP layout stays as it is
        Path(changed[1]).write_text(yaml.safe_dump(config))
        assert make_atlas(changed) == 0
        assert stages_run(caplog) == []


@pytest.mark.usefixtures("one_thread")
def test_an_accentuated_section_renders_a_second_icon_set_that_compose_shows_beside_the_first(tmp_path, caplog):
    argv, out = tiny_run(tmp_path)
    config = yaml.safe_load(Path(argv[1]).read_text())
    config["accentuated"] = {**TINY_RUN["render"], "accentuate": 0.1, "steps": 1}
    Path(argv[1]).write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert make_atlas(argv) == 0
        assert stages_run(caplog) == ["collect", "project", "grid", "render", "accentuate", "compose"]
        caplog.clear()
        assert make_atlas(argv) == 0
        assert stages_run(caplog) == []
        config["accentuated"]["steps"] = 2  # new accentuated icons: only they are made again, and composed
        Path(argv[1]).write_text(yaml.safe_dump(config))
        assert make_atlas(argv) == 0
        assert stages_run(caplog) == ["accentuate", "compose"]
    with h5py.File(out / "store.h5") as f:
        grid = f["relu3/grid/3"]
        assert grid["icon_done"][()].any() and grid["accentuated/icon_done"][()].any()
        assert json.loads(grid["accentuated/icons"].attrs["settings"])["steps"] == 2
    views = json.loads((out / "atlases.json").read_text())["atlases"][0]["grids"][0]["views"]
    assert sorted(views) == ["accentuated", "examples", "visualisation"]
    assert all((out / path).is_file() for path in views.values())
    config["accentuated"].pop("accentuate")
    Path(argv[1]).write_text(yaml.safe_dump(config))
    with pytest.raises(AtlasError, match=r"\(accentuated:\) needs accentuate"):
        pipeline.run_atlas(Path(argv[1]), "tests.synthetic:tiny_classifier", data=argv[-3], device="cpu", out=out)


def test_a_per_layer_override_applies_that_layers_settings_only(tmp_path):
    config = tmp_path / "layers.yaml"
    overrides = {"mixed3a": {"project": {"n_neighbors": 200}}, "mixed5b": {"project": {"n_neighbors": 15}}}
    config.write_text(yaml.safe_dump({**TINY_RUN, "layer": "mixed4c", "layers": overrides}))
    neighbours = {
        layer: load_config(config, pipeline.stage_settings(), layer)["project"].n_neighbors
        for layer in ("mixed3a", "mixed5b", "mixed4c", None)
    }
    assert neighbours == {"mixed3a": 200, "mixed5b": 15, "mixed4c": 5, None: 5}


@pytest.mark.usefixtures("one_thread")
def test_a_run_of_several_layers_makes_an_atlas_of_each_and_a_rerun_with_one_more_collects_only_it(tmp_path, caplog):
    argv, out = tiny_run(tmp_path)
    with caplog.at_level(logging.INFO):
        assert make_atlas([*argv, "--layer", "relu2,relu3"]) == 0
        plan = next(r.message for r in caplog.records if r.message.startswith("plan: "))
        assert plan.startswith("plan: 8 images x 4 positions = 32 samples in each of 2 layers;")
        assert stages_run(caplog)[:2] == ["collect", "project relu2"]
        atlases = json.loads((out / "atlases.json").read_text())["atlases"]
        assert [(a["id"], a["layer"]) for a in atlases] == [("layer-relu2", "relu2"), ("layer-relu3", "relu3")]
        caplog.clear()
        assert make_atlas([*argv, "--layer", "relu1,relu2,relu3"]) == 0
    assert stages_run(caplog) == ["collect", *(f"{stage} relu1" for stage in pipeline.STAGES[1:])]
    assert any("holds relu2, relu3: collecting only relu1" in r.message for r in caplog.records)
    atlases = json.loads((out / "atlases.json").read_text())["atlases"]
    assert sorted(a["layer"] for a in atlases) == ["relu1", "relu2", "relu3"]
    with h5py.File(out / "store.h5") as f:
        assert all(f[layer]["activations"].shape[0] == 32 for layer in ("relu1", "relu2", "relu3"))


def test_the_layers_of_a_run_share_one_collect_section(tmp_path, capsys):
    config = tmp_path / "layers.yaml"
    run = {**TINY_RUN, "layers": {"relu2": {"collect": {"positions": 2}}}}
    config.write_text(yaml.safe_dump({"model": "tiny", **run}))
    argv = ["--config", str(config), "--model", "tests.synthetic:tiny_classifier", "--layer", "relu2,relu3"]
    assert make_atlas([*argv, "--out", str(tmp_path / "run")]) == 2
    line = capsys.readouterr().err.strip()
    assert "layers relu2 and relu3 have different collect settings" in line and "\n" not in line
    assert not (tmp_path / "run").exists()


def test_a_layers_list_in_a_config_names_the_runs_layers(tmp_path):
    from atlas.config import run_layers

    config = tmp_path / "layers.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "layers": ["relu2", "relu3"]}))
    assert run_layers(load_config(config, pipeline.stage_settings(), "relu2")) == ["relu2", "relu3"]
    config.write_text(yaml.safe_dump({**TINY_RUN, "layer": "relu3", "layers": ["relu2"]}))
    with pytest.raises(AtlasError, match="names both layer: and a layers: list"):
        load_config(config, pipeline.stage_settings(), "relu2")


@pytest.mark.usefixtures("one_thread")
def test_a_run_of_several_layers_takes_at_most_the_smallest_layers_interior_and_says_so(tmp_path, caplog):
    argv, out = tiny_run(tmp_path)
    config = yaml.safe_load(Path(argv[1]).read_text())
    config["collect"]["positions"] = 9  # relu2 is 8 x 8 (36 interior positions), relu3 4 x 4 (4)
    Path(argv[1]).write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert make_atlas([*argv, "--layer", "relu2,relu3"]) == 0
    assert any(
        r.message.startswith("positions: 4 per image, all of relu3's interior (4x4), not the configured 9")
        for r in caplog.records
    )
    with h5py.File(out / "store.h5") as f:
        assert f["relu2/activations"].shape[0] == f["relu3/activations"].shape[0] == 8 * 4


def demo_store(path: Path, **collect_changes: object) -> tuple[Path, dict]:
    """The demo photos collected, laid out and gridded at the offline default's settings (collect as changed)."""
    from dataclasses import asdict

    from atlas.models.zoo import load_model
    from atlas.stages.collect import collect
    from atlas.stages.grid import grid_store
    from atlas.stages.project import project_store

    config = load_config(CONFIG_DIR / "efficientnet-lite0.yaml", pipeline.stage_settings())
    model = load_model("efficientnet-lite0")
    records = list_images("demo", model.class_names, model.imagenet_index)
    collect(model, records, path, **{**asdict(config["collect"]), "workers": 0, **collect_changes})
    project_store(path, "_blocks.10", config["project"])
    grid_store(path, layer="_blocks.10", **asdict(config["grid"]))
    return path, config


def photos_whose_class_shades_their_cells(store: Path, size: int) -> int:
    """How many labelled photos of the store have, among the cells that typing their class in the viewer shades
    most (heatmap_opacity, as the viewer shades: tests/test_viewer_browser.py), one that holds their samples."""
    from atlas.stages.compose import heatmap_opacity

    with h5py.File(store) as f:
        layer, labels = f["_blocks.10"], f["images/label"][()]
        image_index, grid = layer["image_index"][()], layer[f"grid/{size}"]
        cell, count, attribution = grid["cell"][()], grid["count"][()], grid["attribution"][()]
        min_count = int(grid.attrs["min_count"])
    shaded = 0
    for photo, label in enumerate(labels):
        if label >= 0:
            opacity = heatmap_opacity(attribution[..., label], count, min_count).ravel()
            shaded += int(np.argmax(opacity) in set(cell[image_index == photo].tolist()))
    return shaded


@pytest.mark.usefixtures("one_thread")
def test_on_the_demo_run_a_photos_class_shades_the_cells_that_hold_its_samples(tmp_path):
    """Issue 37: on the offline default, typing a demo photo's class in the viewer shades most a cell that holds that
    photo's samples, for most of the 20 labelled photos (16 on `make atlas`'s 12 x 12 grid), and its samples'
    attributions rank the photo's class in the top 10 for at least 16 (17 on `make atlas`'s store)."""
    store, config = demo_store(tmp_path / "demo.h5")
    with h5py.File(store) as f:
        attributions, image_index = f["_blocks.10/attributions"][()], f["_blocks.10/image_index"][()]
        labels = f["images/label"][()]
    ranks = []
    for photo, label in enumerate(labels):
        if label >= 0:
            mean = attributions[image_index == photo].mean(0)
            ranks.append(int((mean > mean[label]).sum()) + 1)
    assert len(ranks) == 20 and sum(rank <= 10 for rank in ranks) >= 16, ranks
    for size in config["grid"].sizes:
        assert photos_whose_class_shades_their_cells(store, size) >= 14, size
