"""The HDF5 store: the contract between the stages.

Every stage reads and writes one HDF5 file with this layout (N samples, M images, C channels,
K classes, G grid size, PX icon size). Names are stable; stages may add datasets but never change
these.

    /                      attrs: model, weights, input_size, seed, dataset, code_version, positions,
                           memory_format, precision (collect's run-time policy, atlas/runtime.py)
    /images/path           [M] str      image path (or demo name), in collection order
    /images/label          [M] int64    class index, -1 when unknown
    /images/skipped        [S] str      images that could not be read, "path: reason"
    /<layer>/              attrs: channels, height, width (activation map size at the input size)
    /<layer>/activations   [N, C] float32   one activation vector per sampled position
    /<layer>/image_index   [N] int64        row in /images
    /<layer>/position      [N, 2] int32     (y, x) in the layer's activation map
    /<layer>/attributions  [N, K] float32   h . d logit_k / d h at that position
    /<layer>/layout        [N, 2] float32   written by `project`, in [0, 1]; attrs: method and its parameters
    /<layer>/whitening     [C, C] float32   written by `grid`: regularised inverse covariance (S)
    /<layer>/grid/<G>/     attrs: min_count
        cell               [N] int32        row-major cell of each sample, y * G + x
        count              [G, G] int64     samples per cell
        mean               [G, G, C] float32  mean activation (zeros where empty)
        attribution        [G, G, K] float32  mean attribution (zeros where empty)
        top_classes        [G, G, 5] int64    classes of the 5 (or K if fewer) largest mean attributions,
                                              best first; -1 where empty
        top_attributions   [G, G, 5] float32  those mean attributions; NaN where empty
        icons              [G, G, PX, PX, 3] uint8   written by `render`: icon [y, x] is cell y * G + x;
                                              white (255) where empty; attrs: the render settings,
                                              memory_format and precision included
        icon_cosine        [G, G] float32   cosine(icon's centre activation, cell mean); NaN where empty
        icon_objective     [G, G] float32   final objective of the kept attempt; NaN where empty
        icon_done          [G, G] bool      icons rendered so far (a rerun of `render` renders the rest)

A cell is "empty" when its count is below the grid's min_count. Layer names are module paths
(`_blocks.10`, `inception4c`) or a model's aliases (`mixed4c`); they are stored as given by the
model's canonical name, which never contains "/".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from atlas import AtlasError

STR = h5py.string_dtype("utf-8")
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


def layers(store: h5py.File) -> list[str]:
    """Layers that have activations in the store."""
    return [name for name, item in store.items() if isinstance(item, h5py.Group) and "activations" in item]


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
