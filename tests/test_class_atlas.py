"""Class atlases: the winner and magnitude filters, subset stores, the comparison layout, heat-maps, the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from atlas import AtlasError
from atlas.class_atlas import (
    comparison_layout_store,
    comparison_x,
    select_samples,
    winner_counts,
    write_subset_store,
)
from atlas.stages.compose import ComposeSettings, compose_run, heatmap_opacity
from atlas.stages.grid import GridSettings, grid_store
from atlas.stages.render import RenderSettings, render_store
from pipelines.class_atlas import FEW_WINNERS, check_winners, class_settings, run_class_atlas
from pipelines.cli import main
from tests.synthetic import tiny_imagenet_classifier, write_synthetic_store
from tests.test_compose import write_rendered_store

SHARK, TIGER_SHARK = 2, 3  # ImageNet classes favoured by blobs 2 and 3 of the synthetic store


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """300 samples of 'relu3' in 5 blobs favouring ImageNet classes 0-4 (model: tiny_imagenet_classifier)."""
    path = write_synthetic_store(tmp_path / "store.h5", n=300, channels=16, classes=1000, layer="relu3")
    with h5py.File(path, "r+") as f:
        f.attrs.update(model="tests.synthetic:tiny_imagenet_classifier", weights="random", input_size=32)
    return path


def attributions_of(path: Path) -> np.ndarray:
    with h5py.File(path) as f:
        return f["relu3/attributions"][()]


def brute_winner(attributions: np.ndarray, classes: list[int]) -> np.ndarray:
    return np.flatnonzero(np.isin(attributions.argmax(axis=1), classes))


def brute_top(attributions: np.ndarray, c: int, n: int) -> np.ndarray:
    best = np.argsort(-attributions[:, c], kind="stable")[:n]
    return np.sort(best[attributions[best, c] > 0])


# filters ----------------------------------------------------------------------------------------------
def test_winner_filter_picks_the_rows_whose_top_attribution_is_the_class(store):
    expected = brute_winner(attributions_of(store), [SHARK])
    with h5py.File(store) as f:
        got = select_samples(f["relu3/attributions"], [SHARK], winner=True, top=0, chunk_rows=97)
    np.testing.assert_array_equal(got, expected)
    with h5py.File(store) as f:
        assert (f["images/label"][()][got] == SHARK).all()  # the blob that favours the class, and only it
    random = np.random.default_rng(1).normal(size=(2000, 10)).astype(np.float32)
    got = select_samples(random, [4, 7], winner=True, top=0, chunk_rows=300)
    np.testing.assert_array_equal(got, brute_winner(random, [4, 7]))


@pytest.mark.parametrize("top", [1, 50, 333, 5000])
def test_magnitude_filter_picks_the_top_positive_attributions(store, top):
    attributions = attributions_of(store)
    with h5py.File(store) as f:
        got = select_samples(f["relu3/attributions"], [TIGER_SHARK], winner=False, top=top, chunk_rows=64)
    np.testing.assert_array_equal(got, brute_top(attributions, TIGER_SHARK, top))
    assert (attributions[got, TIGER_SHARK] > 0).all()  # with top 5000 > N: every positive one, no negative one


def test_union_of_filters_has_no_duplicates_and_covers_both():
    attributions = np.random.default_rng(2).normal(size=(3000, 10)).astype(np.float32)
    winner = brute_winner(attributions, [2])
    top = brute_top(attributions, 2, 100)
    assert len(np.intersect1d(winner, top)) and len(np.setdiff1d(top, winner))  # overlapping, neither covers all
    got = select_samples(attributions, [2], winner=True, top=100, chunk_rows=128)
    np.testing.assert_array_equal(got, np.union1d(winner, top))
    assert len(got) == len(set(got.tolist())) < len(winner) + len(top)
    both = select_samples(attributions, [2, 5], winner=True, top=100, chunk_rows=128)
    expected = np.union1d(np.union1d(brute_winner(attributions, [2, 5]), top), brute_top(attributions, 5, 100))
    np.testing.assert_array_equal(both, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(classes=[1000]), "not all in"), (dict(classes=[2], winner=False, top=0), "choose"), (dict(top=-1), "top")],
)
def test_filters_reject_bad_settings(kwargs, message):
    with pytest.raises(AtlasError, match=message):
        select_samples(np.zeros((5, 1000), np.float32), **{"classes": [2], **kwargs})


# subset store -----------------------------------------------------------------------------------------
def test_subset_store_holds_the_rows_and_the_whole_layers_whitening(store, tmp_path):
    rows = np.array([3, 10, 11, 250, 299])
    computed = write_subset_store(store, tmp_path / "computed.h5", rows, kind="class")
    with h5py.File(store, "r+") as f:
        f["relu3/layout"] = np.random.default_rng(0).uniform(size=(300, 2)).astype(np.float32)
    grid_store(store, layer="relu3", sizes=[4], min_count=1)
    copied = write_subset_store(store, tmp_path / "copied.h5", rows)
    with h5py.File(store) as parent, h5py.File(copied) as subset, h5py.File(computed) as first:
        for name in ("activations", "attributions", "image_index", "position"):
            np.testing.assert_array_equal(subset[f"relu3/{name}"][()], parent[f"relu3/{name}"][()][rows])
        np.testing.assert_array_equal(subset["relu3/source_index"][()], rows)
        np.testing.assert_array_equal(subset["images/path"][()], parent["images/path"][()])
        assert subset.attrs["model"] == parent.attrs["model"] and first["relu3"].attrs["kind"] == "class"
        whitening = parent["relu3/whitening"][()]
        np.testing.assert_array_equal(subset["relu3/whitening"][()], whitening)
        np.testing.assert_allclose(first["relu3/whitening"][()], whitening, rtol=1e-5)  # as `grid` computes it
    # the subset's grid keeps the parent's whitening when asked to
    with h5py.File(copied, "r+") as f:
        f["relu3/layout"] = np.random.default_rng(1).uniform(size=(5, 2)).astype(np.float32)
    grid_store(copied, sizes=[2], min_count=1, whitening=False)
    with h5py.File(copied) as subset:
        np.testing.assert_array_equal(subset["relu3/whitening"][()], whitening)
    with pytest.raises(AtlasError, match="increasing"):
        write_subset_store(store, tmp_path / "bad.h5", np.array([5, 5]))
    assert not (tmp_path / "bad.h5").exists()


# comparison layout -----------------------------------------------------------------------------------
def test_comparison_x_is_the_scaled_clipped_difference():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=1000), rng.normal(size=1000)
    x, scale = comparison_x(a, b)
    assert scale == pytest.approx(np.percentile(np.abs(b - a), 99))
    np.testing.assert_allclose(x, (np.clip((b - a) / scale, -1, 1) + 1) / 2, rtol=1e-6)
    assert ((x > 0.5) == (b > a)).all()  # more attribution to the second class: to the right
    assert (x == 1).sum() + (x == 0).sum() == pytest.approx(10, abs=1)  # the 1 % beyond the scale is clipped
    x, scale = comparison_x(np.ones(4), np.ones(4))
    assert scale == 1 and (x == 0.5).all()


def test_comparison_layout_store_writes_x_and_a_1d_tsne_y(store, tmp_path):
    rows = select_samples(attributions_of(store), [SHARK, TIGER_SHARK], winner=False, top=20)
    subset = write_subset_store(store, tmp_path / "compare.h5", rows)
    layout = comparison_layout_store(subset, TIGER_SHARK, SHARK, perplexity=50)  # tiger shark on the left
    attributions = attributions_of(store)[rows]
    expected, _ = comparison_x(attributions[:, TIGER_SHARK], attributions[:, SHARK])
    with h5py.File(subset) as f:
        stored = f["relu3/layout"]
        np.testing.assert_array_equal(stored[()], layout)
        assert stored.attrs["method"] == "comparison" and stored.attrs["perplexity"] < 50  # lowered: few samples
    np.testing.assert_array_equal(layout[:, 0], expected)
    assert layout[:, 1].min() >= 0 and layout[:, 1].max() <= 1 and layout[:, 1].std() > 0.1
    with pytest.raises(AtlasError, match="two different"):
        comparison_layout_store(subset, SHARK, SHARK)


# heat-map ---------------------------------------------------------------------------------------------
def test_heatmap_opacity_is_attribution_over_the_populated_maximum():
    count = np.array([[100, 100], [2, 50]])
    attribution = np.array([[2.0, -1.0], [9.0, 1.0]])  # the cell of 2 is below min_count; 9 must not set the max
    opacity = heatmap_opacity(attribution, count, min_count=3)
    np.testing.assert_allclose(opacity, [[1.0, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(heatmap_opacity(-attribution, count, min_count=3), [[0, 1], [0, 0]])


def test_compose_heatmap_fades_cells_by_attribution(tmp_path):
    store = write_rendered_store(tmp_path, sizes=(4,))
    run = tmp_path / "run"
    compose_run(store, run, settings=ComposeSettings(labels=False, examples=0))
    compose_run(store, run, heatmap_class=3, settings=ComposeSettings(labels=False, examples=0))
    manifest = json.loads((run / "atlases.json").read_text())["atlases"]
    assert [(a["id"], a["kind"]) for a in manifest] == [("layer-mixed4c", "layer"), ("heatmap-mixed4c-3", "heatmap")]
    assert manifest[1]["class"] == "class 3 (heat-map)"
    plain = np.asarray(Image.open(run / "layer-mixed4c/grid-4/atlas.png"), np.float64)
    faded = np.asarray(Image.open(run / "heatmap-mixed4c-3/grid-4/atlas.png"), np.float64)
    with h5py.File(store) as f:
        grid = f["mixed4c/grid/4"]
        grid_attribution = grid["attribution"][:, :, 3]
        opacity = heatmap_opacity(grid_attribution, grid["count"][()], int(grid.attrs["min_count"]))
    assert (opacity == 1).any() and (opacity == 0).any() and ((opacity > 0) & (opacity < 1)).any()
    for y, x in np.ndindex(4, 4):
        cell = np.s_[y * 16 : (y + 1) * 16, x * 16 : (x + 1) * 16]
        np.testing.assert_allclose(faded[cell], 255 - (255 - plain[cell]) * opacity[y, x], atol=0.51)
    # the viewer's info panel reads each cell's attribution to the class and its opacity (4 digits) from cells.json
    cells = json.loads((run / "heatmap-mixed4c-3/grid-4/cells.json").read_text())
    for cell in cells["cells"]:
        y, x = cell["y"], cell["x"]
        assert cell["heatmap"]["class"] == "class 3"
        assert cell["heatmap"]["attribution"] == pytest.approx(grid_attribution[y, x], rel=1e-3)
        assert cell["heatmap"]["opacity"] == pytest.approx(opacity[y, x], rel=1e-3)
    assert "heatmap" not in json.loads((run / "layer-mixed4c/grid-4/cells.json").read_text())["cells"][0]
    with pytest.raises(AtlasError, match="not in 0..9"):
        compose_run(store, run, heatmap_class=10)
    for atlas in ({"id": "class-1"}, {"id": "../up", "kind": "class"}):  # an atlas of another kind: checked first
        with pytest.raises(AtlasError, match="id"):
            compose_run(store, run, atlas=atlas)
    assert not (run / "up").exists() and len(json.loads((run / "atlases.json").read_text())["atlases"]) == 2


# settings and the command line ------------------------------------------------------------------------
def test_class_settings_take_the_config_and_catch_typos(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("class_atlas:\n  grid: {sizes: [6]}\n  compare: {render: {steps: 7}}\n")
    settings = class_settings(config, "relu3", comparison=False, overrides={"render": {"steps": 5}})
    assert settings["grid"] == GridSettings(sizes=(6,), min_count=4) and settings["render"].steps == 5
    assert settings["select"].top == 3000 and settings["project"].method == "tsne"  # the paper's defaults
    compare = class_settings(config, "relu3", comparison=True)
    assert compare["render"].steps == 7 and compare["grid"].sizes == (10,) and compare["select"].top == 2000
    config.write_text("class_atlas:\n  grid: {sizez: [6]}\n")
    with pytest.raises(AtlasError, match="did you mean sizes"):
        class_settings(config, "relu3", comparison=False)


def test_cli_class_atlas_and_comparison_end_to_end(store, tmp_path, capsys, monkeypatch):
    from atlas import canvas

    drawn: list[str] = []  # every text written into an atlas image
    label_image = canvas.label_image
    monkeypatch.setattr(canvas, "label_image", lambda text, width: drawn.append(text) or label_image(text, width))
    run = tmp_path / "run"
    run.mkdir()
    other = {"id": "layer-other", "kind": "layer", "layer": "other", "grids": [], "tiles": {}}
    (run / "atlases.json").write_text(json.dumps({"atlases": [other]}))
    tiny = ["--top", "20", "--size", "32", "--steps", "8", "--attempts", "1", "--device", "cpu"]
    assert main(["run", "class-atlas", str(store), "--class", "Great_White  shark", "--out", str(run), *tiny]) == 0
    assert not [text for text in drawn if "->" in text or "<-" in text]  # one class: no sides to name
    assert (
        main(["run", "class-atlas", str(store), "--class", "2", "--vs", "tiger shark", "--out", str(run), *tiny]) == 0
    )
    assert {"<- great white shark", "tiger shark ->"} <= set(drawn)  # the comparison names its left and right
    manifest = json.loads((run / "atlases.json").read_text())["atlases"]
    assert [a["id"] for a in manifest] == ["layer-other", "class-relu3-2", "compare-relu3-2-3"]
    assert [a["class"] for a in manifest[1:]] == ["great white shark", "great white shark vs tiger shark"]
    for atlas, size in zip(manifest[1:], (8, 10), strict=True):
        image = Image.open(run / atlas["id"] / f"grid-{size}" / "atlas.png")
        assert image.size == (32 * size, 32 * size) and np.asarray(image).std() > 0
        cells = json.loads((run / atlas["id"] / f"grid-{size}" / "cells.json").read_text())
        assert cells["total"] == atlas["samples"] and any(not cell["empty"] for cell in cells["cells"])
    assert (run / "index.html").is_file()
    with h5py.File(run / "stores/class-relu3-2.h5") as f:  # the class's blob dominates its cells
        assert (f["images/label"][()][f["relu3/image_index"][()]] == SHARK).mean() > 0.5
    printed = capsys.readouterr().out
    assert "class-relu3-2/grid-8/atlas.png" in printed and "compare-relu3-2-3/grid-10/atlas.png" in printed

    modified = (run / "stores/class-relu3-2.h5").stat().st_mtime_ns
    assert main(["run", "class-atlas", str(store), "--class", "great white shark", "--out", str(run), *tiny]) == 0
    assert (run / "stores/class-relu3-2.h5").stat().st_mtime_ns == modified  # up to date: nothing redone

    assert main(["run", "class-atlas", str(store), "--class", "grate white shark", "--out", str(run)]) == 2
    assert "did you mean 'great white shark'" in capsys.readouterr().err
    assert main(["run", "class-atlas", str(store), "--class", "2", "--vs", "2", "--out", str(run)]) == 2
    assert "same class" in capsys.readouterr().err


def test_class_atlas_adds_the_heatmap_when_the_layer_has_an_atlas(store, tmp_path):
    with h5py.File(store, "r+") as f:
        f["relu3/layout"] = np.random.default_rng(0).uniform(size=(300, 2)).astype(np.float32)
    grid_store(store, sizes=[4], min_count=2)
    icon = RenderSettings(size=32, steps=1, attempts=1)
    render_store(store, grid=4, settings=icon, model=tiny_imagenet_classifier(), progress=False)
    tiny = {"select": {"top": 20}, "render": {"size": 32, "steps": 2, "attempts": 1}}
    entries = run_class_atlas(store, tmp_path / "run", "great white shark", device="cpu", overrides=tiny)
    assert [(e["id"], e["kind"]) for e in entries] == [("class-relu3-2", "class"), ("heatmap-relu3-2", "heatmap")]
    heat = entries[1]
    assert heat["layer"] == "relu3" and heat["class_index"] == SHARK and heat["class"] == "great white shark (heat-map)"
    assert (tmp_path / "run" / heat["grids"][0]["image"]).is_file()


def test_winner_counts_are_the_rows_whose_top_attribution_is_each_class(store):
    attributions = attributions_of(store)
    with h5py.File(store) as f:
        counts = winner_counts(f["relu3/attributions"], [SHARK, TIGER_SHARK, 500], chunk_rows=37)
    assert counts == [len(brute_winner(attributions, [c])) for c in (SHARK, TIGER_SHARK, 500)]
    assert counts[0] > 0 and counts[2] == 0


def test_a_class_with_few_winners_is_warned_of_and_one_with_none_refused_unless_forced(caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.class_atlas"):
        check_winners([2, FEW_WINNERS], ["great white shark", "tiger shark"], 1408, force=False)
    assert [r.getMessage() for r in caplog.records] == [
        f"class 'great white shark': only 2 of 1,408 samples have it as their top class (fewer than {FEW_WINNERS}): "
        "its atlas rests mostly on weak attributions"
    ]
    with pytest.raises(AtlasError, match=r"no sample of the store has 'grey whale' as its top class \(0 of 1,408"):
        check_winners([0], ["grey whale"], 1408, force=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.class_atlas"):
        check_winners([0], ["grey whale"], 1408, force=True)
    assert "only 0 of 1,408" in caplog.records[0].getMessage()


def test_cli_refuses_a_class_without_winner_samples_in_one_line(store, tmp_path, capsys):
    assert main(["run", "class-atlas", str(store), "--class", "500", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(0 of 300 winner samples)" in err[0] and "--force" in err[0]
