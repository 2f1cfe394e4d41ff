"""Microscope: dataset examples against brute force, atlas cells, unit pages and reuse on rerun."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from atlas import AtlasError
from atlas.images import ImageDataset, ImageRecord, collate
from atlas.microscope import (
    RESULTS,
    TopK,
    best_cells,
    find_layer_atlas,
    lenses,
    merge_top_k,
    parse_units,
    top_activating,
    unit_maxima,
)
from atlas.microscope import examples as example_lens
from atlas.models.classifier import Classifier, capture
from atlas.site import VIEWER
from atlas.stages.compose import ComposeSettings, compose_run
from pipelines.cli import main
from tests.test_compose import write_rendered_store

LAYER = "mixed4c"  # the tiny model's alias, as in write_rendered_store's atlas
CHANNELS = 8
TINY = "tests.test_microscope:tiny_classifier"
FAST = ["--steps", "4", "--size", "32", "--top-k", "3", "--caricatures", "2", "--workers", "0"]


def tiny_classifier() -> Classifier:
    """Three stride-2 convolutions: `mixed4c` is 8 channels at 4 x 4 for its 32 px input (the tiny atlas's layer)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(8, CHANNELS, 3, 2, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(CHANNELS, 10),
    )
    names = [f"class {k}" for k in range(10)]
    return Classifier("tiny", net, nn.Identity(), 32, names, "5", "seeded", aliases={LAYER: "5"})


def write_photos(folder: Path, count: int = 9, seed: int = 0) -> Path:
    """`count` random photos of different sizes and one file that is no image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(30 + 7 * i, 50 - 2 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def build_site(folder: Path, units: str = "4", with_atlas: bool = True) -> Path:
    """A tiny atlas run folder (write_rendered_store + compose) with the microscope written into it."""
    run = folder / "run"
    run.mkdir(parents=True, exist_ok=True)
    if with_atlas:
        compose_run(write_rendered_store(folder, sizes=(4, 8), n=400), run, settings=ComposeSettings(examples=1))
        (folder / "store.h5").rename(run / "store.h5")
    photos = write_photos(folder / "photos")
    assert main(["run", "microscope", "--model", TINY, "--layer", LAYER, "--data", str(photos), "--units", units,
                 "--out", str(run), *FAST]) == 0  # fmt: skip
    return run


def test_top_k_examples_equal_brute_force(tmp_path: Path) -> None:
    model = tiny_classifier()
    folder = write_photos(tmp_path / "photos", count=11)
    records = [ImageRecord(str(p)) for p in sorted(folder.iterdir())]
    best = top_activating(model, [LAYER], records, top_k=4, batch_size=3, workers=0, progress=False)[LAYER]

    items = [ImageDataset(records, model.resize_size, model.input_size)[i] for i in range(len(records))]
    rows, images, skipped = collate(items)
    assert [records[row].path for row, _ in skipped] == [str(folder / "broken.png")]
    with torch.no_grad(), capture(model, [LAYER]) as acts:
        model(images)
    maps = acts[LAYER].numpy()  # [N, C, 4, 4]
    interior = np.zeros(maps.shape[2:], bool)
    interior[1:-1, 1:-1] = True  # the border row and column are left out, as collect leaves them out
    for unit in range(CHANNELS):
        maxima = [max(image[unit][interior]) for image in maps]
        order = np.argsort(-np.asarray(maxima), kind="stable")[:4]
        np.testing.assert_array_equal(best.row[unit], np.asarray(rows)[order])
        np.testing.assert_allclose(best.value[unit], np.asarray(maxima)[order], rtol=1e-5)
        for row, (y, x) in zip(order, best.position[unit], strict=True):
            assert interior[y, x] and maps[row, unit, y, x] == maxima[row]


def test_one_pass_over_several_layers_finds_what_one_pass_each_finds(tmp_path: Path) -> None:
    model = tiny_classifier()
    records = [ImageRecord(str(p)) for p in sorted(write_photos(tmp_path / "photos", count=7).iterdir())]
    both = top_activating(model, ["1", LAYER], records, top_k=3, batch_size=2, workers=0, progress=False)
    for layer in ("1", LAYER):
        alone = top_activating(model, [layer], records, top_k=3, batch_size=2, workers=0, progress=False)[layer]
        for field in ("value", "row", "position"):
            np.testing.assert_array_equal(getattr(both[layer], field), getattr(alone, field))


def test_unit_maxima_leave_out_the_border_unless_the_map_has_no_interior() -> None:
    acts = torch.zeros(1, 1, 4, 4)
    acts[0, 0, 0, 3], acts[0, 0, 2, 1] = 9.0, 5.0  # the larger one on the border
    value, position = unit_maxima(acts)
    assert value.tolist() == [[5.0]] and position.tolist() == [[[2, 1]]]
    value, position = unit_maxima(acts[..., :2, 2:])
    assert value.tolist() == [[9.0]] and position.tolist() == [[[0, 1]]]


def test_merge_top_k_breaks_ties_by_the_earlier_row() -> None:
    best = TopK.empty(2)
    for rows in ([0, 1], [2, 3], [4]):  # every image gives both units the same maximum
        value = np.ones((len(rows), 2), np.float32)
        position = np.zeros((len(rows), 2, 2), np.int32)
        best = merge_top_k(best, value, np.array(rows), position, k=3)
    assert best.row.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_top_k_pads_when_fewer_images_than_k(tmp_path: Path) -> None:
    folder = write_photos(tmp_path / "photos", count=2)
    records = [ImageRecord(str(p)) for p in sorted(folder.iterdir())]
    best = top_activating(tiny_classifier(), [LAYER], records, top_k=3, workers=0, progress=False)[LAYER]
    assert (best.row[:, 2] == -1).all() and np.isnan(best.value[:, 2]).all()
    assert sorted(best.row[0, :2]) == [1, 2]  # row 0 is the broken file
    with pytest.raises(AtlasError, match="none of the 1 images"):
        top_activating(tiny_classifier(), [LAYER], records[:1], workers=0, progress=False)


def test_best_cells_is_the_highest_cosine_non_empty_cell() -> None:
    rng = np.random.default_rng(1)
    size, channels, min_count = 5, 6, 3
    mean = rng.gamma(2.0, 1.0, size=(size, size, channels))
    count = rng.integers(0, 6, size=(size, size))
    units = [4, 0, 2]
    y, x, cosine = best_cells(mean, count, min_count, units)
    for i, unit in enumerate(units):
        scores = {
            (cy, cx): mean[cy, cx, unit] / np.linalg.norm(mean[cy, cx])
            for cy in range(size)
            for cx in range(size)
            if count[cy, cx] >= min_count
        }
        cell = max(scores, key=scores.get)
        assert (y[i], x[i]) == cell
        assert cosine[i] == pytest.approx(scores[cell])
    assert not np.isfinite(best_cells(mean, np.zeros_like(count), 1, [0])[2]).any()


def test_parse_units() -> None:
    assert parse_units(None, 3) == [0, 1, 2]
    assert parse_units("2", 8) == [0, 1]
    assert parse_units("5,1-3,5", 8) == [5, 1, 2, 3]
    for bad in ("9", "1,x", "3-10", ","):
        with pytest.raises(AtlasError):
            parse_units(bad, 8)


def test_the_unit_lenses_objectives() -> None:
    acts = {LAYER: torch.rand(8, 3, 5, 5)}  # diversity: four images per unit, units 0 and 2 in one batch
    channel, neuron = lenses.unit_objective("channel", LAYER, [2]), lenses.unit_objective("neuron", LAYER, [2])
    torch.testing.assert_close(channel({LAYER: acts[LAYER][:1]}), acts[LAYER][:1, 2].mean((1, 2)))
    torch.testing.assert_close(neuron({LAYER: acts[LAYER][:1]}), acts[LAYER][:1, 2, 2, 2])  # the centre only
    diverse = lenses.unit_objective("diversity", LAYER, [0, 2])(acts)
    expected = torch.cat([acts[LAYER][:4, 0].mean((1, 2)), acts[LAYER][4:, 2].mean((1, 2))])
    assert lenses.DIVERSE == 4 and not torch.allclose(diverse, expected)  # the diversity term counts
    from atlas.optvis.objectives import diversity

    torch.testing.assert_close(diverse, expected + lenses.DIVERSITY_WEIGHT * diversity(LAYER, group=4)(acts))
    with pytest.raises(AtlasError, match="unknown unit lens"):
        lenses.unit_objective("pixel", LAYER, [0])


def test_a_page_per_unit_and_rerun_reuses_finished_units(tmp_path: Path, monkeypatch) -> None:
    run = build_site(tmp_path, units="3", with_atlas=False)
    layer_dir = run / "tiny" / LAYER
    assert (run / "index.html").is_file() and (run / "tiny" / "index.html").is_file()
    assert sorted(p.name for p in layer_dir.glob("[0-9]*.html")) == [f"{u}.html" for u in range(3)]
    assert (layer_dir / "layer" / "deepdream.png").is_file() and (layer_dir / "layer" / "caricature-1.png").is_file()
    assert (layer_dir / "layer" / "dream.jpg").is_file()  # the first photo dreamt at the layer
    unit_page = (layer_dir / "1.html").read_text()
    assert 'rel="prev" href="0.html"' in unit_page and 'rel="next" href="2.html"' in unit_page
    assert 'src="neurons/1-0.png"' in unit_page and (layer_dir / "neurons" / "1-0.png").is_file()
    diverse = re.findall(r'src="(diversity/1-\d\.png)"', unit_page)
    assert len(diverse) == lenses.DIVERSE and all((layer_dir / src).is_file() for src in diverse)
    examples = re.findall(r'src="(examples/[^"]+)"', unit_page)
    assert len(examples) == 3 and all((layer_dir / src).is_file() for src in examples)
    wholes = re.findall(r'src="\.\./\.\./(tiny/images/[^"]+)"', unit_page)
    assert len(wholes) == 3 and all((run / src).is_file() for src in wholes)
    with h5py.File(run / RESULTS) as f:
        group = f[f"tiny/{LAYER}/units/{f[f'tiny/{LAYER}/units'].attrs['latest']}"]
        first = group["images"][:3]
        assert group["done"][()].tolist() == [True] * 3 + [False] * 5

    rendered: list[int] = []
    original = lenses.optimize_images

    def spy(model, objective, keys, **kwargs):
        rendered.append(len(keys))
        return original(model, objective, keys, **kwargs)

    def no_pass(*args, **kwargs):
        raise AssertionError("the dataset pass should be reused")

    monkeypatch.setattr(lenses, "optimize_images", spy)
    monkeypatch.setattr(example_lens, "top_activating", no_pass)
    photos = str(tmp_path / "photos")
    assert main(["run", "microscope", "--model", TINY, "--layer", LAYER, "--data", photos, "--units", "5", "--out",
                 str(run), *FAST]) == 0  # fmt: skip
    # units 3 and 4 only, in each unit lens (diversity: DIVERSE images each): no DeepDream or caricature again
    assert rendered == [2, 2, 2 * lenses.DIVERSE]
    assert sorted(p.name for p in layer_dir.glob("[0-9]*.html")) == [f"{u}.html" for u in range(5)]
    with h5py.File(run / RESULTS) as f:
        group = f[f"tiny/{LAYER}/units/{f[f'tiny/{LAYER}/units'].attrs['latest']}"]
        np.testing.assert_array_equal(group["images"][:3], first)

    rendered.clear()  # other settings are other results: all five units again, kept beside the first ones
    assert main(["run", "microscope", "--model", TINY, "--layer", LAYER, "--data", photos, "--units", "5", "--out",
                 str(run), *FAST[2:], "--steps", "2"]) == 0  # fmt: skip
    # DeepDream, 2 caricatures, 5 channel and 5 neuron images, and 5 x DIVERSE diverse ones in batches of 16 images
    assert sorted(rendered) == [1, 2, 4, 5, 5, 16]
    with h5py.File(run / RESULTS) as f:
        assert len(f[f"tiny/{LAYER}/units"]) == 2


def test_units_link_to_their_best_atlas_cell(tmp_path: Path) -> None:
    run = build_site(tmp_path, units="2")
    assert (run / "atlas.html").read_text() == (VIEWER / "index.html").read_text()
    assert "atlas.html" in (run / "index.html").read_text()
    with h5py.File(run / "store.h5") as f:
        grids = {size: (f[f"{LAYER}/grid/{size}/mean"][()], f[f"{LAYER}/grid/{size}/count"][()]) for size in (4, 8)}
    for unit in range(2):
        page = (run / "tiny" / LAYER / f"{unit}.html").read_text()
        links = re.findall(r'class="atlas-cell" href="([^"]+)"', page)
        expected = []
        for size, (mean, count) in grids.items():
            y, x, _ = best_cells(mean, count, 3, [unit])
            expected.append(f"../../atlas.html#atlas=layer-{LAYER}&amp;grid={size}&amp;cell={x[0]},{y[0]}")
        assert links == expected
    # composing the folder again refreshes the atlas viewer in atlas.html and keeps the microscope's home page
    home = (run / "index.html").read_text()
    (run / "atlas.html").write_text("stale")
    assert compose_run(run / "store.h5", run, settings=ComposeSettings(labels=False, examples=0)) == run / "atlas.html"
    assert (run / "index.html").read_text() == home
    assert (run / "atlas.html").read_text() == (VIEWER / "index.html").read_text()


def test_bad_input_is_one_line_error(tmp_path: Path, capsys) -> None:
    photos = str(write_photos(tmp_path / "photos", count=1))
    base = ["run", "microscope", "--model", TINY, "--data", photos, "--out", str(tmp_path / "out")]
    assert main([*base, "--layer", LAYER, "--units", "0-20"]) == 2
    assert "outside the layer's 8 channels" in capsys.readouterr().err
    assert main([*base, "--layer", "mixed9z"]) == 2
    assert "unknown layer" in capsys.readouterr().err
    assert main([*base, "--layer", LAYER, "--lenses", "channel,pixel"]) == 2
    assert "unknown unit lens pixel" in capsys.readouterr().err
    assert main([*base, "--layer", LAYER, "--lenses", "neuron"]) == 2
    assert "keep it in --lenses" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # validated before anything is written
    manifest = tmp_path / "out" / "atlases.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"atlases": []}))
    assert find_layer_atlas(manifest.parent, "tiny", LAYER) is None


HAND_SET = "tests.test_circuits:hand_set_inception"  # mixed4c:0 is built from mixed4b:1 and mixed4b:3


def build_two_layer_site(folder: Path) -> Path:
    """The microscope of the hand-set network's mixed4b and mixed4c (given in the wrong order), first unit each."""
    run = folder / "site"
    photos = write_photos(folder / "photos")
    assert main(["run", "microscope", "--model", HAND_SET, "--layers", "mixed4c,mixed4b", "--data", str(photos),
                 "--units", "1", "--out", str(run), *FAST]) == 0  # fmt: skip
    return run


def test_a_unit_page_lists_its_inputs_from_the_layer_below_and_links_to_their_pages(tmp_path: Path) -> None:
    from tests.test_circuits import A, B

    run = build_two_layer_site(tmp_path)
    upper_dir, lower_dir = run / "hand-set" / "mixed4c", run / "hand-set" / "mixed4b"
    page = (upper_dir / "0.html").read_text()
    circuit = page[page.index('class="lens circuit"') :]
    how = re.findall(r"<h3>([^<]+)</h3>", circuit)
    assert how[0].startswith("expanded weights") and how[1].startswith("attribution") and how[2] == "Ablation"
    positives = re.findall(r'<div class="inputs positive">(.*?)</div>', circuit, re.S)
    assert len(positives) == 2  # one row per lens, both with the unit's own inputs first
    for row in positives:
        assert [int(u) for u in re.findall(r'data-unit="(\d+)"', row)][:2] == [A, B]
        links = re.findall(r'class="input" href="([^"]+)"', row)
        assert links[:2] == [f"../mixed4b/{A}.html", f"../mixed4b/{B}.html"]
        assert all((upper_dir / link).is_file() for link in links)  # every listed input has its page
    maps = re.findall(r'class="weights" src="([^"]+)"', circuit)
    assert maps and all((upper_dir / src).is_file() for src in maps)  # expanded weights: a k x k map per input
    ablated = [int(u) for u in re.findall(r"<td><a href=\"\.\./mixed4b/(\d+)\.html\">", circuit)]
    assert ablated[:2] == [A, B]  # zeroing its own inputs drops it the most
    lower = (lower_dir / f"{A}.html").read_text()
    assert 'class="user" href="../mixed4c/0.html"' in lower  # and back up
    assert 'class="lens circuit"' not in (lower_dir / "0.html").read_text()  # the lowest layer has no circuit
    model_page = (run / "hand-set" / "index.html").read_text()
    assert 'href="mixed4b/index.html"' in model_page and 'href="mixed4c/index.html"' in model_page
    edges = re.findall(r'class="edge" data-from="([^"]+)" data-to="([^"]+)"', model_page)
    assert ("mixed4b", "bottleneck_conv") in edges and ("conv2", "mixed4c") in edges  # the graph's edges
    layer_page = (upper_dir / "index.html").read_text()
    assert re.findall(r'src="\.\./(mixed4[bc])/layer/dream\.jpg"', layer_page) == ["mixed4b", "mixed4c"]


def test_all_layers_are_the_models_microscope_layers_with_a_map() -> None:
    from atlas.microscope.graph import microscope_layers
    from atlas.models.zoo import load_model

    alexnet = load_model("alexnet", weights="random")
    assert microscope_layers(alexnet) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]  # the graph's
    assert microscope_layers(alexnet, spatial=True) == ["conv1", "conv2", "conv3", "conv4", "conv5"]  # with units
    assert microscope_layers(tiny_classifier()) == ["0", "1", "2", "3", "4", LAYER, "6"]  # top-level, with a map


def test_lenses_left_out_are_not_rendered(tmp_path: Path) -> None:
    photos = str(write_photos(tmp_path / "photos"))
    run = tmp_path / "run"
    assert main(["run", "microscope", "--model", TINY, "--layer", LAYER, "--data", photos, "--units", "2", "--out",
                 str(run), *FAST, "--lenses", "channel,neuron"]) == 0  # fmt: skip
    layer_dir = run / "tiny" / LAYER
    assert (layer_dir / "neurons" / "1-0.png").is_file() and not (layer_dir / "diversity").exists()
    assert "Diversity" not in (layer_dir / "1.html").read_text()
