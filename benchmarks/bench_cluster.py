"""Collection on dask: throughput with 1 and 2 CPU workers on the same images, and the scaling ratio.

Every worker, and the single-process baseline, gets one torch thread, so the ratio measures scaling
by processes alone. Rates are of warm workers (each has run a first batch and holds its model);
`startup_s` is what starting the cluster and that warm-up took. `load_before` is the machine's
1-minute load average when the row started: other jobs on a shared machine lower the rates, and
with no free core a second worker cannot help. `cpu_s_per_image` (CPU time of the computing
processes) does not depend on that load: equal values for 1 and 2 workers mean no added work, so
near-linear scaling wherever each worker has a core of its own.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import SAMPLE, in_subprocess

MODEL = "efficientnet-lite0"
IMAGES = 64
BATCH = 8


def single_process(images: int, batch_size: int) -> dict:
    import torch

    from atlas.images import list_images
    from atlas.models.zoo import load_model
    from atlas.stages.collect import collect

    torch.set_num_threads(1)
    model = load_model(MODEL)
    records = list_images(SAMPLE)[:images]
    with tempfile.TemporaryDirectory() as tmp:
        collect(model, records[:batch_size], Path(tmp) / "warm.h5", batch_size=batch_size, workers=0)
        start, cpu = time.perf_counter(), time.process_time()
        collect(model, records, Path(tmp) / "s.h5", batch_size=batch_size, workers=0)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"images_per_s": images / elapsed, "cpu_s_per_image": cpu / images}


def on_cluster(workers: int, images: int, batch_size: int) -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"  # overrides connect's share of the cores: one torch thread per worker

    from atlas.cluster import collect_on_cluster, connect
    from atlas.images import list_images

    records = list_images(SAMPLE)[:images]
    start = time.perf_counter()
    with connect("local", workers=workers) as client, tempfile.TemporaryDirectory() as tmp:
        # one batch per worker first, so that every worker has imported torch and loaded the model
        warm = records[: batch_size * workers]
        collect_on_cluster(client, MODEL, warm, Path(tmp) / "warm.h5", batch_size=batch_size, batches_per_task=1)
        startup = time.perf_counter() - start
        start, cpu = time.perf_counter(), sum(client.run(time.process_time).values())
        collect_on_cluster(client, MODEL, records, Path(tmp) / "s.h5", batch_size=batch_size)
        elapsed, cpu = time.perf_counter() - start, sum(client.run(time.process_time).values()) - cpu
    return {"images_per_s": images / elapsed, "cpu_s_per_image": cpu / images, "startup_s": startup}


def run() -> list[dict]:
    settings = {"model": MODEL, "images": IMAGES, "batch": BATCH, "positions": 1, "device": "cpu", "threads": 1}
    rows = []
    load = os.getloadavg()[0]
    got = in_subprocess("benchmarks.bench_cluster", "single_process", images=IMAGES, batch_size=BATCH)
    rows.append({"what": "single process", "workers": 0, **settings, **got, "load_before": load})
    for workers in (1, 2):
        load = os.getloadavg()[0]
        got = in_subprocess("benchmarks.bench_cluster", "on_cluster", workers=workers, images=IMAGES, batch_size=BATCH)
        rows.append({"what": "LocalCluster", "workers": workers, **settings, **got, "load_before": load})
    rows[-1]["scaling_vs_1_worker"] = rows[-1]["images_per_s"] / rows[-2]["images_per_s"]
    return rows
