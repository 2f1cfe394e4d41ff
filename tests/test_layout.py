from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

from atlas.layout import (
    LayoutSettings,
    TorchUMAP,
    _knn_graph,
    embed,
    exact_knn,
    fuzzy_graph,
    optimize_layout,
    read_unit_rows,
    resolve_knn,
    unit_rows,
)
from atlas.stages.project import normalize_layout


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


@pytest.mark.parametrize("knn, unit", [("nndescent", False), ("nndescent", True), ("umap-learn", False)])
def test_approximate_knn_finds_the_true_neighbours(knn, unit):
    """Both NN-descent searches (pynndescent's tree count, umap-learn's own call) against the exact neighbours;
    unit rows, as project_store reads them for cosine, take the squared euclidean search without a copy."""
    rng = np.random.default_rng(2)
    x = np.maximum(rng.normal(size=(6000, 16)) + rng.normal(size=(30, 16))[rng.integers(0, 30, 6000)], 0)
    x = read_unit_rows(x.astype(np.float32)) if unit else x.astype(np.float32)
    assert unit_rows(x) == unit
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


def test_optimize_layout_in_edge_blocks_moves_as_in_one_piece():
    # an epoch's edges in blocks of 7 are summed into one step from the same positions: the same layout, up to
    # rounding (which later epochs of this small dense graph amplify, hence only 4)
    rng = np.random.default_rng(3)
    head, tail = np.nonzero(np.triu(rng.random((30, 30)) < 0.3, 1))
    head, tail = np.concatenate([head, tail]), np.concatenate([tail, head])
    start = rng.uniform(0, 10, size=(30, 2)).astype(np.float32)
    period = rng.choice([1.0, 2.0, 3.5], size=len(head))
    layouts = [
        optimize_layout(start, head, tail, period, n_epochs=4, a=1.577, b=0.895, seed=2, edge_block=block)
        for block in (7, len(head))
    ]
    np.testing.assert_allclose(layouts[0], layouts[1], atol=1e-4)
    assert np.abs(layouts[0] - start).max() > 0.5


def test_fuzzy_graph_is_umap_learns_fuzzy_simplicial_set():
    """The adapter over umap-learn's internals: the same symmetric edges and union weights as its own graph,
    on a kNN graph with a missing neighbour (-1); fails if umap-learn changes the functions it borrows."""
    from scipy.sparse import coo_matrix
    from umap.umap_ import fuzzy_simplicial_set

    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    indices, distances = exact_knn(x, 12, metric="euclidean")
    indices[7, -1], distances[7, -1] = -1, np.inf
    head, tail, weight = fuzzy_graph(indices, distances)
    assert head.dtype == tail.dtype == np.int32 and weight.dtype == np.float32
    ours = coo_matrix((weight, (head, tail)), shape=(300, 300)).tocsr()
    assert ours.nnz == len(head)  # no edge twice
    theirs, _, _ = fuzzy_simplicial_set(x, 12, np.random.RandomState(0), "euclidean", {}, indices, distances)
    assert ours.nnz == theirs.nnz and (ours != ours.T).nnz == 0
    np.testing.assert_allclose(ours.toarray(), theirs.toarray(), rtol=1e-6, atol=1e-7)


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


def test_torch_umap_is_a_scikit_learn_estimator_over_embed():
    from sklearn.base import clone

    rng = np.random.default_rng(6)
    x = np.maximum(rng.normal(size=(400, 12)) + 2 * rng.normal(size=(4, 12))[np.arange(400) % 4], 0)
    x = x.astype(np.float32)
    estimator = clone(TorchUMAP(n_neighbors=10, n_epochs=40, metric="euclidean", random_state=3))
    assert estimator.get_params()["n_neighbors"] == 10 and TorchUMAP().get_params()["min_dist"] == 0.05
    want = embed(x, LayoutSettings(n_neighbors=10, n_epochs=40, metric="euclidean", seed=3))
    np.testing.assert_array_equal(estimator.fit_transform(x), want)
    assert estimator.embedding_.shape == (400, 2)


def test_torch_umap_owns_the_engine_fit_keeps_the_fuzzy_graph_and_the_embedding():
    rng = np.random.default_rng(7)
    x = np.maximum(rng.normal(size=(300, 10)) + 2 * rng.normal(size=(3, 10))[np.arange(300) % 3], 0)
    x = x.astype(np.float32)
    fitted = TorchUMAP(n_neighbors=8, n_epochs=30, metric="euclidean", random_state=1).fit(x)
    want = embed(x, LayoutSettings(n_neighbors=8, n_epochs=30, metric="euclidean", seed=1))
    np.testing.assert_array_equal(fitted.embedding_, want)
    graph = fitted.graph_
    assert graph.shape == (300, 300) and abs(graph - graph.T).max() < 1e-6  # the fuzzy union is symmetric
    assert graph.diagonal().sum() == 0 and (graph.getnnz(axis=1) >= 7).all() and graph.max() <= 1  # k less itself


def test_umap_learns_internals_keep_the_parameters_layout_passes():
    """atlas.umap_internals is the one place umap-learn's undocumented functions are imported: an upgrade that
    renames or reorders their parameters fails here, not deep in a projection."""
    import inspect

    from atlas import umap_internals

    for name, wanted in umap_internals.SIGNATURES.items():
        function = getattr(umap_internals, name)
        parameters = list(inspect.signature(getattr(function, "py_func", function)).parameters)
        assert parameters[: len(wanted)] == list(wanted), (name, parameters)


@pytest.mark.parametrize("knn", ["exact", "nndescent"])
def test_a_seeded_layout_is_the_same_at_one_and_two_threads(knn):
    """Issue 39: the layout SGD's pow runs on one thread (torch's vector and scalar pow differ in the last bit, and
    the split between threads decides which elements take which), so one and two threads give the same layout."""
    rng = np.random.default_rng(11)
    x = (rng.normal(size=(1500, 24)) + 3 * rng.normal(size=(6, 24))[np.arange(1500) % 6]).astype(np.float32)
    settings = LayoutSettings(n_neighbors=15, n_epochs=60, knn=knn, metric="euclidean", seed=4)
    before = torch.get_num_threads()
    layouts = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            layouts.append(embed(x, settings))
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(*layouts)
