from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

from atlas import AtlasError
from atlas.cli import main
from atlas.project import embed, exact_knn, normalize_layout, project_store, resolve_knn
from tests.synthetic import write_synthetic_store

FAST = {"n_neighbors": 15, "n_epochs": 60}  # small settings: the tests check plumbing and invariants, not beauty


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_normalize_layout_clips_to_widened_percentiles_and_rescales():
    rng = np.random.default_rng(0)
    layout = rng.normal(size=(1000, 2)) * [1.0, 50.0] + [0.0, 7.0]
    layout[0] = [1e6, -1e6]  # outliers are clipped, not allowed to squash everything else
    normalised = normalize_layout(layout)
    assert normalised.dtype == np.float32 and normalised.shape == layout.shape
    assert normalised.min() >= 0.0 and normalised.max() <= 1.0
    for axis in range(2):
        low, high = np.percentile(layout[:, axis], [1, 99])
        low, high = low - 0.1 * (high - low), high + 0.1 * (high - low)
        expected = (np.clip(layout[:, axis], low, high) - low) / (high - low)
        np.testing.assert_allclose(normalised[:, axis], expected, atol=1e-6)
    assert normalised[0, 0] == 1.0 and normalised[0, 1] == 0.0


def test_normalize_layout_handles_one_axis_and_no_spread():
    assert normalize_layout(np.arange(10.0)).shape == (10,)
    flat = normalize_layout(np.stack([np.arange(10.0), np.full(10, 3.0)], axis=1))
    assert (flat[:, 1] == 0.5).all() and flat[:, 0].min() > 0 and flat[:, 0].max() < 1


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_knn_matches_brute_force(metric):
    rng = np.random.default_rng(1)
    x = np.maximum(rng.normal(size=(700, 24)), 0).astype(np.float32)
    indices, distances = exact_knn(x, 10, metric=metric, block_bytes=4 * 700 * 64)  # 64 query rows per block
    assert indices.dtype == np.int32 and distances.dtype == np.float32
    assert (indices[:, 0] == np.arange(700)).all() and (distances[:, 0] == 0).all()
    want_distances, want_indices = NearestNeighbors(n_neighbors=10, metric=metric).fit(x).kneighbors(x)
    np.testing.assert_allclose(distances, want_distances, atol=1e-4)
    assert (np.sort(indices[:, 1:], axis=1) == np.sort(want_indices[:, 1:], axis=1)).mean() > 0.99


def test_exact_knn_puts_each_point_first_among_duplicates():
    x = np.ones((30, 4), dtype=np.float32)
    indices, _ = exact_knn(x, 5)
    assert (indices[:, 0] == np.arange(30)).all()


def test_auto_knn_is_exact_for_small_inputs_and_on_accelerators():
    assert resolve_knn("auto", "cosine", "cpu", (2000, 512)) == "exact"
    assert resolve_knn("auto", "cosine", "cpu", (100_000, 512)) == "umap-learn"
    assert resolve_knn("auto", "euclidean", "cuda", (100_000, 512)) == "exact"
    assert resolve_knn("auto", "correlation", "cpu", (2000, 512)) == "umap-learn"  # no exact search for it
    assert resolve_knn("nndescent", "cosine", "cpu", (2000, 512)) == "nndescent"


def test_project_store_writes_a_seeded_normalised_layout(synthetic_store):
    layout = project_store(synthetic_store, seed=3, **FAST)
    with h5py.File(synthetic_store) as f:
        stored = f["mixed4c/layout"]
        assert stored.shape == (2000, 2) and stored.dtype == np.float32
        attrs = dict(stored.attrs)
        np.testing.assert_array_equal(stored[:], layout)
        clusters = f["images/label"][:]  # the synthetic store's cluster of each sample
    assert attrs["method"] == "umap" and attrs["metric"] == "cosine" and attrs["n_neighbors"] == 15
    assert attrs["seed"] == 3 and attrs["knn"] == "exact"
    assert layout.min() >= 0.0 and layout.max() <= 1.0
    # the layout keeps the clusters apart: a sample's nearest layout neighbour is in its cluster
    _, nearest = NearestNeighbors(n_neighbors=2).fit(layout).kneighbors(layout)
    assert (clusters[nearest[:, 1]] == clusters).mean() > 0.95
    again = project_store(synthetic_store, seed=3, **FAST)
    np.testing.assert_array_equal(again, layout)
    assert not np.array_equal(project_store(synthetic_store, seed=4, **FAST), layout)


def test_tsne_layout_in_one_and_two_dimensions():
    rng = np.random.default_rng(2)
    side = np.arange(200) % 2
    active = np.arange(12) // 6 == side[:, None]  # the two groups fire on different halves of the channels
    x = np.maximum(rng.normal(size=(200, 12)) + 3 * active, 0).astype(np.float32)
    with threadpool_limits(1):  # OpenMP threads spin-wait on a busy 2-core machine: one thread is far faster here
        line = embed(x, method="tsne", n_components=1, perplexity=15, seed=0)
        again = embed(x, method="tsne", n_components=1, perplexity=15, seed=0)
        plane = normalize_layout(embed(x, method="tsne", perplexity=15, seed=0))
    assert line.shape == (200, 1) and np.isfinite(line).all()
    np.testing.assert_array_equal(line, again)
    # the two groups of samples stay apart along the line: neighbours on it are of one group
    along = side[np.argsort(line[:, 0])]
    assert (along[1:] == along[:-1]).mean() > 0.95
    assert plane.shape == (200, 2) and plane.min() >= 0 and plane.max() <= 1


def test_missing_layer_is_an_error_and_leaves_the_store(synthetic_store):
    before = digest(synthetic_store)
    with pytest.raises(AtlasError, match="not in the store"):
        project_store(synthetic_store, layer="mixed5b")
    assert digest(synthetic_store) == before


def test_too_few_samples_for_n_neighbors_is_an_error(tmp_path):
    path = write_synthetic_store(tmp_path / "small.h5", n=40)
    before = digest(path)
    with pytest.raises(AtlasError, match="too few for n_neighbors=50"):
        project_store(path)
    with pytest.raises(AtlasError, match="too few for perplexity=50"):
        project_store(path, method="tsne")
    assert digest(path) == before


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activations_are_an_error(synthetic_store, bad):
    with h5py.File(synthetic_store, "r+") as f:
        f["mixed4c/activations"][123, 4] = bad
    before = digest(synthetic_store)
    with pytest.raises(AtlasError, match="NaN or infinite values .first in sample 123"):
        project_store(synthetic_store, **FAST)
    assert digest(synthetic_store) == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "pca"}, "unknown projection method"),
        ({"metric": "nonsense"}, "unknown metric"),
        ({"knn": "exact", "metric": "correlation"}, "exact kNN supports"),
        ({"min_dist": 2.0}, "min_dist"),
        ({"device": "cuda:7"}, "CUDA is not available|unknown device"),
    ],
)
def test_bad_settings_are_errors(synthetic_store, settings, message):
    with pytest.raises(AtlasError, match=message):
        project_store(synthetic_store, **settings)


def test_cli_project(synthetic_store, capsys):
    assert main(["project", str(synthetic_store), "--n-neighbors", "15", "--seed", "1", "--device", "cpu"]) == 0
    assert "layout of 2000 samples" in capsys.readouterr().out
    with h5py.File(synthetic_store) as f:
        assert f["mixed4c/layout"].shape == (2000, 2)
    assert main(["project", str(synthetic_store), "--layer", "nope"]) == 2
    assert "not in the store" in capsys.readouterr().err
