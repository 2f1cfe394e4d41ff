"""The quality benchmark's held-against-the-examples metric (benchmarks/bench_quality.py), on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.bench_quality import embed, retrieval
from tests.test_optvis import toy_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _cells(count: int = 6, per_cell: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """`per_cell` patches for each of `count` cells: each cell a colour of its own, with noise."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (count, 3))
    patches = np.clip(colours[:, None, None, None] + rng.normal(0, 12, (count, per_cell, 16, 16, 3)), 0, 255)
    return patches.reshape(-1, 16, 16, 3).astype(np.uint8), np.repeat(np.arange(count), per_cell)


def _embedder() -> nn.Module:
    torch.manual_seed(0)
    return toy_classifier(nn.Conv2d(3, 8, 3))


def test_an_icon_that_copies_its_cells_patch_retrieves_its_own_cell():
    patches, patch_cells = _cells()
    model = _embedder()
    features = embed(model, "relu", patches)
    icons = patches[::3]  # icon i is a copy of cell i's first patch
    found = retrieval(embed(model, "relu", icons), np.arange(6), features, patch_cells)
    assert found["retrieval_top1"] == 1.0 and found["retrieval_top5"] == 1.0
    assert found["cosine_own"] > found["cosine_other"]


def test_icons_of_other_cells_are_not_retrieved_as_their_own():
    patches, patch_cells = _cells()
    model = _embedder()
    features = embed(model, "relu", patches)
    icons = np.roll(patches[::3], 1, axis=0)  # icon i copies cell i-1's patch
    found = retrieval(embed(model, "relu", icons), np.arange(6), features, patch_cells)
    assert found["retrieval_top1"] == 0.0


def test_top5_counts_an_own_patch_among_the_five_nearest():
    patches = np.eye(4, dtype=np.float32)  # unit features: patch j is axis j
    icon = np.array([[0.8, 0.6, 0, 0]], np.float32)  # nearest: patch 0 (cell 1), then patch 1 (cell 0)
    found = retrieval(icon, np.array([0]), patches, np.array([1, 0, 2, 3]))
    assert found["retrieval_top1"] == 0.0 and found["retrieval_top5"] == 1.0
    assert found["cosine_own"] == pytest.approx(0.6) and found["cosine_other"] == pytest.approx(0.8 / 3)
