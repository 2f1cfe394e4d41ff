"""Render's forward pass (issue 39, part 1): the renderer as it is (forward hooks that record the objective's layer
and stop the pass after it) beside a hook-free forward and a compiled one, and beside the plain pixel loop.

EfficientNet-Lite0 `_blocks.10`, 16 icons of 80 px, the atlas transform stack, `STEPS` steps, one attempt, the
render policy (`atlas.runtime`'s auto: channels-last bf16 on this CPU), in one process, each after a warm-up of 2
steps whose time is reported (`warm_s`: for the compiled forward, the compilation), best of `REPEATS`:
- plain pixel loop: raw pixels, Adam 0.05, the whole network in NCHW fp32 every step, no transforms (the baseline
  of gpu_check);
- hooks: `atlas.optvis.forward` as the renderer uses it;
- hook-free: the network traced once (torchvision's `create_feature_extractor`, which also drops the layers after
  the objective's), the same graph every step;
- hook-free, compiled: that graph under `torch.compile` (inductor).
x_plain is each row's rate over the plain loop's; the issue's target is 2.0.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import plain_pixel_loop

LAYER = "_blocks.10"
ICONS, SIZE, STEPS, REPEATS = 16, 80, 40, 2


def _traced_forward(compiled: bool) -> Callable:
    from torchvision.models.feature_extraction import create_feature_extractor

    graphs: dict[tuple, Callable] = {}

    def forward(model, images: torch.Tensor, layers) -> dict[str, torch.Tensor]:
        key = tuple(layers)
        if key not in graphs:
            graph = create_feature_extractor(model, return_nodes={f"net.{layer}": layer for layer in layers})
            graphs[key] = torch.compile(graph) if compiled else graph
        return graphs[key](images)

    return forward


def _render(model, directions: np.ndarray, steps: int) -> None:
    from atlas.stages.render import RenderSettings, render_icons

    render_icons(model, LAYER, directions, RenderSettings(size=SIZE, steps=steps, attempts=1), batch_size=ICONS,
                 progress=False)  # fmt: skip


def _timed(run: Callable[[int], None]) -> tuple[float, float]:
    """(warm-up seconds, best icon-steps/s)."""
    start = time.perf_counter()
    run(2)
    warm = time.perf_counter() - start
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        run(STEPS)
        best = min(best, time.perf_counter() - start)
    return warm, ICONS * STEPS / best


def run() -> list[dict]:
    import atlas.optvis as optvis
    from atlas.models.zoo import load_model

    model = load_model("efficientnet-lite0")
    directions = np.random.default_rng(0).gamma(2.0, 1.0, size=(ICONS, 112)).astype(np.float32)
    hooks = optvis.forward
    rows = []
    rendered = functools.partial(_render, model, directions)
    cases: list[tuple[str, Callable[[int], None], Callable | None]] = [
        ("plain pixel loop (NCHW fp32, whole network)", plain_pixel_loop(model, LAYER, directions, SIZE), None),
        ("render, hooks (as it is)", rendered, hooks),
        ("render, hook-free (traced)", rendered, _traced_forward(compiled=False)),
        ("render, hook-free, compiled", rendered, _traced_forward(compiled=True)),
    ]
    for name, renderer, forward in cases:
        optvis.forward = forward or hooks  # type: ignore[assignment]
        try:
            warm, rate = _timed(renderer)
            rows.append({"renderer": name, "icons": ICONS, "size": SIZE, "steps": STEPS,
                         "threads": torch.get_num_threads(), "warm_s": warm, "icon_steps_per_s": rate})  # fmt: skip
        except Exception as err:  # a forward that cannot be traced or compiled here: say why
            rows.append({"renderer": name, "note": f"failed: {type(err).__name__}: {str(err).splitlines()[0]}"})
        finally:
            optvis.forward = hooks
    baseline = rows[0].get("icon_steps_per_s")
    for row in rows:
        if baseline and "icon_steps_per_s" in row:
            row["x_plain"] = row["icon_steps_per_s"] / baseline
    return rows
