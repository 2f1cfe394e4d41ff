"""The batch shards of a collection (atlas.stages.collect): `<out>.parts/` holds one .npz per finished batch, written
atomically, and `merge_parts` joins them in row order into the store, so a killed run resumes from its finished
batches and the merged store has exactly the rows of an uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from atlas import AtlasError, __version__
from atlas.images import ImageRecord
from atlas.progress import progress as progress_of
from atlas.store import (
    ACTIVATIONS,
    ATTRIBUTIONS,
    BASELINE,
    CLASSES,
    COLLECT_SETTINGS,
    COLLECTED,
    IMAGE_INDEX,
    IMAGES,
    PARTIAL,
    POSITION,
    ROW_CHUNK,
    SKIPPED,
    STR,
    fingerprint,
    record_lineage,
    record_settings,
    settings_json,
)

log = logging.getLogger("atlas.stages.collect")

BASELINES_FILE = "baselines.npz"  # in a collection's parts folder: each new layer's baseline (`baselines_of`)


def layer_record(meta: dict, layer: str) -> dict:
    """What a collected layer's group records as its settings (atlas.store lineage): the collection's and its name."""
    return {**meta, "layer": layer}


def missing_batches(parts: Path, batches: list[list[int]]) -> list[list[int]]:
    """The batches that have no finished shard in `parts`."""
    return [b for b in batches if not (parts / shard_name(b[0])).exists()]


def shard_name(first_row: int) -> str:
    return f"batch-{first_row:09d}.npz"


def parts_dir(out: Path, meta: dict) -> Path:
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


def write_shard(path: Path, result: dict, skipped: list[tuple[int, str]]) -> None:
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


def merge_parts(
    parts: Path,
    out: Path,
    records: list[ImageRecord],
    meta: dict,
    layer_shapes: dict[str, tuple[int, int, int]],
    class_names: list[str],
) -> None:
    """Join the batch shards in row order into the store (streamed: one shard in memory at a time).

    A new store is written whole under a temporary name; a store that holds other layers of these images gets the
    new layers' groups, each written under a temporary name and moved into place when complete.
    """
    shards = sorted(parts.glob("batch-*.npz"))
    adding = out.exists()
    target = out if adding else out.with_name(out.name + ".tmp")
    with h5py.File(target, "a" if adding else "w") as f:
        if not adding:
            recorded = ("model", "weights", "input_size", "resize_size", "seed", "dataset", "positions", "attribution")
            f.attrs.update({k: meta[k] for k in (*recorded, "memory_format", "precision")})
            f.create_dataset(CLASSES, data=np.array(class_names, dtype=object), dtype=STR)
            f.attrs["code_version"] = __version__
            record_settings(f, meta, COLLECT_SETTINGS)
            images = f.create_group(IMAGES)
            images.create_dataset("path", data=np.array([r.path for r in records], dtype=object), dtype=STR)
            images.create_dataset("label", data=np.array([r.label for r in records], dtype=np.int64))
        if PARTIAL in f:  # a merge killed before it finished
            del f[PARTIAL]
        skipped = _merge_shards(f.create_group(PARTIAL), shards, parts / BASELINES_FILE, records, meta, layer_shapes)
        if not adding:
            f[IMAGES].create_dataset(SKIPPED, data=np.array(skipped, dtype=object), dtype=STR)
        elif skipped != f[IMAGES][SKIPPED].asstr()[()].tolist():
            raise AtlasError(
                f"the images of {out} changed since it was collected (other images could not be read): its layers "
                f"would no longer share samples; collect again into a new store (--force collect)"
            )
        for layer in layer_shapes:
            f.move(f"{PARTIAL}/{layer}", layer)
        del f[PARTIAL]
    shutil.rmtree(parts)
    if not adding and len(skipped) == len(records):  # an empty store is no result: say why instead
        target.unlink()
        raise AtlasError(f"none of the {len(records)} images could be read (the first: {skipped[0]})")
    if not adding:
        os.replace(target, out)
    if skipped:
        log.warning(
            "%d of %d images could not be read and were skipped (listed in /images/skipped)", len(skipped), len(records)
        )


def _merge_shards(
    into: h5py.Group,
    shards: list[Path],
    baselines: Path,
    records: list[ImageRecord],
    meta: dict,
    layer_shapes: dict[str, tuple[int, int, int]],
) -> list[str]:
    """Append the shards' rows of each layer to its group in `into`, with its baseline where the collection has
    one (the file `baselines`); returns the skipped images' lines."""
    skipped: list[str] = []
    datasets: dict[str, dict[str, h5py.Dataset]] = {}
    kept = dict(np.load(baselines)) if baselines.exists() else {}
    for layer, (channels, height, width) in layer_shapes.items():
        group = into.create_group(layer)
        group.attrs.update(channels=channels, height=height, width=width)
        record_lineage(group, layer_record(meta, layer), "")
        datasets[layer] = {}
        if kept:
            group.create_dataset(BASELINE, data=kept[layer].astype(np.float32))
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
                        _append(into[layer], datasets[layer], key, data[name])
    for layer, (channels, _h, _w) in layer_shapes.items():
        for key, tail, dtype in (
            (ACTIVATIONS, (channels,), np.float32),
            (IMAGE_INDEX, (), np.int64),
            (POSITION, (2,), np.int32),
            (ATTRIBUTIONS, (meta["classes"],), np.float32),
        ):
            if key not in datasets[layer]:  # every image was skipped
                _append(into[layer], datasets[layer], key, np.zeros((0, *tail), dtype=dtype))
    return skipped


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
