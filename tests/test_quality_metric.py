"""The quality benchmark's held-against-the-examples metric (benchmarks/bench_quality.py), on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.bench_quality import class_agreement, embed, label_classes, photo_likeness, retrieval
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


def test_photo_likeness_is_one_for_a_copied_photo_and_near_zero_for_noise():
    patches, _ = _cells(count=4, per_cell=1)
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, patches.shape, dtype=np.uint8)
    np.testing.assert_allclose(photo_likeness(patches, patches), 1.0)
    brighter = np.clip(patches.astype(int) * 0.5 + 60, 0, 255).astype(np.uint8)  # the same picture, other levels
    assert (photo_likeness(brighter, patches) > 0.99).all()
    assert (np.abs(photo_likeness(noise, patches)) < 0.3).all()
    assert (photo_likeness(255 - patches, patches) < -0.99).all()  # a negative is no copy either


def test_class_agreement_counts_the_cells_whose_classes_meet_and_labels_rank_by_frequency():
    seen = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]])
    assert class_agreement(seen, [np.array([5, 99]), np.array([0]), np.array([15, 11])]) == pytest.approx(2 / 3)
    labels = np.array([3, 3, 7, -1, 7, 7, 2, 9, 9])
    cell = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1])
    found = label_classes(labels, cell, np.array([1, 0]), top=2)
    assert [f.tolist() for f in found] == [[9, 2], [7, 3]]  # unlabelled (-1) photos count for nothing
