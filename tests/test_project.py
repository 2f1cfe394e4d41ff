from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from atlas import AtlasError
from atlas.layout import LayoutSettings
from atlas.stages.project import layout_record, normalize_layout, project_store
from pipelines.cli import main
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


def test_a_layout_records_its_own_methods_parameters_only():
    """Changing t-SNE's perplexity leaves a UMAP layout fresh, and UMAP's n_neighbors a t-SNE one; the method's own
    parameters and the device are recorded."""
    umap, tsne = LayoutSettings(), LayoutSettings(method="tsne")
    assert layout_record(umap, "cpu") == layout_record(LayoutSettings(perplexity=7.0), "cpu")
    assert layout_record(umap, "cpu") != layout_record(LayoutSettings(n_neighbors=9), "cpu")
    assert layout_record(tsne, "cpu") == layout_record(LayoutSettings(method="tsne", n_neighbors=9), "cpu")
    assert layout_record(tsne, "cpu") != layout_record(LayoutSettings(method="tsne", perplexity=7.0), "cpu")
    assert layout_record(umap, "cpu") != layout_record(umap, "cuda")
