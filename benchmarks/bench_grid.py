"""Gridding (`atlas grid`): 1M samples x 512 channels with 1000-class attributions, into 20/40/80/160 grids.

The store is synthetic (paper scale: 1M samples of mixed4c, 512 channels; an ImageNet model's 1000 classes)
and written block by block to a temporary folder (6 GB), so it is read back from the page cache where
memory allows. The measurement runs in a fresh process: its peak RSS is the gridding's own, plus Python
and torch. Target: under 30 s on the CPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from benchmarks.common import in_subprocess

N = 1_000_000
CHANNELS = 512
CLASSES = 1000
SIZES = [20, 40, 80, 160]  # the paper's production zoom levels for mixed3a-4e
BLOCK = 65536


def write_store(path: Path, n: int = N, channels: int = CHANNELS, classes: int = CLASSES, seed: int = 0) -> None:
    """A store with activations, attributions and a clustered layout (some points exactly at 1.0), by blocks."""
    rng = np.random.default_rng(seed)
    centres = rng.random((50, 2))
    with h5py.File(path, "w") as f:
        group = f.create_group("mixed4c")
        activations = group.create_dataset("activations", (n, channels), np.float32, chunks=(4096, channels))
        attributions = group.create_dataset("attributions", (n, classes), np.float32, chunks=(4096, classes))
        layout = group.create_dataset("layout", (n, 2), np.float32)
        for start in range(0, n, BLOCK):
            rows = min(BLOCK, n - start)
            activations[start : start + rows] = np.maximum(rng.standard_normal((rows, channels), np.float32), 0)
            attributions[start : start + rows] = rng.standard_normal((rows, classes), np.float32)
            points = centres[rng.integers(0, len(centres), rows)] + rng.normal(0, 0.08, (rows, 2))
            layout[start : start + rows] = np.clip(points, 0.0, 1.0)


def grid_case(path: str, sizes: list[int]) -> dict:
    from atlas.stages.grid import grid_store

    started = time.perf_counter()
    counts = grid_store(path, sizes=sizes)
    seconds = time.perf_counter() - started
    filled = {size: int((count >= 6).sum()) for size, count in counts.items()}
    return {"seconds": round(seconds, 2), "cells_filled": "/".join(str(filled[size]) for size in sizes)}


def run() -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "store.h5"
        started = time.perf_counter()
        write_store(path)
        written = time.perf_counter() - started
        result = in_subprocess("benchmarks.bench_grid", "grid_case", path=str(path), sizes=SIZES)
    return [
        {
            "case": "grid_store",
            "device": "cpu",
            "n": N,
            "channels": CHANNELS,
            "classes": CLASSES,
            "sizes": "/".join(map(str, SIZES)),
            "seconds": result["seconds"],
            "peak_rss_mib": result["peak_rss_mib"],
            "cells_filled": result["cells_filled"],
            "store_write_s": round(written, 1),
        }
    ]
