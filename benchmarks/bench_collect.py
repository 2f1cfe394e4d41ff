"""Collection throughput beside the model's own forward rate, and the run-time policy against the old code path.

For EfficientNet-Lite0 (real weights, `_blocks.10`) and InceptionV1 (random weights, `mixed4c`), at
batch 32, K = 1 position (the paper's), in one run:

- forward only, in NCHW fp32 and in each policy's memory format and precision;
- `collect_batch` alone (decoded batches in memory), policy vs baseline;
- `atlas.stages.collect.collect` end to end on the sample photos (decoding, shards, merge), policy vs baseline,
  with the largest attribution difference between the two stores, relative to the largest attribution
  (the issue's tolerance: 1e-3).

The baseline is the code path before issue 15: a no-grad forward for the activations, then the
whole network again inside a vmap'd JVP whose tangent is added at the layer, NCHW fp32. Targets
(2-core CPU): end to end >= 2x the baseline and >= 0.7x the NCHW fp32 forward rate. Each
measurement runs in a fresh process; every rate is the best of `REPEATS` timed runs after a warm-up.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from benchmarks.common import SAMPLE, in_subprocess

BATCH = 32
IMAGES = 128  # end to end: four batches, so the loader processes' start-up is not half of it
REPEATS = 3
MODELS = {"efficientnet-lite0": None, "inceptionv1": "random"}  # name: weights
LAYERS = {"efficientnet-lite0": "_blocks.10", "inceptionv1": "mixed4c"}  # their default layers, as stored
POLICIES = {  # (memory format, precision)
    "NCHW fp32": ("contiguous", "fp32"),
    "policy auto": ("auto", "auto"),
    "channels_last bf16": ("channels_last", "bf16"),
}


def _model(name: str):
    from atlas.models.zoo import load_model

    torch.manual_seed(0)  # random weights: the same in every process, so the stores compare
    return load_model(name, weights=MODELS[name])


def _best_rate(run, images: int) -> float:
    run()  # warm-up: kernels, allocator, one-time dispatch
    best = min(_timed(run) for _ in range(REPEATS))
    return images / best


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def forward_only(model: str, memory_format: str, precision: str) -> dict:
    from atlas.runtime import resolve

    runtime = resolve("collect", "cpu", precision, memory_format)
    net = runtime.prepare(_model(model))
    images = runtime.inputs(torch.rand(BATCH, 3, net.input_size, net.input_size))

    def run() -> None:
        with torch.no_grad(), runtime.autocast():
            net(images)

    return {**runtime.settings(), "images_per_s": _best_rate(run, BATCH)}


def baseline_collect_batch(model, images, rows, layers, positions, seed) -> dict:
    """`atlas.stages.collect.collect_batch` before issue 15: a forward for the activations, then the JVP from the
    input."""
    from torch.func import jvp, vmap

    from atlas.models.classifier import capture
    from atlas.stages.collect import _RelaxedMaxPool, sample_positions

    with torch.no_grad(), capture(model, list(layers)) as acts:
        model(images)
        acts = dict(acts)
    out = {}
    for layer, (_channels, height, width) in layers.items():
        where = torch.from_numpy(np.stack([sample_positions(r, layer, height, width, positions, seed) for r in rows]))
        act, b = acts[layer], torch.arange(len(rows))
        module = model.layer_module(layer)

        def logits_with(delta, module=module):
            hook = module.register_forward_hook(lambda _m, _i, out: out + delta)
            try:
                return model(images)
            finally:
                hook.remove()

        tangents = torch.zeros(where.shape[1], *act.shape)
        for k in range(where.shape[1]):
            tangents[k, b, :, where[:, k, 0], where[:, k, 1]] = act[b, :, where[:, k, 0], where[:, k, 1]]
        with torch.no_grad():
            pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
            hooks = [pool.register_forward_hook(_RelaxedMaxPool(pool)) for pool in pools]
            zero = torch.zeros_like(act)
            attr = vmap(lambda t, f=logits_with, z=zero: jvp(f, (z,), (t,))[1])(tangents)
            for hook in hooks:
                hook.remove()
        vectors = act.permute(0, 2, 3, 1)[b[:, None], where[..., 0], where[..., 1]]
        out[layer] = {
            "activations": vectors.reshape(-1, act.shape[1]).numpy(),
            "image_index": np.repeat(np.asarray(rows, dtype=np.int64), where.shape[1]),
            "position": where.reshape(-1, 2).numpy().astype(np.int32),
            "attributions": attr.transpose(0, 1).reshape(len(rows) * where.shape[1], -1).numpy(),
        }
    return out


def batch_only(model: str, code: str, memory_format: str, precision: str) -> dict:
    from atlas.runtime import resolve
    from atlas.stages.collect import collect_batch

    runtime = resolve("collect", "cpu", precision, memory_format)
    net = runtime.prepare(_model(model))
    layer = net.resolve_layer(net.default_layer)
    shapes = {name: tuple(shape) for name, *shape in net.layer_shapes() if name == layer}
    images = runtime.inputs(torch.rand(BATCH, 3, net.input_size, net.input_size))
    step = baseline_collect_batch if code == "baseline" else collect_batch

    def run() -> None:
        with runtime.autocast():
            step(net, images, list(range(BATCH)), shapes, 1, 0)

    return {**runtime.settings(), "images_per_s": _best_rate(run, BATCH)}


def end_to_end(model: str, code: str, memory_format: str, precision: str, out: str, workers: int) -> dict:
    import atlas.stages.collect
    from atlas.images import list_images

    if code == "baseline":
        atlas.stages.collect.collect_batch = baseline_collect_batch  # write_batches looks it up at call time
    net = _model(model)
    photos = list_images(SAMPLE)
    settings = dict(batch_size=BATCH, workers=workers, precision=precision, memory_format=memory_format)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up on one batch of other photos
        atlas.stages.collect.collect(net, photos[-BATCH:], Path(tmp) / "w.h5", **settings)
    start = time.perf_counter()
    atlas.stages.collect.collect(net, photos[:IMAGES], out, **settings)
    elapsed = time.perf_counter() - start
    with h5py.File(out) as f:
        settings = {key: str(f.attrs[key]) for key in ("memory_format", "precision")}
    return {**settings, "images_per_s": IMAGES / elapsed}


def _relative_difference(a: Path, b: Path, layer: str) -> float:
    with h5py.File(a) as fa, h5py.File(b) as fb:
        x, y = fa[f"{layer}/attributions"][()], fb[f"{layer}/attributions"][()]
    return float(np.abs(x - y).max() / np.abs(y).max())


def run() -> list[dict]:
    rows = []
    workers = 2
    if SAMPLE.is_dir():
        got = in_subprocess("benchmarks.bench_collect", "input_pipeline", images=128, workers=workers)
        rows.append({"what": "input pipeline (decode only)", "model": "efficientnet-lite0", "workers": workers, **got})
    for model in MODELS:
        base = f"{model}{' (random)' if MODELS[model] else ''}"
        forward = {}
        for label, (memory_format, precision) in POLICIES.items():
            got = in_subprocess("benchmarks.bench_collect", "forward_only", model=model, memory_format=memory_format,
                                precision=precision)  # fmt: skip
            forward[label] = got["images_per_s"]
            rows.append({"what": f"forward only, {label}", "model": base, **got})
        for code, label in (("baseline", "NCHW fp32"), ("one pass", "NCHW fp32"), ("one pass", "policy auto")):
            memory_format, precision = POLICIES[label]
            got = in_subprocess("benchmarks.bench_collect", "batch_only", model=model, code=code,
                                memory_format=memory_format, precision=precision)  # fmt: skip
            rows.append(
                {"what": f"collect_batch, {code}, {label}", "model": base, **got,
                 "x_forward_same_format": got["images_per_s"] / forward[label],
                 "x_forward_nchw_fp32": got["images_per_s"] / forward["NCHW fp32"]}
            )  # fmt: skip
        if not SAMPLE.is_dir():
            rows.append({"what": "collect end to end", "model": base, "note": f"skipped: no {SAMPLE}"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            stores = {}
            for code, label in (("baseline", "NCHW fp32"), ("one pass", "policy auto")):
                memory_format, precision = POLICIES[label]
                stores[code] = Path(tmp) / f"{code}.h5"
                got = in_subprocess("benchmarks.bench_collect", "end_to_end", model=model, code=code,
                                    memory_format=memory_format, precision=precision, out=str(stores[code]),
                                    workers=workers)  # fmt: skip
                rows.append(
                    {"what": f"collect end to end ({IMAGES} photos), {code}, {label}", "model": base, **got,
                     "x_forward_same_format": got["images_per_s"] / forward[label],
                     "x_forward_nchw_fp32": got["images_per_s"] / forward["NCHW fp32"]}
                )  # fmt: skip
            rows[-1]["x_baseline"] = rows[-1]["images_per_s"] / rows[-2]["images_per_s"]
            rows[-1]["attr_rel_diff"] = _relative_difference(stores["one pass"], stores["baseline"], LAYERS[model])
    return rows


def input_pipeline(images: int, workers: int) -> dict:
    from atlas.images import list_images, load_batches

    model = _model("efficientnet-lite0")
    records = list_images(SAMPLE)[:images]
    batches = [list(range(i, min(i + BATCH, images))) for i in range(0, images, BATCH)]
    start = time.perf_counter()
    for _ in load_batches(records, model.resize_size, model.input_size, batches, workers):
        pass
    return {"images_per_s": images / (time.perf_counter() - start)}
