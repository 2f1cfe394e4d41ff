"""Attribution faithfulness (issue 37): does a method's attribution point at the class the model uses?

For each attribution method (`atlas.attribution.METHODS`), `collect` runs end to end on the ImageNet sample photos
(one per class) at a model's layer, `POSITIONS` random interior positions each, and we measure:
- rank: the rank of each photo's predicted class (the model's top-1 on the whole photo) among all classes in the
  mean attribution of its samples; the median, and the share of photos where it is in the top 10;
- sample_top1: the share of samples whose own largest attribution is their photo's predicted class;
- deletion: each photo's `DELETED` samples with the largest attribution to its predicted class are set to the
  layer's mean activation, and so are `DELETED` of its samples drawn at random; drop_top and drop_random are the
  mean falls of the predicted logit, and deletion_wins the share of photos where the top positions' fall is the
  larger. A per-image attribution that ranks no position (a trivial answer) wins half of them;
- seconds: the collection's wall time, and x_gradient its ratio to the paper's gradient method.

The reference rows are no methods: "whole map" is logit(h) - logit(every position set to the mean activation),
the counterfactual that the sampled positions' attributions estimate, and "photo logits" is the trivial answer that
gives every sample its photo's logits: it ranks perfectly and ranks no position, which is why the deletion check
is part of the benchmark. "whole map, integrated K steps" is integrated gradients' own sum over every position of
the map (one forward-mode pass per step with the whole map as the tangent): the most that K steps can reach,
before sampling loses more. It shows how many steps the method needs on the layer (`WHOLE_MAP_STEPS`).

ATTRIBUTION_LAYERS=model:layer,... names other layers (default: the default layer of each offline zoo model);
ATTRIBUTION_IMAGES=N takes the first N photos; ATTRIBUTION_METHODS=none measures the reference rows only.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from benchmarks.common import SAMPLE

POSITIONS = 16  # of a 14 x 14 layer's 144 interior positions; the demo takes 64
DELETED = 4  # a quarter of each photo's samples
BATCH = 16
METHODS = (("gradient", 1), ("integrated", 1), ("integrated", 4), ("occlusion", 1))
WHOLE_MAP_STEPS = (1, 2, 4, 8, 16)
OFFLINE_LAYERS = "efficientnet-lite0:_blocks.10"  # the zoo's offline models (the others need downloaded weights)


def _logits_and_maps(model, layer: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from atlas.models.classifier import capture

    with torch.no_grad(), capture(model, [layer]) as seen:
        logits = model(images)
    return logits, seen[layer]


def _with_positions_at(model, layer: str, images: torch.Tensor, masks: torch.Tensor | float, base: torch.Tensor):
    """The logits with each image's masked positions [B, 1, H, W] (1.0: all) set to `base` [C]."""
    handle = model.layer_module(layer).register_forward_hook(
        lambda _m, _i, out: out + masks * (base.view(1, -1, 1, 1) - out)
    )
    try:
        with torch.no_grad():
            return model(images)
    finally:
        handle.remove()


def _whole_map_integrated(model, layer: str, images: torch.Tensor, base: torch.Tensor, steps: int) -> torch.Tensor:
    """(h - m) . mean over the midpoints alpha of grad logit at m + alpha (h - m), over the whole map: [B, classes].
    The integrated method's own integrand (`atlas.attribution._gradient_at`) with one mask that covers every
    position."""
    from atlas.attribution import _gradient_at
    from atlas.models.classifier import capture

    with torch.no_grad():  # as collect runs it: no autograd graph is kept
        with capture(model, [layer]) as seen:
            model(images)
        h = seen[layer]
        whole = torch.ones(1, len(images), 1, *h.shape[-2:], dtype=h.dtype)
        module, m = model.layer_module(layer), base.view(1, -1, 1, 1)
        alphas = [(j + 0.5) / steps for j in range(steps)]
        return sum(_gradient_at(model, module, images, h, m, whole, alpha)[0] for alpha in alphas) / steps


def measure(model_name: str, layer: str, images: int, methods=METHODS) -> list[dict]:
    from atlas.attribution import mean_activation
    from atlas.images import list_images, load_batches
    from atlas.models.zoo import load_model
    from atlas.stages.collect import collect

    model = load_model(model_name)
    layer = model.resolve_layer(layer)
    records = list_images(SAMPLE, model.class_names, model.imagenet_index)[:images]
    batches = [list(range(i, min(i + BATCH, len(records)))) for i in range(0, len(records), BATCH)]
    loaded = [(rows, stacked) for rows, stacked, _ in load_batches(records, model.resize_size, model.input_size,
                                                                   batches, 0, progress=False) if rows]  # fmt: skip
    base = mean_activation(model, [stacked for _, stacked in loaded[: 256 // BATCH]], [layer])[layer]
    passes = [_logits_and_maps(model, layer, stacked) for _, stacked in loaded]
    batch_logits, side = [found for found, _ in passes], tuple(passes[0][1].shape[-2:])
    del passes  # the maps: only their side is needed
    logits = torch.cat(batch_logits)
    predicted = logits.argmax(1).numpy()
    image_rows = np.concatenate([rows for rows, _ in loaded])
    read_at = {row: i for i, row in enumerate(image_rows)}
    rows: list[dict] = []
    gradient_s = None
    with tempfile.TemporaryDirectory() as tmp:
        settings = dict(layers=[layer], positions=POSITIONS, batch_size=BATCH, workers=0, dataset=str(SAMPLE))
        collect(model, records[-2:], Path(tmp) / "warm.h5", **settings)  # warm-up
        samples = None
        for method, steps in methods:
            out = Path(tmp) / f"{method}-{steps}.h5"
            start = time.perf_counter()
            collect(model, records, out, attribution=method, attribution_steps=steps, **settings)
            seconds = time.perf_counter() - start
            gradient_s = seconds if method == "gradient" else gradient_s
            with h5py.File(out, "r") as f:
                group = f[layer]
                attributions = group["attributions"][()]
                samples = (group["image_index"][()], group["position"][()])
            name = method if method != "integrated" else f"integrated, {steps} step{'s' * (steps > 1)}"
            rows.append({"method": name, **_scores(attributions, samples, predicted, read_at),
                         **_deletion(model, layer, loaded, batch_logits, side, attributions, samples, predicted,
                                     read_at, base),
                         "seconds": seconds, "x_gradient": seconds / gradient_s})  # fmt: skip
        if samples is None:  # no method ran: the positions a collection would sample, for the reference rows
            collect(model, records, Path(tmp) / "positions.h5", **settings)
            with h5py.File(Path(tmp) / "positions.h5", "r") as f:
                samples = (f[layer]["image_index"][()], f[layer]["position"][()])
        whole = logits - torch.cat([_with_positions_at(model, layer, stacked, 1.0, base) for _, stacked in loaded])
        index = samples[0]
        for steps in WHOLE_MAP_STEPS:
            summed = torch.cat([_whole_map_integrated(model, layer, stacked, base, steps) for _, stacked in loaded])
            name = f"reference: whole map, integrated {steps} step{'s' * (steps > 1)}"
            rows.append({"method": name, **_scores(summed.numpy()[[read_at[i] for i in index]], samples, predicted,
                                                   read_at)})  # fmt: skip
        trivial = logits.numpy()[[read_at[i] for i in index]]
        rows.append({"method": "reference: whole map", **_scores(whole.numpy()[[read_at[i] for i in index]], samples,
                                                                  predicted, read_at)})  # fmt: skip
        rows.append({"method": "reference: photo logits (trivial)", **_scores(trivial, samples, predicted, read_at),
                     **_deletion(model, layer, loaded, batch_logits, side, trivial, samples, predicted, read_at,
                                 base)})  # fmt: skip
    return [{"model": model_name, "layer": layer, "photos": len(image_rows), "positions": POSITIONS, **row}
            for row in rows]  # fmt: skip


def _scores(attributions: np.ndarray, samples, predicted: np.ndarray, read_at: dict) -> dict:
    index = samples[0]
    ranks = []
    for image in np.unique(index):
        mean = attributions[index == image].mean(0)
        target = predicted[read_at[image]]
        ranks.append(int((mean > mean[target]).sum()) + 1)
    ranks = np.array(ranks)
    sample_top = attributions.argmax(1) == predicted[[read_at[i] for i in index]]
    return {"median_rank": float(np.median(ranks)), "top10": float((ranks <= 10).mean()),
            "sample_top1": float(sample_top.mean())}  # fmt: skip


def _deletion(model, layer, loaded, batch_logits, side, attributions, samples, predicted, read_at, base) -> dict:
    """`batch_logits`: each loaded batch's logits; `side`: the layer's (H, W)."""
    index, where = samples
    rng = np.random.default_rng(0)
    drops = {"top": [], "random": []}
    for (rows, stacked), logits in zip(loaded, batch_logits, strict=True):
        masks = {kind: torch.zeros(len(rows), 1, *side) for kind in drops}
        for i, row in enumerate(rows):
            mine = np.flatnonzero(index == row)
            order = np.argsort(-attributions[mine, predicted[read_at[row]]], kind="stable")
            for kind, chosen in (("top", order[:DELETED]), ("random", rng.permutation(len(mine))[:DELETED])):
                y, x = where[mine[chosen]].T
                masks[kind][i, 0, y, x] = 1
        target = torch.as_tensor(predicted[[read_at[r] for r in rows]])
        before = logits.gather(1, target[:, None])[:, 0]
        for kind, mask in masks.items():
            after = _with_positions_at(model, layer, stacked, mask, base).gather(1, target[:, None])[:, 0]
            drops[kind].append((before - after).numpy())
    top, random = (np.concatenate(drops[kind]) for kind in ("top", "random"))
    return {"drop_top": float(top.mean()), "drop_random": float(random.mean()),
            "deletion_wins": float((top > random).mean() + 0.5 * (top == random).mean())}  # fmt: skip


def run() -> list[dict]:
    if not SAMPLE.is_dir():
        return [{"method": "all", "note": f"skipped: no {SAMPLE}"}]
    images = int(os.environ.get("ATTRIBUTION_IMAGES", "1000"))
    methods = () if os.environ.get("ATTRIBUTION_METHODS") == "none" else METHODS
    rows = []
    for spec in os.environ.get("ATTRIBUTION_LAYERS", OFFLINE_LAYERS).split(","):
        model_name, layer = spec.split(":", 1)
        rows += measure(model_name, layer, images, methods)
    return rows
