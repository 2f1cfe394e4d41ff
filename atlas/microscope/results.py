"""The microscope's results file: one HDF5 group per (model, layer, lens, settings), so reruns reuse work."""

from __future__ import annotations

import h5py
import numpy as np

from atlas.store import fingerprint, record_settings

RESULTS = "microscope.h5"


def lens_group(results: h5py.File, model: str, layer: str, lens: str, settings: dict) -> h5py.Group:
    """The results group of one lens for these settings (made when new), marked as the lens's latest."""
    parent = results.require_group(f"{model}/{layer}/{lens}")
    key = fingerprint(settings)  # the group's name: equal settings find their results again
    group = parent.require_group(key)
    record_settings(group, settings)
    parent.attrs["latest"] = key
    return group


def latest_group(results: h5py.File, model: str, layer: str, lens: str) -> h5py.Group | None:
    parent = results.get(f"{model}/{layer}/{lens}")
    if parent is None or "latest" not in parent.attrs:
        return None
    return parent.get(str(parent.attrs["latest"]))


def done_units(results: h5py.File, model: str, layer: str, lens: str = "units") -> list[int]:
    """The units whose latest `lens` results are done (for "units": the units with a page)."""
    group = latest_group(results, model, layer, lens)
    return [int(unit) for unit in np.flatnonzero(group["done"][()])] if group is not None and "done" in group else []
