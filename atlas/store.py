"""The HDF5 store: the contract between the stages.

Every stage reads and writes one HDF5 file with this layout (N samples, M images, C channels,
K classes, G grid size, PX icon size). Names are stable; stages may add datasets but never change
these. A later stage reads what an earlier one recorded here and never recomputes or guesses it.

    /                      attrs, written by `collect`:
                             model, weights          the model's name and its weights' label
                             input_size, resize_size images were resized to resize_size (short side), then
                                                     centre-cropped to input_size
                             seed, positions         the position sampler's seed; positions per image and layer
                                                     (the same positions in every layer of one size: the k-th
                                                     sample of an image is at the same place in every layer)
                             dataset, code_version   the data source as given; the atlas version that collected
                             memory_format, precision  collect's run-time policy (atlas/runtime.py)
                             attribution             how the attributions were computed (atlas/attribution.py):
                                                     gradient, integrated or occlusion
                             collect_meta            JSON of every collect setting but the layers
                                                     (`record_settings`; a rerun with equal settings collects only
                                                     the layers the store lacks and adds their groups; other
                                                     settings are an error, never an overwrite)
    /classes               [K] str      the model's class names, in logit order
    /images/path           [M] str      image path (or demo name), in collection order
    /images/label          [M] int64    class index, -1 when unknown
    /images/skipped        [S] str      images that could not be read, "path: reason"
    /<layer>/              attrs: channels, height, width (activation map size at the input size); one group per
                           collected layer, all with the same images and sample rows: row i of every layer
                           is the same image's i-th sample (image_index equal)
    /<layer>/activations   [N, C] float32   one activation vector per sampled position
    /<layer>/image_index   [N] int64        row in /images
    /<layer>/position      [N, 2] int32     (y, x) in the layer's activation map
    /<layer>/attributions  [N, K] float32   the sample's attribution to logit k, by the root's `attribution`
                                            method: h . d logit_k / d h at that position (gradient), integrated
                                            gradients from the baseline, or logit_k(h) - logit_k(h with the
                                            position set to the baseline) (occlusion)
    /<layer>/baseline      [C] float32      integrated and occlusion only: the layer's mean activation over the
                                            first `baseline_images` images (collect_meta), where they start from
    /<layer>/layout        [N, 2] float32   written by `project`, in [0, 1]; attrs: method, metric, seed ("none"
                                            when unseeded), device, and the method's parameters (UMAP: n_neighbors,
                                            min_dist, n_epochs, knn, sgd, init; t-SNE: perplexity, learning_rate;
                                            a comparison: classes, scale, percentile, y_method, ...); and
                                            `settings`, the JSON of project's LayoutSettings and device
    /<layer>/whitening     [C, C] float32   written by `grid`: regularised inverse covariance (S);
                                            attrs: ridge, samples (how many it was computed from), centred
    /<layer>/grid/<G>/     attrs: min_count
        cell               [N] int32        row-major cell of each sample, y * G + x
        count              [G, G] int64     samples per cell
        mean               [G, G, C] float32  mean activation (zeros where empty)
        attribution        [G, G, K] float32  mean attribution (zeros where empty)
        top_classes        [G, G, 5] int64    classes of the 5 (or K if fewer) largest mean attributions,
                                              best first; -1 where empty
        top_attributions   [G, G, 5] float32  those mean attributions; NaN where empty
        icons              [G, G, PX, PX, 3] uint8   written by `render`: icon [y, x] is cell y * G + x;
                                              white (255) where empty; attrs: the render settings (size, steps,
                                              attempts, cossim_pow, transforms, param, lr unless None,
                                              decay_power, whiten, seed, model, weights, memory_format,
                                              precision), and all of them as JSON in `settings` (a rerun
                                              resumes only when they match)
        icon_cosine        [G, G] float32   cosine(icon's centre activation, cell mean); NaN where empty
        icon_objective     [G, G] float32   final objective of the kept attempt; NaN where empty
        icon_done          [G, G] bool      icons rendered so far (a rerun of `render` renders the rest)
        accentuated/       the second icon set, written by `render` with `accentuate` set: icons, icon_cosine,
                           icon_objective and icon_done as above, each icon the cell's most typical example patch
                           accentuated (feature accentuation) instead of a feature visualisation from noise

A class atlas's subset store (atlas.class_atlas.write_subset_store) has the same layout for one layer:
the parent's root attrs plus `parent_store` (its path), the parent's /classes and /images, and in the
layer group the parent layer's attrs plus `kind` ("class" or "comparison") and `classes`; its
`source_index` [n] int64 holds each sample's row in the parent layer, and its whitening is the parent
layer's (attrs as above, plus source = "parent layer").

Lineage: the layer group (written by collect), its layout (project), each grid/<G> group (grid) and its icons
(render) carry `settings` (the JSON of what made them), `made` (an identity, new each time they are made or, for
icons, added to) and `made_from` (the `made` of what they were made from: layer <- layout <- grid/<G> <- icons; a
subset store's layer group <- the parent's layer group). `fresh(node, settings, made_from)` is the one rule that
decides whether a product is up to date; a composed atlas records its icons' `made` in the run folder's
atlases.json (`made_from`).

In code, the names above are this module's constants (ACTIVATIONS, LAYOUT, COUNT, ICONS, ...), and a stage reads a
layer or a grid through the `Layer` and `Grid` views, which check what it needs and say which stage makes what is
missing.

A cell is "empty" when its count is below the grid's min_count. Layer names are module paths
(`_blocks.10`, `inception4c`) or a model's aliases (`mixed4c`); they are stored as given by the
model's canonical name, which never contains "/".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import h5py
import numpy as np

from atlas import AtlasError
from atlas.classes import imagenet_classes

STR = h5py.string_dtype("utf-8")
SETTINGS = "settings"  # the attr holding the JSON of the settings that made a dataset or group
MADE = "made"  # the attr holding a product's identity, new each time it is made (`record_lineage`)
MADE_FROM = "made_from"  # the attr holding the identity of the product it was made from
COLLECT_SETTINGS = "collect_meta"  # the root attr holding collect's settings
CLASSES = "classes"
IMAGES, SKIPPED = "images", "skipped"  # /images/path, /images/label, /images/skipped
PARTIAL = ".partial"  # collect merges new layer groups here, then moves each complete one to its name
# the datasets of a layer group and of its grids (the schema above): every stage names them by these
ACTIVATIONS, IMAGE_INDEX, POSITION, ATTRIBUTIONS = "activations", "image_index", "position", "attributions"
BASELINE = "baseline"  # a layer's mean activation, where integrated gradients and occlusion start from
LAYOUT, WHITENING, GRIDS = "layout", "whitening", "grid"
CELL, COUNT, MEAN, ATTRIBUTION = "cell", "count", "mean", "attribution"
TOP_CLASSES, TOP_ATTRIBUTIONS = "top_classes", "top_attributions"
ICONS, ICON_COSINE, ICON_OBJECTIVE, ICON_DONE = "icons", "icon_cosine", "icon_objective", "icon_done"
ACCENTUATED = "accentuated"  # a grid's second icon set (accentuated example patches), a group of the same datasets
COLLECTED = (ACTIVATIONS, IMAGE_INDEX, POSITION, ATTRIBUTIONS)  # what `collect` writes, one row per sample
SAMPLE_ROWS = (*COLLECTED, LAYOUT)  # a layer's datasets with one row per sample
GRIDDED = (CELL, COUNT, MEAN, ATTRIBUTION, TOP_CLASSES, TOP_ATTRIBUTIONS)  # what `grid` writes in a grid
RENDERED = (ICONS, ICON_COSINE, ICON_OBJECTIVE)  # what `render` adds to a grid
MADE_BY = {LAYOUT: "project", WHITENING: "grid"}  # the stage that writes a layer dataset collect does not
ROW_CHUNK = 4096  # rows per HDF5 chunk: large enough to stream fast, small enough to read one cheaply


def open_store(path: str | Path, mode: str = "r") -> h5py.File:
    """Open a store, with a one-line error when it is missing or not HDF5."""
    path = Path(path)
    if mode == "r" and not path.exists():
        raise AtlasError(f"store {path} does not exist (run `atlas collect` first)")
    try:
        return h5py.File(path, mode)
    except OSError as err:
        raise AtlasError(f"cannot open {path} as an HDF5 store: {err}") from err


@contextlib.contextmanager
def opened(store: str | Path | h5py.File, mode: str = "r") -> Iterator[h5py.File]:
    """The store as an open file: a path is opened (and closed after), an open file is used as it is, so that a
    run opens its store once and hands it to every stage (pipelines.runner)."""
    if isinstance(store, h5py.File):
        yield store
        return
    with open_store(store, mode) as f:
        yield f


def layers(store: h5py.File) -> list[str]:
    """Layers that have activations in the store."""
    return [name for name, item in store.items() if isinstance(item, h5py.Group) and ACTIVATIONS in item]


def layer_group(store: h5py.File, layer: str | None) -> h5py.Group:
    """The group of `layer`; with None, the store's only layer. Clear error when absent."""
    present = layers(store)
    if layer is None:
        if len(present) != 1:
            raise AtlasError(f"store has layers {present}; choose one with --layer")
        layer = present[0]
    if layer not in present:
        raise AtlasError(f"layer {layer!r} is not in the store (it has: {', '.join(present) or 'none'})")
    return store[layer]


def grid_group(group: h5py.Group, size: int) -> h5py.Group:
    """The `/<layer>/grid/<size>` group, with a clear error when `atlas grid` has not made it."""
    key = f"grid/{size}"
    if key not in group:
        made = sorted(int(g) for g in group["grid"]) if "grid" in group else []
        raise AtlasError(f"{group.name} has no grid of size {size} (grids: {made or 'none'}; run `atlas grid`)")
    return group[key]


def replace_dataset(group: h5py.Group, name: str, data: np.ndarray, **attrs: object) -> h5py.Dataset:
    """Write `data` as `group[name]`, replacing an older version; row-chunked when it is large."""
    if name in group:
        del group[name]
    chunks = None
    if data.ndim >= 1 and data.shape[0] > ROW_CHUNK:
        chunks = (ROW_CHUNK, *data.shape[1:])
    dset = group.create_dataset(name, data=data, chunks=chunks)
    dset.attrs.update(attrs)
    return dset


def iter_rows(dset: h5py.Dataset, chunk: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start, rows) blocks of a dataset so that memory does not grow with N."""
    for start in range(0, dset.shape[0], chunk):
        yield start, dset[start : start + chunk]


def store_finished(
    group: h5py.Group,
    where: tuple[np.ndarray, ...],
    images: tuple[str, np.ndarray],
    values: dict[str, np.ndarray],
    done: str,
) -> None:
    """Write finished images and their per-item values at the indices `where` of `group`, then mark them done.

    The done mask is written last and the file flushed, so a run killed at any moment leaves every item
    either stored and marked or unmarked; a rerun redoes only the unmarked ones.
    """
    name, pixels = images
    for index, image in zip(zip(*where, strict=True), pixels, strict=True):
        group[name][index] = image
    for table_name, table_values in {**values, done: True}.items():
        table = group[table_name][()]
        table[where] = table_values
        group[table_name][...] = table
    group.file.flush()


def _jsonable(value: object) -> object:
    """json.dumps' fallback: a dataclass as its fields, anything else (a Path) as its text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def settings_json(settings: object) -> str:
    """The settings (a dataclass, or JSON-able dict or list) as canonical JSON: sorted keys, tuples as lists."""
    return json.dumps(settings, sort_keys=True, default=_jsonable)


def fingerprint(settings: object) -> str:
    """A short stable hash of the settings: equal exactly when their canonical JSON is."""
    return hashlib.sha1(settings_json(settings).encode()).hexdigest()[:16]


def record_settings(node: Node, settings: object, name: str = SETTINGS) -> None:
    """Record the settings that made `node` (as JSON in its attr `name`), for `settings_match` to compare."""
    node.attrs[name] = settings_json(settings)


def settings_match(node: Node, settings: object, name: str = SETTINGS) -> bool:
    """Whether `node` was made with these settings; False when it recorded none or unreadable ones (older stores)."""
    try:
        recorded = json.loads(str(node.attrs[name]))
    except (KeyError, ValueError):
        return False
    return fingerprint(recorded) == fingerprint(settings)


def class_names(store: h5py.File, count: int) -> list[str]:
    """The `count` class names of a store's logits: /classes, else (a store written by other tools) ImageNet's
    names for 1000 classes and "class <k>" otherwise."""
    if CLASSES in store:
        names = store[CLASSES].asstr()[()].tolist()
        if len(names) != count:
            raise AtlasError(f"{store.filename}: /{CLASSES} has {len(names)} names for {count} logits")
        return names
    if count == 1000:
        return imagenet_classes()
    return [f"class {k}" for k in range(count)]


# views ------------------------------------------------------------------------------------------
class Layer:
    """A view of `/<layer>` that reads and checks what a later stage needs of it, in one place.

    `layer`: a name, or None for the store's only layer. `needs`: the datasets the caller reads; a missing one, or a
    per-sample one whose rows do not match the activations', is a one-line AtlasError naming the stage that makes it.
    """

    def __init__(self, store: h5py.File, layer: str | None, needs: tuple[str, ...] = (ACTIVATIONS,)):
        self.group = layer_group(store, layer)
        self.name = self.group.name.strip("/")
        self.rows = self.group[ACTIVATIONS].shape[0]
        for name in needs:
            stage = MADE_BY.get(name, "collect")
            if name not in self.group:
                raise AtlasError(f"{self.group.name} has no {name}: run `atlas {stage}` first")
            if name in SAMPLE_ROWS and self.group[name].shape[0] != self.rows:
                rows = self.group[name].shape[0]
                raise AtlasError(
                    f"{self.group.name}/{name} has {rows} rows for {self.rows} samples: rerun `atlas {stage}`"
                )

    def __getitem__(self, name: str) -> h5py.Dataset:
        return self.group[name]

    def __contains__(self, name: str) -> bool:
        return name in self.group

    @property
    def channels(self) -> int:
        return self.group[ACTIVATIONS].shape[1]

    @property
    def classes(self) -> int:
        return self.group[ATTRIBUTIONS].shape[1]

    def read(self, name: str) -> np.ndarray:
        return self.group[name][()]

    def grid(self, size: int, needs: tuple[str, ...] = (COUNT, MEAN)) -> Grid:
        return Grid(self.group, size, needs)


class Grid:
    """A view of `/<layer>/grid/<G>` that reads and checks what a later stage needs of it, in one place.

    `needs`: the datasets the caller reads; a missing one is a one-line AtlasError naming the stage that makes it.
    """

    def __init__(self, layer: h5py.Group, size: int, needs: tuple[str, ...] = (COUNT, MEAN)):
        self.group = grid_group(layer, size)
        self.layer, self.size = layer.name.strip("/"), size
        missing = [name for name in needs if name not in self.group]
        if missing:
            stage = "render" if set(RENDERED) & set(missing) else "grid"
            raise AtlasError(f"{self.group.name} lacks {', '.join(missing)} (run `atlas {stage}`)")
        if COUNT in needs and self.group[COUNT].shape != (size, size):
            raise AtlasError(f"{self.group.name}: count {self.group[COUNT].shape} does not fit a {size}x{size} grid")
        icons = self.group[ICONS].shape if ICONS in needs else None
        if icons is not None and (icons[:2] != (size, size) or len(icons) != 5 or icons[2:] != (icons[2], icons[2], 3)):
            raise AtlasError(f"{self.group.name}: icons {icons} do not fit a {size}x{size} grid")
        if CELL in needs and self.group[CELL].shape[0] != layer[IMAGE_INDEX].shape[0]:
            raise AtlasError(
                f"{self.group.name}/cell has {self.group[CELL].shape[0]} rows for {layer[IMAGE_INDEX].shape[0]} samples"
            )

    @property
    def min_count(self) -> int:
        return int(self.group.attrs.get("min_count", 1))

    def read(self, name: str) -> np.ndarray:
        return self.group[name][()]

    def non_empty(self) -> np.ndarray:
        """[G, G] bool: the cells that hold at least min_count samples (the others are empty)."""
        return self.read(COUNT) >= self.min_count


def only_grid(layer: h5py.Group) -> int:
    """The size of the layer's one grid; an AtlasError asking for --grid when it has none or several."""
    sizes = sorted(int(size) for size in layer[GRIDS]) if GRIDS in layer else []
    if len(sizes) != 1:
        raise AtlasError(f"{layer.name} has grids {sizes or 'none'}; choose one with --grid (run `atlas grid` first)")
    return sizes[0]


# lineage -----------------------------------------------------------------------------------------
class Product(Protocol):
    """Anything that records its lineage in `attrs`: a group or dataset of the store, or a composed atlas's manifest
    entry (atlas.stages.compose.ComposedAtlas)."""

    @property
    def attrs(self) -> Any: ...


Node: TypeAlias = h5py.Group | h5py.Dataset | Product


def record_lineage(node: Node, settings: object, made_from: str) -> None:
    """Record that `node` was just made with `settings` from the product whose identity is `made_from` ("" for the
    images themselves). Each making gets a new identity, so a product made again, even with equal settings (an
    unseeded UMAP), leaves everything made from its earlier self stale."""
    record_settings(node, settings)
    node.attrs[MADE_FROM] = made_from
    remade(node)


def remade(node: Node) -> None:
    """Give `node` a new identity: its content changed (a resumed render added icons), so its products are stale."""
    node.attrs[MADE] = uuid.uuid4().hex[:16]


def made(node: Node | None) -> str:
    """The identity of a product ("" for none, or one written before lineage was recorded)."""
    return "" if node is None else str(node.attrs.get(MADE, ""))


def icons_made(grid: h5py.Group) -> str:
    """The identity of a grid's icons: its visualisations' and, where it has them, its accentuated icons' (what a
    composed atlas is made from); "" when it has no visualisations."""
    icons = made(grid.get(ICONS))
    accentuated = made(grid.get(f"{ACCENTUATED}/{ICONS}"))
    return f"{icons}+{accentuated}" if icons and accentuated else icons


def fresh(node: Node | None, settings: object, made_from: str) -> bool:
    """Whether `node` exists, was made with these settings, and from the product whose identity is `made_from` now:
    the one freshness rule of the CLI and the pipelines."""
    if node is None or not made(node) or not settings_match(node, settings):
        return False
    return str(node.attrs.get(MADE_FROM, "")) == made_from
