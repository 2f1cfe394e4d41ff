"""Composition time and memory: atlas PNGs, the Deep Zoom pyramid, labels and example patches.

A synthetic rendered store (paper-sized 80 px icons, 1000 classes, a Gaussian blob layout) with the
real sample photos as its images; grid sizes grow as in the paper's zoom levels (20, 40, 80).
The atlas of the finest grid is held in memory: (G * 80)^2 * 3 bytes, 123 MB at G = 80.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import SAMPLE, in_subprocess


def _store(folder: Path, sizes: list[int], n: int, icon_px: int) -> Path:
    import h5py
    import numpy as np
    from PIL import Image

    from atlas.store import STR

    rng = np.random.default_rng(0)
    photos = sorted(str(p) for p in SAMPLE.glob("*.JPEG"))
    thumbs = np.stack([np.asarray(Image.open(p).convert("RGB").resize((icon_px, icon_px))) for p in photos[:64]])
    layout = np.clip(rng.normal(0.5, 0.18, size=(n, 2)), 0, 0.999)
    activations = rng.gamma(2.0, 1.0, (n, 64)).astype(np.float32)
    path = folder / "store.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(model="synthetic", input_size=224)
        f.create_dataset("images/path", data=np.array(photos, dtype=object), dtype=STR)
        layer = f.create_group("mixed4c")
        layer.attrs.update(channels=64, height=14, width=14)
        layer["activations"] = activations
        layer["image_index"] = rng.integers(0, len(photos), n)
        layer["position"] = rng.integers(1, 13, (n, 2)).astype(np.int32)
        for size in sizes:
            y, x = (layout * size).astype(int).T
            cell = y * size + x
            count = np.bincount(cell, minlength=size * size)
            mean = np.stack([np.bincount(cell, a, size * size) for a in activations.T], 1)
            grid = layer.create_group(f"grid/{size}")
            grid.attrs["min_count"] = 5
            grid["cell"] = cell.astype(np.int32)
            grid["count"] = count.reshape(size, size)
            grid["mean"] = (mean / np.maximum(count, 1)[:, None]).reshape(size, size, -1).astype(np.float32)
            grid["attribution"] = rng.normal(0, 1, (size, size, 1000)).astype(np.float32)
            grid["icons"] = thumbs[rng.integers(0, len(thumbs), size * size)].reshape(size, size, icon_px, icon_px, 3)
            grid["icon_cosine"] = rng.uniform(0, 1, (size, size)).astype(np.float32)
            grid["icon_objective"] = rng.uniform(0, 1, (size, size)).astype(np.float32)
    return path


def compose_case(sizes: list[int], n: int, icon_px: int, examples: int) -> dict:
    from atlas.stages.compose import ComposeSettings, compose_run

    with tempfile.TemporaryDirectory() as tmp:
        store = _store(Path(tmp), sizes, n, icon_px)
        start = time.perf_counter()
        compose_run(store, Path(tmp) / "run", settings=ComposeSettings(examples=examples))
        seconds = time.perf_counter() - start
        tiles = sum(1 for _ in (Path(tmp) / "run/layer-mixed4c").rglob("tiles_files/*/*.jpg"))
        patches = sum(1 for _ in (Path(tmp) / "run/patches").rglob("*.jpg"))
    return {"seconds": round(seconds, 2), "tiles": tiles, "patches": patches}


def run() -> list[dict]:
    if not SAMPLE.is_dir():
        return []
    rows = []
    for sizes, examples in (([20, 40], 0), ([20, 40], 4), ([20, 40, 80], 4)):
        settings = {"grids": "+".join(map(str, sizes)), "icon_px": 80, "samples": 50_000, "examples": examples}
        result = in_subprocess(
            "benchmarks.bench_compose", "compose_case", sizes=sizes, n=50_000, icon_px=80, examples=examples
        )
        rows.append({**settings, "atlas_px": max(sizes) * 80, **result, "device": "cpu"})
    return rows
