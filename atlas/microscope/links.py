"""The atlas lens: each unit links to the atlas cell whose mean activation is closest to its direction."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlas import AtlasError
from atlas.site import MANIFEST, move_viewer_beside_home
from atlas.store import COUNT, MEAN, Grid, open_store

log = logging.getLogger(__name__)


def best_cells(
    mean: np.ndarray, count: np.ndarray, min_count: int, units: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit u, the non-empty cell whose mean activation m has the highest cos(m, e_u) = m_u / |m|.

    mean [G, G, C], count [G, G]; returns (y [U], x [U], cosine [U]); cosine -inf when no cell is non-empty.
    """
    size = count.shape[0]
    flat = mean.reshape(-1, mean.shape[-1]).astype(np.float64)
    norm = np.linalg.norm(flat, axis=1)
    cosine = flat[:, list(units)] / np.maximum(norm, 1e-12)[:, None]
    cosine[(count.ravel() < min_count) | (norm == 0)] = -np.inf
    best = cosine.argmax(0)
    y, x = np.divmod(best, size)
    return y, x, cosine[best, np.arange(len(units))]


def find_layer_atlas(atlas_dir: Path, model: str, layer: str) -> dict | None:
    """The manifest entry of `layer`'s atlas in a run folder, or None."""
    manifest = atlas_dir / MANIFEST
    if not manifest.is_file():
        return None
    try:
        atlases = json.loads(manifest.read_text())["atlases"]
    except (ValueError, KeyError, TypeError) as err:
        log.warning("%s is not an atlas manifest (%s); units are not linked to an atlas", manifest, err)
        return None
    for entry in atlases:
        if entry.get("kind") == "layer" and entry.get("layer") == layer and entry.get("model") in (None, "", model):
            return entry
    return None


def atlas_cells(store: Path, layer: str, grids: Sequence[int], units: Sequence[int]) -> dict[int, list[dict]]:
    """Unit -> [{grid, x, y, cosine}] of its best cell in each grid of the store's `layer`."""
    cells: dict[int, list[dict]] = {unit: [] for unit in units}
    with open_store(store) as f:
        for size in grids:
            try:
                grid = Grid(f[layer], size, needs=(COUNT, MEAN))
            except (AtlasError, KeyError):
                log.warning("%s has no grid %d of %s; its atlas cells are not linked", store, size, layer)
                continue
            y, x, cosine = best_cells(grid.read(MEAN), grid.read(COUNT), grid.min_count, units)
            for i, unit in enumerate(units):
                if np.isfinite(cosine[i]):
                    cells[unit].append({"grid": size, "x": int(x[i]), "y": int(y[i]), "cosine": float(cosine[i])})
    return cells


@dataclass
class AtlasLinks:
    """Where a layer's atlas is, relative to the site root, and each unit's cells in it."""

    viewer: str  # the viewer page, relative to the site root
    atlas_id: str
    cells: dict[int, list[dict]]

    def href(self, cell: dict | None = None) -> str:
        params = {"atlas": self.atlas_id, "grid": cell["grid"] if cell else "auto"}
        if cell:
            params["cell"] = f"{cell['x']},{cell['y']}"
        return self.viewer + "#" + "&".join(f"{k}={v}" for k, v in params.items())


def link_atlas(
    out: Path, atlas_dir: Path, store: Path | None, model: str, layer: str, units: Sequence[int]
) -> AtlasLinks | None:
    """The atlas links of `layer`, when `atlas_dir` holds its layer atlas and the store its grids; else None.

    When the atlas is in the site's own folder, its viewer is installed as atlas.html, since the
    microscope's home page takes index.html.
    """
    entry = find_layer_atlas(atlas_dir, model, layer)
    if entry is None:
        return None
    store = store or atlas_dir / "store.h5"
    if not store.is_file():
        log.warning(
            "found the atlas of %s in %s but no store %s (pass --store); units are not linked", layer, atlas_dir, store
        )
        return None
    cells = atlas_cells(store, layer, [grid["size"] for grid in entry["grids"]], units)
    if atlas_dir.resolve() == out.resolve():
        viewer = move_viewer_beside_home(out)
    else:
        viewer = Path(os.path.relpath(atlas_dir.resolve() / "index.html", out.resolve())).as_posix()
    return AtlasLinks(viewer, entry["id"], cells)
