"""The store as the contract: what collect records (class names, resize size) is what later stages read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from atlas import AtlasError
from atlas.examples import patch_box
from atlas.images import ImageRecord, load_rgb, to_model_input
from atlas.stages.collect import collect
from atlas.stages.compose import ComposeSettings, compose_run
from atlas.store import (
    ACTIVATIONS,
    ATTRIBUTIONS,
    CELL,
    CLASSES,
    COLLECTED,
    COUNT,
    LAYOUT,
    RENDERED,
    STR,
    WHITENING,
    Grid,
    Layer,
    class_names,
    fingerprint,
    only_grid,
    record_settings,
    settings_match,
)
from tests.synthetic import tiny_classifier
from tests.test_compose import INPUT_SIZE, MAP_SIDE, write_rendered_store


def test_collect_records_class_names_and_resize_size(tmp_path: Path, one_thread) -> None:
    model = tiny_classifier([f"kind {k}" for k in range(10)])
    model.resize_size = 45  # not the 256/224 rule (round(32 * 256 / 224) = 37)
    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        path = tmp_path / f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(str(path)))
    store = collect(model, records, tmp_path / "store.h5", workers=0)
    with h5py.File(store) as f:
        assert f.attrs["resize_size"] == 45 and f.attrs["input_size"] == 32
        assert f[CLASSES].asstr()[()].tolist() == model.class_names
        assert class_names(f, 10) == model.class_names
        with pytest.raises(AtlasError, match="3 logits"):
            class_names(f, 3)


def test_compose_names_cells_and_cuts_patches_as_the_store_says(tmp_path: Path) -> None:
    store = write_rendered_store(tmp_path)
    resize = 2 * INPUT_SIZE  # a view far from the 256/224 default, so a guessed view would show other pixels
    names = [f"thing {k}" for k in range(10)]
    with h5py.File(store, "r+") as f:
        f.attrs["resize_size"] = resize
        f.create_dataset(CLASSES, data=np.array(names, dtype=object), dtype=STR)
        paths = f["images/path"].asstr()[()]
        image_index, position = f["mixed4c/image_index"][()], f["mixed4c/position"][()]
    out = tmp_path / "run"
    compose_run(store, out, settings=ComposeSettings(labels=False, examples=2))
    cells = json.loads((out / "layer-mixed4c/grid-4/cells.json").read_text())["cells"]
    shown = [c for c in cells if c["top"]]
    assert shown and all(t["name"] == names[t["class"]] for c in shown for t in c["top"])
    examples = [e for c in cells for e in c["examples"] if e["patch"]]
    assert examples
    for example in examples[:4]:
        sample = next(
            s
            for s in range(len(image_index))
            if paths[image_index[s]] == example["image"] and position[s].tolist() == example["position"]
        )
        seen = to_model_input(load_rgb(paths[image_index[sample]], min_side=resize), resize, INPUT_SIZE)
        pixels = (seen.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        left, top, right, bottom = patch_box(*position[sample], MAP_SIDE, MAP_SIDE, INPUT_SIZE)
        expected = pixels[top:bottom, left:right].astype(float)
        saved = np.asarray(Image.open(out / example["patch"]), dtype=float)
        assert np.abs(saved - expected).mean() < 12  # JPEG noise; the default view differs by far more


def test_a_store_whose_weights_file_is_gone_is_an_error_not_other_weights(tmp_path: Path) -> None:
    from atlas.stages.render import RenderSettings, render_store
    from tests.test_render import grid_store

    weights = tmp_path / "trained.pth"
    path = grid_store(tmp_path / "s.h5", model="tests.synthetic:tiny_classifier", weights=str(weights))
    with pytest.raises(AtlasError, match=f"weights file {weights} .* is gone"):
        render_store(path, grid=3, settings=RenderSettings(steps=1, attempts=1), progress=False)


@dataclass(frozen=True)
class Knobs:
    steps: int = 8
    names: tuple[str, ...] = ("a", "b")


def test_settings_are_recorded_and_matched_by_one_fingerprint(tmp_path: Path) -> None:
    assert fingerprint({"a": 1, "b": [2, 3]}) == fingerprint({"b": (2, 3), "a": 1})  # key order, tuple or list
    assert fingerprint(Knobs()) == fingerprint({"steps": 8, "names": ["a", "b"]})  # a dataclass is its fields
    assert fingerprint(Knobs(steps=9)) != fingerprint(Knobs()) and fingerprint({"a": 1}) != fingerprint({"a": 2})
    with h5py.File(tmp_path / "s.h5", "w") as f:
        group = f.create_group("made")
        assert not settings_match(group, Knobs())  # nothing recorded (a store from before): settings differ
        record_settings(group, Knobs())
        assert settings_match(group, Knobs()) and not settings_match(group, Knobs(steps=9))
        group.attrs["settings"] = "not json"
        assert not settings_match(group, Knobs())  # unreadable: settings differ, no crash


def test_the_layer_view_names_what_is_missing_or_short_and_the_stage_that_makes_it(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "s.h5", "w") as f:
        layer = f.create_group("relu3")
        layer["activations"] = np.zeros((5, 4), np.float32)
        layer["attributions"] = np.zeros((5, 7), np.float32)
        layer["image_index"] = np.arange(5)
        view = Layer(f, None, needs=(ACTIVATIONS, ATTRIBUTIONS))  # None: the store's only layer
        assert (view.name, view.rows, view.channels, view.classes) == ("relu3", 5, 4, 7)
        with pytest.raises(AtlasError, match=r"/relu3 has no layout: run `atlas project` first"):
            Layer(f, "relu3", needs=(ACTIVATIONS, LAYOUT))
        with pytest.raises(AtlasError, match=r"/relu3 has no whitening: run `atlas grid` first"):
            Layer(f, "relu3", needs=(WHITENING,))
        with pytest.raises(AtlasError, match=r"/relu3 has no position: run `atlas collect` first"):
            Layer(f, "relu3", needs=COLLECTED)
        layer["position"] = np.zeros((5, 2), np.int32)
        layer["layout"] = np.zeros((4, 2), np.float32)
        assert Layer(f, "relu3", needs=COLLECTED).rows == 5
        with pytest.raises(AtlasError, match=r"relu3/layout has 4 rows for 5 samples: rerun `atlas project`"):
            Layer(f, "relu3", needs=(LAYOUT,))
        with pytest.raises(AtlasError, match="layer 'relu4' is not in the store"):
            Layer(f, "relu4")


def test_the_grid_view_names_what_is_missing_and_the_stage_that_makes_it(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "s.h5", "w") as f:
        layer = f.create_group("relu3")
        layer["image_index"] = np.arange(5)
        grid = layer.create_group("grid/3")
        grid.attrs["min_count"] = 2
        grid["count"] = np.array([[0, 2, 1], [3, 0, 0], [0, 0, 0]])
        grid["mean"] = np.zeros((3, 3, 4), np.float32)
        grid["cell"] = np.zeros(4, np.int32)
        view = Grid(layer, 3)
        assert view.min_count == 2 and view.non_empty().sum() == 2 and only_grid(layer) == 3
        with pytest.raises(AtlasError, match=r"lacks icons, icon_cosine, icon_objective \(run `atlas render`\)"):
            Grid(layer, 3, needs=(COUNT, *RENDERED))
        with pytest.raises(AtlasError, match="cell has 4 rows for 5 samples"):
            Grid(layer, 3, needs=(COUNT, CELL))
        grid["icons"] = np.zeros((3, 3, 8, 9, 3), np.uint8)
        grid["icon_cosine"] = grid["icon_objective"] = np.zeros((3, 3), np.float32)
        with pytest.raises(AtlasError, match="do not fit a 3x3 grid"):
            Grid(layer, 3, needs=(COUNT, *RENDERED))
        with pytest.raises(AtlasError, match=r"no grid of size 4 \(grids: \[3\]; run `atlas grid`\)"):
            Grid(layer, 4)
