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
from atlas.project import (
    LayoutSettings,
    _knn_graph,
    embed,
    exact_knn,
    normalize_layout,
    optimize_layout,
    project_store,
    resolve_knn,
)
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


@pytest.mark.parametrize("knn", ["nndescent", "umap-learn"])
def test_approximate_knn_finds_the_true_neighbours(knn):
    """Both NN-descent searches (pynndescent's tree count, umap-learn's own call) against the exact neighbours."""
    rng = np.random.default_rng(2)
    x = np.maximum(rng.normal(size=(6000, 16)) + rng.normal(size=(30, 16))[rng.integers(0, 30, 6000)], 0)
    x = x.astype(np.float32)
    indices, distances = _knn_graph(x, 10, "cosine", 0, "cpu", knn)
    assert indices.shape == distances.shape == (6000, 10)
    want_distances, want_indices = NearestNeighbors(n_neighbors=10, metric="cosine").fit(x).kneighbors(x)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(indices, want_indices, strict=True)])
    assert recall > 0.95, recall
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cosine_distance = 1 - np.einsum("nc,nkc->nk", unit, unit[indices])  # of the neighbours it returned
    np.testing.assert_allclose(distances, cosine_distance, atol=1e-4)
    assert np.abs(np.sort(distances, axis=1) - want_distances).mean() < 1e-3


def test_exact_knn_puts_each_point_first_among_duplicates():
    x = np.ones((30, 4), dtype=np.float32)
    indices, _ = exact_knn(x, 5)
    assert (indices[:, 0] == np.arange(30)).all()


def test_auto_knn_is_exact_for_small_inputs_and_on_accelerators_else_nndescent():
    assert resolve_knn("auto", "cosine", "cpu", (2000, 512)) == "exact"
    assert resolve_knn("auto", "cosine", "cpu", (100_000, 512)) == "nndescent"
    assert resolve_knn("auto", "euclidean", "cuda", (100_000, 512)) == "exact"
    assert resolve_knn("auto", "correlation", "cpu", (2000, 512)) == "nndescent"  # no exact search for it
    assert resolve_knn("nndescent", "cosine", "cpu", (2000, 512)) == "nndescent"


def umap_step(start: np.ndarray, other: np.ndarray, a: float, b: float) -> np.ndarray:
    """umap-learn's attractive step for one edge, written out in numpy: -2ab d^(2b-2) / (1 + a d^(2b)) (x_i - x_j)."""
    squared = ((start - other) ** 2).sum()
    coefficient = -2 * a * b * squared ** (b - 1) / (1 + a * squared**b)
    return np.clip(coefficient * (start - other), -4, 4)


def test_optimize_layout_first_sampled_epoch_is_umap_learns_attraction():
    # pairs 0-1 and 2-3, both directions as in UMAP's symmetric graph. As in umap-learn, an edge sampled every
    # epoch is first sampled in epoch 1 (learning rate 1 - 1/2), and one negative sample every 10 epochs gives
    # none yet: each end moves by the attraction alone, once for each direction of its edge
    start = np.array([[0.0, 0.0], [1.0, 0.5], [5.0, 5.0], [5.2, 4.9]], dtype=np.float32)
    head, tail = np.array([0, 1, 2, 3]), np.array([1, 0, 3, 2])
    a, b = 1.577, 0.895  # umap-learn's find_ab_params(1.0, 0.05)
    moved = optimize_layout(start, head, tail, np.ones(4), n_epochs=2, a=a, b=b, negative_sample_rate=0.1)
    steps = np.stack([umap_step(start[i], start[j], a, b) for i, j in zip(head, tail, strict=True)])
    np.testing.assert_allclose(moved, start + 2 * 0.5 * steps, rtol=1e-5)
    assert np.abs(moved - start).max() > 0.1


def test_optimize_layout_pulls_neighbours_together_and_pushes_the_rest_apart():
    # two cliques of 20 vertices with no edge between them, from one random cloud
    members = np.arange(40) // 20
    head, tail = np.nonzero((members[:, None] == members[None, :]) & ~np.eye(40, dtype=bool))
    start = np.random.default_rng(0).uniform(0, 10, size=(40, 2)).astype(np.float32)
    layout = optimize_layout(start, head, tail, np.ones(len(head)), n_epochs=100, a=1.577, b=0.895, seed=1)
    distance = np.linalg.norm(layout[:, None] - layout[None, :], axis=-1)
    same = members[:, None] == members[None, :]
    assert distance[same].mean() * 3 < distance[~same].mean()
    np.testing.assert_array_equal(
        layout, optimize_layout(start, head, tail, np.ones(len(head)), n_epochs=100, a=1.577, b=0.895, seed=1)
    )


def test_torch_sgd_matches_umap_learns_quality():
    from sklearn.manifold import trustworthiness

    rng = np.random.default_rng(5)
    centres = rng.normal(size=(6, 24)) * 3
    x = np.maximum(centres[np.arange(1200) % 6] + rng.normal(size=(1200, 24)), 0).astype(np.float32)
    scores = {
        sgd: trustworthiness(
            x, embed(x, LayoutSettings(n_neighbors=15, seed=0, sgd=sgd)), n_neighbors=10, metric="cosine"
        )
        for sgd in ("torch", "umap-learn")
    }
    assert scores["torch"] > scores["umap-learn"] - 0.01, scores


@pytest.mark.parametrize("engine", [{"sgd": "torch"}, {"sgd": "umap-learn", "init": "spectral"}])
def test_project_store_writes_a_seeded_normalised_layout(synthetic_store, engine):
    layout = project_store(synthetic_store, settings=LayoutSettings(seed=3, **FAST, **engine))
    with h5py.File(synthetic_store) as f:
        stored = f["mixed4c/layout"]
        assert stored.shape == (2000, 2) and stored.dtype == np.float32
        attrs = dict(stored.attrs)
        np.testing.assert_array_equal(stored[:], layout)
        clusters = f["images/label"][:]  # the synthetic store's cluster of each sample
    assert attrs["method"] == "umap" and attrs["metric"] == "cosine" and attrs["n_neighbors"] == 15
    assert attrs["seed"] == 3 and attrs["knn"] == "exact" and attrs["sgd"] == engine["sgd"]
    assert attrs["init"] == engine.get("init", "pca")
    assert layout.min() >= 0.0 and layout.max() <= 1.0
    # the layout keeps the clusters apart: a sample's nearest layout neighbour is in its cluster
    _, nearest = NearestNeighbors(n_neighbors=2).fit(layout).kneighbors(layout)
    assert (clusters[nearest[:, 1]] == clusters).mean() > 0.95
    again = project_store(synthetic_store, settings=LayoutSettings(seed=3, **FAST, **engine))
    np.testing.assert_array_equal(again, layout)
    assert not np.array_equal(project_store(synthetic_store, settings=LayoutSettings(seed=4, **FAST, **engine)), layout)


def test_project_store_normalises_from_widened_percentiles(tmp_path):
    path = write_synthetic_store(tmp_path / "small.h5", n=300)
    layout = project_store(path, settings=LayoutSettings(n_neighbors=10, n_epochs=30, sgd="torch"))
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["mixed4c/layout"][:], layout)
    # the 1st and 99th percentiles widened by 10 % of their range map to [0, 1]: they land at 1/12 and 11/12
    np.testing.assert_allclose(np.percentile(layout, [1, 99], axis=0), [[1 / 12] * 2, [11 / 12] * 2], atol=1e-3)
    assert layout.min() >= 0.0 and layout.max() <= 1.0


def test_tsne_layout_in_one_and_two_dimensions():
    rng = np.random.default_rng(2)
    side = np.arange(200) % 2
    active = np.arange(12) // 6 == side[:, None]  # the two groups fire on different halves of the channels
    x = np.maximum(rng.normal(size=(200, 12)) + 3 * active, 0).astype(np.float32)
    with threadpool_limits(1):  # OpenMP threads spin-wait on a busy 2-core machine: one thread is far faster here
        line = embed(x, LayoutSettings(method="tsne", n_components=1, perplexity=15, seed=0))
        again = embed(x, LayoutSettings(method="tsne", n_components=1, perplexity=15, seed=0))
        plane = normalize_layout(embed(x, LayoutSettings(method="tsne", perplexity=15, seed=0)))
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
        project_store(path, settings=LayoutSettings(method="tsne"))
    assert digest(path) == before


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activations_are_an_error(synthetic_store, bad):
    with h5py.File(synthetic_store, "r+") as f:
        f["mixed4c/activations"][123, 4] = bad
    before = digest(synthetic_store)
    with pytest.raises(AtlasError, match="NaN or infinite values .first in sample 123"):
        project_store(synthetic_store, settings=LayoutSettings(**FAST))
    assert digest(synthetic_store) == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "pca"}, "unknown projection method"),
        ({"metric": "nonsense"}, "unknown metric"),
        ({"knn": "exact", "metric": "correlation"}, "exact kNN supports"),
        ({"min_dist": 2.0}, "min_dist"),
        ({"sgd": "numba"}, "unknown layout sgd"),
        ({"init": "random"}, "unknown UMAP init"),
        ({"device": "cuda:7"}, "is not here; torch sees: cpu"),
    ],
)
def test_bad_settings_are_errors(synthetic_store, settings, message):
    settings = dict(settings)
    device = settings.pop("device", "cpu")
    with pytest.raises(AtlasError, match=message):
        project_store(synthetic_store, settings=LayoutSettings(**settings), device=device)


def test_cli_project(synthetic_store, capsys):
    assert main(["project", str(synthetic_store), "--n-neighbors", "15", "--seed", "1", "--device", "cpu"]) == 0
    assert "layout of 2000 samples" in capsys.readouterr().out
    with h5py.File(synthetic_store) as f:
        assert f["mixed4c/layout"].shape == (2000, 2)
    assert main(["project", str(synthetic_store), "--layer", "nope"]) == 2
    assert "not in the store" in capsys.readouterr().err


def test_layout_settings_from_config_rejects_an_unknown_key_by_name():
    assert LayoutSettings.from_config({"n_neighbors": 15}) == LayoutSettings(n_neighbors=15)
    with pytest.raises(AtlasError, match="unknown key 'n_neighbours'.*did you mean n_neighbors"):
        LayoutSettings.from_config({"n_neighbours": 15})
