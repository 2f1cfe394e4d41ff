"""Class-atlas sample selection at paper scale: 1M samples x 1000-class attributions (x 512 channels).

The store is bench_grid's synthetic one (6 GB, written to a temporary folder). Each case runs in a fresh
process, so its peak RSS shows that the filters stream the attributions instead of loading N x K (4 GB):
the winner and magnitude filters (paper: 3000 for a class atlas, 2000 per class for a comparison), then the
subset store with the whole layer's whitening (the store has none, so it is computed: a second full pass).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from atlas.store import STR
from benchmarks.bench_grid import N, write_store
from benchmarks.common import in_subprocess

CASES = [([2], 3000), ([147, 2], 2000)]  # great white shark; grey whale vs great white shark (torchvision order)


def add_sample_records(path: Path) -> None:
    """What collect writes besides activations and attributions: /images and each sample's image and position."""
    with h5py.File(path, "r+") as f:
        f.attrs.update(model="synthetic", input_size=224)
        paths = np.array([f"img{i:07d}.jpg" for i in range(N)], dtype=object)
        f.create_dataset("images/path", data=paths, dtype=STR)
        f.create_dataset("mixed4c/image_index", data=np.arange(N, dtype=np.int64), chunks=(4096,))
        f.create_dataset("mixed4c/position", data=np.ones((N, 2), np.int32), chunks=(4096, 2))


def class_case(path: str, classes: list[int], top: int) -> dict:
    from atlas.class_atlas import select_samples, write_subset_store

    started = time.perf_counter()
    with h5py.File(path) as store:
        rows = select_samples(store["mixed4c/attributions"], classes, top=top)
    selected = time.perf_counter()
    write_subset_store(path, Path(path).with_name("subset.h5"), rows)
    return {
        "select_s": round(selected - started, 2),
        "subset_store_s": round(time.perf_counter() - selected, 2),
        "rows": len(rows),
    }


def run() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "store.h5"
        write_store(path)
        add_sample_records(path)
        for classes, top in CASES:
            result = in_subprocess(
                "benchmarks.bench_class_atlas", "class_case", path=str(path), classes=classes, top=top
            )
            rows.append(
                {
                    "device": "cpu",
                    "samples": N,
                    "classes": 1000,
                    "channels": 512,
                    "filter": classes,
                    "top": top,
                    **result,
                }
            )
    return rows
