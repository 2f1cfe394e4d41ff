"""Microscope throughput: the dataset-examples pass and the per-unit feature visualisations.

The pass keeps a running top-k per unit, so its peak memory should not grow with the number of
images (measured at two dataset sizes, each in a fresh process). Visualisation rows report
unit-steps per second at a few batch sizes and, from it, the time of a 32-unit page set at 192 steps
(the CPU demo in the README).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import SAMPLE, in_subprocess

MODEL, LAYER = "efficientnet-lite0", "_blocks.10"
SIZE = 128  # lucid's default image size, the microscope's default
CPU_STEPS, GPU_STEPS = 6, 64  # enough to amortise set-up; minutes in all on a 2-core CPU
CPU_THREADS = 1  # on a shared 2-core machine a second thread waits more than it works (bench_render.py)


def dataset_pass(images: int, device: str) -> dict:
    from atlas.images import list_images
    from atlas.microscope import top_activating
    from atlas.models.zoo import load_model

    model = load_model(MODEL, device=device)
    records = list_images(SAMPLE)[:images]
    start = time.perf_counter()
    top_activating(model, [LAYER], records, top_k=8, batch_size=32, workers=2, progress=False)
    return {"images_per_s": round(images / (time.perf_counter() - start), 1)}


def unit_visualisations(batch: int, steps: int, device: str) -> dict:
    from atlas.models.zoo import load_model
    from atlas.optvis import optimize_images
    from atlas.optvis.objectives import channel
    from atlas.optvis.transform import image_key, preset

    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    model = load_model(MODEL, device=device)
    units = list(range(batch))
    options = dict(size=SIZE, transforms=preset("standard", SIZE), mixed_precision=device == "cuda")
    optimize_images(model, channel(LAYER, units), units, steps=1, **options)  # warm-up: lazy imports, allocator
    start = time.perf_counter()
    optimize_images(model, channel(LAYER, units), [image_key(0, u) for u in units], steps=steps, **options)
    rate = batch * steps / (time.perf_counter() - start)
    return {"unit_steps_per_s": round(rate, 2), "32_units_192_steps_min": round(32 * 192 / rate / 60, 1)}


def run() -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for images in (64, 256):
        got = in_subprocess("benchmarks.bench_microscope", "dataset_pass", images=images, device=device)
        rows.append({"what": "dataset examples pass", "model": MODEL, "layer": LAYER, "images": images, **got})
    steps = GPU_STEPS if device == "cuda" else CPU_STEPS
    for batch in (8, 16) if device == "cpu" else (16, 64, 256):
        got = in_subprocess(
            "benchmarks.bench_microscope", "unit_visualisations", batch=batch, steps=steps, device=device
        )
        rows.append(
            {"what": "unit visualisations", "model": MODEL, "layer": LAYER, "size": SIZE, "batch": batch, **got}
        )
    for row in rows:
        row["device"] = device
    return rows
