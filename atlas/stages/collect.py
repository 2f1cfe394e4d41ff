"""Stage 1, collect: activation vectors at random positions and their attributions to every class.

For each image and layer, K random interior positions (never the border row or column, where
padding distorts activations) are sampled from a generator seeded by (seed, image row, layer), so a
rerun, a resumed run or a run split across workers samples the same positions. At each position we
keep the activation vector h and its attribution to every logit, h . d logit / d h, which is the
Jacobian-vector product of the logits with the tangent h placed at that position. The tangent enters
at the layer's forward hook inside the one forward pass that also records h: forward-mode AD
(`torch.func.jvp`) vectorised over the K positions with `torch.func.vmap`, so the layers before the
target run once and without tangents. Max pools pass the average-pool derivative (the paper's
relaxed max-pool gradient). The pass runs in the memory format and precision of `atlas.runtime`'s
policy (default channels_last, fp32), recorded in the store's root attrs.

Work is written batch by batch into `<out>.parts/` (one .npz per batch, written atomically), then
merged into the store; a killed run resumes from the finished batches, and the merged store has
exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn
from torch.func import jvp, vmap

from atlas import AtlasError, __version__
from atlas.config import Settings, check_number
from atlas.images import ImageRecord, load_batches
from atlas.models.classifier import Classifier
from atlas.progress import progress as progress_of
from atlas.runtime import MEMORY_FORMATS, PRECISIONS, Runtime, resolve
from atlas.store import (
    ACTIVATIONS,
    ATTRIBUTIONS,
    CLASSES,
    COLLECT_SETTINGS,
    COLLECTED,
    IMAGE_INDEX,
    POSITION,
    ROW_CHUNK,
    STR,
    fingerprint,
    record_lineage,
    record_settings,
    settings_json,
    settings_match,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectSettings(Settings):
    """A run's collection settings (a config's `collect:`), validated once; `collect` takes them as keywords.

    One random position per image is the paper's (reference 1.1); batch_size 32 and the image-loading workers
    (None: up to 4) bound memory, not results; precision and memory_format: `atlas.runtime`'s policy.
    """

    positions: int = 1
    seed: int = 0
    batch_size: int = 32
    workers: int | None = None
    precision: str = "auto"
    memory_format: str = "auto"

    def __post_init__(self) -> None:
        """Raise AtlasError, naming the value and its range, on a setting that cannot work (the layer's interior
        bounds positions too: `check_counts`, once the model is known)."""
        check_number("collect: positions", self.positions, 1)
        check_number("collect: seed", self.seed, 0)
        check_number("collect: batch_size", self.batch_size, 1)
        if self.workers is not None:
            check_number("collect: workers", self.workers, 0)
        if self.precision not in PRECISIONS:
            raise AtlasError(f"collect: precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.memory_format not in MEMORY_FORMATS:
            raise AtlasError(
                f"collect: memory_format {self.memory_format!r}: choose one of {', '.join(MEMORY_FORMATS)}"
            )


# positions and attributions (pure functions over tensors) ---------------------------------------------
def sample_positions(image_row: int, layer: str, height: int, width: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct interior (y, x) positions of an image, reproducible from (seed, row, layer).

    Interior means rows 1..height-2 and columns 1..width-2. With count >= the interior size, all of
    them in row-major order.
    """
    ys, xs = np.mgrid[1 : height - 1, 1 : width - 1]
    interior = np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.int32)
    if len(interior) == 0:
        raise AtlasError(f"layer {layer} is {height}x{width}: too small to have interior positions")
    if count >= len(interior):
        return interior
    rng = np.random.default_rng([seed, image_row, zlib.crc32(layer.encode())])
    return interior[np.sort(rng.choice(len(interior), size=count, replace=False))]


class _RelaxedMaxPool:
    """Max pool forward, average-pool derivative: the paper's continuous relaxation for attributions."""

    def __init__(self, pool: nn.MaxPool2d):
        self.pool = pool

    def __call__(self, _module: nn.Module, inputs: tuple[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        p = self.pool
        average = nn.functional.avg_pool2d(inputs[0], p.kernel_size, p.stride, p.padding, p.ceil_mode)
        return out.detach() + average - average.detach()


def attribution_pass(
    model: Classifier,
    images: torch.Tensor,
    layer: str,
    positions: torch.Tensor,
    size: tuple[int, int],
    max_rows: int = 512,
    activations: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the layer's activations [B, C, H, W] and attributions [B, K, classes] at `positions` [B, K, 2].

    The tangent enters at the layer's forward hook, h (the layer's own output, or `activations` when
    given) masked to one position: the layers before it run once, unbatched and without tangents, and
    the tail carries one tangent per position (vmap). `size` is the layer's (H, W). `max_rows` bounds
    B x (positions per pass), i.e. the memory of one pass; each further pass runs the network again.
    """
    module = model.layer_module(layer)
    batch, count = positions.shape[:2]
    rows = torch.arange(batch, device=images.device)
    zero = torch.zeros(batch, 1, *size, device=images.device)
    seen: dict[str, torch.Tensor] = {}

    def logits_with(scale: torch.Tensor) -> torch.Tensor:
        def enter(_m: nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor:
            seen["h"] = out
            h = out if activations is None else activations
            # primal: out unchanged (scale is 0); tangent: h at the masked position, in the layer's dtype (autocast)
            return out + h * scale.to(out.dtype)

        hook = module.register_forward_hook(enter)
        try:
            return model(images)
        finally:
            hook.remove()

    def one_hot(k: int) -> torch.Tensor:
        mask = torch.zeros_like(zero)
        mask[rows, 0, positions[:, k, 0], positions[:, k, 1]] = 1
        return mask

    per_pass = max(1, max_rows // batch)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    relax = [pool.register_forward_hook(_RelaxedMaxPool(pool)) for pool in pools]
    try:
        parts = []
        for start in range(0, count, per_pass):
            masks = torch.stack([one_hot(k) for k in range(start, min(count, start + per_pass))])
            parts.append(vmap(lambda m: jvp(logits_with, (zero,), (m,))[1])(masks))
        return seen["h"], torch.cat(parts).transpose(0, 1).float()
    finally:
        for hook in relax:
            hook.remove()


def attributions(
    model: Classifier,
    images: torch.Tensor,
    layer: str,
    activations: torch.Tensor,
    positions: torch.Tensor,
    max_rows: int = 512,
) -> torch.Tensor:
    """h . grad_h logit_c for every class, at `positions` [B, K, 2] of `layer`: returns [B, K, classes].

    `activations` is the layer's output h for `images` [B, C, H, W]. `max_rows` bounds B x (positions
    per pass), i.e. the memory of one vectorised pass. `collect_batch` uses `attribution_pass`, which
    takes h from the same pass.
    """
    return attribution_pass(model, images, layer, positions, activations.shape[-2:], max_rows, activations)[1]


def collect_batch(
    model: Classifier,
    images: torch.Tensor,
    rows: list[int],
    layers: dict[str, tuple[int, int, int]],
    positions: int,
    seed: int,
) -> dict[str, dict[str, np.ndarray]]:
    """Activations, positions and attributions of one batch for every layer (one forward pass per layer)."""
    out = {}
    for layer, (_channels, height, width) in layers.items():
        where = np.stack([sample_positions(row, layer, height, width, positions, seed) for row in rows])
        where_t = torch.from_numpy(where).to(images.device).long()
        with torch.no_grad():
            act, attr = attribution_pass(model, images, layer, where_t, (height, width))
        b = torch.arange(len(rows), device=images.device)[:, None]
        vectors = act.permute(0, 2, 3, 1)[b, where_t[..., 0], where_t[..., 1]]  # [B, K, C]
        count = where.shape[1]
        out[layer] = {
            ACTIVATIONS: vectors.reshape(len(rows) * count, -1).float().cpu().numpy(),
            IMAGE_INDEX: np.repeat(np.asarray(rows, dtype=np.int64), count),
            POSITION: where.reshape(-1, 2).astype(np.int32),
            ATTRIBUTIONS: attr.reshape(len(rows) * count, -1).cpu().numpy(),
        }
    return out


def timed_rate(model: Classifier, layer: str, positions: int, images: int = 2) -> float:
    """Images per second of `collect_batch` on `images` random inputs with `positions` each, after an untimed
    one-image warm-up: a short measurement on this device for a run's plan, not a benchmark."""
    name = model.resolve_layer(layer)
    shape = next(tuple(shape) for layer_name, *shape in model.layer_shapes() if layer_name == name)
    device = next(model.parameters()).device
    runtime = resolve("collect", device)
    runtime.prepare(model)
    batch = runtime.inputs(torch.rand(images, 3, model.input_size, model.input_size))
    with runtime.autocast():
        collect_batch(model, batch[:1], [0], {name: shape}, positions, 0)
        started = time.perf_counter()
        collect_batch(model, batch, list(range(images)), {name: shape}, positions, 0)
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
) -> Path:
    """Collect activations and attributions of `records` into the HDF5 store `out`; resumable.

    Defaults follow the paper: one random position per image (`positions=1`). precision and
    memory_format: `atlas.runtime.resolve` settings.
    """
    out = Path(out)
    runtime = resolve("collect", device, precision, memory_format)
    plan = plan_collection(model, records, out, layers, positions, seed, batch_size, dataset, runtime)
    if plan is not None:
        write_batches(model, records, plan.pending, plan.parts, plan.layer_shapes, positions, seed, workers, runtime)
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
) -> CollectionPlan | None:
    """Check the settings against `out` and its parts folder (made when new); None when `out` already holds them.

    The runtime's memory format and precision are part of the settings (they change the results in the last
    digits); its device is not, so a run may resume on another device.
    """
    names = [model.resolve_layer(name) for name in (layers or [model.default_layer])]
    shapes = {name: shape for name, *shape in model.layer_shapes() if name in names}
    layer_shapes = {name: tuple(shapes[name]) for name in names}
    check_counts(records, layer_shapes, positions)
    check_number("batch_size", batch_size, 1)
    meta = collection_settings(model, records, names, positions, seed, batch_size, dataset, runtime)
    if collected(out, meta):
        log.info("%s is already complete for these inputs; nothing to do", out)
        return None
    if out.exists():
        raise AtlasError(f"{out} exists and holds a different collection; remove it or choose another --out")
    parts = _parts_dir(out, meta)
    batches = [list(range(i, min(i + batch_size, len(records)))) for i in range(0, len(records), batch_size)]
    pending = missing_batches(parts, batches)
    if len(pending) < len(batches):
        log.info("resuming: %d of %d batches already done in %s", len(batches) - len(pending), len(batches), parts)
    return CollectionPlan(meta, layer_shapes, parts, batches, pending)


def collection_settings(
    model: Classifier,
    records: list[ImageRecord],
    layers: list[str],
    positions: int,
    seed: int,
    batch_size: int,
    dataset: str,
    runtime: Runtime,
) -> dict:
    """What a collection records (the root attr COLLECT_SETTINGS): a store holding these is finished with them."""
    return {
        "model": model.name,
        "weights": model.weights,
        "input_size": model.input_size,
        "resize_size": model.resize_size,
        "layers": layers,
        "positions": positions,
        "seed": seed,
        "dataset": dataset,
        "classes": len(model.class_names),
        "images": len(records),
        "images_sha1": hashlib.sha1("\n".join(r.path for r in records).encode()).hexdigest(),
        "batch_size": batch_size,
        "memory_format": runtime.memory_format,
        "precision": runtime.precision,
    }


def check_counts(records: list[ImageRecord], layer_shapes: dict[str, tuple[int, int, int]], positions: object) -> None:
    """One-line AtlasErrors before any work: no images, or positions outside what every layer's interior holds
    (they would be silently capped, while the store records the number asked for)."""
    if not records:
        raise AtlasError("no images to collect: the data source is empty (or --limit left none)")
    layer, (_c, height, width) = min(layer_shapes.items(), key=lambda item: item[1][1] * item[1][2])
    interior = (height - 2) * (width - 2)
    where = f"layer {layer} is {height}x{width}: {interior} interior positions"
    check_number(f"positions ({where})", positions, 1, interior)


def missing_batches(parts: Path, batches: list[list[int]]) -> list[list[int]]:
    """The batches that have no finished shard in `parts`."""
    return [b for b in batches if not (parts / _shard_name(b[0])).exists()]


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
    start: int = 0,
    progress: bool | None = None,
) -> None:
    """Collect `batches` (rows of the whole image list) into one shard each in `parts`, run as `runtime` says.

    `records` holds the rows from `start` on, so a cluster task needs only its own slice of the list.
    """
    model = runtime.prepare(model)
    pin = runtime.device.type == "cuda"
    sides = (model.resize_size, model.input_size)
    for rows, stacked, skipped in load_batches(records, *sides, batches, workers, start, progress, pin, desc="collect"):
        result = {}
        if rows:
            with runtime.autocast():
                result = collect_batch(model, runtime.inputs(stacked), rows, layer_shapes, positions, seed)
        first = min(rows + [row for row, _ in skipped])
        _write_shard(parts / _shard_name(first), result, skipped)


def _shard_name(first_row: int) -> str:
    return f"batch-{first_row:09d}.npz"


def _parts_dir(out: Path, meta: dict) -> Path:
    parts = out.with_name(out.name + ".parts")
    meta_file = parts / "meta.json"
    if parts.exists() and meta_file.exists():
        if fingerprint(json.loads(meta_file.read_text())) != fingerprint(meta):
            raise AtlasError(
                f"{parts} holds an unfinished collection with other settings; rerun it with the same "
                f"arguments, or delete {parts} to start over"
            )
        return parts
    parts.mkdir(parents=True, exist_ok=True)
    tmp = meta_file.with_suffix(".tmp")
    tmp.write_text(settings_json(meta))
    os.replace(tmp, meta_file)
    return parts


def _write_shard(path: Path, result: dict, skipped: list[tuple[int, str]]) -> None:
    arrays = {f"{layer}/{key}": value for layer, fields in result.items() for key, value in fields.items()}
    arrays["skipped_rows"] = np.array([row for row, _ in skipped], dtype=np.int64)
    arrays["skipped_reasons"] = np.array([reason for _, reason in skipped], dtype=str)
    for row, reason in skipped:
        log.warning("skipped image %d: %s", row, reason)
    # the temporary name is outside merge_parts' "batch-*.npz" and unique to this process, so a killed writer's
    # leftover is never merged and two workers that happen to run the same batch do not clash
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a shard is either complete or absent


def collected(out: Path, meta: dict) -> bool:
    """Whether `out` is a finished collection with these settings (`collection_settings`)."""
    if not out.exists():
        return False
    try:
        with h5py.File(out, "r") as f:
            return settings_match(f, meta, COLLECT_SETTINGS)
    except OSError:
        return False


def merge_parts(
    parts: Path,
    out: Path,
    records: list[ImageRecord],
    meta: dict,
    layer_shapes: dict[str, tuple[int, int, int]],
    class_names: list[str],
) -> None:
    """Join the batch shards in row order into the store (streamed: one shard in memory at a time)."""
    shards = sorted(parts.glob("batch-*.npz"))
    tmp = out.with_name(out.name + ".tmp")
    skipped: list[str] = []
    with h5py.File(tmp, "w") as f:
        recorded = ("model", "weights", "input_size", "resize_size", "seed", "dataset", "positions")
        f.attrs.update({k: meta[k] for k in (*recorded, "memory_format", "precision")})
        f.create_dataset(CLASSES, data=np.array(class_names, dtype=object), dtype=STR)
        f.attrs["code_version"] = __version__
        record_settings(f, meta, COLLECT_SETTINGS)
        images = f.create_group("images")
        images.create_dataset("path", data=np.array([r.path for r in records], dtype=object), dtype=STR)
        images.create_dataset("label", data=np.array([r.label for r in records], dtype=np.int64))
        datasets: dict[str, dict[str, h5py.Dataset]] = {}
        for layer, (channels, height, width) in layer_shapes.items():
            group = f.create_group(layer)
            group.attrs.update(channels=channels, height=height, width=width)
            record_lineage(group, meta, "")
            datasets[layer] = {}
        for shard in progress_of(shards, desc="merge", unit="batch"):
            with np.load(shard) as data:
                skipped += [
                    f"{records[r].path}: {why}"
                    for r, why in zip(data["skipped_rows"], data["skipped_reasons"], strict=True)
                ]
                for layer in layer_shapes:
                    for key in COLLECTED:
                        name = f"{layer}/{key}"
                        if name in data:
                            _append(f[layer], datasets[layer], key, data[name])
        for layer, (channels, _h, _w) in layer_shapes.items():
            for key, tail, dtype in (
                (ACTIVATIONS, (channels,), np.float32),
                (IMAGE_INDEX, (), np.int64),
                (POSITION, (2,), np.int32),
                (ATTRIBUTIONS, (meta["classes"],), np.float32),
            ):
                if key not in datasets[layer]:  # every image was skipped
                    _append(f[layer], datasets[layer], key, np.zeros((0, *tail), dtype=dtype))
        images.create_dataset("skipped", data=np.array(skipped, dtype=object), dtype=STR)
    shutil.rmtree(parts)
    if len(skipped) == len(records):  # an empty store is no result: say why instead
        tmp.unlink()
        raise AtlasError(f"none of the {len(records)} images could be read (the first: {skipped[0]})")
    os.replace(tmp, out)
    if skipped:
        log.warning(
            "%d of %d images could not be read and were skipped (listed in /images/skipped)", len(skipped), len(records)
        )


def _append(group: h5py.Group, made: dict[str, h5py.Dataset], key: str, rows: np.ndarray) -> None:
    if key not in made:
        made[key] = group.create_dataset(
            key,
            shape=(0, *rows.shape[1:]),
            maxshape=(None, *rows.shape[1:]),
            dtype=rows.dtype,
            chunks=(ROW_CHUNK, *rows.shape[1:]),
        )
    dset = made[key]
    start = dset.shape[0]
    dset.resize(start + len(rows), axis=0)
    dset[start:] = rows
