"""The microscope's results file: one HDF5 group per (model, layer, lens, settings), so reruns reuse work."""

from __future__ import annotations

import hashlib
import json

import h5py

RESULTS = "microscope.h5"


def settings_key(settings: dict) -> str:
    """A short, stable hash of a lens's settings: the name of its results group."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def lens_group(results: h5py.File, model: str, layer: str, lens: str, settings: dict) -> h5py.Group:
    """The results group of one lens for these settings (made when new), marked as the lens's latest."""
    parent = results.require_group(f"{model}/{layer}/{lens}")
    key = settings_key(settings)
    group = parent.require_group(key)
    group.attrs["settings"] = json.dumps(settings, sort_keys=True)
    parent.attrs["latest"] = key
    return group


def latest_group(results: h5py.File, model: str, layer: str, lens: str) -> h5py.Group | None:
    parent = results.get(f"{model}/{layer}/{lens}")
    if parent is None or "latest" not in parent.attrs:
        return None
    return parent.get(str(parent.attrs["latest"]))
