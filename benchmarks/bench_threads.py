"""torch's CPU threads: its own default (every core) against ours (`atlas.runtime.default_threads`: the cores of
this process's affinity less the machine's load), rendering icons on a quiet machine and beside one busy process.

Each measurement runs in a fresh process (`common.in_subprocess`), so the thread count it starts with is its own.
The busy process starts `settle_s` before the measurements beside it, so that the 1-minute load average that
`default_threads` reads has seen it.
"""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.common import in_subprocess

BUSY = "while True: pass"  # one process that keeps one core busy, as a browser tab or another job would
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # they would set torch's default: it is measured unset


def render_rate(
    threads: str,
    model: str = "efficientnet-lite0",
    layer: str = "_blocks.10",
    icons: int = 4,
    steps: int = 64,
    repeats: int = 5,
) -> dict:
    """Icon-steps per second of `icons` channel visualisations (64 px), with torch's threads left at its default
    (threads="torch") or set by atlas (threads="atlas"): the median of `repeats` timed renders, and their range
    (one render of a second or two varies by a quarter from one to the next)."""
    import statistics

    import torch

    from atlas.models.zoo import load_model
    from atlas.optvis import objectives, visualize
    from atlas.runtime import set_threads

    count = torch.get_num_threads() if threads == "torch" else set_threads()
    net = load_model(model, weights="random")
    objective = objectives.channel(layer, list(range(icons)))
    visualize(net, objective, batch=icons, size=64, steps=1)  # warm-up: allocations, first-call costs
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        visualize(net, objective, batch=icons, size=64, steps=steps)
        rates.append(icons * steps / (time.perf_counter() - started))
    return {
        "threads": count,
        "icon_steps_per_s": statistics.median(rates),
        "slowest": min(rates),
        "fastest": max(rates),
    }


def compare(settle_s: float = 60.0, **case: object) -> list[dict]:
    """Rows of torch's default and ours, quiet and then beside one busy process."""
    rows = []
    for load in ("quiet", "one busy process"):
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load != "quiet" else None
        try:
            time.sleep(settle_s if busy else 0)
            for threads in ("torch", "atlas"):
                measured = in_subprocess(
                    "benchmarks.bench_threads", "render_rate", drop_env=THREAD_ENV, threads=threads, **case
                )
                rows.append({"machine": load, "threads from": threads, **measured})
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    return rows


def run() -> list[dict]:
    return compare()
