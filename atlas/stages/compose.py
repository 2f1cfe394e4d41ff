"""Composition: rendered icons -> atlas images, a deep-zoom pyramid, cell metadata and the viewer (stage 5).

A run folder holds any number of atlases; `atlases.json` lists them and the viewer reads only that, so
other atlas kinds (class atlases) can be added beside the layer atlases later:

    index.html, viewer.js, viewer.css, vendor/    the static viewer (copied from atlas/viewer); its page is
                                                  atlas.html instead where `atlas run microscope` made index.html
                                                  the folder's home page (move_viewer_beside_home)
    atlases.json                                  {"atlases": [entry, ...]}: id, kind, layer, class, title, paths;
                                                  made_from (each grid's icons' identity, atlas.store lineage)
                                                  and settings (the compose settings' fingerprint)
    <atlas id>/grid-<G>/atlas.png                 the atlas of grid size G: one icon per cell, sized by density
    <atlas id>/grid-<G>/tiles.dzi, tiles_files/   its Deep Zoom pyramid (OpenSeadragon reads it); the viewer
                                                  shows the grid whose cells are large enough at the zoom
    <atlas id>/grid-<G>/<view>/atlas.png, tiles.dzi, tiles_files/
                                                  the same atlas drawn with other icons, which the viewer
                                                  switches to (the manifest's grid "views"): "accentuated", the
                                                  grid's accentuated icon set where render made one, and
                                                  "examples", each cell's most typical example patch
    <atlas id>/grid-<G>/cells.json                cells of grid G: count, top classes, icon quality, examples
                                                  (and on a heat-map: attribution to its class, opacity)
    <atlas id>/grid-<G>/attribution.bin           every cell's mean attribution to every class, quantised
                                                  (attribution_table): the viewer shades any class from it
    <atlas id>/grid-<G>/samples.bin               the cell (y * G + x) of each sample, int32 little-endian in the
                                                  store's row order: the layer atlases of one store share their
                                                  rows (atlas.store), so layers.html shows where one layer's
                                                  samples fall in another
    <atlas id>/classes.json                       the store's class names, for the viewer's class search
    patches/<layer>/<sample>.jpg                  dataset example patches, shared by all atlases of a layer
    patches/<atlas id>/<sample>.jpg               those of an atlas from a subset store (class atlases)

Kinds in the manifest: "layer"; "heatmap", a layer atlas with each cell's opacity its attribution to one
class (`heatmap_class`); and those of other stores, e.g. "class" and "comparison" (atlas.class_atlas).

Rows of an atlas are the grid's y, columns its x (cell = y * G + x, as in the store).
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from atlas import AtlasError
from atlas.canvas import BACKGROUND, atlas_canvas, density_scale, draw_legend, fade_cells, label_image
from atlas.config import Settings
from atlas.examples import example_crops, pick_examples, view_sizes
from atlas.site import MANIFEST, install_viewer, update_manifest, write_dzi, write_patches
from atlas.stages import Context
from atlas.store import (
    ACCENTUATED,
    ACTIVATIONS,
    ATTRIBUTION,
    ATTRIBUTIONS,
    CELL,
    COLLECT_SETTINGS,
    COUNT,
    GRIDS,
    ICON_COSINE,
    ICON_DONE,
    ICON_OBJECTIVE,
    ICONS,
    IMAGE_INDEX,
    MADE,
    MADE_FROM,
    MEAN,
    POSITION,
    RENDERED,
    SETTINGS,
    TOP_ATTRIBUTIONS,
    TOP_CLASSES,
    Layer,
    Node,
    class_names,
    fingerprint,
    grid_group,
    icons_made,
    opened,
    settings_json,
)
from atlas.store import Grid as GridView
from atlas.store import layers as store_layers

log = logging.getLogger(__name__)

LABEL_SPACING_PX = 80  # about one label per 80 px of atlas; the paper's front-end draws one every ~40-60 px
LABEL_MIN_OPACITY = 0.5  # on a heat-map, only cells at least half shown are labelled: faded ones are not the class's
TOP_COUNT = 5
COMPOSED = (COUNT, CELL, ATTRIBUTION, MEAN, *RENDERED)  # what composing a grid reads of it
HEATMAP_POPULATED = 0.2  # paper front-end: max over cells of > 500 samples, a fifth of the 2500 per 20x20 cell of 1M


@dataclass
class Heatmap:
    """One class's heat-map over a grid: each cell's mean attribution to the class, and the opacity shown."""

    class_index: int
    attribution: np.ndarray  # [G, G]
    opacity: np.ndarray  # [G, G] in [0, 1] (heatmap_opacity)


@dataclass
class Grid:
    """One grid size of an atlas, read from the store and ready to draw."""

    size: int
    min_count: int
    count: np.ndarray  # [G, G]
    cell: np.ndarray  # [N] cell of each sample
    top_classes: np.ndarray  # [G, G, T] class index, best first
    top_attributions: np.ndarray  # [G, G, T]
    icon_cosine: np.ndarray  # [G, G], NaN where empty
    icon_objective: np.ndarray  # [G, G]
    image: Image.Image  # the atlas without labels, G * icon size square
    heatmap: Heatmap | None = None  # set on a class's heat-map atlas
    # [G, G] each drawn icon's side, a fraction of the icon size (density_scale); 0: not drawn. None: not read
    scale: np.ndarray | None = None


def draw_labels(image: Image.Image, grid: Grid, names: list[str]) -> None:
    """Write the top class of about one cell per LABEL_SPACING_PX (the densest of each block) at its bottom.

    On a heat-map only cells shown at LABEL_MIN_OPACITY or more are candidates.
    """
    cell_px = image.width / grid.size
    step = max(1, math.ceil(LABEL_SPACING_PX / cell_px))
    count = grid.count if grid.heatmap is None else np.where(grid.heatmap.opacity >= LABEL_MIN_OPACITY, grid.count, 0)
    for block_y in range(0, grid.size, step):
        for block_x in range(0, grid.size, step):
            block = count[block_y : block_y + step, block_x : block_x + step]
            dy, dx = np.unravel_index(np.argmax(block), block.shape)
            if block[dy, dx] < grid.min_count:
                continue
            y, x = block_y + dy, block_x + dx
            # centred under its cell, but kept inside the block so that neighbouring labels never overlap; the last
            # block of a row can be narrower than the others
            block_left, block_right = block_x * cell_px + 2, min(block_x + step, grid.size) * cell_px - 2
            label = label_image(names[grid.top_classes[y, x, 0]], int(block_right - block_left))
            left = np.clip((x + 0.5) * cell_px - label.width / 2, block_left, block_right - label.width)
            image.paste(label, (round(left), round((y + 1) * cell_px - label.height)), label)


def read_grid(group: h5py.Group) -> Grid:
    """Read one grid of the store and draw its atlas (without labels)."""
    count = group[COUNT][()]
    size = count.shape[0]
    cell = group[CELL][()].astype(np.int64)
    if cell.size and (cell.min() < 0 or cell.max() >= size * size):
        raise AtlasError(f"{group.name}/cell has cells outside the {size}x{size} grid")
    if not np.array_equal(np.bincount(cell, minlength=size * size).reshape(size, size), count):
        raise AtlasError(f"{group.name}: count does not match the cells of the samples (rerun `atlas grid`)")
    if TOP_CLASSES in group and TOP_ATTRIBUTIONS in group:
        top, top_values = group[TOP_CLASSES][()], group[TOP_ATTRIBUTIONS][()]
    else:
        attribution = group[ATTRIBUTION][()]
        top = np.argsort(-attribution, axis=-1, kind="stable")[..., :TOP_COUNT]
        top_values = np.take_along_axis(attribution, top, axis=-1)
    min_count = int(group.attrs.get("min_count", 1))
    scale = density_scale(count, min_count)
    if ICON_DONE in group:  # `render` stopped early: cells it has not reached stay blank until it is rerun
        unfinished = (scale > 0) & ~group[ICON_DONE][()]
        if unfinished.any():
            log.warning(
                "%s: %d of %d icons are not rendered yet (rerun `atlas render`); left blank",
                group.name,
                unfinished.sum(),
                (scale > 0).sum(),
            )
        scale = np.where(unfinished, 0.0, scale)
    canvas = atlas_canvas(group[ICONS], scale)
    return Grid(
        scale=scale,
        size=size,
        min_count=min_count,
        count=count,
        cell=cell,
        top_classes=top,
        top_attributions=top_values,
        icon_cosine=group[ICON_COSINE][()],
        icon_objective=group[ICON_OBJECTIVE][()],
        image=Image.fromarray(canvas),
    )


def _number(value: float) -> float | None:
    """JSON-friendly: 4 significant digits, None for NaN."""
    return float(f"{value:.4g}") if np.isfinite(value) else None


def cells_json(grid: Grid, names: list[str], examples: np.ndarray, example_info: dict[int, dict]) -> dict:
    """What the viewer shows for each cell that has samples (cells below min_count are marked empty: no icon)."""
    cells = []
    for y, x in zip(*np.nonzero(grid.count), strict=True):
        empty = grid.count[y, x] < grid.min_count  # too few samples for a mean: no icon, no classes
        ranked = zip(grid.top_classes[y, x], grid.top_attributions[y, x], strict=True)
        top = [{"class": int(k), "name": names[k], "attribution": _number(v)} for k, v in ranked if k >= 0]
        cells.append(
            {
                "x": int(x),
                "y": int(y),
                "count": int(grid.count[y, x]),
                "empty": bool(empty),
                "top": [] if empty else top,
                "icon_cosine": _number(grid.icon_cosine[y, x]),
                "icon_objective": _number(grid.icon_objective[y, x]),
                "examples": [example_info[s] for s in examples[y * grid.size + x].tolist() if s >= 0],
            }
        )
        if grid.heatmap is not None:
            cells[-1]["heatmap"] = {
                "class": names[grid.heatmap.class_index],
                "attribution": _number(grid.heatmap.attribution[y, x]),
                "opacity": _number(grid.heatmap.opacity[y, x]),
            }
    return {"grid": grid.size, "min_count": grid.min_count, "total": int(grid.count.sum()), "cells": cells}


def attribution_table(attribution: np.ndarray) -> bytes:
    """A grid's mean attributions [G, G, C] as the viewer reads them: float32 [C] scales, then int8 [C, G * G].

    Class-major, so that the viewer takes one class as one contiguous slice; each class is scaled by its
    largest magnitude (value = int8 * scale), which keeps a class's own shading exact to 1/127 of its range.
    Little-endian, as typed arrays are in every browser. 25.8 MB for a 160 x 160 grid of 1008 classes.
    """
    table = np.nan_to_num(attribution.reshape(-1, attribution.shape[-1]).T.astype(np.float32))  # [C, cells]
    scale = np.abs(table).max(axis=1) / 127
    quantised = np.round(table / np.where(scale > 0, scale, 1)[:, None]).astype(np.int8)
    return scale.astype("<f4").tobytes() + quantised.tobytes()


def heatmap_opacity(
    attribution: np.ndarray, count: np.ndarray, min_count: int, populated: float = HEATMAP_POPULATED
) -> np.ndarray:
    """Opacity [G, G] in [0, 1] of each cell: its mean attribution to a class over the largest one among the
    well-populated cells (at least `populated` x the average samples per cell); 0 where empty or negative."""
    kept = count >= min_count
    if not kept.any():
        return np.zeros(count.shape, np.float32)
    well_populated = kept & (count >= populated * count.sum() / count.size)
    largest = attribution[well_populated if well_populated.any() else kept].max()
    if largest <= 0:
        largest = attribution[kept].max()  # no populated cell attributes to the class: scale by all the others
    if largest <= 0:
        return np.zeros(count.shape, np.float32)
    return np.where(kept, np.clip(attribution / largest, 0.0, 1.0), 0.0).astype(np.float32)


@dataclass(frozen=True)
class ComposeSettings(Settings):
    """How an atlas is drawn and written, validated once."""

    labels: bool = True  # atlas.png: the top class of about one cell per LABEL_SPACING_PX (the viewer draws its own)
    examples: int = 4  # dataset example patches per cell (the paper's viewer shows a few per cell)
    tile_format: str = "jpg"  # of the Deep Zoom tiles: jpg (small) or png (lossless)

    section = "compose"

    def validate(self) -> None:
        if self.tile_format not in ("jpg", "png"):
            raise AtlasError(f"tile format {self.tile_format!r} is not jpg or png")
        if self.examples < 0:
            raise AtlasError(f"examples per cell must be >= 0, not {self.examples}")


def _draw_grids(group: h5py.Group, sizes: list[int], heatmap_class: int | None) -> list[Grid]:
    """Each grid's atlas image; with a heat-map class, each cell faded by its attribution to that class."""
    grids = []
    for size in sizes:
        grid = read_grid(grid_group(group, size))
        if heatmap_class is not None:
            attribution = grid_group(group, size)[ATTRIBUTION][:, :, heatmap_class]
            opacity = heatmap_opacity(attribution, grid.count, grid.min_count)
            grid.heatmap = Heatmap(heatmap_class, attribution, opacity)
            grid.image = fade_cells(grid.image, opacity)
        grids.append(grid)
        log.info("%s grid %d: atlas drawn", group.name.strip("/"), size)
    return grids


def _example_patches(
    store: h5py.File,
    group: h5py.Group,
    grids: list[Grid],
    per_cell: int,
    patch_dir: Path,
    patch_url: str,
    names: list[str],
) -> tuple[dict[int, np.ndarray], dict[int, dict]]:
    """The example samples picked for each grid's cells, and each one's image, position, written patch and the
    photo's class (`names` of the store's classes)."""
    image_index, position = group[IMAGE_INDEX][()], group[POSITION][()]
    picked = {
        grid.size: pick_examples(
            group[ACTIVATIONS], grid.cell, grid_group(group, grid.size)[MEAN][()], per_cell, image_index
        )
        for grid in grids
    }
    samples = np.unique(np.concatenate([p[p >= 0] for p in picked.values()]))
    paths = store["images/path"].asstr()[()].tolist()
    labels = store["images/label"][()] if "images/label" in store else np.full(len(paths), -1)
    wanted: dict[int, list[tuple[str, tuple[int, int]]]] = {}
    for sample in samples.tolist():
        wanted.setdefault(int(image_index[sample]), []).append((f"{sample}.jpg", tuple(position[sample])))
    read = write_patches(
        wanted, paths, (int(group.attrs["height"]), int(group.attrs["width"])), *view_sizes(store), patch_dir
    )
    example_info = {
        s: {
            "image": paths[image_index[s]],
            "position": position[s].tolist(),
            "patch": f"{patch_url}/{s}.jpg" if int(image_index[s]) in read else None,
            # the photo's label, in the model's class order (atlas.images); -1 or past the names where unknown
            "class": names[label] if 0 <= (label := int(labels[image_index[s]])) < len(names) else None,
        }
        for s in samples.tolist()
    }
    return picked, example_info


def _save_atlas(
    image: Image.Image,
    grid: Grid,
    names: list[str],
    settings: ComposeSettings,
    folder: Path,
    legend: tuple[str, str] | None = None,
) -> None:
    """`folder`/atlas.png: the atlas image, with its labels when the settings ask for them, and a comparison's
    `legend` (its left and right classes)."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = image.copy()
    if settings.labels:
        draw_labels(picture, grid, names)
    if legend is not None:
        draw_legend(picture, *legend)
    picture.save(folder / "atlas.png", compress_level=3)  # fast enough for 12800 px atlases, still small


def _other_views(store: h5py.File, layer: str, grid: Grid, picked: np.ndarray) -> list[tuple[str, Image.Image]]:
    """The grid's atlas drawn with other icons, each cell where the visualisations' atlas draws one: its accentuated
    icon (where render made that set, and the icon is done) and its most typical example patch (`picked`'s first)."""
    group = grid_group(store[layer], grid.size)
    scale = grid.scale
    assert scale is not None  # the visualisations' atlas is drawn first
    icon_px = grid.image.width // grid.size
    views = []
    accentuated = group.get(ACCENTUATED)
    if accentuated is not None and ICONS in accentuated:
        done = accentuated[ICON_DONE][()] if ICON_DONE in accentuated else np.ones_like(scale, bool)
        views.append(("accentuated", Image.fromarray(atlas_canvas(accentuated[ICONS], np.where(done, scale, 0)))))
    if picked.shape[1]:
        shown = (scale > 0) & (picked[:, 0] >= 0).reshape(scale.shape)
        crops = np.full((*scale.shape, icon_px, icon_px, 3), BACKGROUND, np.uint8)
        crops[shown] = example_crops(store, layer, picked[shown.ravel(), 0].tolist(), icon_px)
        views.append(("examples", Image.fromarray(atlas_canvas(crops, np.where(shown, scale, 0)))))
    return views


def compose_atlas(
    store: h5py.File,
    layer: str,
    sizes: list[int],
    out_dir: Path,
    folder: str,
    settings: ComposeSettings,
    heatmap_class: int | None = None,
    patch_dir: str | None = None,
    sides: tuple[int, int] | None = None,
) -> dict:
    """Write one atlas (its grids of `layer` at `sizes`) under `out_dir`/`folder`; return its manifest paths.

    heatmap_class: fade each cell by its attribution to this class (heatmap_opacity).
    patch_dir: the example patches' folder in `out_dir`, default patches/<layer>.
    sides: a two-class comparison's classes, left and right, named in the atlas images' top corners.
    """
    group = store[layer]
    atlas_dir = out_dir / folder
    grids = _draw_grids(group, sizes, heatmap_class)
    names = class_names(store, grid_group(group, sizes[0])[ATTRIBUTION].shape[-1])
    patch_dir = patch_dir or f"patches/{layer}"
    legend = None if sides is None else (names[sides[0]], names[sides[1]])
    picked, example_info = _example_patches(
        store, group, grids, settings.examples, out_dir / patch_dir, patch_dir, names
    )
    entry_grids = []
    for grid in grids:
        grid_dir = atlas_dir / f"grid-{grid.size}"
        grid_dir.mkdir(parents=True, exist_ok=True)
        _save_atlas(grid.image, grid, names, settings, grid_dir, legend)
        cells = cells_json(grid, names, picked[grid.size], example_info)
        (grid_dir / "cells.json").write_text(json.dumps(cells, separators=(",", ":")))
        (grid_dir / "attribution.bin").write_bytes(attribution_table(grid_group(group, grid.size)[ATTRIBUTION][()]))
        (grid_dir / "samples.bin").write_bytes(grid_group(group, grid.size)[CELL][()].astype("<i4").tobytes())
        levels = write_dzi(grid.image, grid_dir / "tiles", tile_format=settings.tile_format)
        log.info("%s grid %d: %d Deep Zoom levels written", layer, grid.size, levels)
        views = {"visualisation": f"{folder}/grid-{grid.size}/tiles.dzi"}
        # a heat-map atlas shows its faded visualisations only: other icons would show every cell at full strength
        others = _other_views(store, layer, grid, picked[grid.size]) if heatmap_class is None else []
        for view, image in others:
            _save_atlas(image, grid, names, settings, grid_dir / view, legend)
            write_dzi(image, grid_dir / view / "tiles", tile_format=settings.tile_format)
            views[view] = f"{folder}/grid-{grid.size}/{view}/tiles.dzi"
        entry_grids.append(
            {
                "views": views,
                "size": grid.size,
                "min_count": grid.min_count,
                "image": f"{folder}/grid-{grid.size}/atlas.png",
                "cells": f"{folder}/grid-{grid.size}/cells.json",
                "attribution": f"{folder}/grid-{grid.size}/attribution.bin",
                "samples": f"{folder}/grid-{grid.size}/samples.bin",
                "tiles": views["visualisation"],
            }
        )
    (atlas_dir / "classes.json").write_text(json.dumps(names))
    return {
        "icon_size": grids[0].image.width // grids[0].size,
        "grids": entry_grids,
        "class_names": f"{folder}/classes.json",
        "heatmap_populated": HEATMAP_POPULATED,  # the viewer shades a class as heatmap_opacity does
    }


def compose_run(
    store_path: str | Path | h5py.File,
    out_dir: str | Path,
    layers: list[str] | None = None,
    grids: list[int] | None = None,
    settings: ComposeSettings = ComposeSettings(),
    heatmap_class: int | None = None,
    atlas: dict | None = None,
) -> Path:
    """Compose the layer atlases of a store into the run folder `out_dir`; return the viewer's page.

    layers: default every layer with rendered grids. grids: default every rendered grid size of each
    layer. Re-running adds to or overwrites the folder; atlases of other kinds in it are kept.
    heatmap_class: compose each layer's attribution heat-map for this class instead (kind "heatmap").
    atlas: manifest fields (at least id and kind) of the one atlas a store of another kind holds, e.g. a
    class atlas's subset store; its example patches go to patches/<id>/, its sample numbers being its own.
    """
    out_dir = Path(out_dir)
    with opened(store_path) as store:
        plan = _plan(store, layers, grids)  # validate everything before writing anything
        if atlas is not None and (heatmap_class is not None or len(plan) != 1):
            raise AtlasError("an atlas of another kind comes from one layer of its store, with no heat-map")
        heads = {layer: _manifest_entry(store, layer, heatmap_class, atlas) for layer in plan}
        # the store's path: what the layers page's `make class-atlas STORE=...` suggestion names
        where = str(Path(store.filename).resolve())
        entries = []
        for layer, sizes in plan.items():
            head = heads[layer]
            patch_dir = f"patches/{head['id']}" if atlas is not None else None
            sides = tuple(head["classes"]) if head.get("kind") == "comparison" else None
            paths = compose_atlas(store, layer, sizes, out_dir, head["id"], settings, heatmap_class, patch_dir, sides)
            icons = composed_from(store[layer], sizes)
            made = uuid.uuid4().hex[:16]  # as atlas.store.remade: a new identity each time it is composed
            entries.append(
                {**head, **paths, "made_from": icons, "settings": asdict(settings), "made": made, "store": where}
            )
    index = install_viewer(out_dir)
    update_manifest(out_dir, entries, index.name)
    return index


def _manifest_entry(store: h5py.File, layer: str, heatmap_class: int | None, atlas: dict | None) -> dict:
    """The manifest fields of one atlas but its paths: a layer atlas, its heat-map for a class, or `atlas`."""
    entry = {
        "id": f"layer-{layer}",
        "kind": "layer",
        "layer": layer,
        "class": None,
        "title": layer,
        "model": str(store.attrs.get("model", "")),
        # the collection the atlas's samples come from, and how many: atlases with equal ones share their rows
        "collection": fingerprint(json.loads(str(store.attrs.get(COLLECT_SETTINGS, "{}")))),
        "samples": int(store[layer][ACTIVATIONS].shape[0]),
    }
    if heatmap_class is not None:
        classes = store[layer][ATTRIBUTIONS].shape[1]
        if not 0 <= heatmap_class < classes:
            raise AtlasError(f"heat-map class {heatmap_class} is not in 0..{classes - 1}")
        name = class_names(store, classes)[heatmap_class]
        entry.update(id=f"heatmap-{layer}-{heatmap_class}", kind="heatmap", title=f"{layer}: attribution to {name}")
        entry.update({"class": f"{name} (heat-map)", "class_index": heatmap_class})
    elif atlas is not None:
        if not {"id", "kind"} <= set(atlas):
            raise AtlasError(f"an atlas of another kind needs an id and a kind, not {sorted(atlas)}")
        entry.update(atlas)
        if not re.fullmatch(r"[\w.\-]+", str(entry["id"])) or entry["id"] in (".", ".."):
            raise AtlasError(f"atlas id {entry['id']!r} is not a folder name")
    return entry


def _plan(store: h5py.File, layers: list[str] | None, grids: list[int] | None) -> dict[str, list[int]]:
    """Layer -> grid sizes to compose, checked."""

    def rendered(layer: str) -> list[int]:
        group = store[layer]
        return sorted(int(size) for size in group.get(GRIDS, {}) if ICONS in group[f"{GRIDS}/{size}"])

    names = layers or [layer for layer in store_layers(store) if rendered(layer)]
    if not names:
        raise AtlasError("the store has no rendered grids (run `atlas render` first)")
    plan = {}
    for name in names:
        group = Layer(store, name, needs=(ACTIVATIONS, ATTRIBUTIONS, IMAGE_INDEX, POSITION)).group
        sizes = sorted(set(grids)) if grids else rendered(name)
        if not sizes:
            raise AtlasError(f"layer {name!r} has no rendered grids (run `atlas render` first)")
        for size in sizes:
            GridView(group, size, needs=COMPOSED)  # checked before anything is written
        icon_sizes = {grid_group(group, size)[ICONS].shape[2] for size in sizes}
        if len(icon_sizes) > 1:
            raise AtlasError(f"layer {name!r}: grids {sizes} have different icon sizes {sorted(icon_sizes)}")
        plan[name] = sizes
    return plan


def composed_from(layer: h5py.Group, sizes: list[int]) -> dict[str, str]:
    """What a composed atlas is made from: the identity of each grid's icons (atlas.store.icons_made)."""
    return {str(size): icons_made(grid_group(layer, size)) for size in sizes}


@dataclass(frozen=True)
class ComposedAtlas:
    """A composed atlas's manifest entry seen as a product of the store's lineage (atlas.store.fresh): the settings
    it was drawn with, its identity, and the icons it was composed from."""

    entry: dict

    @property
    def attrs(self) -> dict:
        made_from = self.entry.get("made_from")
        return {
            SETTINGS: settings_json(self.entry.get("settings")),
            MADE: str(self.entry.get("made", "")),
            MADE_FROM: settings_json(made_from) if made_from else "",
        }


class ComposeStage:
    """The stage (atlas.stages.Stage): one atlas of the run folder, composed from a layer's icons as they are.

    `head`: the manifest fields of an atlas of another kind (a class atlas's), as `compose_run`'s `atlas`;
    `heatmap_class`: a layer atlas's attribution heat-map for that class instead."""

    name, settings, whole_run = "compose", ComposeSettings, False

    def __init__(self, head: dict | None = None, heatmap_class: int | None = None):
        self.head, self.heatmap_class = head, heatmap_class

    def atlas_id(self, layer: str | None) -> str:
        if self.head is not None:
            return str(self.head["id"])
        return f"layer-{layer}" if self.heatmap_class is None else f"heatmap-{layer}-{self.heatmap_class}"

    def products(self, ctx: Context, layer: str | None, settings: ComposeSettings) -> list[tuple[Node | None, str]]:
        try:
            icons = composed_from(ctx.store[layer], ctx.grid_sizes)
            entries = json.loads((ctx.run_dir / MANIFEST).read_text())["atlases"]
        except (OSError, ValueError, KeyError, TypeError, AtlasError):
            return [(None, "")]
        entry = next((e for e in entries if e.get("id") == self.atlas_id(layer)), None)
        if entry is None or not all(icons.values()):
            return [(None, "")]
        return [(ComposedAtlas(entry), settings_json(icons))]

    def record(self, ctx: Context, layer: str | None, settings: ComposeSettings) -> ComposeSettings:
        return settings

    def complete(self, ctx: Context, layer: str | None, node: ComposedAtlas) -> bool:
        grids = [ctx.run_dir / self.atlas_id(layer) / f"grid-{size}" for size in ctx.grid_sizes]
        files = [ctx.run_dir / "index.html", *(grid / name for grid in grids for name in ("atlas.png", "tiles.dzi"))]
        return all(file.is_file() for file in files)

    def run(self, ctx: Context, layer: str | None, settings: ComposeSettings) -> None:
        compose_run(
            ctx.store,
            ctx.run_dir,
            [str(layer)],
            ctx.grid_sizes,
            settings,
            heatmap_class=self.heatmap_class,
            atlas=self.head,
        )


COMPOSE = ComposeStage()
