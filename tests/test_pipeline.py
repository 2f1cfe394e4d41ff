"""`make atlas` end to end on the tiny classifier, the shipped configs, and the demo image set."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image

from atlas import AtlasError
from atlas.config import CONFIG_DIR, load_config
from atlas.images import list_images, load_rgb
from pipelines import atlas as pipeline
from pipelines.class_atlas import class_settings

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
def test_make_atlas_runs_every_stage_and_a_rerun_skips_them(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny", **TINY_RUN}))
    out = tmp_path / "run"
    argv = ["--config", str(config), "--model", "tests.synthetic:tiny_classifier", "--device", "cpu"]
    argv += ["--data", str(write_folder(tmp_path / "images", 12)), "--out", str(out)]
    assert pipeline.main(argv) == 0
    assert (out / "index.html").is_file()
    assert str(out / "index.html") in capsys.readouterr().out
    assert [p.relative_to(out).as_posix() for p in out.glob("layer-*/grid-*/atlas.png")] == [
        "layer-relu3/grid-3/atlas.png"
    ]
    with h5py.File(out / "store.h5") as f:
        assert f["relu3/activations"].shape == (48, 16)  # 12 images x 4 positions
        assert f["relu3/layout"].shape == (48, 2)
        assert f["relu3/grid/3/icon_done"][()].sum() == (f["relu3/grid/3/count"][()] >= 1).sum() > 0
    done = json.loads((out / "pipeline.json").read_text())
    assert list(done) == ["collect", "project", "grid", "render", "compose"]
    stamp = (out / "store.h5").stat().st_mtime_ns
    assert pipeline.main(argv) == 0
    assert (out / "store.h5").stat().st_mtime_ns == stamp  # every stage up to date: nothing rewritten
    assert json.loads((out / "pipeline.json").read_text()) == done


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_every_stage_key_is_a_parameter(path):
    raw = yaml.safe_load(path.read_text())
    for layer in [raw.get("layer"), *(raw.get("layers") or {})]:
        config = load_config(path, pipeline.stage_functions(), layer)  # raises on a key the stage does not accept
        assert set(pipeline.stage_functions()) <= set(config)
    assert raw["collect"] and raw["project"] and raw["grid"] and raw["render"]
    if "class_atlas" in raw:
        for comparison in (False, True):
            assert class_settings(path, raw.get("layer"), comparison)


def test_a_misspelt_stage_key_is_caught(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "render": {"stpes": 3}}))
    with pytest.raises(AtlasError, match="did you mean steps"):
        load_config(config, pipeline.stage_functions())


def test_demo_set_is_22_readable_photos_with_labels():
    records = list_images("demo")
    assert len(records) == 22
    labelled = [r for r in records if r.label >= 0]
    assert len(labelled) == 20 and all(0 <= r.label < 1000 for r in labelled)
    for record in records:
        image = load_rgb(record.path, min_side=64)
        assert image.mode == "RGB" and min(image.size) >= 64
