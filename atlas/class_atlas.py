"""Class activation atlases and two-class comparisons (reference 1.7): sample filters, subset stores, layouts.

Filters read the stored attributions [N, K] in row blocks, so N x K never has to fit in memory:
- winner: the samples whose largest attribution is to the class (the article's "winner" filter);
- magnitude: the `top` samples with the largest attribution to the class, keeping only positive ones
  (lucid's `get_top_indices`).
Their union is de-duplicated (lucid concatenates the two and counts a sample twice).

A class atlas is a subset store: a new HDF5 file with the store schema (atlas.store) holding the chosen rows
of one layer, /images, the root attrs, `source_index` (the rows in the parent store) and the parent layer's
whitening matrix, since the paper renders class-atlas icons with S of all samples, not of the subset. The
layer atlas's stages (project, grid with `whitening=False`, render, compose) then run on it unchanged.

Two-class comparison (class a left, class b right): x = attr_b - attr_a divided by the 99th percentile of its
absolute value and clipped to [-1, 1], so 0 (no preference) stays in the middle, then mapped to [0, 1]; y = a
1-D t-SNE of the activations (cosine, perplexity 50), normalised. Its layout is written directly.

Heat-map view (reference 1.6, "map contribution to opacity"): a layer atlas redrawn with each cell's opacity
its mean attribution to a class over the largest such mean among well-populated cells.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from atlas import AtlasError
from atlas.config import Settings, check_number
from atlas.layout import LayoutSettings, embed
from atlas.stages.grid import layer_whitening
from atlas.stages.project import normalize_layout
from atlas.store import (
    ACTIVATIONS,
    ATTRIBUTIONS,
    CLASSES,
    COLLECTED,
    LAYOUT,
    WHITENING,
    Layer,
    iter_rows,
    made,
    open_store,
    record_lineage,
    replace_dataset,
)

log = logging.getLogger(__name__)


# filters ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectSettings(Settings):
    """Which samples a class atlas shows (a config's `class_atlas: select:`), `select_samples`' keywords: the paper's
    winner filter (the class is the sample's top attribution) and magnitude filter (the `top` largest attributions
    to it: 3000 for a class atlas, 2000 per class for a comparison; 0 turns it off)."""

    winner: bool = True
    top: int = 3000

    section = "select"
    bounds = {"top": (0, None)}

    def validate(self) -> None:
        if not self.winner and self.top == 0:
            raise AtlasError("select: choose the winner filter, the magnitude filter (top > 0) or both")


def select_samples(
    attributions: h5py.Dataset | np.ndarray,
    classes: Sequence[int],
    winner: bool = True,
    top: int = 3000,  # paper: 3000 for a class atlas, 2000 per class for a comparison
    chunk_rows: int = 65536,
) -> np.ndarray:
    """Sorted, distinct rows chosen by the winner and magnitude filters for any of `classes` (one streamed pass).

    top=0 turns the magnitude filter off; winner=False the winner filter.
    """
    n, k = attributions.shape
    classes = [int(c) for c in classes]
    if not classes or min(classes) < 0 or max(classes) >= k:
        raise AtlasError(f"classes {classes} are not all in 0..{k - 1}")
    if top < 0 or (not winner and top == 0):
        raise AtlasError(f"choose the winner filter, the magnitude filter (top > 0) or both; got top={top}")
    winners: list[np.ndarray] = []
    # per class, the best `top` (value, row) pairs seen so far
    best_values = [np.empty(0, np.float32) for _ in classes]
    best_rows = [np.empty(0, np.int64) for _ in classes]
    for start, rows in iter_rows(attributions, chunk_rows):
        if winner:
            winners.append(start + np.flatnonzero(np.isin(rows.argmax(axis=1), classes)))
        if top:
            for i, c in enumerate(classes):
                values = np.concatenate([best_values[i], rows[:, c]])
                index = np.concatenate([best_rows[i], start + np.arange(len(rows))])
                if len(values) > top:
                    keep = np.argpartition(-values, top - 1)[:top]
                    values, index = values[keep], index[keep]
                best_values[i], best_rows[i] = values, index
    magnitude = [rows[values > 0] for values, rows in zip(best_values, best_rows, strict=True)]
    chosen = np.unique(np.concatenate([np.empty(0, np.int64), *winners, *magnitude]))
    log.info(
        "classes %s: %d winner and %d magnitude samples, %d together",
        classes,
        sum(len(w) for w in winners),
        sum(len(m) for m in magnitude),
        len(chosen),
    )
    return chosen


def winner_counts(
    attributions: h5py.Dataset | np.ndarray, classes: Sequence[int], chunk_rows: int = 65536
) -> list[int]:
    """For each class, the samples whose largest attribution is to it (one streamed pass)."""
    counts = np.zeros(attributions.shape[1], np.int64)
    for _start, rows in iter_rows(attributions, chunk_rows):
        counts += np.bincount(rows.argmax(axis=1), minlength=len(counts))
    return [int(counts[c]) for c in classes]


# the subset store ---------------------------------------------------------------------------------------
def write_subset_store(
    parent: str | Path, out: str | Path, rows: np.ndarray, layer: str | None = None, **attrs: object
) -> Path:
    """Write the `rows` of a layer of the `parent` store (and its whole layer's whitening) as the store `out`.

    The whitening is the parent's `/<layer>/whitening` when it has one, else computed as `atlas grid` would.
    `attrs` are added to the new layer group's attrs (what the subset is). Written to a temporary file first.
    """
    out = Path(out)
    rows = np.asarray(rows, dtype=np.int64)
    with open_store(parent) as source:
        view = Layer(source, layer, needs=COLLECTED)
        group, layer, n = view.group, view.name, view.rows
        if len(rows) == 0:
            raise AtlasError(f"no samples of {group.name} were selected")
        if np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= n:
            raise AtlasError(f"subset rows must be increasing and within 0..{n - 1}")
        if WHITENING in group:
            whitening = group[WHITENING][()]
            whitening_attrs = dict(group[WHITENING].attrs)
        else:
            whitening, samples = layer_whitening(group)
            whitening_attrs = {"samples": samples, "centred": True}
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with h5py.File(temporary, "w") as subset:
            subset.attrs.update(source.attrs)
            subset.attrs["parent_store"] = str(Path(parent).resolve())
            source.copy(source["images"], subset, "images")
            if CLASSES in source:
                source.copy(source[CLASSES], subset, CLASSES)
            target = subset.create_group(layer)
            target.attrs.update(group.attrs)
            target.attrs.update(attrs)
            for name in COLLECTED:
                replace_dataset(target, name, _take_rows(group[name], rows))
            replace_dataset(target, "source_index", rows)
            replace_dataset(target, WHITENING, whitening, source="parent layer", **whitening_attrs)
    os.replace(temporary, out)
    log.info("wrote %d of %d samples of %s to %s", len(rows), n, layer, out)
    return out


def _take_rows(dataset: h5py.Dataset, rows: np.ndarray, chunk_rows: int = 65536) -> np.ndarray:
    """dataset[rows] for increasing `rows`, read block by block (HDF5 point selection is slow on big sets)."""
    taken = np.empty((len(rows), *dataset.shape[1:]), dataset.dtype)
    bounds = np.searchsorted(rows, np.arange(0, dataset.shape[0] + chunk_rows, chunk_rows))
    for block, (low, high) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if high > low:
            start = block * chunk_rows
            taken[low:high] = dataset[start : int(rows[high - 1]) + 1][rows[low:high] - start]
    return taken


# layouts ------------------------------------------------------------------------------------------------
def fit_perplexity(n_samples: int, perplexity: float) -> float:
    """`perplexity`, lowered to a third of the samples when there are few (t-SNE needs perplexity < N)."""
    return float(min(perplexity, max(1.0, (n_samples - 1) / 3)))


def comparison_x(
    attribution_a: np.ndarray,
    attribution_b: np.ndarray,
    percentile: float = 99.0,  # lucid's class notebook
) -> tuple[np.ndarray, float]:
    """(x in [0, 1], scale): (b - a) / scale clipped to [-1, 1], then mapped to [0, 1]; scale is the
    `percentile` of |b - a| (1 when that is 0). Class a is on the left, b on the right, 0.5 is no preference."""
    difference = np.asarray(attribution_b, np.float64) - np.asarray(attribution_a, np.float64)
    scale = float(np.percentile(np.abs(difference), percentile)) if len(difference) else 0.0
    scale = scale if scale > 0 else 1.0
    return ((np.clip(difference / scale, -1.0, 1.0) + 1.0) / 2.0).astype(np.float32), scale


@dataclass(frozen=True)
class ComparisonSettings(Settings):
    """A two-class comparison's layout (a config's `class_atlas: compare: layout:`), `comparison_layout_store`'s
    keywords: x is the attribution difference clipped at its `percentile`; y a 1-D t-SNE (lucid's class notebook:
    cosine, perplexity 50)."""

    percentile: float = 99.0
    metric: str = "cosine"
    perplexity: float = 50.0
    learning_rate: float | str = "auto"
    seed: int | None = 0

    section = "layout"
    bounds = {"percentile": (0.0, 100.0), "perplexity": (1.0, None), "seed": (0, None)}

    def validate(self) -> None:
        if self.learning_rate != "auto":
            check_number("learning_rate", self.learning_rate, 1e-6, kind=float)


def comparison_layout_store(
    path: str | Path,
    class_a: int,
    class_b: int,
    layer: str | None = None,
    percentile: float = 99.0,
    metric: str = "cosine",  # lucid's class notebook: 1-D t-SNE, cosine, perplexity 50
    perplexity: float = 50.0,
    learning_rate: float | str = "auto",
    seed: int | None = 0,
) -> np.ndarray:
    """Write `/<layer>/layout` of a subset store as the two-class comparison layout; returns it."""
    asked = ComparisonSettings(percentile, metric, perplexity, learning_rate, seed)
    with open_store(path) as store:
        view = Layer(store, layer, needs=(ACTIVATIONS, ATTRIBUTIONS))
        layer, classes = view.name, view.classes
        if not (0 <= class_a < classes and 0 <= class_b < classes) or class_a == class_b:
            raise AtlasError(f"a comparison needs two different classes in 0..{classes - 1}, not {class_a}, {class_b}")
        activations = view.read(ACTIVATIONS)
        attribution_a, attribution_b = view[ATTRIBUTIONS][:, class_a], view[ATTRIBUTIONS][:, class_b]
    if len(activations) < 3:
        raise AtlasError(f"{len(activations)} samples are too few to lay out a comparison")
    x, scale = comparison_x(attribution_a, attribution_b, percentile)
    perplexity = fit_perplexity(len(activations), perplexity)
    line = LayoutSettings(
        method="tsne", n_components=1, metric=metric, perplexity=perplexity, learning_rate=learning_rate, seed=seed
    )
    y = embed(activations, line)
    layout = np.stack([x, normalize_layout(y)[:, 0]], axis=1)
    with open_store(path, "r+") as store:
        written = replace_dataset(
            store[layer],
            LAYOUT,
            layout,
            method="comparison",
            classes=[class_a, class_b],
            scale=scale,
            percentile=percentile,
            y_method="tsne",
            metric=metric,
            perplexity=perplexity,
            learning_rate=learning_rate,
            seed="none" if seed is None else seed,
        )
        record_lineage(written, {"classes": [class_a, class_b], "settings": asked}, made(store[layer]))
    return layout


# heat-map -----------------------------------------------------------------------------------------------
