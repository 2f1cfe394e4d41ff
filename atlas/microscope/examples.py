"""Dataset examples: the top-k images of every unit, found in one streaming pass with a running top-k."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from atlas import AtlasError
from atlas.images import ImageRecord, images_identity, load_batches
from atlas.microscope.results import lens_group
from atlas.models.classifier import Classifier
from atlas.optvis import forward, layer_map, model_device
from atlas.store import STR

log = logging.getLogger(__name__)

TOP_K = 8  # dataset examples per unit: one row on a unit page
BORDER = 1  # map rows and columns at the edge that dataset examples leave out, as `collect` does


@dataclass
class TopK:
    """A running top-k per unit, best first: value [C, k], row [C, k] in the image list, position [C, k, 2]."""

    value: np.ndarray
    row: np.ndarray
    position: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> TopK:
        return cls(
            np.zeros((channels, 0), np.float32), np.zeros((channels, 0), np.int64), np.zeros((channels, 0, 2), np.int32)
        )

    def padded(self, k: int) -> TopK:
        """Exactly k columns: NaN values and -1 rows and positions where fewer images were seen."""
        missing = k - self.value.shape[1]
        return TopK(
            np.pad(self.value, ((0, 0), (0, missing)), constant_values=np.nan).astype(np.float32),
            np.pad(self.row, ((0, 0), (0, missing)), constant_values=-1).astype(np.int64),
            np.pad(self.position, ((0, 0), (0, missing), (0, 0)), constant_values=-1).astype(np.int32),
        )


def unit_maxima(acts: torch.Tensor, border: int = BORDER) -> tuple[np.ndarray, np.ndarray]:
    """[B, C, H, W] -> each unit's maximum over positions [B, C] and where it is, (y, x) [B, C, 2].

    Positions within `border` of the edge are left out, as `collect` leaves them out: there the
    convolutions' zero padding, not the image, makes many maxima. Maps too small to have an interior
    use every position. The first maximum in row-major order wins a tie.
    """
    height, width = acts.shape[-2:]
    if min(height, width) <= 2 * border:
        border = 0
    inside = acts[..., border : height - border, border : width - border]
    flat = inside.flatten(2).float()
    index = flat.argmax(2)
    value = flat.gather(2, index[..., None])[..., 0]
    inner_width = inside.shape[-1]
    position = torch.stack([index // inner_width, index % inner_width], -1) + border
    return value.cpu().numpy(), position.cpu().numpy().astype(np.int32)


def merge_top_k(best: TopK, value: np.ndarray, rows: np.ndarray, position: np.ndarray, k: int) -> TopK:
    """Add one batch (value [B, C], rows [B], position [B, C, 2]) to a running top-k.

    Batches come in row order and the sort is stable, so ties keep the earlier image, as a sort of the
    whole dataset would.
    """
    channels = value.shape[1]
    values = np.concatenate([best.value, value.T], 1)
    all_rows = np.concatenate([best.row, np.broadcast_to(np.asarray(rows, np.int64), (channels, len(rows)))], 1)
    positions = np.concatenate([best.position, position.transpose(1, 0, 2)], 1)
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return TopK(
        np.take_along_axis(values, order, 1),
        np.take_along_axis(all_rows, order, 1),
        np.take_along_axis(positions, order[..., None], 1),
    )


def top_activating(
    model: Classifier,
    layers: Sequence[str],
    records: list[ImageRecord],
    *,
    top_k: int = TOP_K,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool | None = None,
) -> dict[str, TopK]:
    """The top-k images of every unit of each of `layers` by its maximum over interior positions, in one streaming
    pass over the images for all the layers.

    Images are read as `collect` reads them (resize, centre crop); unreadable ones are skipped. Returns
    exactly k columns per layer (padded as in `TopK.padded`).
    """
    device = model_device(model)
    batches = [list(range(i, min(i + batch_size, len(records)))) for i in range(0, len(records), batch_size)]
    best: dict[str, TopK] = {}
    skipped = 0
    sides = (model.resize_size, model.input_size)
    for rows, images, unreadable in load_batches(records, *sides, batches, workers, progress=progress, desc="examples"):
        for row, reason in unreadable:
            log.warning("skipped image %s: %s", records[row].path, reason)
        skipped += len(unreadable)
        if not rows:
            continue
        assert images is not None  # the batch of the readable rows
        with torch.no_grad():
            acts = forward(model, images.to(device), list(layers))
        for layer in layers:
            value, position = unit_maxima(acts[layer])
            running = best.get(layer) or TopK.empty(value.shape[1])
            best[layer] = merge_top_k(running, value, np.asarray(rows), position, top_k)
    if not best:
        raise AtlasError(f"none of the {len(records)} images could be read")
    if skipped:
        log.warning("%d of %d images could not be read and were skipped", skipped, len(records))
    return {layer: found.padded(top_k) for layer, found in best.items()}


def dataset_examples(
    results: h5py.File,
    model: Classifier,
    layers: Sequence[str],
    records: list[ImageRecord],
    *,
    top_k: int,
    batch_size: int = 32,
    workers: int | None = None,
) -> list[str]:
    """Store the top-k examples of every unit of each of `layers` not stored yet, in one pass over the images;
    returns the layers it scanned (none when all were stored)."""
    paths = [r.path for r in records]
    common = {
        "model": model.name,
        "weights": model.weights,
        "top_k": top_k,
        "border": BORDER,
        "input_size": model.input_size,
        "resize_size": model.resize_size,
        "images": len(paths),
        "images_sha1": images_identity(paths),
    }
    groups = {layer: lens_group(results, model.name, layer, "examples", {**common, "layer": layer}) for layer in layers}
    missing = [layer for layer, group in groups.items() if "value" not in group]
    if not missing:
        log.info("dataset examples of these %d images are stored already", len(paths))
        return []
    log.info("%s: top %d images of every unit over %d images", ", ".join(missing), top_k, len(paths))
    found = top_activating(model, missing, records, top_k=top_k, batch_size=batch_size, workers=workers)
    for layer in missing:
        group, best = groups[layer], found[layer]
        group.attrs["map_size"] = layer_map(model, layer, model.input_size)[1:]  # where the positions lie
        group.create_dataset("paths", data=np.array(paths, dtype=object), dtype=STR)
        group.create_dataset("row", data=best.row)
        group.create_dataset("position", data=best.position)
        group.create_dataset("value", data=best.value)  # last: its presence marks the group complete
    results.flush()
    return missing
