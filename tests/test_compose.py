"""Composition: a small rendered store -> atlas PNGs, Deep Zoom tiles, cells.json, patches and the manifest."""

from __future__ import annotations

import json
import math
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from atlas import AtlasError
from atlas.examples import patch_box
from atlas.site import write_dzi
from atlas.stages.compose import (
    ComposeSettings,
    Grid,
    Heatmap,
    compose_run,
    density_scale,
    draw_labels,
)
from atlas.store import STR
from atlas.view import serve_in_thread
from pipelines.cli import main

ICON_PX = 16
INPUT_SIZE = 32
MAP_SIDE = 4  # activation map height and width


def write_rendered_store(
    folder: Path, sizes: tuple[int, ...] = (4, 8), n: int = 400, icon_px: int = ICON_PX, seed: int = 0
) -> Path:
    """A store as `atlas render` leaves it: samples in two blobs of the layout (so some cells are empty),
    solid-colour icons (no channel at 255; empty cells get one too, which compose must not draw), real JPEGs
    (one path missing).

    The coarse grid has no top_classes (compose computes them from `attribution`); the others have them.
    """
    rng = np.random.default_rng(seed)
    images = []
    for i in range(6):
        path = folder / f"photo{i}.jpg"
        Image.fromarray(rng.integers(0, 256, size=(40 + 8 * i, 56, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    images.append(str(folder / "moved-away.jpg"))  # unreadable: its examples get no patch
    blob = rng.integers(0, 2, size=n)
    layout = np.clip(np.array([[0.3, 0.3], [0.7, 0.75]])[blob] + rng.normal(0, 0.08, size=(n, 2)), 0, 0.999)
    activations = rng.gamma(2.0, 1.0, size=(n, 8)).astype(np.float32)
    attributions = rng.normal(0, 1, size=(n, 10)).astype(np.float32)
    path = folder / "store.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(model="tiny", input_size=INPUT_SIZE)
        f.create_dataset("images/path", data=np.array(images, dtype=object), dtype=STR)
        f["images/label"] = np.array([0, 1, 2, 3, 4, 5, -1], np.int64)  # the last photo is unlabelled
        layer = f.create_group("mixed4c")
        layer.attrs.update(channels=8, height=MAP_SIDE, width=MAP_SIDE)
        layer["activations"] = activations
        layer["image_index"] = rng.integers(0, len(images), size=n).astype(np.int64)
        layer["position"] = rng.integers(0, MAP_SIDE, size=(n, 2)).astype(np.int32)
        layer["attributions"] = attributions
        for size in sizes:
            y, x = (layout * size).astype(int).T
            cell = y * size + x
            count = np.bincount(cell, minlength=size * size)
            per_cell = np.maximum(count, 1)[:, None]
            mean = np.stack([np.bincount(cell, a, size * size) for a in activations.T], 1) / per_cell
            attribution = np.stack([np.bincount(cell, a, size * size) for a in attributions.T], 1) / per_cell
            empty = count < 3
            mean[empty], attribution[empty] = 0, 0  # the grid stage's means are zero where empty
            colours = rng.integers(0, 250, size=(size * size, 3), dtype=np.uint8)
            icons = np.broadcast_to(colours[:, None, None, :], (size * size, icon_px, icon_px, 3))
            grid = layer.create_group(f"grid/{size}")
            grid.attrs["min_count"] = 3
            grid["cell"] = cell.astype(np.int32)
            grid["count"] = count.reshape(size, size).astype(np.int64)
            grid["mean"] = mean.reshape(size, size, -1).astype(np.float32)
            grid["attribution"] = attribution.reshape(size, size, -1).astype(np.float32)
            grid["icons"] = icons.reshape(size, size, icon_px, icon_px, 3)
            grid["icon_cosine"] = np.where(empty, np.nan, rng.uniform(0.3, 0.9, size * size)).reshape(size, size)
            grid["icon_objective"] = np.where(empty, np.nan, rng.uniform(1, 5, size * size)).reshape(size, size)
            grid["icon_done"] = ~empty.reshape(size, size)
            if size != min(sizes):
                top = np.argsort(-attribution, axis=1)[:, :5]
                values = np.take_along_axis(attribution, top, 1)
                grid["top_classes"] = np.where(empty[:, None], -1, top).reshape(size, size, 5)
                grid["top_attributions"] = np.where(empty[:, None], np.nan, values).reshape(size, size, 5)
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return write_rendered_store(tmp_path)


def test_density_scale_follows_the_paper() -> None:
    count = np.array([[0, 2], [8, 30]])  # average 10
    scale = density_scale(count, min_count=2)
    assert scale[0, 0] == 0 and scale[1, 1] == 1
    assert scale[0, 1] == pytest.approx(math.sqrt(0.2)) and scale[1, 0] == pytest.approx(math.sqrt(0.8))


def test_patch_box_is_centred_and_kept_inside() -> None:
    # 4x4 map at 32 px: cells of 8 px, so a 3-cell patch is 24 px around the cell centre
    assert patch_box(1, 2, 4, 4, 32) == (8, 0, 32, 24)  # centre (12, 20); the top is clipped at 0
    assert patch_box(3, 3, 4, 4, 32) == (8, 8, 32, 32)  # moved inside at the bottom right
    assert patch_box(2, 1, 8, 8, 64, context=1) == (8, 16, 16, 24)


def _grid(size: int, colour_seed: int) -> Grid:
    """A Grid whose every cell is full, with a distinct random picture, for pyramid tests."""
    rng = np.random.default_rng(colour_seed)
    picture = rng.integers(0, 256, size=(size * ICON_PX, size * ICON_PX, 3), dtype=np.uint8)
    count = np.full((size, size), 10)
    zeros = np.zeros((size, size, 5), np.int64)
    nan = np.full((size, size), np.nan)
    return Grid(size, 1, count, np.zeros(0, np.int64), zeros, zeros.astype(float), nan, nan, Image.fromarray(picture))


def test_heatmap_labels_only_cells_that_are_shown() -> None:
    # 4 x 4 cells of 80 px: one label per cell; on the heat-map only the left half is at least half shown
    grid = Grid(
        4, 1, np.full((4, 4), 10), np.zeros(0, np.int64), np.zeros((4, 4, 5), np.int64), np.zeros((4, 4, 5)),
        np.zeros((4, 4)), np.zeros((4, 4)), Image.new("RGB", (320, 320), "white"),
    )  # fmt: skip
    grid.heatmap = Heatmap(0, np.zeros((4, 4)), np.array([[1.0, 0.5, 0.49, 0.0]] * 4))
    image = grid.image.copy()
    draw_labels(image, grid, names=["tench"] * 5)
    inked = (np.asarray(image).min(axis=-1) < 128).reshape(4, 80, 4, 80).any(axis=(1, 3))
    np.testing.assert_array_equal(inked, np.array([[True, True, False, False]] * 4))
    grid.heatmap = None  # a layer atlas labels every populated cell
    image = grid.image.copy()
    draw_labels(image, grid, names=["tench"] * 5)
    assert (np.asarray(image).min(axis=-1) < 128).reshape(4, 80, 4, 80).any(axis=(1, 3)).all()


def test_each_label_is_its_own_cells_top_class_under_that_cell() -> None:
    """A wide name is the top class of cell (x 1, y 0) only, a dot everywhere else: its ink is under that cell."""
    top = np.zeros((4, 4, 5), np.int64)
    top[0, 1, 0] = 1
    grid = Grid(
        4, 1, np.full((4, 4), 10), np.zeros(0, np.int64), top, np.zeros((4, 4, 5)), np.zeros((4, 4)),
        np.zeros((4, 4)), Image.new("RGB", (320, 320), "white"),
    )  # fmt: skip
    image = grid.image.copy()
    draw_labels(image, grid, names=[".", "WWWWWWWW"])
    # inked pixel columns under each cell, [y, x]
    inked = (np.asarray(image).min(axis=-1) < 128).reshape(4, 80, 4, 80).any(axis=1).sum(axis=-1)
    expected = np.zeros((4, 4), bool)
    expected[0, 1] = True
    np.testing.assert_array_equal(inked > 20, expected)
    assert (inked > 0).all()  # every cell is labelled


def test_dzi_levels_and_tiles(tmp_path: Path) -> None:
    fine = _grid(8, 2)
    assert write_dzi(fine.image, tmp_path / "tiles", tile_size=48, overlap=1, tile_format="png") == 8
    meta = ET.parse(tmp_path / "tiles.dzi").getroot()
    ns = "{http://schemas.microsoft.com/deepzoom/2008}"
    assert (meta.get("TileSize"), meta.get("Overlap"), meta.get("Format")) == ("48", "1", "png")
    full = int(meta.find(f"{ns}Size").get("Width"))
    assert full == 8 * ICON_PX and int(meta.find(f"{ns}Size").get("Height")) == full
    levels = sorted(int(p.name) for p in (tmp_path / "tiles_files").iterdir())
    assert levels == list(range(math.ceil(math.log2(full)) + 1))
    for level in levels:
        width = math.ceil(full / 2 ** (levels[-1] - level))
        tiles = math.ceil(width / 48)
        names = {p.name for p in (tmp_path / "tiles_files" / str(level)).iterdir()}
        assert names == {f"{c}_{r}.png" for c in range(tiles) for r in range(tiles)}
        for c in range(tiles):  # each tile: its 48 px plus 1 px overlap on inner edges
            side = min(width, (c + 1) * 48 + 1) - max(0, c * 48 - 1)
            assert Image.open(tmp_path / "tiles_files" / str(level) / f"{c}_0.png").size[0] == side
    # the top level is the atlas, cut into tiles; each lower level halves the one above
    top = np.asarray(fine.image)
    for r in range(3):
        for c in range(3):
            tile = np.asarray(Image.open(tmp_path / "tiles_files" / "7" / f"{c}_{r}.png"))
            left, upper = max(0, c * 48 - 1), max(0, r * 48 - 1)
            assert np.array_equal(tile, top[upper : upper + tile.shape[0], left : left + tile.shape[1]])
    quarter = np.asarray(Image.open(tmp_path / "tiles_files" / "5" / "0_0.png"))
    half = fine.image.resize((64, 64), Image.LANCZOS, reducing_gap=3.0)
    assert np.array_equal(quarter, np.asarray(half.resize((32, 32), Image.LANCZOS, reducing_gap=3.0)))


def test_compose_run_end_to_end(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    index = compose_run(store, out, settings=ComposeSettings(labels=False, examples=3))
    assert index == out / "index.html" and index.is_file()
    assert (out / "vendor/openseadragon/openseadragon.min.js").is_file()
    manifest = json.loads((out / "atlases.json").read_text())["atlases"]
    assert [(a["id"], a["kind"], a["layer"]) for a in manifest] == [("layer-mixed4c", "layer", "mixed4c")]
    entry = manifest[0]
    assert [g["size"] for g in entry["grids"]] == [4, 8] and entry["icon_size"] == ICON_PX
    with h5py.File(store) as f:
        layer = f["mixed4c"]
        paths = f["images/path"].asstr()[()]
        for grid in entry["grids"]:
            size, group = grid["size"], layer[f"grid/{grid['size']}"]
            count, icons = group["count"][()], group["icons"][()]
            atlas = np.asarray(Image.open(out / grid["image"]))
            assert atlas.shape == (size * ICON_PX, size * ICON_PX, 3)
            scale = density_scale(count, 3)
            for y in range(size):
                for x in range(size):
                    block = atlas[y * ICON_PX : (y + 1) * ICON_PX, x * ICON_PX : (x + 1) * ICON_PX]
                    drawn = (block != 255).any(axis=2)
                    if count[y, x] < 3:
                        assert not drawn.any(), f"empty cell {y},{x} of grid {size} is not blank"
                    else:  # a solid icon, centred, its side scaled by density
                        side = max(1, round(ICON_PX * scale[y, x]))
                        assert drawn.sum() == side * side
                        assert np.array_equal(block[ICON_PX // 2, ICON_PX // 2], icons[y, x, 0, 0])
            cells = json.loads((out / grid["cells"]).read_text())
            assert cells["grid"] == size and cells["total"] == count.sum() == len(layer["image_index"])
            by_cell = {(c["y"], c["x"]): c for c in cells["cells"]}
            assert set(by_cell) == {tuple(map(int, yx)) for yx in zip(*np.nonzero(count), strict=True)}
            attribution = group["attribution"][()]
            cell_of = group["cell"][()]
            for (y, x), c in by_cell.items():
                assert c["count"] == count[y, x] and c["empty"] == (count[y, x] < 3)
                best = np.argsort(-attribution[y, x], kind="stable")[:5] if count[y, x] >= 3 else []
                assert [t["class"] for t in c["top"]] == list(best)
                assert [t["name"] for t in c["top"]] == [f"class {k}" for k in best]
                if len(best):
                    assert c["top"][0]["attribution"] == pytest.approx(attribution[y, x, best[0]], rel=1e-3)
                assert (c["icon_cosine"] is None) == (count[y, x] < 3)
                members = np.flatnonzero(cell_of == y * size + x)
                photos = np.unique(layer["image_index"][()][members])
                assert len(c["examples"]) == min(3, len(photos))  # at most one crop per photo
                assert len({example["image"] for example in c["examples"]}) == len(c["examples"])
                for example in c["examples"]:
                    label = paths.tolist().index(example["image"])
                    assert example["class"] == (f"class {label}" if label < 6 else None)
                    matches = [
                        s
                        for s in members
                        if paths[layer["image_index"][s]] == example["image"]
                        and layer["position"][s].tolist() == example["position"]
                    ]
                    assert matches, "an example is not a sample of its cell"
                    if example["image"].endswith("moved-away.jpg"):
                        assert example["patch"] is None
                    else:
                        assert Image.open(out / example["patch"]).size == (24, 24)
            # every class's attribution of every cell, to 1/254 of the class's largest magnitude
            raw = (out / grid["attribution"]).read_bytes()
            classes = attribution.shape[-1]
            scale = np.frombuffer(raw[: 4 * classes], "<f4")
            table = np.frombuffer(raw[4 * classes :], np.int8).reshape(classes, size * size) * scale[:, None]
            expected = attribution.reshape(-1, classes).T
            np.testing.assert_allclose(table, expected, atol=np.abs(expected).max() / 254 + 1e-7)
    assert json.loads((out / entry["class_names"]).read_text()) == [f"class {k}" for k in range(10)]
    for grid in entry["grids"]:  # a pyramid per grid, from 1 px to its atlas
        assert (out / grid["tiles"]).is_file()
        levels = math.ceil(math.log2(grid["size"] * ICON_PX)) + 1
        assert len(list((out / grid["tiles"].replace(".dzi", "_files")).iterdir())) == levels


def test_compose_is_rerunnable_and_keeps_other_atlases(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    compose_run(store, out, grids=[8], settings=ComposeSettings(examples=0))
    manifest = json.loads((out / "atlases.json").read_text())
    other = {"id": "class-5-mixed4c", "kind": "class", "layer": "mixed4c", "class": "class 5", "title": "class 5"}
    manifest["atlases"].append(other)
    (out / "atlases.json").write_text(json.dumps(manifest))
    compose_run(store, out, settings=ComposeSettings(examples=1))
    atlases = json.loads((out / "atlases.json").read_text())["atlases"]
    assert [a["id"] for a in atlases] == ["layer-mixed4c", "class-5-mixed4c"]
    assert [g["size"] for g in atlases[0]["grids"]] == [4, 8]
    labelled = np.asarray(Image.open(out / "layer-mixed4c/grid-8/atlas.png"))
    compose_run(store, out, grids=[8], settings=ComposeSettings(labels=False, examples=0))
    assert not np.array_equal(labelled, np.asarray(Image.open(out / "layer-mixed4c/grid-8/atlas.png")))


def test_unrendered_icons_are_left_blank(store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with h5py.File(store, "a") as f:
        count = f["mixed4c/grid/8/count"][()]
        y, x = np.argwhere(count >= 3)[0]
        f["mixed4c/grid/8/icon_done"][y, x] = False  # as if `atlas render` was interrupted
    compose_run(store, tmp_path / "run", grids=[8], settings=ComposeSettings(labels=False, examples=0))
    atlas = np.asarray(Image.open(tmp_path / "run/layer-mixed4c/grid-8/atlas.png"))
    assert (atlas[y * ICON_PX : (y + 1) * ICON_PX, x * ICON_PX : (x + 1) * ICON_PX] == 255).all()
    assert (atlas != 255).any()
    assert "1 of" in caplog.text and "not rendered yet" in caplog.text


def test_compose_checks_before_writing(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(AtlasError, match="no grid of size 5"):
        compose_run(store, out, grids=[5])
    with pytest.raises(AtlasError, match="not in the store"):
        compose_run(store, out, layers=["mixed5b"])
    with h5py.File(store, "a") as f:
        del f["mixed4c/grid/8/icons"]
    with pytest.raises(AtlasError, match="atlas render"):
        compose_run(store, out, grids=[4, 8])
    with h5py.File(store, "a") as f:
        f["mixed4c/grid/4/count"][0, 0] += 1
    with pytest.raises(AtlasError, match="count does not match"):
        compose_run(store, out, grids=[4])
    assert not out.exists()


def test_cli_compose_and_view_server(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["compose", str(store), "--out", str(out), "--grid", "4", "--examples", "1"]) == 0
    server, url = serve_in_thread(out)
    try:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url) as page:
            assert b"openseadragon.min.js" in page.read()
        with urllib.request.urlopen(url + "atlases.json") as manifest:
            assert json.load(manifest)["atlases"][0]["grids"][0]["size"] == 4
    finally:
        server.shutdown()
        server.server_close()
    assert main(["view", str(tmp_path)]) == 2
    assert "no index.html" in capsys.readouterr().err


def test_compose_settings_are_checked_once_from_a_config():
    assert ComposeSettings.from_config({"examples": 0}) == ComposeSettings(examples=0)
    with pytest.raises(AtlasError, match="unknown key 'label'.*did you mean labels"):
        ComposeSettings.from_config({"label": False})
    with pytest.raises(AtlasError, match="tile format 'gif'"):
        ComposeSettings(tile_format="gif")
    with pytest.raises(AtlasError, match="examples per cell"):
        ComposeSettings(examples=-1)


@pytest.mark.parametrize(("size", "levels"), [(3, 7), (5, 8), (8, 8)])
def test_deep_zoom_has_a_level_per_halving_down_to_1_px_on_any_canvas(tmp_path: Path, size, levels) -> None:
    """Deep Zoom's pyramid: ceil(log2(the canvas side)) + 1 levels. A 48 px canvas needs 7 (48, 24, 12, 6, 3, 2,
    1), an 80 px one 8: a canvas whose side is not a power of two rounds up, or the browser's tiles are misplaced."""
    assert write_dzi(_grid(size, 0).image, tmp_path / "tiles", tile_format="png") == levels
    assert len(list((tmp_path / "tiles_files").iterdir())) == levels
