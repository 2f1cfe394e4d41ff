"""Synthetic stores with the collect stage's schema, for tests and benchmarks of later stages."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from atlas.store import STR


def write_synthetic_store(
    path: str | Path,
    n: int = 2000,
    channels: int = 16,
    classes: int = 10,
    layer: str = "mixed4c",
    clusters: int = 5,
    seed: int = 0,
) -> Path:
    """A store of `n` samples drawn from `clusters` non-negative Gaussian blobs (post-ReLU-like).

    Each blob's attributions favour one class, so class filters and cell labels have a right answer.
    """
    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 1.0, size=(clusters, channels)).astype(np.float32)
    which = rng.integers(0, clusters, size=n)
    activations = np.maximum(centres[which] + rng.normal(0, 0.3, size=(n, channels)), 0).astype(np.float32)
    attributions = rng.normal(0, 0.1, size=(n, classes)).astype(np.float32)
    attributions[np.arange(n), which % classes] += 1.0
    with h5py.File(path, "w") as f:
        f.attrs.update(
            model="synthetic",
            weights="none",
            input_size=224,
            seed=seed,
            dataset="synthetic",
            code_version="test",
            positions=1,
        )
        images = f.create_group("images")
        images.create_dataset("path", data=np.array([f"img{i:06d}.jpg" for i in range(n)], dtype=object), dtype=STR)
        images.create_dataset("label", data=(which % classes).astype(np.int64))
        images.create_dataset("skipped", shape=(0,), dtype=STR)
        g = f.create_group(layer)
        g.attrs.update(channels=channels, height=14, width=14)
        g.create_dataset("activations", data=activations, chunks=(min(n, 4096), channels))
        g.create_dataset("image_index", data=np.arange(n, dtype=np.int64))
        g.create_dataset("position", data=rng.integers(1, 13, size=(n, 2)).astype(np.int32))
        g.create_dataset("attributions", data=attributions, chunks=(min(n, 4096), classes))
    return Path(path)
