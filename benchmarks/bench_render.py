"""Icon rendering throughput: this renderer at batch 1, 16 and 64 against torch-lucent's `render_vis`, one at a time.

Same model (InceptionV1 mixed4c; random weights: the arithmetic is the same as with trained ones), same
objective (the atlas objective, dot * max(0.1, cos)^4 at the centre neuron), same icon size, steps
and transform values (lucid's standard stack: lucent's own `standard_transforms` for lucent, the
`standard` preset here), FFT + decorrelated parameterisation, Adam 0.05. Lucent gets
`fixed_image_size` = icon size + 12, the size its standard stack hands our network, so it does not
upsample to 224. One extra row uses the paper's atlas stack. Rows report icons per second (one
attempt each) and, from it, the time a full 20/40/80 atlas (8,400 cells x 4 attempts x 1024 steps)
would take at that rate.

The policy rows (issue 15) render 16 icons at 80 px with the atlas stack, for InceptionV1 (random
weights) and EfficientNet-Lite0 (real weights): the pre-issue-15 path (NCHW fp32) against
`atlas.runtime`'s `auto` policy, in icon-steps/s, beside the forward-only rate of the same model in
the same format and precision (a batch of 16 at the icon size), and the
ratio of the mean final objectives on the same cells and seeds (target: within 2 %; speed: >= 1.4x).

torch-lucent is not a project dependency. `make bench` installs it beside this file (the folder ignores itself):

    mkdir -p benchmarks/.lucent && echo '*' > benchmarks/.lucent/.gitignore
    .venv/bin/python -m pip --isolated install --no-deps --target benchmarks/.lucent torch-lucent==0.1.8 \
        kornia==0.4.1 decorator
    .venv/bin/python -m pip --isolated install --target benchmarks/.lucent ipython

Without it the lucent row says why it was skipped.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from atlas.models.classifier import Classifier
from atlas.models.zoo import load_model
from atlas.optvis.objectives import atlas_direction
from atlas.runtime import Runtime, resolve
from atlas.stages.render import RenderSettings, render_icons

LUCENT_DIR = Path(__file__).resolve().parent / ".lucent"
LAYER = "mixed4c"
SIZE = 80  # paper icon size
COSSIM_POW = 4
FULL_ATLAS_ICON_STEPS = (20**2 + 40**2 + 80**2) * 4 * 1024  # every cell non-empty: an upper bound
CPU_STEPS = 10  # enough to amortise set-up, small enough for minutes on a 2-core CPU
GPU_STEPS = 128
CPU_THREADS = 1  # on a shared 2-core machine a second thread waits more than it works (8x slower here)


def _row(renderer: str, batch: int, icons: int, steps: int, seconds: float, device: str, transforms: str) -> dict:
    rate = icons / seconds
    return {
        "renderer": renderer,
        "batch": batch,
        "icons": icons,
        "steps": steps,
        "size": SIZE,
        "transforms": transforms,
        "device": device,
        "icons_per_s": rate,
        "full_atlas_h": FULL_ATLAS_ICON_STEPS / (rate * steps) / 3600,
        "load_avg": round(os.getloadavg()[0], 1),
    }


def _ours(model: Classifier, directions: np.ndarray, batch: int, steps: int, transforms: str) -> float:
    start = time.perf_counter()
    render_icons(
        model,
        LAYER,
        directions,
        RenderSettings(size=SIZE, steps=steps, attempts=1, cossim_pow=COSSIM_POW, transforms=transforms),
        batch_size=batch,
        progress=False,
    )
    _sync()
    return time.perf_counter() - start


def _lucent(model: Classifier, directions: np.ndarray, steps: int) -> float:
    """Seconds for lucent to render each direction alone; raises ImportError when lucent is not installed."""
    if str(LUCENT_DIR) not in sys.path:
        sys.path.append(str(LUCENT_DIR))  # appended: the project's own packages win over copies in there
    from lucent.optvis import objectives, param, render, transform

    hook_name = "net_" + model.resolve_layer(LAYER).replace(".", "_")  # lucent: module paths joined with "_"
    start = time.perf_counter()
    for vec in directions:
        ours = atlas_direction(LAYER, torch.as_tensor(vec), cossim_pow=COSSIM_POW)
        render.render_vis(
            model,
            objectives.Objective(lambda hook, ours=ours: -ours({LAYER: hook(hook_name)}).sum()),
            param_f=lambda: param.image(SIZE),
            transforms=transform.standard_transforms,
            thresholds=(steps,),
            preprocess=False,  # the Classifier normalises its input itself
            progress=False,
            show_image=False,
            fixed_image_size=SIZE + 12,
        )
        for module in model.modules():  # render_vis leaves a hook on every module; do not let them pile up
            module._forward_hooks.clear()
    _sync()
    return time.perf_counter() - start


POLICY_MODELS = {"inceptionv1": ("random", "mixed4c"), "efficientnet-lite0": (None, "_blocks.10")}
POLICY_ICONS = 16
POLICY_REPEATS = 2  # best of, after a warm-up


POLICIES = {"baseline NCHW fp32": ("contiguous", "fp32"), "auto": ("auto", "auto")}  # (memory format, precision)


def _policy_render(model: Classifier, layer: str, directions: np.ndarray, steps: int, runtime: Runtime) -> np.ndarray:
    return render_icons(
        model, layer, directions, RenderSettings(size=SIZE, steps=steps, attempts=1, transforms="atlas"),
        batch_size=len(directions), mixed_precision=runtime.precision == "bf16", memory_format=runtime.memory_format,
        progress=False,
    )[1]  # fmt: skip


def _policy_rows(device: str, steps: int, label: str) -> list[dict]:
    rows = []
    for name, (weights, layer) in POLICY_MODELS.items():
        model = load_model(name, weights=weights, device=device)
        channels = {n: c for n, c, *_ in model.layer_shapes()}[model.resolve_layer(layer)]
        directions = np.random.default_rng(0).gamma(2.0, 1.0, size=(POLICY_ICONS, channels)).astype(np.float32)
        objectives = {}
        for policy, (memory_format, precision) in POLICIES.items():
            runtime = resolve("render", device, precision, memory_format)
            _policy_render(model, layer, directions, 2, runtime)  # warm-up
            seconds = []
            for _ in range(POLICY_REPEATS):
                start = time.perf_counter()
                objectives[policy] = _policy_render(model, layer, directions, steps, runtime)
                _sync()
                seconds.append(time.perf_counter() - start)
            images = runtime.inputs(torch.rand(POLICY_ICONS, 3, SIZE, SIZE, device=device))
            with torch.no_grad(), runtime.autocast():
                model(images)  # warm-up
                start = time.perf_counter()
                model(images)
                _sync()
                forward = POLICY_ICONS / (time.perf_counter() - start)
            rows.append(
                {"renderer": f"atlas.stages.render, {policy}", "model": name, "batch": POLICY_ICONS, "steps": steps,
                 "size": SIZE, "transforms": "atlas", **runtime.settings(), "device": label,
                 "icon_steps_per_s": POLICY_ICONS * steps / min(seconds), "forward_images_per_s": forward,
                 "mean_objective": float(objectives[policy].mean()), "load_avg": round(os.getloadavg()[0], 1)}
            )  # fmt: skip
        rows[-1]["x_baseline"] = rows[-1]["icon_steps_per_s"] / rows[-2]["icon_steps_per_s"]
        rows[-1]["objective_ratio"] = float(objectives["auto"].mean() / objectives["baseline NCHW fp32"].mean())
    return rows


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run() -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = GPU_STEPS if device == "cuda" else CPU_STEPS
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    label = f"{device} ({torch.get_num_threads()} thread)" if device == "cpu" else torch.cuda.get_device_name(0)
    try:
        model = load_model("inceptionv1", weights="random", device=device)
        directions = np.random.default_rng(0).gamma(2.0, 1.0, size=(64, 512)).astype(np.float32)
        _ours(model, directions[:2], 2, 2, "standard")  # warm-up: kernels, allocator
        rows = _policy_rows(device, steps, label)
        for batch, count in ((1, 4), (16, 16), (64, 64)):
            seconds = _ours(model, directions[:count], batch, steps, "standard")
            rows.append(_row("atlas.stages.render", batch, count, steps, seconds, label, "standard"))
        seconds = _ours(model, directions[:64], 64, steps, "atlas")
        rows.append(_row("atlas.stages.render", 64, 64, steps, seconds, label, "atlas (paper)"))
        try:
            seconds = _lucent(model, directions[:4], steps)
            rows.append(_row("lucent render_vis", 1, 4, steps, seconds, label, "standard (lucent)"))
        except ImportError as err:
            rows.append({"renderer": "lucent render_vis", "note": f"skipped, cannot import lucent: {err}"})
        best = max(row["icons_per_s"] for row in rows if row["renderer"] == "atlas.stages.render")
        lucent = rows[-1].get("icons_per_s")
        for row in rows:
            if lucent and row["renderer"] == "atlas.stages.render":
                row["x_lucent"] = row["icons_per_s"] / lucent
        if device == "cpu":
            rows.append(
                {
                    "renderer": "estimate: full 20/40/80 InceptionV1 mixed4c atlas (CPU extrapolation)",
                    "note": f"8,400 icons x 4 attempts x 1024 steps at the best measured {best * steps:.1f} "
                    "icon-steps/s; the GPU target is under 20 minutes on one H100",
                    "full_atlas_h": FULL_ATLAS_ICON_STEPS / (best * steps) / 3600,
                }
            )
        return rows
    finally:
        torch.set_num_threads(threads)
