"""The static site every product writes into a run folder: the atlas viewer, the manifest of atlases it lists,
Deep Zoom pyramids and dataset example crops (compose writes atlases into it, `atlas run microscope` its pages).

    index.html (or atlas.html), viewer.js, viewer.css, vendor/   the static viewer, copied from atlas/viewer
    atlases.json                                                 {"viewer": page, "atlases": [entry, ...]}
    layers.html, layers.js, layers.css                           the layer atlases of one store side by side
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from atlas import AtlasError
from atlas.examples import model_view, patch_box
from atlas.images import UNREADABLE

log = logging.getLogger(__name__)

VIEWER = Path(__file__).with_name("viewer")
MANIFEST = "atlases.json"
VIEWER_BESIDE_HOME = "atlas.html"  # the viewer's page where another home page (the microscope's) holds index.html


def install_viewer(out_dir: Path) -> Path:
    """Copy the static viewer (page, script, style, vendored OpenSeadragon) into the run folder; return its page.

    The page is index.html, or atlas.html where `atlas run microscope` made the folder's index.html its home page.
    """
    page = out_dir / (VIEWER_BESIDE_HOME if (out_dir / VIEWER_BESIDE_HOME).is_file() else "index.html")
    # microscope/ holds the templates of `atlas run microscope`'s pages, not part of the atlas viewer
    ignore = shutil.ignore_patterns("__pycache__", "microscope", "index.html")
    shutil.copytree(VIEWER, out_dir, dirs_exist_ok=True, ignore=ignore)
    shutil.copyfile(VIEWER / "index.html", page)
    return page


def move_viewer_beside_home(out_dir: Path) -> str:
    """Make the atlas viewer's page atlas.html, for a site whose own home page takes index.html; returns its name.

    install_viewer keeps it there on later runs, so composing again never overwrites that home page.
    """
    shutil.copyfile(VIEWER / "index.html", out_dir / VIEWER_BESIDE_HOME)
    return VIEWER_BESIDE_HOME


def update_manifest(out_dir: Path, entries: list[dict], viewer: str) -> None:
    """Add or replace `entries` (by id) in the run folder's atlases.json, keeping other atlases; `viewer`: the
    viewer's page (index.html, or atlas.html beside a Microscope home page), which layers.html embeds."""
    path = out_dir / MANIFEST
    atlases = []
    if path.exists():
        try:
            atlases = json.loads(path.read_text())["atlases"]
        except (ValueError, KeyError, TypeError) as err:
            raise AtlasError(f"{path} is not an atlas manifest ({err}); remove it to start afresh") from err
    new = {entry["id"]: entry for entry in entries}
    atlases = [new.pop(old["id"], old) for old in atlases] + list(new.values())
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"viewer": viewer, "atlases": atlases}, indent=1))
    temporary.replace(path)


def write_dzi(
    image: Image.Image,
    stem: Path,
    tile_size: int = 254,  # Deep Zoom's customary tile and overlap (Microsoft's tools, deepzoom.py)
    overlap: int = 1,
    tile_format: str = "jpg",
) -> int:
    """Write `stem`.dzi and `stem`_files/<level>/<col>_<row>.<format>, the pyramid of one grid's atlas; return
    its number of levels (level 0 is 1 px wide, the last is the atlas itself).

    Unlabelled: the viewer writes the labels over it as text, as many as the zoom leaves room for.
    """
    full = image.width
    top = math.ceil(math.log2(full))
    folder = stem.parent / f"{stem.name}_files"
    if folder.exists():
        shutil.rmtree(folder)  # a previous run may have had more levels
    base = image
    for level in range(top, -1, -1):
        width = math.ceil(full / 2 ** (top - level))
        # each level halves the one above; Pillow copies an image "resized" to its own size, so the finest
        # level takes the atlas itself (655 MB at 160)
        base = base if base.width == width else base.resize((width, width), Image.Resampling.LANCZOS, reducing_gap=3.0)
        _write_tiles(base, folder / str(level), tile_size, overlap, tile_format)
    stem.with_suffix(".dzi").write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{tile_format}" Overlap="{overlap}" '
        f'TileSize="{tile_size}">\n  <Size Width="{full}" Height="{full}"/>\n</Image>\n'
    )
    return top + 1


def _write_tiles(image: Image.Image, folder: Path, tile_size: int, overlap: int, tile_format: str) -> None:
    folder.mkdir(parents=True)
    for row in range(math.ceil(image.height / tile_size)):
        for col in range(math.ceil(image.width / tile_size)):
            box = (
                max(0, col * tile_size - overlap),
                max(0, row * tile_size - overlap),
                min(image.width, (col + 1) * tile_size + overlap),
                min(image.height, (row + 1) * tile_size + overlap),
            )
            image.crop(box).save(folder / f"{col}_{row}.{tile_format}", quality=90)


def write_patches(
    wanted: dict[int, list[tuple[str, tuple[int, int]]]],
    image_paths: list[str],
    activation_shape: tuple[int, int],
    input_size: int,
    resize_size: int,
    folder: Path,
    whole_images: Path | None = None,
    workers: int = min(8, os.cpu_count() or 1),
) -> set[int]:
    """Save input patches as the model saw the images (resize to `resize_size`, centre crop to `input_size`).

    wanted: image index -> [(file name in `folder`, (y, x) activation position)]: the patch around each
    position. whole_images: also save each image whole there, as <image_id>.jpg, unless it is there already.
    Returns the images that could be read; unreadable ones are skipped.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if whole_images is not None:
        whole_images.mkdir(parents=True, exist_ok=True)

    def one_image(item: tuple[int, list[tuple[str, tuple[int, int]]]]) -> int | None:
        image, patches = item
        try:
            pixels = model_view(image_paths[image], input_size, resize_size)
        except UNREADABLE:
            return None
        if whole_images is not None and not (whole := whole_images / f"{image_id(image_paths[image])}.jpg").exists():
            pixels.save(whole, quality=90)
        for name, (y, x) in patches:
            pixels.crop(patch_box(y, x, *activation_shape, input_size)).save(folder / name, quality=90)
        return image

    with ThreadPoolExecutor(workers) as pool:  # PIL decodes outside the GIL
        done = list(pool.map(one_image, wanted.items()))
    read = {image for image in done if image is not None}
    if len(read) < len(done):
        log.warning("%d of %d example images could not be read; they show no patches", len(done) - len(read), len(done))
    return read


def image_id(path: str) -> str:
    """The file name of a dataset image on a site: stable across runs and image lists."""
    return hashlib.sha1(path.encode()).hexdigest()[:16]
