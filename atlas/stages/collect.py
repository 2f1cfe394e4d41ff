"""Stage 1, collect: activation vectors at random positions and their attributions to every class.

For each image, K random interior positions (never the border row or column, where padding distorts
activations) are drawn as points of the image from a generator seeded by (seed, image row), so a rerun, a
resumed run or a run split across workers samples the same positions, and the k-th sample of an image sits at
the same place of the image in every layer of a run (the viewer's cross-layer highlight). At each position we
keep the activation vector h and its attribution to every logit, h . d logit / d h, which is the
Jacobian-vector product of the logits with the tangent h placed at that position. The tangents of every layer
enter at the layers' forward hooks inside the one forward pass that also records the activations:
forward-mode AD (`torch.func.jvp`) vectorised over the positions of all layers with `torch.func.vmap`, so
the images are decoded and the network runs once per batch however many layers a run collects
(benchmarks/results.md, "collect, k layers"). Max pools pass the average-pool derivative (the paper's
relaxed max-pool gradient). The pass runs in the memory format and precision of `atlas.runtime`'s
policy (default channels_last, fp32), recorded in the store's root attrs.

Work is written batch by batch into `<out>.parts/` (one .npz per batch, written atomically), then
merged into the store; a killed run resumes from the finished batches, and the merged store has
exactly the rows of an uninterrupted run. A store's layers are collected independently of each other on the
same images: a rerun that asks for one more layer collects only that layer and adds its group to the store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from atlas import AtlasError
from atlas.attribution import FROM_BASELINE, METHODS, attribution_pass, mean_activation
from atlas.attribution import attributions as attributions  # its home before atlas.attribution
from atlas.config import Settings, check_number
from atlas.images import ImageRecord, images_identity, load_batches
from atlas.models.classifier import Classifier
from atlas.runtime import MEMORY_FORMATS, PRECISIONS, Runtime, resolve
from atlas.shards import BASELINES_FILE, layer_record, merge_parts, missing_batches, parts_dir, shard_name, write_shard
from atlas.stages import Context
from atlas.store import (
    ACTIVATIONS,
    ATTRIBUTIONS,
    COLLECT_SETTINGS,
    COLLECTED,
    IMAGE_INDEX,
    POSITION,
    Node,
    settings_match,
)
from atlas.store import layers as store_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectSettings(Settings):
    """A run's collection settings (a config's `collect:`), validated once; `collect` takes them as keywords.

    One random position per image is the paper's (reference 1.1); batch_size 32 and the image-loading workers
    (None: up to 4) bound memory, not results; precision and memory_format: `atlas.runtime`'s policy.
    attribution: one of `atlas.attribution.METHODS`, None for the model's own (`Classifier.attribution`, chosen
    per model by benchmarks/bench_attributions.py); attribution_steps: the integration points of "integrated":
    1, the gradient at the midpoint, ranked a photo's class better than 4 at a third of the time (median rank 3
    against 5 on the 1000 sample photos, results.md "attributions"); baseline_images: the first images of the run
    whose mean activation is the baseline of "integrated" and "occlusion" (256 images hold 256 x H x W positions).
    """

    positions: int = 1
    seed: int = 0
    batch_size: int = 32
    workers: int | None = None
    precision: str = "auto"
    memory_format: str = "auto"
    attribution: str | None = None
    attribution_steps: int = 1
    baseline_images: int = 256

    # the layer's interior bounds positions too: `check_counts`, once the model is known
    section = "collect"
    bounds = {
        **{"positions": (1, None), "seed": (0, None), "batch_size": (1, None), "workers": (0, None)},
        **{"attribution_steps": (1, None), "baseline_images": (1, None)},
    }

    def validate(self) -> None:
        """Raise AtlasError on a run-time policy or attribution method that does not exist."""
        if self.precision not in PRECISIONS:
            raise AtlasError(f"collect: precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.memory_format not in MEMORY_FORMATS:
            raise AtlasError(
                f"collect: memory_format {self.memory_format!r}: choose one of {', '.join(MEMORY_FORMATS)}"
            )
        if self.attribution is not None and self.attribution not in METHODS:
            raise AtlasError(f"collect: attribution {self.attribution!r}: choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class Attribution:
    """A collection's attribution method as it runs: its name (`atlas.attribution.METHODS`), the integration
    points of "integrated", and each layer's baseline (its mean activation [C]) for the methods that need one."""

    method: str = "gradient"
    steps: int = 1
    baselines: dict[str, np.ndarray] = field(default_factory=dict)


def attribution_record(model: Classifier, method: str | None, steps: int, baseline_images: int) -> dict:
    """What a collection records of its attribution method (None: the model's own): only the settings the method
    reads (a gradient collection's is the same whatever its unused steps)."""
    method = method or model.attribution
    return {
        "attribution": method,
        "attribution_steps": steps if method == "integrated" else 0,
        "baseline_images": baseline_images if method in FROM_BASELINE else 0,
    }


# positions and attributions (pure functions over tensors) ---------------------------------------------
def sample_positions(image_row: int, layer: str, height: int, width: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct interior (y, x) positions of an image, reproducible from (seed, row).

    Interior means rows 1..height-2 and columns 1..width-2. The draws are points of the image, each taking the
    layer position it falls in (a point falling in a position already taken gives way to the next draw): the k-th
    sample of an image is at the same position in every layer of the same size and at the same place of the
    image in a coarser or finer one, whichever other layers a run collects. With count >= the interior size,
    all of them in row-major order.
    """
    ys, xs = np.mgrid[1 : height - 1, 1 : width - 1]
    interior = np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.int32)
    if len(interior) == 0:
        raise AtlasError(f"layer {layer} is {height}x{width}: too small to have interior positions")
    if count >= len(interior):
        return interior
    rng = np.random.default_rng([seed, image_row])
    drawn = np.zeros(0, dtype=np.int64)
    while True:  # a draw's stream does not depend on how many are drawn at a time
        points = rng.random((2 * count, 2))
        cells = (points * (height - 2, width - 2)).astype(np.int64)
        drawn = np.concatenate([drawn, cells[:, 0] * (width - 2) + cells[:, 1]])
        _, first = np.unique(drawn, return_index=True)
        if len(first) >= count:
            return interior[drawn[np.sort(first)[:count]]]


# The fewest images a batch's math runs on: the CPU kernels split a batch's work by its shape and the thread count,
# and with Lite0 a batch of 8 gave other numbers at 1 and 2 threads, one of 32 the same (tests/test_collect.py)
MATH_BATCH = 32


def math_batch(batch_size: int) -> int:
    """The shape every batch of a collection runs at: its batch size, and at least MATH_BATCH images (`collect_batch`
    pads), so that a store depends neither on the thread count nor on a batch size below MATH_BATCH."""
    return max(batch_size, MATH_BATCH)


def collect_batch(
    model: Classifier,
    images: torch.Tensor,
    rows: list[int],
    layers: dict[str, tuple[int, int, int]],
    positions: int,
    seed: int,
    attribution: Attribution = Attribution(),
    pad_to: int | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Activations, positions and attributions of one batch for every layer (the gradient's from one forward pass;
    the others' from one forward pass, then the layers one after another).

    `pad_to`: run a shorter batch (the last one, one with unreadable images, or any below MATH_BATCH) padded to this
    many images with copies of its last, and keep only its own rows (`math_batch`)."""
    kept = len(rows)
    if pad_to is not None and pad_to > kept:
        images = torch.cat([images, images[-1:].expand(pad_to - kept, *images.shape[1:])])
        rows = rows + [rows[-1]] * (pad_to - kept)
    where = {
        layer: np.stack([sample_positions(row, layer, height, width, positions, seed) for row in rows])
        for layer, (_channels, height, width) in layers.items()
    }
    where_t = {layer: torch.from_numpy(w).to(images.device).long() for layer, w in where.items()}
    with torch.no_grad():
        sizes = {layer: shape[1:] for layer, shape in layers.items()}
        baselines = {layer: torch.from_numpy(b).to(images.device) for layer, b in attribution.baselines.items()}
        found = attribution_pass(
            model, images, where_t, sizes, method=attribution.method, baselines=baselines, steps=attribution.steps
        )
    b = torch.arange(kept, device=images.device)[:, None]
    out = {}
    for layer, (act, attr) in found.items():
        vectors = act[:kept].permute(0, 2, 3, 1)[b, where_t[layer][:kept, :, 0], where_t[layer][:kept, :, 1]]
        count = where[layer].shape[1]
        out[layer] = {
            ACTIVATIONS: vectors.reshape(kept * count, -1).float().cpu().numpy(),
            IMAGE_INDEX: np.repeat(np.asarray(rows[:kept], dtype=np.int64), count),
            POSITION: where[layer][:kept].reshape(-1, 2).astype(np.int32),
            ATTRIBUTIONS: attr[:kept].reshape(kept * count, -1).cpu().numpy(),
        }
    return out


def timed_rate(model: Classifier, layers: list[str], positions: int, images: int = 2) -> float:
    """Images per second of `collect_batch` over `layers` on `images` random inputs with `positions` each, after
    an untimed one-image warm-up: a short measurement on this device for a run's plan, not a benchmark."""
    shapes = {name: (channels, height, width) for name, channels, height, width in model.layer_shapes()}
    wanted = {name: shapes[name] for name in map(model.resolve_layer, layers)}
    device = next(model.parameters()).device
    runtime = resolve("collect", device)
    runtime.prepare(model)
    batch = runtime.inputs(torch.rand(images, 3, model.input_size, model.input_size))
    with runtime.autocast():
        collect_batch(model, batch[:1], [0], wanted, positions, 0)
        started = time.perf_counter()
        collect_batch(model, batch, list(range(images)), wanted, positions, 0)
    return images / (time.perf_counter() - started)


# the stage ----------------------------------------------------------------------------------------------
def collect(
    model: Classifier,
    records: list[ImageRecord],
    out: str | Path,
    layers: list[str] | None = None,
    positions: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    dataset: str = "",
    precision: str = "auto",
    memory_format: str = "auto",
    attribution: str | None = None,
    attribution_steps: int = 1,
    baseline_images: int = 256,
) -> Path:
    """Collect activations and attributions of `records` into the HDF5 store `out`; resumable.

    Defaults follow the paper: one random position per image (`positions=1`). precision and
    memory_format: `atlas.runtime.resolve` settings; attribution (None: the model's own), attribution_steps and
    baseline_images: as `CollectSettings`.
    """
    out = Path(out)
    runtime = resolve("collect", device, precision, memory_format)
    method = attribution_record(model, attribution, attribution_steps, baseline_images)
    plan = plan_collection(model, records, out, layers, positions, seed, batch_size, dataset, runtime, method)
    if plan is not None:
        how = baselines_of(model, records, plan, runtime, workers)
        write_batches(
            model,
            records,
            plan.pending,
            plan.parts,
            plan.layer_shapes,
            positions,
            seed,
            workers,
            runtime,
            how,
            pad_to=math_batch(batch_size),
        )
        merge_parts(plan.parts, out, records, plan.meta, plan.layer_shapes, model.class_names)
    return out


@dataclass(frozen=True)
class CollectionPlan:
    """What is left to do: the settings record, the layers' shapes, the parts folder and its missing batches."""

    meta: dict
    layer_shapes: dict[str, tuple[int, int, int]]
    parts: Path
    batches: list[list[int]]  # the fixed partition of the image rows by batch_size
    pending: list[list[int]]  # the batches without a shard yet


def plan_collection(
    model: Classifier,
    records: list[ImageRecord],
    out: Path,
    layers: list[str] | None,
    positions: int,
    seed: int,
    batch_size: int,
    dataset: str,
    runtime: Runtime,
    attribution: dict | None = None,
) -> CollectionPlan | None:
    """Check the settings against `out` and its parts folder (made when new); None when `out` already holds
    every layer asked for. The plan collects only the layers `out` lacks.

    The runtime's memory format and precision are part of the settings (they change the results in the last
    digits); its device is not, so a run may resume on another device. attribution: `attribution_record`'s
    (None: the model's own method at CollectSettings' defaults).
    """
    names = list(dict.fromkeys(model.resolve_layer(name) for name in (layers or [model.default_layer])))
    shapes = {name: (channels, height, width) for name, channels, height, width in model.layer_shapes()}
    check_counts(records, {name: shapes[name] for name in names}, positions)
    check_number("batch_size", batch_size, 1)
    meta = collection_settings(model, records, positions, seed, batch_size, dataset, runtime, attribution)
    have = collected_layers(out, meta)
    if have is None and out.exists():
        raise AtlasError(
            f"{out} exists and holds a different collection (other photos, model or collect settings): collect "
            "again with --force collect (make: FORCE=collect), remove it, or choose another --out"
        )
    missing = [name for name in names if name not in (have or ())]
    if not missing:
        log.info("%s is already complete for these inputs; nothing to do", out)
        return None
    if have:
        log.info("%s holds %s: collecting only %s", out, ", ".join(sorted(have)), ", ".join(missing))
    parts = parts_dir(out, {**meta, "layers": missing})
    batches = [list(range(i, min(i + batch_size, len(records)))) for i in range(0, len(records), batch_size)]
    pending = missing_batches(parts, batches)
    if len(pending) < len(batches):
        log.info("resuming: %d of %d batches already done in %s", len(batches) - len(pending), len(batches), parts)
    return CollectionPlan(meta, {name: shapes[name] for name in missing}, parts, batches, pending)


def collection_settings(
    model: Classifier,
    records: list[ImageRecord],
    positions: int,
    seed: int,
    batch_size: int,
    dataset: str,
    runtime: Runtime,
    attribution: dict | None = None,
) -> dict:
    """What a collection records (the root attr COLLECT_SETTINGS), whichever layers it holds: a layer group in a
    store with these settings is finished with them. attribution: `attribution_record`'s (None: the model's own
    method at CollectSettings' defaults)."""
    if attribution is None:
        defaults = CollectSettings()
        attribution = attribution_record(model, None, defaults.attribution_steps, defaults.baseline_images)
    return {
        "model": model.name,
        "weights": model.weights,
        "input_size": model.input_size,
        "resize_size": model.resize_size,
        "positions": positions,
        "seed": seed,
        "dataset": dataset,
        "classes": len(model.class_names),
        "images": len(records),
        "images_sha1": images_identity([r.path for r in records]),
        "batch_size": batch_size,
        "memory_format": runtime.memory_format,
        "precision": runtime.precision,
        **attribution,
    }


def baselines_of(
    model: Classifier, records: list[ImageRecord], plan: CollectionPlan, runtime: Runtime, workers: int | None
) -> Attribution:
    """The plan's attribution method with the baselines it needs: each new layer's mean activation over the first
    `baseline_images` images, computed once and kept in the parts folder, so a resumed run or a cluster's workers
    use the very same numbers (the store records them as each layer's BASELINE)."""
    meta = plan.meta
    method = Attribution(meta["attribution"], meta["attribution_steps"])
    if method.method not in FROM_BASELINE:
        return method
    kept = plan.parts / BASELINES_FILE
    if kept.exists():
        with np.load(kept) as data:
            return Attribution(method.method, method.steps, {layer: data[layer] for layer in plan.layer_shapes})
    count = min(meta["baseline_images"], len(records))
    batch = meta["batch_size"]
    rows = [list(range(i, min(i + batch, count))) for i in range(0, count, batch)]
    model = runtime.prepare(model)
    sides = (model.resize_size, model.input_size)
    loaded = load_batches(records, *sides, rows, workers, desc="baseline")
    threads = torch.get_num_threads()
    # one thread: the baseline enters every attribution, so its sums must not follow the thread count that the
    # machine's load sets (atlas.runtime.default_threads); a few hundred forward passes
    torch.set_num_threads(1)
    with runtime.autocast():
        images = (runtime.inputs(stacked) for _rows, stacked, _skipped in loaded if stacked is not None)
        try:
            means = mean_activation(model, images, list(plan.layer_shapes))
        except ValueError:
            raise AtlasError(
                f"none of the first {count} images could be read: no mean activation for {meta['attribution']} "
                f"attributions to start from"
            ) from None
        finally:
            torch.set_num_threads(threads)
    found = {layer: mean.cpu().numpy() for layer, mean in means.items()}
    tmp = kept.with_name(f".{kept.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **found)  # type: ignore[arg-type]  # numpy's stub types **kwds as savez's allow_pickle
    os.replace(tmp, kept)
    return Attribution(method.method, method.steps, found)


def check_counts(records: list[ImageRecord], layer_shapes: dict[str, tuple[int, int, int]], positions: object) -> None:
    """One-line AtlasErrors before any work: no images, or positions outside what every layer's interior holds
    (they would be silently capped, while the store records the number asked for)."""
    if not records:
        raise AtlasError("no images to collect: the data source is empty (or --limit left none)")
    layer, height, width, interior = smallest_interior(layer_shapes)
    where = f"layer {layer} is {height}x{width}: {interior} interior positions"
    check_number(f"positions ({where})", positions, 1, interior)


def smallest_interior(layer_shapes: dict[str, tuple[int, int, int]]) -> tuple[str, int, int, int]:
    """The layer with the fewest interior positions, its height and width, and that number: what bounds the
    positions of a collection whose layers share their samples."""
    layer, (_channels, height, width) = min(layer_shapes.items(), key=lambda item: item[1][1] * item[1][2])
    return layer, height, width, (height - 2) * (width - 2)


def write_batches(
    model: Classifier,
    records: list[ImageRecord],
    batches: list[list[int]],
    parts: Path,
    layer_shapes: dict[str, tuple[int, int, int]],
    positions: int,
    seed: int,
    workers: int | None,
    runtime: Runtime,
    attribution: Attribution = Attribution(),
    start: int = 0,
    progress: bool | None = None,
    pad_to: int | None = None,
) -> None:
    """Collect `batches` (rows of the whole image list) into one shard each in `parts`, run as `runtime` says.

    `records` holds the rows from `start` on, so a cluster task needs only its own slice of the list. `pad_to`: the
    collection's batch size, the shape every batch runs at (`collect_batch`).
    """
    model = runtime.prepare(model)
    pin = runtime.device.type == "cuda"
    sides = (model.resize_size, model.input_size)
    for rows, stacked, skipped in load_batches(records, *sides, batches, workers, start, progress, pin, desc="collect"):
        result = {}
        if rows and stacked is not None:  # a batch of only unreadable images has no tensor
            with runtime.autocast():
                images = runtime.inputs(stacked)
                result = collect_batch(model, images, rows, layer_shapes, positions, seed, attribution, pad_to)
        first = min(rows + [row for row, _ in skipped])
        write_shard(parts / shard_name(first), result, skipped)


def collected_layers(out: Path, meta: dict | None) -> set[str] | None:
    """The layers `out` holds finished, when it is a collection with these settings (`collection_settings`; None:
    any); None when it is missing, unreadable, unfinished or made with other settings."""
    if not out.exists():
        return None
    try:
        with h5py.File(out, "r") as f:
            if COLLECT_SETTINGS not in f.attrs or (meta is not None and not settings_match(f, meta, COLLECT_SETTINGS)):
                return None
            return set(store_layers(f))  # a layer's group is moved to its name only once merged whole (merge_parts)
    except OSError:
        return None


class CollectStage:
    """The stage (atlas.stages.Stage): every layer of the run in one pass over the images (`whole_run`), each layer
    group a product made from the images ("") with its collection's settings (`layer_record`)."""

    name, settings, whole_run = "collect", CollectSettings, True

    def products(self, ctx: Context, layer: str | None, settings: CollectSettings) -> list[tuple[Node | None, str]]:
        store = ctx.existing_store
        return [(None if store is None else store.get(str(layer)), "")]

    def record(self, ctx: Context, layer: str | None, settings: CollectSettings) -> dict:
        assert ctx.model is not None  # a run that collects has its model
        policy = ctx.runtime("collect", settings.precision, settings.memory_format)
        how = attribution_record(ctx.model, settings.attribution, settings.attribution_steps, settings.baseline_images)
        meta = collection_settings(
            ctx.model, ctx.records, settings.positions, settings.seed, settings.batch_size, ctx.dataset, policy, how
        )
        return layer_record(meta, str(layer))

    def complete(self, ctx: Context, layer: str | None, node: h5py.Group) -> bool:
        rows = {node[name].shape[0] for name in COLLECTED if name in node}
        return all(name in node for name in COLLECTED) and len(rows) == 1 and rows.pop() > 0

    def run(self, ctx: Context, layer: str | None, settings: CollectSettings) -> None:
        """Collect what the store lacks: a store that is not a finished collection is merged anew from the batch
        shards, and a forced one is collected again from the images."""
        assert ctx.model is not None
        ctx.close_store()  # collect writes the file itself
        path, parts = ctx.store_path, ctx.store_path.with_name(ctx.store_path.name + ".parts")
        forced = self.name in ctx.force
        if forced and parts.exists():
            shutil.rmtree(parts)
        if path.exists() and (forced or collected_layers(path, None) is None):
            path.unlink()
        options = {**dataclasses.asdict(settings), "layers": ctx.layers, "dataset": ctx.dataset}
        collect(ctx.model, ctx.records, path, device=ctx.device, **options)


COLLECT = CollectStage()
