"""Collection throughput: input pipeline alone vs full collection, batched vs one image per step.

The reference notebooks fed one image per step; we batch through a DataLoader. On a GPU the target
is collection at no less than 80 % of the input pipeline's rate. Peak memory is measured at two
dataset sizes to show it stays flat as N grows.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SAMPLE, in_subprocess


def input_pipeline(images: int, batch_size: int, workers: int) -> dict:
    from atlas.collect import load_batches
    from atlas.images import list_images
    from atlas.models import load_model

    model = load_model("efficientnet-lite0")
    records = list_images(SAMPLE)[:images]
    batches = [list(range(i, min(i + batch_size, images))) for i in range(0, images, batch_size)]
    start = time.perf_counter()
    for _ in load_batches(model, records, batches, workers):
        pass
    return {"images_per_s": images / (time.perf_counter() - start)}


def full_collection(images: int, batch_size: int, workers: int, device: str) -> dict:
    from atlas.collect import collect
    from atlas.images import list_images
    from atlas.models import load_model

    model = load_model("efficientnet-lite0", device=device)
    records = list_images(SAMPLE)[:images]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        collect(model, records, Path(tmp) / "s.h5", batch_size=batch_size, workers=workers, device=device)
        elapsed = time.perf_counter() - start
    return {"images_per_s": images / elapsed}


def run() -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workers = 2
    rows = []
    settings = {"model": "efficientnet-lite0", "layer": "_blocks.10", "positions": 1, "device": device}
    for images in (64, 256):
        got = in_subprocess("benchmarks.bench_collect", "input_pipeline", images=images, batch_size=32, workers=workers)
        rows.append({"what": "input pipeline", "images": images, "batch": 32, "workers": workers, **got})
    for images, batch in ((64, 1), (64, 32), (256, 32)):
        got = in_subprocess(
            "benchmarks.bench_collect",
            "full_collection",
            images=images,
            batch_size=batch,
            workers=workers,
            device=device,
        )
        rows.append(
            {"what": "full collection", "images": images, "batch": batch, "workers": workers, **settings, **got}
        )
    return rows
