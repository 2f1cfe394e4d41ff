"""Stage 3, `atlas grid`: bin the layout into G x G cells and average activations and attributions per cell.

One streamed pass over `/<layer>/activations` and `/<layer>/attributions` (row blocks, so memory holds
one block plus the per-cell sums, never N x C) fills every grid size at once and the covariance for the
whitening matrix. Each block is scattered into per-cell sums with one `index_add_` (float32 within a block,
float64 across blocks); there is no loop over cells. A size that divides a larger one (20, 40, 80 of 160)
takes block sums of the larger grid's cells instead of its own pass: the cells nest exactly.

Cells: x = layout[:, 0], y = layout[:, 1], column floor(x G), row floor(y G), points at exactly 1.0 go in
the last column/row, cell id y * G + x. A cell is empty when count < min_count; the default 6 is the lucid
recipe's rule (a cell is kept when count > 5).

Whitening: S = (Sigma + r I)^-1 with Sigma the centred covariance and r = ridge x the mean channel variance,
estimated from at most `whitening_rows` evenly strided samples. Lucid inverts the uncentred second moment
with no ridge, which blows up on near-dead ReLU channels. The renderer turns a target direction v into S v.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from atlas import AtlasError
from atlas.config import Settings, check_number
from atlas.stages import Context
from atlas.store import (
    ACTIVATIONS,
    ATTRIBUTION,
    ATTRIBUTIONS,
    CELL,
    COUNT,
    GRIDDED,
    GRIDS,
    LAYOUT,
    MEAN,
    TOP_ATTRIBUTIONS,
    TOP_CLASSES,
    WHITENING,
    Layer,
    Node,
    iter_rows,
    made,
    opened,
    record_lineage,
    replace_dataset,
)

log = logging.getLogger(__name__)

DEFAULT_SIZES = (20, 40, 80)  # the paper's zoom levels; production adds 160 (and 320 for mixed5a/5b)
DEFAULT_MIN_COUNT = 6  # lucid recipe: a cell is kept when count > 5
TOP_COUNT = 5  # classes kept per cell, best first (the viewer lists five)
RIDGE = 0.01  # fraction of the mean channel variance added to the covariance's diagonal
WHITENING_ROWS = 262_144  # a covariance of C <= 1024 channels is settled long before this many samples
CHUNK_ROWS = 65536  # rows per streamed block


@dataclass(frozen=True)
class GridSettings(Settings):
    """A run's grid settings (a config's `grid:`), validated once; `grid_store` takes them as keywords.

    sizes and min_count: the constants above (the paper, lucid); ridge, whitening_rows, chunk_rows: the module
    docstring. `whitening=False` keeps the store's whitening matrix (a class atlas's subset store).
    """

    sizes: tuple[int, ...] = DEFAULT_SIZES
    min_count: int = DEFAULT_MIN_COUNT
    ridge: float = RIDGE
    whitening_rows: int | None = WHITENING_ROWS
    chunk_rows: int = CHUNK_ROWS
    whitening: bool = True

    section = "grid"
    bounds = {"ridge": (0.0, None), "whitening_rows": (1, None), "chunk_rows": (1, None)}

    def validate(self) -> None:
        """Raise AtlasError, naming the value and its range, on grid sizes that cannot work."""
        object.__setattr__(self, "sizes", tuple(_check_sizes(self.sizes, self.min_count)))


def cell_ids(layout: np.ndarray, size: int) -> np.ndarray:
    """Row-major cell y * size + x of every [x, y] point of a layout in [0, 1] (1.0 goes to the last cell)."""
    scaled = np.floor(np.asarray(layout, dtype=np.float64) * size).astype(np.int64)  # exact for float32 layouts
    np.clip(scaled, 0, size - 1, out=scaled)
    return (scaled[:, 1] * size + scaled[:, 0]).astype(np.int32)


class CovarianceSums:
    """Streamed sums for a covariance, of every `stride`-th row in file order.

    Rows are shifted by the first block's mean against cancellation; the sums are float64 across blocks.
    """

    def __init__(self, channels: int, stride: int = 1):
        self.stride = stride
        self.second_moment, self.total, self.samples = np.zeros((channels, channels)), np.zeros(channels), 0
        self.shift: np.ndarray | None = None

    def add(self, rows: np.ndarray, start: int) -> None:
        """Add a block of rows that starts at row `start` of the dataset."""
        if self.shift is None:
            self.shift = rows.mean(axis=0)
        sample = torch.from_numpy(rows[(-start) % self.stride :: self.stride] - self.shift)
        self.second_moment += (sample.T @ sample).numpy()
        self.total += sample.sum(dim=0).numpy()
        self.samples += len(sample)

    def whitening(self, ridge: float = RIDGE) -> np.ndarray:
        """S = (Sigma + r I)^-1, r = ridge x the mean channel variance (module docstring)."""
        mean = self.total / self.samples
        covariance = (self.second_moment - self.samples * np.outer(mean, mean)) / max(self.samples - 1, 1)
        eigenvalues, eigenvectors = np.linalg.eigh((covariance + covariance.T) / 2)
        floor = ridge * max(float(np.trace(covariance)) / len(covariance), 0.0)
        if floor <= 0:
            raise AtlasError(
                "activations have no variance: cannot whiten (is the layer dead, or are all samples equal?)"
            )
        inverse = (eigenvectors / (np.clip(eigenvalues, 0.0, None) + floor)) @ eigenvectors.T
        return inverse.astype(np.float32)


def _stride(n: int, whitening_rows: int | None) -> int:
    return 1 if not whitening_rows else math.ceil(n / whitening_rows)


def top_classes(attribution: np.ndarray, top: int = TOP_COUNT) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the `top` largest entries of each row, largest first."""
    top = min(top, attribution.shape[1])
    chosen = np.argpartition(-attribution, top - 1, axis=1)[:, :top]
    values = np.take_along_axis(attribution, chosen, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(chosen, order, axis=1), np.take_along_axis(values, order, axis=1)


def _add_rows(sums: np.ndarray, cell: np.ndarray, rows: np.ndarray, scratch: torch.Tensor) -> None:
    """sums[cell[i]] += rows[i] for every row of a block: summed in float32 within the block, float64 across.

    `scratch` is a float32 array of the sums' shape: scattering into it and adding it whole is far faster
    than adding into only the occupied cells with fancy indexing.
    """
    scratch.zero_()
    scratch.index_add_(0, torch.from_numpy(cell), torch.from_numpy(rows))
    np.add(sums, scratch.numpy(), out=sums)


def _coarsen(sums: np.ndarray, fine: int, coarse: int) -> np.ndarray:
    """Per-cell sums of a coarse grid from those of a fine one whose size is a multiple of it.

    Cells nest exactly: floor(x fine) // m == floor(x coarse) for m = fine / coarse, and x fine is exact in
    float64 for a float32 x, so these are the sums of the very samples that `cell_ids(layout, coarse)` puts there.
    """
    m = fine // coarse
    return sums.reshape(coarse, m, coarse, m, -1).sum(axis=(1, 3)).reshape(coarse * coarse, -1)


def _first_non_finite(dataset: h5py.Dataset) -> str:
    for start, rows in iter_rows(dataset):
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            return f"{dataset.name} contains NaN or infinite values (first in sample {start + np.argmin(finite)})"
    return f"{dataset.name} has values too large to sum in float32"


def _check_sizes(sizes: Iterable[int], min_count: int) -> list[int]:
    sizes = sorted({int(check_number("grid: sizes", size, 1)) for size in sizes})
    if not sizes:
        raise AtlasError("no grid sizes given")
    check_number("grid: min_count", min_count, 1)
    return sizes


def check_room(sizes: list[int], samples: int, channels: int, classes: int) -> None:
    """A one-line AtlasError, with the estimate, for a grid whose sums (float64) and means (float32) of activations
    and attributions would take more than half this machine's memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_cell = (channels + classes) * 12
    largest = math.isqrt(int(memory / 2 / per_cell))
    for size in sizes:
        if size > largest:
            raise AtlasError(
                f"grid size {size} is too large: {size * size:,} cells (for {samples:,} samples) need about "
                f"{size * size * per_cell / 2**30:,.0f} GiB of sums and means, and this machine has "
                f"{memory / 2**30:.0f} GiB; grid sizes from 1 to {largest:,}"
            )


def _read_layout(layer: Layer) -> np.ndarray:
    layout = layer.read(LAYOUT)
    if layout.shape[1:] != (2,):
        raise AtlasError(f"{layer.group.name}/layout has shape {layout.shape}, not [N, 2]: rerun `atlas project`")
    if not (np.isfinite(layout).all() and layout.min() >= 0.0 and layout.max() <= 1.0):
        raise AtlasError(f"{layer.group.name}/layout is not within [0, 1]: rerun `atlas project`")
    return layout


def _stream_sums(
    layer: Layer, cells: dict[int, np.ndarray], covariance: CovarianceSums | None, chunk_rows: int
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """One pass over the rows: per-cell sums of activations and attributions for each grid in `cells`, and
    the covariance sums when asked.

    Non-finite input is not checked row by row: it makes its cell's sum non-finite, which `grid_store` checks.
    """
    activations, attributions = layer[ACTIVATIONS], layer[ATTRIBUTIONS]
    n, channels = activations.shape
    classes = attributions.shape[1]
    activation_sums = {size: np.zeros((size * size, channels)) for size in cells}
    attribution_sums = {size: np.zeros((size * size, classes)) for size in cells}
    # buffers reused for every block: fresh pages for each block cost more than the sums
    block_rows = min(chunk_rows, n)
    rows, attribution_rows = np.empty((block_rows, channels), np.float32), np.empty((block_rows, classes), np.float32)
    scratch = {size: torch.empty(sums.shape) for size, sums in activation_sums.items()}  # float32
    attribution_scratch = {size: torch.empty(sums.shape) for size, sums in attribution_sums.items()}
    for start in range(0, n, chunk_rows):
        count = min(chunk_rows, n - start)
        activations.read_direct(rows, np.s_[start : start + count], np.s_[:count])
        attributions.read_direct(attribution_rows, np.s_[start : start + count], np.s_[:count])
        for size, cell in cells.items():
            block_cells = cell[start : start + count]
            _add_rows(activation_sums[size], block_cells, rows[:count], scratch[size])
            _add_rows(attribution_sums[size], block_cells, attribution_rows[:count], attribution_scratch[size])
        if covariance is not None:
            covariance.add(rows[:count], start)
    return activation_sums, attribution_sums


def _grid_arrays(
    cell: np.ndarray, activation_sum: np.ndarray, attribution_sum: np.ndarray, size: int, min_count: int
) -> dict[str, np.ndarray]:
    """The datasets of one `/<layer>/grid/<G>` group (schema: atlas.store)."""
    count = np.bincount(cell, minlength=size * size)
    kept = (count >= min_count)[:, None]
    divisor = np.maximum(count, 1)[:, None]
    mean = np.where(kept, activation_sum / divisor, 0.0).astype(np.float32)
    attribution = np.where(kept, attribution_sum / divisor, 0.0).astype(np.float32)
    classes, values = top_classes(attribution)
    return {
        CELL: cell,
        COUNT: count.reshape(size, size),
        MEAN: mean.reshape(size, size, -1),
        ATTRIBUTION: attribution.reshape(size, size, -1),
        TOP_CLASSES: np.where(kept, classes, -1).reshape(size, size, -1),
        TOP_ATTRIBUTIONS: np.where(kept, values, np.nan).astype(np.float32).reshape(size, size, -1),
    }


def layer_whitening(
    group: h5py.Group, ridge: float = RIDGE, whitening_rows: int | None = WHITENING_ROWS, chunk_rows: int = CHUNK_ROWS
) -> tuple[np.ndarray, int]:
    """(S, samples used) of a layer, computed as `grid_store` does but without a layout or grids."""
    activations = group[ACTIVATIONS]
    covariance = CovarianceSums(activations.shape[1], _stride(activations.shape[0], whitening_rows))
    for start, rows in iter_rows(activations, chunk_rows):
        covariance.add(rows, start)
    if not np.isfinite(covariance.total).all():
        raise AtlasError(_first_non_finite(activations))
    return covariance.whitening(ridge), covariance.samples


def grid_store(
    path: str | Path | h5py.File,
    layer: str | None = None,
    sizes: Iterable[int] = DEFAULT_SIZES,
    min_count: int = DEFAULT_MIN_COUNT,
    ridge: float = RIDGE,
    whitening_rows: int | None = WHITENING_ROWS,
    chunk_rows: int = CHUNK_ROWS,
    whitening: bool = True,
) -> dict[int, np.ndarray]:
    """Grid a layer at every size and write `/<layer>/grid/<G>/...` and `/<layer>/whitening` (schema: atlas.store).

    `whitening_rows` caps the samples (evenly strided) that go into the covariance; None uses all.
    `whitening=False` leaves `/<layer>/whitening` as it is: a class atlas's subset store holds the whole layer's
    (the paper renders class-atlas icons with S of all samples, reference 1.7).
    Everything is read and checked before the store is written; a failure leaves it as it was.
    Returns the [G, G] counts per size.
    """
    sizes = _check_sizes(sizes, min_count)
    started = time.perf_counter()
    with opened(path) as store:
        view = Layer(store, layer, needs=(ACTIVATIONS, ATTRIBUTIONS, LAYOUT))
        layer, n = view.name, view.rows
        if n < 2:
            raise AtlasError(f"{view.group.name} has {n} samples: too few to grid")
        check_room(sizes, n, view.channels, view.classes)
        cells = {size: cell_ids(_read_layout(view), size) for size in sizes}
        layout_made = made(view[LAYOUT])
        # sums are made for the sizes that no larger size is a multiple of; the others are block sums of those
        source = {size: max(other for other in sizes if other % size == 0) for size in sizes}
        covariance = CovarianceSums(view.channels, _stride(n, whitening_rows)) if whitening else None
        activation_sums, attribution_sums = _stream_sums(
            view, {size: cells[size] for size in set(source.values())}, covariance, chunk_rows
        )
        for sums, dataset in ((activation_sums, view[ACTIVATIONS]), (attribution_sums, view[ATTRIBUTIONS])):
            if not all(np.isfinite(block).all() for block in sums.values()):
                raise AtlasError(_first_non_finite(dataset))
    grids = {
        size: _grid_arrays(
            cells[size],
            _coarsen(activation_sums[source[size]], source[size], size),
            _coarsen(attribution_sums[source[size]], source[size], size),
            size,
            min_count,
        )
        for size in sizes
    }
    whitened = None if covariance is None else (covariance.whitening(ridge), covariance.samples)
    settings = GridSettings(tuple(sizes), min_count, ridge, whitening_rows, chunk_rows, whitening)
    _write_grids(path, layer, grids, (settings, layout_made), whitened)
    for size, arrays in grids.items():
        filled = int((arrays[COUNT] >= min_count).sum())
        log.info("grid %d: %d of %d cells hold >= %d samples", size, filled, size * size, min_count)
    log.info("gridded %d samples of %s at sizes %s in %.1f s", n, layer, sizes, time.perf_counter() - started)
    return {size: arrays[COUNT] for size, arrays in grids.items()}


def _write_grids(
    path: str | Path | h5py.File,
    layer: str,
    grids: dict[int, dict[str, np.ndarray]],
    lineage: tuple[GridSettings, str],
    whitened: tuple[np.ndarray, int] | None,
) -> None:
    """Write each grid's arrays (replacing the old grid and its icons) and, when given, the whitening matrix; each
    grid records its settings and the layout it was made from (`lineage`)."""
    settings, layout_made = lineage
    with opened(path, "r+") as store:
        group = store[layer]
        if whitened is not None:
            matrix, samples = whitened
            replace_dataset(group, WHITENING, matrix, ridge=settings.ridge, samples=samples, centred=True)
        for size, arrays in grids.items():
            key = f"{GRIDS}/{size}"
            if key in group:
                del group[key]  # its icons belong to the old means
            grid = group.create_group(key)
            grid.attrs.update(min_count=settings.min_count)
            record_lineage(grid, settings, layout_made)
            for name, data in arrays.items():
                replace_dataset(grid, name, data)


class GridStage:
    """The stage (atlas.stages.Stage): a layer's grid of every size, from its layout as it is."""

    name, settings, whole_run = "grid", GridSettings, False

    def products(self, ctx: Context, layer: str | None, settings: GridSettings) -> list[tuple[Node | None, str]]:
        group = ctx.store[layer]
        layout = made(group.get(LAYOUT))
        return [(group.get(f"{GRIDS}/{size}"), layout) for size in settings.sizes]

    def record(self, ctx: Context, layer: str | None, settings: GridSettings) -> GridSettings:
        return settings

    def complete(self, ctx: Context, layer: str | None, node: h5py.Group) -> bool:
        rows = ctx.store[layer][ACTIVATIONS].shape[0]
        return all(name in node for name in GRIDDED) and len(node[CELL]) == rows

    def run(self, ctx: Context, layer: str | None, settings: GridSettings) -> None:
        grid_store(ctx.store, layer=layer, **dataclasses.asdict(settings))


GRID = GridStage()
