from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from atlas import AtlasError
from atlas.stages.grid import cell_ids, grid_store, layer_whitening, top_classes
from pipelines.cli import main
from tests.synthetic import write_synthetic_store


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def boundary_layout(n: int, seed: int = 0) -> np.ndarray:
    """Random points in [0, 1]^2 with many exactly on cell edges (multiples of 1/40, including 0 and 1)."""
    rng = np.random.default_rng(seed)
    layout = rng.beta(2.0, 2.0, size=(n, 2)).astype(np.float32)  # denser in the middle: some cells stay empty
    on_edges = rng.random(size=(n, 2)) < 0.1
    layout[on_edges] = (rng.integers(0, 41, size=on_edges.sum()) / 40).astype(np.float32)
    return layout


@pytest.fixture
def laid_out_store(synthetic_store: Path) -> Path:
    with h5py.File(synthetic_store, "r+") as f:
        f["mixed4c"].create_dataset("layout", data=boundary_layout(2000))
    return synthetic_store


def test_every_point_lands_in_exactly_the_cell_that_contains_it():
    layout = boundary_layout(5000)
    layout[:4] = [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.5, 0.25]]
    for size in (1, 7, 20, 40):
        cells = cell_ids(layout, size)
        assert cells.dtype == np.int32 and ((cells >= 0) & (cells < size * size)).all()
        x, y = cells % size, cells // size
        # the cell [x/G, (x+1)/G) holds the point, and the last cell also holds 1.0
        for column, coordinate in ((x, layout[:, 0]), (y, layout[:, 1])):
            assert (column / size <= coordinate).all()
            assert ((coordinate < (column + 1) / size) | ((column == size - 1) & (coordinate == 1.0))).all()
        assert cells[0] == size * size - 1 and cells[1] == 0 and cells[2] == size - 1


def test_cell_means_match_a_direct_computation(laid_out_store):
    # 10 is summed from 20's cells, 7 on its own
    counts = grid_store(laid_out_store, sizes=(7, 10, 20), min_count=4, chunk_rows=300, whitening_rows=None)
    with h5py.File(laid_out_store) as f:
        group = f["mixed4c"]
        activations, attributions = group["activations"][:], group["attributions"][:]
        layout = group["layout"][:]
        for size in (7, 10, 20):
            grid = group[f"grid/{size}"]
            assert grid.attrs["min_count"] == 4
            cell = grid["cell"][:]
            np.testing.assert_array_equal(cell, cell_ids(layout, size))
            np.testing.assert_array_equal(grid["count"][:], counts[size])
            assert grid["count"][:].sum() == 2000
            for y in range(size):
                for x in range(size):
                    members = cell == y * size + x
                    assert grid["count"][y, x] == members.sum()
                    if members.sum() >= 4:
                        want = activations[members].mean(axis=0)
                        want_attribution = attributions[members].mean(axis=0)
                        order = np.argsort(-want_attribution)[:5]
                        np.testing.assert_array_equal(grid["top_classes"][y, x], order)
                        np.testing.assert_allclose(grid["top_attributions"][y, x], want_attribution[order], rtol=1e-5)
                    else:
                        want = np.zeros(activations.shape[1])
                        want_attribution = np.zeros(attributions.shape[1])
                        assert (grid["top_classes"][y, x] == -1).all()
                        assert np.isnan(grid["top_attributions"][y, x]).all()
                    np.testing.assert_allclose(grid["mean"][y, x], want, rtol=1e-5, atol=1e-6)
                    np.testing.assert_allclose(grid["attribution"][y, x], want_attribution, rtol=1e-5, atol=1e-6)
        assert 0 < (counts[20] < 4).sum() < 400  # both kinds of cell are exercised


def assert_whitening(whitening: np.ndarray, activations: np.ndarray, ridge: float) -> None:
    """`whitening` is the inverse of the centred covariance plus `ridge` x its mean variance, in numpy."""
    covariance = np.cov(activations, rowvar=False)
    ridge = ridge * np.trace(covariance) / len(covariance)
    want = np.linalg.inv(covariance + ridge * np.eye(len(covariance)))
    np.testing.assert_allclose(whitening, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_whitening_is_the_ridged_inverse_of_the_centred_covariance(laid_out_store):
    grid_store(laid_out_store, sizes=(4,), ridge=0.05, whitening_rows=None, chunk_rows=700)
    with h5py.File(laid_out_store) as f:
        whitening = f["mixed4c/whitening"][:]
        activations = f["mixed4c/activations"][:].astype(np.float64)
        assert f["mixed4c/whitening"].attrs["samples"] == 2000
    assert_whitening(whitening, activations, ridge=0.05)


def test_whitening_from_a_strided_subsample(laid_out_store):
    grid_store(laid_out_store, sizes=(4,), whitening_rows=500, chunk_rows=333)
    with h5py.File(laid_out_store) as f:
        whitening = f["mixed4c/whitening"][:]
        activations = f["mixed4c/activations"][::4].astype(np.float64)  # every 4th row: ceil(2000 / 500)
        assert f["mixed4c/whitening"].attrs["samples"] == 500
    assert_whitening(whitening, activations, ridge=0.01)


def test_layer_whitening_is_what_grid_writes_and_whitening_false_keeps_it(laid_out_store):
    grid_store(laid_out_store, sizes=(4,), whitening_rows=700)
    with h5py.File(laid_out_store) as f:
        written = f["mixed4c/whitening"][:]
        computed, samples = layer_whitening(f["mixed4c"], whitening_rows=700)
    np.testing.assert_array_equal(computed, written)
    assert samples == 667  # every 3rd of 2000 rows
    with h5py.File(laid_out_store, "r+") as f:
        f["mixed4c/whitening"][...] = np.eye(16)
    grid_store(laid_out_store, sizes=(4,), whitening=False)
    with h5py.File(laid_out_store) as f:
        np.testing.assert_array_equal(f["mixed4c/whitening"][:], np.eye(16))


def test_top_classes_are_sorted_best_first():
    values = np.array([[0.1, 0.5, -1.0, 0.3], [2.0, 1.0, 3.0, 0.0]])
    classes, top = top_classes(values, top=3)
    np.testing.assert_array_equal(classes, [[1, 3, 0], [2, 0, 1]])
    np.testing.assert_array_equal(top, [[0.5, 0.3, 0.1], [3.0, 2.0, 1.0]])
    assert top_classes(values, top=5)[0].shape == (2, 4)


def test_regridding_replaces_a_size_and_its_icons(laid_out_store):
    grid_store(laid_out_store, sizes=(4, 8))
    with h5py.File(laid_out_store, "r+") as f:
        f["mixed4c/grid/8"].create_dataset("icons", data=np.zeros((8, 8, 2, 2, 3), np.uint8))
    grid_store(laid_out_store, sizes=(8,), min_count=2)
    with h5py.File(laid_out_store) as f:
        assert "icons" not in f["mixed4c/grid/8"] and f["mixed4c/grid/8"].attrs["min_count"] == 2
        assert f["mixed4c/grid/4"].attrs["min_count"] == 6  # other sizes are left alone


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": (20, 0)}, "grid: sizes must be an integer at least 1, not 0"),
        ({"sizes": (20, 100_000)}, "grid size 100000 is too large: 10,000,000,000 cells .* about 2,906 GiB"),
        ({"min_count": 0}, "min_count must be an integer at least 1, not 0"),
        ({"layer": "mixed5b"}, "not in the store"),
    ],
)
def test_bad_arguments_are_errors_and_leave_the_store(laid_out_store, kwargs, message):
    before = digest(laid_out_store)
    with pytest.raises(AtlasError, match=message):
        grid_store(laid_out_store, **kwargs)
    assert digest(laid_out_store) == before


@pytest.mark.parametrize(("dataset", "bad"), [("activations", np.nan), ("attributions", np.inf)])
def test_non_finite_data_is_an_error_and_leaves_the_store(laid_out_store, dataset, bad):
    with h5py.File(laid_out_store, "r+") as f:
        f[f"mixed4c/{dataset}"][1999, 0] = bad  # in the last block: found after earlier blocks were summed
    before = digest(laid_out_store)
    with pytest.raises(AtlasError, match=f"{dataset} contains NaN or infinite values .first in sample 1999"):
        grid_store(laid_out_store, chunk_rows=512)
    assert digest(laid_out_store) == before


def test_missing_or_stale_layout_is_an_error(tmp_path):
    path = write_synthetic_store(tmp_path / "s.h5", n=300)
    with pytest.raises(AtlasError, match="no layout: run `atlas project` first"):
        grid_store(path)
    with h5py.File(path, "r+") as f:
        f["mixed4c"].create_dataset("layout", data=np.full((299, 2), 0.5, np.float32))
    with pytest.raises(AtlasError, match=r"layout has 299 rows for 300 samples: rerun `atlas project`"):
        grid_store(path)


def test_cli_grid(laid_out_store, capsys):
    assert main(["grid", str(laid_out_store), "--sizes", "10,20", "--min-count", "3"]) == 0
    assert "grid 20:" in capsys.readouterr().out
    with h5py.File(laid_out_store) as f:
        group = f["mixed4c"]
        assert group["grid/10/cell"].shape == (2000,) and group["grid/20/count"].shape == (20, 20)
        assert group["grid/20/mean"].shape == (20, 20, 16) and group["whitening"].shape == (16, 16)
        assert group["grid/10/top_classes"].shape == (10, 10, 5)
    assert main(["grid", str(laid_out_store), "--sizes", "0"]) == 2
    assert "grid: sizes must be an integer at least 1, not 0" in capsys.readouterr().err
