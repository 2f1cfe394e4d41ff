"""Collecting k layers in one run: one shared pass against one pass per layer, k = 1, 2 and 4 (issue 24).

`collect_batch` on one batch of 32 random inputs in memory, at the run-time policy `auto`:
- shared: every layer's tangents in one forward pass (what `collect` does);
- per layer: `collect_batch` once per layer, i.e. the network once per layer (the alternative).
And `collect` end to end on the sample photos (decoding once for all layers), shared, k = 1, 2 and 4.

`x_one_layer` is the time of k layers over the time of one layer (k would mean no sharing at all). Layers:
EfficientNet-Lite0 (real weights) _blocks.10; + _blocks.6; + _blocks.4 and _blocks.13 (28, 14, 14 and 7 px
maps), and InceptionV1 (random weights) mixed4c; + mixed4a; + mixed4b and mixed5b (the article's layers).
Positions: 1 (the paper's) and 16 (the demo takes 64 of a 14x14 layer; a 7x7 layer has 25). Each measurement
runs in a fresh process; every time is the best of `REPEATS` after a warm-up.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import SAMPLE, in_subprocess

BATCH = 32
IMAGES = 64  # end to end: two batches
REPEATS = 3
LAYERS = {
    "efficientnet-lite0": ["_blocks.10", "_blocks.6", "_blocks.4", "_blocks.13"],
    "inceptionv1": ["mixed4c", "mixed4a", "mixed4b", "mixed5b"],
}
WEIGHTS = {"efficientnet-lite0": None, "inceptionv1": "random"}
POSITIONS = (1, 16)


def _model(name: str):
    from atlas.models.zoo import load_model
    from atlas.runtime import resolve

    torch.manual_seed(0)
    runtime = resolve("collect", "cpu")
    return runtime, runtime.prepare(load_model(name, weights=WEIGHTS[name]))


def batch(model: str, layers: int, positions: int, shared: bool) -> dict:
    from atlas.stages.collect import collect_batch

    runtime, net = _model(model)
    shapes = {name: tuple(shape) for name, *shape in net.layer_shapes()}
    wanted = {name: shapes[name] for name in LAYERS[model][:layers]}
    images = runtime.inputs(torch.rand(BATCH, 3, net.input_size, net.input_size))
    rows = list(range(BATCH))

    def run() -> None:
        with runtime.autocast():
            if shared:
                collect_batch(net, images, rows, wanted, positions, 0)
            else:
                for name, shape in wanted.items():
                    collect_batch(net, images, rows, {name: shape}, positions, 0)

    run()  # warm-up
    seconds = min(_timed(run) for _ in range(REPEATS))
    return {"seconds": seconds, "images_per_s": BATCH / seconds}


def end_to_end(model: str, layers: int, positions: int) -> dict:
    from atlas.images import list_images
    from atlas.stages.collect import collect

    _runtime, net = _model(model)
    photos = list_images(SAMPLE)
    settings = dict(layers=LAYERS[model][:layers], positions=positions, batch_size=BATCH, workers=2)
    with tempfile.TemporaryDirectory() as tmp:
        collect(net, photos[-BATCH:], Path(tmp) / "warm.h5", **settings)  # warm-up on other photos
        start = time.perf_counter()
        collect(net, photos[:IMAGES], Path(tmp) / "store.h5", **settings)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": IMAGES / seconds}


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def run() -> list[dict]:
    rows = []
    for model, names in LAYERS.items():
        label = f"{model}{' (random)' if WEIGHTS[model] else ''}"
        for positions in POSITIONS:
            one = None
            for layers in (1, 2, 4):
                for shared in (True, False) if layers > 1 else (True,):
                    got = in_subprocess("benchmarks.bench_layers", "batch", model=model, layers=layers,
                                        positions=positions, shared=shared)  # fmt: skip
                    one = got["seconds"] if layers == 1 else one
                    how = "shared pass" if shared else "one pass per layer"
                    rows.append({"what": f"collect_batch ({BATCH} images), {how}", "model": label, "k": layers,
                                 "layers": "+".join(names[:layers]), "positions": positions, **got,
                                 "x_one_layer": got["seconds"] / one})  # fmt: skip
        if not SAMPLE.is_dir():
            rows.append({"what": "collect end to end", "model": label, "note": f"skipped: no {SAMPLE}"})
            continue
        one = None
        for layers in (1, 2, 4):
            got = in_subprocess("benchmarks.bench_layers", "end_to_end", model=model, layers=layers, positions=1)
            one = got["seconds"] if layers == 1 else one
            rows.append({"what": f"collect end to end ({IMAGES} photos), shared pass", "model": label, "k": layers,
                         "layers": "+".join(names[:layers]), "positions": 1, **got,
                         "x_one_layer": got["seconds"] / one})  # fmt: skip
    return rows
