"""A grid cell's dataset examples: the samples nearest its mean, and the regions of their photos around them.

`compose` shows them beside each cell, `render` can start icons from them (feature accentuation), and the
quality benchmark judges icons against them. A patch is cut from the photo as the model saw it (resized,
centre-cropped), `patch_box` cells wide around the sample's activation position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import h5py
import numpy as np
from PIL import Image

from atlas.images import UNREADABLE, load_rgb, to_model_input
from atlas.store import IMAGE_INDEX, POSITION, Layer, iter_rows

log = logging.getLogger(__name__)

GREY = 128  # the patch of a photo that can no longer be read


def pick_examples(
    activations: h5py.Dataset, cell: np.ndarray, mean: np.ndarray, per_cell: int, image: np.ndarray
) -> np.ndarray:
    """Per cell, the `per_cell` samples whose activation is closest (cosine) to the cell's mean, at most one per
    photo (`image`: each sample's image index): a cell's neighbouring positions of one photo look alike.
    [cells, per_cell] sample indices, -1 where a cell has fewer photos."""
    mean = mean.reshape(-1, mean.shape[-1])
    if per_cell == 0:
        return np.zeros((len(mean), 0), np.int64)
    mean_unit = mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    score = np.empty(len(cell), np.float32)
    for start, rows in iter_rows(activations, chunk=16384):
        rows = rows.astype(np.float32)
        cells = cell[start : start + len(rows)]
        norm = np.maximum(np.linalg.norm(rows, axis=1), 1e-12)
        score[start : start + len(rows)] = np.einsum("nc,nc->n", rows, mean_unit[cells]) / norm
    order = np.lexsort((-score, cell))  # by cell, best first within a cell
    _, first = np.unique(cell[order] * (int(image.max(initial=0)) + 1) + image[order], return_index=True)
    best_of_photo = np.zeros(len(order), bool)
    best_of_photo[first] = True  # the first (best) sample of each photo in each cell
    order = order[best_of_photo]
    sorted_cells = cell[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_cells, sorted_cells)
    keep = rank < per_cell
    picked = np.full((len(mean), per_cell), -1, np.int64)
    picked[sorted_cells[keep], rank[keep]] = order[keep]
    return picked


def patch_box(y: int, x: int, height: int, width: int, size: int, context: float = 3.0) -> tuple[int, int, int, int]:
    """Square (left, top, right, bottom) in the model's input around activation position (y, x), `context` cells
    wide, moved inside the image."""
    side = min(size, round(context * size / min(height, width)))
    centre_y, centre_x = (y + 0.5) * size / height, (x + 0.5) * size / width
    top = int(np.clip(round(centre_y - side / 2), 0, size - side))
    left = int(np.clip(round(centre_x - side / 2), 0, size - side))
    return left, top, left + side, top + side


def view_sizes(store: h5py.File) -> tuple[int, int]:
    """(input_size, resize_size) with which the store's photos were shown to the model (collect records them)."""
    input_size = int(store.attrs["input_size"])
    resize_size = store.attrs["resize_size"] if "resize_size" in store.attrs else round(input_size * 256 / 224)
    return input_size, int(resize_size)


def model_view(path: str, input_size: int, resize_size: int) -> Image.Image:
    """The photo at `path` as the model saw it (resized to `resize_size`, centre-cropped to `input_size`)."""
    picture = to_model_input(load_rgb(path, min_side=resize_size), resize_size, input_size)
    return Image.fromarray((picture.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def example_crops(store: h5py.File, layer: str, samples: Sequence[int], size: int) -> np.ndarray:
    """uint8 [len(samples), size, size, 3]: each sample's patch (`patch_box`), resized to `size` px.

    Each photo is decoded once. A photo that cannot be read gives a grey patch, and a warning.
    """
    view = Layer(store, layer, needs=(IMAGE_INDEX, POSITION))
    image_index, position = view[IMAGE_INDEX], view[POSITION]
    shape = (int(view.group.attrs["height"]), int(view.group.attrs["width"]))
    input_size, resize_size = view_sizes(store)
    paths = store["images/path"].asstr()
    crops = np.full((len(samples), size, size, 3), GREY, np.uint8)
    by_image: dict[int, list[int]] = {}
    for row, sample in enumerate(samples):
        by_image.setdefault(int(image_index[sample]), []).append(row)
    unreadable = 0
    for image, rows in by_image.items():
        try:
            picture = model_view(paths[image], input_size, resize_size)
        except UNREADABLE:
            unreadable += 1
            continue
        for row in rows:
            y, x = position[samples[row]]
            box = patch_box(y, x, *shape, input_size)
            crops[row] = np.asarray(picture.crop(box).resize((size, size), Image.Resampling.BILINEAR))
    if unreadable:
        log.warning("%d of %d photos could not be read; their patches are grey", unreadable, len(by_image))
    return crops
