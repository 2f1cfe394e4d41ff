"""`atlas microscope`: linkable pages for every unit of a layer (after OpenAI Microscope, reference 6).

Lenses, as Microscope has them (a lens points at one resolution):
- unit (channel): its feature visualisation (lucid's channel objective, many units per batch) and its
  dataset examples: the top-k images by the unit's maximum over (interior) positions, found in one
  streaming pass with a running top-k per unit (memory independent of the dataset's size), shown
  whole and as the patch around that maximum;
- layer: DeepDream (maximise the layer's mean squared activation) and caricatures of a few photos;
- atlas: when a layer atlas of the same model and layer exists, each unit links to the atlas cell whose
  mean activation has the highest cosine with the unit's basis vector (viewer URL `#...&cell=x,y`).

Results are kept next to the site in `microscope.h5`, keyed by model, layer, lens and a hash of the
lens's settings; unit visualisations carry a done flag per unit and are written after every batch,
so a rerun with more units or another layer computes only what is missing:

    /<model>/<layer>/<lens>/          attrs: latest (the key of the settings last used)
    /<model>/<layer>/<lens>/<key>/    attrs: settings (JSON)
        examples:   value [C, k] float32 (NaN: fewer than k images), row [C, k] int64 (-1), position [C, k, 2]
                    int32 (y, x in the layer's map, of size attrs map_size), paths [M] str (what rows index)
        units:      images [C, S, S, 3] uint8, objective [C] float32, done [C] bool
        deepdream:  image [S, S, 3] uint8; attrs objective
        caricature: photos [P] str, inputs [P, S, S, 3] uint8 (the photos as the model saw them),
                    images [P, S, S, 3] uint8, objective [P] float32

The site (same look as the atlas viewer; plain pages, so it also works from file://):

    index.html, microscope.css, microscope.js     models and their layers
    atlas.html                                    the atlas viewer, when the folder is also an atlas run folder
    <model>/index.html                            the model's layers
    <model>/<layer>/index.html                    DeepDream, caricatures and every unit
    <model>/<layer>/unit-<n>.html                 one unit: visualisation, dataset examples, atlas cells
    <model>/<layer>/vis/, layer/, examples/<key>/ its images; <model>/images/ dataset images as the model saw them
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import re
import shutil
import string
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from atlas import AtlasError
from atlas.collect import load_batches
from atlas.compose import MANIFEST, VIEWER, patch_box
from atlas.images import ImageRecord, list_images, load_rgb, to_model_input
from atlas.models import Classifier, load_model
from atlas.optvis import PARAM, forward, model_device, optimize_images
from atlas.optvis.objectives import caricature, channel, deepdream
from atlas.optvis.param import param_spec
from atlas.optvis.transform import image_key, preset
from atlas.render import choose_batch_size
from atlas.store import STR, open_store

log = logging.getLogger(__name__)

RESULTS = "microscope.h5"
TEMPLATES = VIEWER / "microscope"
SIZE = 128  # lucid's default image size, param.image(128)
STEPS = 512  # lucid's render_vis threshold (reference 2.1)
# lucid's standard stack after random crops: Lite1 top-1 on 64 Lite0 class logits 0.45 -> 0.72 (bench_quality)
TRANSFORMS = "crops"
TOP_K = 8  # dataset examples per unit: one row on a unit page
CARICATURES = 4  # photos caricatured per layer when none are given
BORDER = 1  # map rows and columns at the edge that dataset examples leave out, as `collect` does


# units and settings ------------------------------------------------------------------------------------
def parse_units(spec: str | int | None, channels: int) -> list[int]:
    """None: every unit; "N" (or an int): the first N; "3,7,10-20": those units, in the order given."""
    if spec is None:
        return list(range(channels))
    text = str(spec).strip()
    try:
        if re.fullmatch(r"\d+", text):
            units = list(range(int(text)))
        else:
            units = []
            for part in filter(None, (p.strip() for p in text.split(","))):
                first, _, last = part.partition("-")
                units += list(range(int(first), int(last or first) + 1))
    except ValueError as err:
        raise AtlasError(f"--units {spec!r} is not a count or a list such as 3,7,10-20") from err
    units = list(dict.fromkeys(units))
    if not units:
        raise AtlasError(f"--units {spec!r} selects no unit")
    outside = [u for u in units if not 0 <= u < channels]
    if outside:
        raise AtlasError(f"units {outside[:5]} are outside the layer's {channels} channels (0..{channels - 1})")
    return units


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


# dataset examples ---------------------------------------------------------------------------------------
@dataclass
class TopK:
    """A running top-k per unit, best first: value [C, k], row [C, k] in the image list, position [C, k, 2]."""

    value: np.ndarray
    row: np.ndarray
    position: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> TopK:
        return cls(
            np.zeros((channels, 0), np.float32), np.zeros((channels, 0), np.int64), np.zeros((channels, 0, 2), np.int32)
        )

    def padded(self, k: int) -> TopK:
        """Exactly k columns: NaN values and -1 rows and positions where fewer images were seen."""
        missing = k - self.value.shape[1]
        return TopK(
            np.pad(self.value, ((0, 0), (0, missing)), constant_values=np.nan).astype(np.float32),
            np.pad(self.row, ((0, 0), (0, missing)), constant_values=-1).astype(np.int64),
            np.pad(self.position, ((0, 0), (0, missing), (0, 0)), constant_values=-1).astype(np.int32),
        )


def unit_maxima(acts: torch.Tensor, border: int = BORDER) -> tuple[np.ndarray, np.ndarray]:
    """[B, C, H, W] -> each unit's maximum over positions [B, C] and where it is, (y, x) [B, C, 2].

    Positions within `border` of the edge are left out, as `collect` leaves them out: there the
    convolutions' zero padding, not the image, makes many maxima. Maps too small to have an interior
    use every position. The first maximum in row-major order wins a tie.
    """
    height, width = acts.shape[-2:]
    if min(height, width) <= 2 * border:
        border = 0
    inside = acts[..., border : height - border, border : width - border]
    flat = inside.flatten(2).float()
    index = flat.argmax(2)
    value = flat.gather(2, index[..., None])[..., 0]
    inner_width = inside.shape[-1]
    position = torch.stack([index // inner_width, index % inner_width], -1) + border
    return value.cpu().numpy(), position.cpu().numpy().astype(np.int32)


def merge_top_k(best: TopK, value: np.ndarray, rows: np.ndarray, position: np.ndarray, k: int) -> TopK:
    """Add one batch (value [B, C], rows [B], position [B, C, 2]) to a running top-k.

    Batches come in row order and the sort is stable, so ties keep the earlier image, as a sort of the
    whole dataset would.
    """
    channels = value.shape[1]
    values = np.concatenate([best.value, value.T], 1)
    all_rows = np.concatenate([best.row, np.broadcast_to(np.asarray(rows, np.int64), (channels, len(rows)))], 1)
    positions = np.concatenate([best.position, position.transpose(1, 0, 2)], 1)
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return TopK(
        np.take_along_axis(values, order, 1),
        np.take_along_axis(all_rows, order, 1),
        np.take_along_axis(positions, order[..., None], 1),
    )


def top_activating(
    model: Classifier,
    layer: str,
    records: list[ImageRecord],
    *,
    top_k: int = TOP_K,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool | None = None,
) -> TopK:
    """The top-k images of every unit of `layer` by its maximum over interior positions, in one streaming pass.

    Images are read as `collect` reads them (resize, centre crop); unreadable ones are skipped. Returns
    exactly k columns (padded as in `TopK.padded`).
    """
    device = model_device(model)
    batches = [list(range(i, min(i + batch_size, len(records)))) for i in range(0, len(records), batch_size)]
    best, skipped = None, 0
    for rows, images, unreadable in load_batches(model, records, batches, workers, progress=progress):
        for row, reason in unreadable:
            log.warning("skipped image %s: %s", records[row].path, reason)
        skipped += len(unreadable)
        if not rows:
            continue
        with torch.no_grad():
            value, position = unit_maxima(forward(model, images.to(device), [layer])[layer])
        best = merge_top_k(best or TopK.empty(value.shape[1]), value, np.asarray(rows), position, top_k)
    if best is None:
        raise AtlasError(f"none of the {len(records)} images could be read")
    if skipped:
        log.warning("%d of %d images could not be read and were skipped", skipped, len(records))
    return best.padded(top_k)


def dataset_examples(
    results: h5py.File,
    model: Classifier,
    layer: str,
    records: list[ImageRecord],
    *,
    top_k: int,
    batch_size: int = 32,
    workers: int | None = None,
) -> bool:
    """Store the top-k examples of every unit of `layer`; False (and nothing done) when they are stored already."""
    paths = [r.path for r in records]
    settings = {
        "model": model.name,
        "weights": model.weights,
        "layer": layer,
        "top_k": top_k,
        "border": BORDER,
        "input_size": model.input_size,
        "resize_size": model.resize_size,
        "images": len(paths),
        "images_sha1": hashlib.sha1("\n".join(paths).encode()).hexdigest(),
    }
    group = lens_group(results, model.name, layer, "examples", settings)
    if "value" in group:
        log.info("%s: dataset examples of these %d images are stored already", layer, len(paths))
        return False
    log.info("%s: top %d images of every unit over %d images", layer, top_k, len(paths))
    best = top_activating(model, layer, records, top_k=top_k, batch_size=batch_size, workers=workers)
    group.attrs["map_size"] = layer_map(model, layer, model.input_size)[1:]  # where the positions lie
    group.create_dataset("paths", data=np.array(paths, dtype=object), dtype=STR)
    group.create_dataset("row", data=best.row)
    group.create_dataset("position", data=best.position)
    group.create_dataset("value", data=best.value)  # last: its presence marks the group complete
    results.flush()
    return True


# feature visualisations ---------------------------------------------------------------------------------
def render_units(
    group: h5py.Group,
    model: Classifier,
    layer: str,
    units: Sequence[int],
    channels: int,
    *,
    size: int,
    steps: int,
    transforms: str,
    param: str,
    lr: float,
    seed: int,
    batch_size: int | None = None,
    progress: bool = True,
) -> int:
    """Render the channel visualisation of each of `units` not yet done in `group`; returns how many it rendered.

    Unit u always starts from the random key (seed, u), so its image does not depend on which run or
    batch renders it. Results are written and flushed after every batch.
    """
    if "done" not in group:
        group.create_dataset(
            "images", shape=(channels, size, size, 3), dtype=np.uint8, chunks=(1, size, size, 3), fillvalue=255
        )
        group.create_dataset("objective", data=np.full(channels, np.nan, np.float32))
        group.create_dataset("done", data=np.zeros(channels, bool))
    done = group["done"][()]
    todo = [u for u in units if not done[u]]
    log.info("%s: %d of %d units to visualise (%d done before)", layer, len(todo), len(units), len(units) - len(todo))
    if not todo:
        return 0
    mixed_precision = model_device(model).type == "cuda"
    stack = preset(transforms, size)
    batch_size = batch_size or choose_batch_size(model, layer, channels, size, stack, mixed_precision)
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc=f"units {layer}", unit="batch", disable=not progress):
        images, (values,) = optimize_images(
            model,
            channel(layer, batch),
            [image_key(seed, unit) for unit in batch],
            size=size,
            steps=steps,
            transforms=stack,
            param=param,
            lr=lr,
            mixed_precision=mixed_precision,
        )
        for unit, image in zip(batch, images, strict=True):
            group["images"][unit] = image
        objective = group["objective"][()]
        objective[batch] = values
        group["objective"][...] = objective
        done[batch] = True
        group["done"][...] = done  # last, so a unit is marked done only once its image is stored
        group.file.flush()
    return len(todo)


def photo_inputs(paths: Sequence[str], model: Classifier, size: int) -> torch.Tensor:
    """Photos [P, 3, size, size] as the model sees them, scaled to `size` px so a caricature's map lines up."""
    resize = round(model.resize_size * size / model.input_size)
    return torch.stack([to_model_input(load_rgb(path, min_side=resize), resize, size) for path in paths])


def layer_lenses(
    results: h5py.File,
    model: Classifier,
    layer: str,
    photos: Sequence[str],
    *,
    size: int,
    steps: int,
    transforms: str,
    param: str,
    lr: float,
    seed: int,
) -> int:
    """DeepDream of `layer` and caricatures of `photos` (lucid's recipe, reference 2.5); stored unless they are.

    Returns the number of images rendered (0 when both were stored already).
    """
    common = {"model": model.name, "weights": model.weights, "layer": layer, "size": size, "steps": steps}
    common |= {"transforms": transforms, "param": param, "lr": lr, "seed": seed}
    stack = preset(transforms, size)
    cuda = model_device(model).type == "cuda"
    options = dict(size=size, steps=steps, transforms=stack, param=param, lr=lr, mixed_precision=cuda)
    rendered = 0
    dream = lens_group(results, model.name, layer, "deepdream", common)
    if "image" not in dream:
        log.info("%s: DeepDream", layer)
        images, (values,) = optimize_images(model, deepdream(layer), [image_key(seed, 0)], **options)
        dream.attrs["objective"] = float(values[0])
        dream.create_dataset("image", data=images[0])
        rendered += 1
    cartoons = lens_group(results, model.name, layer, "caricature", {**common, "photos": list(photos)})
    if photos and "images" not in cartoons:
        log.info("%s: caricatures of %d photos", layer, len(photos))
        inputs = photo_inputs(photos, model, size).to(model_device(model))
        with torch.no_grad():
            reference = forward(model, inputs, [layer])[layer].float()
        keys = [image_key(seed, index) for index in range(len(photos))]
        images, (values,) = optimize_images(model, caricature(layer, reference), keys, **options)
        cartoons.create_dataset("photos", data=np.array(list(photos), dtype=object), dtype=STR)
        cartoons.create_dataset(
            "inputs", data=(inputs.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        )
        cartoons.create_dataset("objective", data=values.astype(np.float32))
        cartoons.create_dataset("images", data=images)  # last: marks the group complete
        rendered += len(photos)
    results.flush()
    return rendered


def default_photos(records: list[ImageRecord], count: int) -> list[str]:
    """`count` readable photos spread evenly over the image list (unreadable ones are passed over)."""
    chosen: list[str] = []
    for index in np.linspace(0, len(records), num=min(count, len(records)), endpoint=False).astype(int):
        for record in records[index:] + records[:index]:
            if record.path in chosen:
                continue
            try:
                load_rgb(record.path, min_side=64)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue
            chosen.append(record.path)
            break
    return chosen


# the atlas lens ------------------------------------------------------------------------------------------
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
            group = f.get(f"{layer}/grid/{size}")
            if group is None or "mean" not in group or "count" not in group:
                log.warning("%s has no grid %d of %s; its atlas cells are not linked", store, size, layer)
                continue
            y, x, cosine = best_cells(
                group["mean"][()], group["count"][()], int(group.attrs.get("min_count", 1)), units
            )
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
        shutil.copyfile(VIEWER / "index.html", out / "atlas.html")
        viewer = "atlas.html"
    else:
        viewer = Path(os.path.relpath(atlas_dir.resolve() / "index.html", out.resolve())).as_posix()
    return AtlasLinks(viewer, entry["id"], cells)


# the site -------------------------------------------------------------------------------------------------
def slug(name: str) -> str:
    """A folder name for a model or layer: safe in a URL path (no ':' that would read as a scheme)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _page(kind: str, title: str, root: str, crumbs: list[tuple[str, str | None]], body: str, links: str = "") -> str:
    """A site page from atlas/viewer/microscope/page.html; crumbs are (text, href or None) after the home link."""
    trail = " › ".join(
        f'<a href="{html.escape(href)}">{html.escape(text)}</a>' if href else html.escape(text) for text, href in crumbs
    )
    template = string.Template((TEMPLATES / "page.html").read_text())
    return template.substitute(title=html.escape(title), kind=kind, root=root, crumbs=trail, links=links, body=body)


def _number(value: float) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.4g}"


def _save_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, compress_level=3)


def image_id(path: str) -> str:
    """The file name of a dataset image on the site: stable across runs and image lists."""
    return hashlib.sha1(path.encode()).hexdigest()[:16]


def write_example_images(examples: h5py.Group, units: Sequence[int], images_dir: Path, patches_dir: Path) -> None:
    """Each example image as the model saw it (images_dir/<id>.jpg) and the patch around each unit's maximum
    (patches_dir/<unit>-<rank>.jpg); files already there are kept. Unreadable images get no files."""
    settings = json.loads(examples.attrs["settings"])
    input_size, resize = settings["input_size"], settings["resize_size"]
    height, width = examples.attrs["map_size"]
    paths = examples["paths"].asstr()[()]
    rows, positions = examples["row"][()], examples["position"][()]
    by_row: dict[int, list[tuple[int, int]]] = {}
    for unit in units:
        for rank, row in enumerate(rows[unit]):
            if row >= 0 and not (patches_dir / f"{unit}-{rank}.jpg").exists():
                by_row.setdefault(int(row), []).append((unit, rank))
    if not by_row:
        return
    images_dir.mkdir(parents=True, exist_ok=True)
    patches_dir.mkdir(parents=True, exist_ok=True)

    def one_image(item: tuple[int, list[tuple[int, int]]]) -> bool:
        row, wanted = item
        try:
            seen = to_model_input(load_rgb(paths[row], min_side=resize), resize, input_size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return False
        picture = Image.fromarray((seen.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        whole = images_dir / f"{image_id(paths[row])}.jpg"
        if not whole.exists():
            picture.save(whole, quality=90)
        for unit, rank in wanted:
            box = patch_box(*positions[unit, rank], height, width, input_size)
            picture.crop(box).save(patches_dir / f"{unit}-{rank}.jpg", quality=90)
        return True

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes outside the GIL
        readable = list(pool.map(one_image, by_row.items()))
    if not all(readable):
        log.warning("%d example images could not be read; their examples show no picture", readable.count(False))


def _examples_html(examples: h5py.Group, unit: int, root: str, model_dir: str, key: str) -> str:
    settings = json.loads(examples.attrs["settings"])
    input_size = settings["input_size"]
    height, width = examples.attrs["map_size"]
    paths = examples["paths"].asstr()
    figures = []
    for rank, (row, value, (y, x)) in enumerate(
        zip(examples["row"][unit], examples["value"][unit], examples["position"][unit], strict=True)
    ):
        if row < 0:
            break
        path = paths[row]
        name = Path(path).name
        whole = f"{root}{model_dir}/images/{image_id(path)}.jpg"
        patch = f"examples/{key}/{unit}-{rank}.jpg"
        left, top, right, bottom = (100 * v / input_size for v in patch_box(y, x, height, width, input_size))
        box = f"left:{left:.2f}%;top:{top:.2f}%;width:{right - left:.2f}%;height:{bottom - top:.2f}%"
        where = html.escape(f"{path}: maximum {value:.4g} at (y {y}, x {x})")
        figures.append(
            f'<figure class="example" data-rank="{rank}" title="{where}">'
            f'<div class="whole"><img src="{html.escape(whole)}" alt="{html.escape(name)}" loading="lazy">'
            f'<span class="box" style="{box}"></span></div>'
            f'<img class="patch" src="{html.escape(patch)}" alt="patch around the maximum" loading="lazy">'
            f'<figcaption><span class="name">{html.escape(name)}</span><span class="value">{value:.4g}</span>'
            f"</figcaption></figure>"
        )
    if not figures:
        return '<p class="note">No image was read.</p>'
    return f'<div class="examples">{"".join(figures)}</div>'


def _unit_page(
    unit: int,
    neighbours: tuple[int | None, int | None],
    model: str,
    layer: str,
    vis: h5py.Group,
    examples: h5py.Group | None,
    atlas: AtlasLinks | None,
) -> str:
    root = "../../"
    settings = json.loads(vis.attrs["settings"])
    parts = [
        '<section class="lens"><h2>Feature visualisation</h2>',
        f'<figure class="vis"><img src="vis/{unit}.png" alt="feature visualisation of unit {unit}" '
        f'width="{2 * settings["size"]}" height="{2 * settings["size"]}">',
        f"<figcaption>mean activation {_number(vis['objective'][unit])} after {settings['steps']} steps "
        f"at {settings['size']} px</figcaption></figure></section>",
    ]
    if examples is not None:
        key = examples.name.rsplit("/", 1)[-1]
        count = json.loads(examples.attrs["settings"])["images"]
        parts += [
            f'<section class="lens"><h2>Dataset examples</h2><p class="note">The {examples["row"].shape[1]} of '
            f"{count} images where this unit's maximum over positions is largest; the box and the patch "
            f"surround that position.</p>",
            _examples_html(examples, unit, root, slug(model), key),
            "</section>",
        ]
    if atlas is not None:
        cells = atlas.cells.get(unit, [])
        items = "".join(
            f'<li><a class="atlas-cell" href="{html.escape(root + atlas.href(cell))}">grid {cell["grid"]} × '
            f'{cell["grid"]}: cell (x {cell["x"]}, y {cell["y"]})</a> <span class="value">cosine '
            f"{cell['cosine']:.3f}</span></li>"
            for cell in cells
        )
        parts.append(
            '<section class="lens"><h2>On the atlas</h2><p class="note">The cell whose mean activation has the '
            f'highest cosine with this unit\'s direction.</p><ul class="cells">{items}</ul></section>'
            if items
            else '<section class="lens"><h2>On the atlas</h2><p class="note">No atlas cell holds enough samples.</p>'
            "</section>"
        )
    previous, following = neighbours
    links = "".join(
        f'<a rel="{rel}" href="unit-{other}.html">{text}</a>'
        for rel, other, text in (("prev", previous, f"← unit {previous}"), ("next", following, f"unit {following} →"))
        if other is not None
    )
    crumbs = [(model, "../index.html"), (layer, "index.html"), (f"unit {unit}", None)]
    return _page("unit", f"{model} · {layer} · unit {unit}", root, crumbs, "\n".join(parts), links)


def _layer_page(
    model: str,
    layer: str,
    units: list[int],
    vis: h5py.Group,
    dream: h5py.Group | None,
    cartoons: h5py.Group | None,
    atlas: AtlasLinks | None,
) -> str:
    parts = []
    if dream is not None and "image" in dream:
        parts.append(
            '<section class="lens"><h2>DeepDream</h2><figure class="vis"><img src="layer/deepdream.png" '
            f'alt="DeepDream of {html.escape(layer)}"><figcaption>mean squared activation '
            f"{_number(dream.attrs['objective'])}</figcaption></figure></section>"
        )
    if cartoons is not None and "images" in cartoons:
        figures = "".join(
            f'<figure class="caricature"><img src="layer/photo-{i}.jpg" alt="photo">'
            f'<img src="layer/caricature-{i}.png" alt="caricature">'
            f'<figcaption title="{html.escape(path)}">{html.escape(Path(path).name)}</figcaption></figure>'
            for i, path in enumerate(cartoons["photos"].asstr()[()])
        )
        parts.append(
            '<section class="lens"><h2>Caricatures</h2><p class="note">Each photo beside an image optimised to '
            f'give the layer activations like the photo\'s.</p><div class="caricatures">{figures}</div></section>'
        )
    if atlas is not None:
        parts.append(
            f'<p><a class="atlas" href="{html.escape("../../" + atlas.href())}">The atlas of this layer</a></p>'
        )
    tiles = "".join(
        f'<a class="unit" href="unit-{unit}.html" data-unit="{unit}"><img src="vis/{unit}.png" alt="unit {unit}" '
        f'loading="lazy"><span>{unit}</span></a>'
        for unit in units
    )
    parts.append(
        f'<section class="lens"><h2>Units ({len(units)})</h2><form id="jump"><label>Unit <input type="text" '
        f'inputmode="numeric" size="6" placeholder="number"></label></form><div id="units">{tiles}</div></section>'
    )
    crumbs = [(model, "../index.html"), (layer, None)]
    return _page("layer", f"{model} · {layer}", "../../", crumbs, "\n".join(parts))


def write_layer_site(out: Path, results: h5py.File, model: str, layer: str, atlas: AtlasLinks | None) -> list[int]:
    """The layer page and a page per visualised unit (latest settings) of one layer; returns those units."""
    vis = latest_group(results, model, layer, "units")
    if vis is None or "done" not in vis:
        return []
    units = np.flatnonzero(vis["done"][()]).tolist()
    examples = latest_group(results, model, layer, "examples")
    examples = examples if examples is not None and "value" in examples else None
    layer_dir = out / slug(model) / slug(layer)
    for unit in units:
        _save_png(vis["images"][unit], layer_dir / "vis" / f"{unit}.png")
    dream = latest_group(results, model, layer, "deepdream")
    if dream is not None and "image" in dream:
        _save_png(dream["image"][()], layer_dir / "layer" / "deepdream.png")
    cartoons = latest_group(results, model, layer, "caricature")
    if cartoons is not None and "images" in cartoons:
        for i, (photo, image) in enumerate(zip(cartoons["inputs"], cartoons["images"], strict=True)):
            Image.fromarray(photo).save(layer_dir / "layer" / f"photo-{i}.jpg", quality=90)
            _save_png(image, layer_dir / "layer" / f"caricature-{i}.png")
    if examples is not None:
        key = examples.name.rsplit("/", 1)[-1]
        for stale in (layer_dir / "examples").glob("*"):  # patches of other example settings
            if stale.name != key:
                shutil.rmtree(stale)
        write_example_images(examples, units, out / slug(model) / "images", layer_dir / "examples" / key)
    for i, unit in enumerate(units):
        neighbours = (units[i - 1] if i else None, units[i + 1] if i + 1 < len(units) else None)
        page = _unit_page(unit, neighbours, model, layer, vis, examples, atlas)
        (layer_dir / f"unit-{unit}.html").write_text(page)
    (layer_dir / "index.html").write_text(_layer_page(model, layer, units, vis, dream, cartoons, atlas))
    return units


def _site_contents(results: h5py.File) -> dict[str, list[tuple[str, int, bool]]]:
    """Model -> [(layer, visualised units, has a DeepDream)] of everything in the results file."""
    contents: dict[str, list[tuple[str, int, bool]]] = {}
    for model, layers in results.items():
        for layer in layers:
            vis = latest_group(results, model, layer, "units")
            if vis is not None and "done" in vis:
                dream = latest_group(results, model, layer, "deepdream")
                entry = (layer, int(vis["done"][()].sum()), dream is not None and "image" in dream)
                contents.setdefault(model, []).append(entry)
    return contents


def write_index(out: Path, results: h5py.File) -> Path:
    """The home page (models and their layers), one page per model, and the site's style and script."""
    contents = _site_contents(results)
    for name in ("microscope.css", "microscope.js"):
        shutil.copyfile(TEMPLATES / name, out / name)
    models = []
    for model, layers in contents.items():
        items = "".join(
            f'<li><a href="{slug(model)}/{slug(layer)}/index.html">{html.escape(layer)}</a> '
            f'<span class="value">{units} units</span></li>'
            for layer, units, _ in layers
        )
        models.append(f'<section class="lens"><h2><a href="{slug(model)}/index.html">{html.escape(model)}</a></h2>')
        models.append(f'<ul class="layers">{items}</ul></section>')
        tiles = "".join(
            f'<a class="layer" href="{slug(layer)}/index.html">'
            + (f'<img src="{slug(layer)}/layer/deepdream.png" alt="DeepDream">' if dream else "")
            + f'<span>{html.escape(layer)}</span><span class="value">{units} units</span></a>'
            for layer, units, dream in layers
        )
        body = f'<section class="lens"><h2>Layers</h2><div class="layers">{tiles}</div></section>'
        (out / slug(model)).mkdir(parents=True, exist_ok=True)
        (out / slug(model) / "index.html").write_text(_page("model", model, "../", [(model, None)], body))
    if (out / "atlas.html").exists():
        models.append('<p><a class="atlas" href="atlas.html">The activation atlases of this run folder</a></p>')
    index = out / "index.html"
    index.write_text(_page("home", "Microscope", "", [], "\n".join(models) or '<p class="note">Nothing yet.</p>'))
    return index


# the command ----------------------------------------------------------------------------------------------
def layer_map(model: Classifier, layer: str, size: int) -> tuple[int, int, int]:
    """(channels, height, width) of `layer` for a `size` px input; AtlasError when it is no activation map."""
    try:
        acts = forward(model, torch.zeros(1, 3, size, size, device=model_device(model)), [layer])[layer]
    except RuntimeError as err:
        raise AtlasError(f"{size} px is too small for {model.name} layer {layer}: {err}") from err
    if acts.dim() != 4:
        raise AtlasError(f"layer {layer} of {model.name} gives {tuple(acts.shape)}, not a [B, C, H, W] activation map")
    return tuple(acts.shape[1:])


def microscope(
    model: str | Classifier,
    out: str | Path,
    *,
    layer: str | None = None,
    data: str | Path = "demo",
    units: str | int | None = None,
    steps: int = STEPS,
    size: int = SIZE,
    top_k: int = TOP_K,
    limit: int | None = None,
    photos: Sequence[str] | None = None,
    caricatures: int = CARICATURES,
    atlas: str | Path | None = None,
    store: str | Path | None = None,
    transforms: str = TRANSFORMS,
    param: str = PARAM,
    lr: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | None = None,
    weights: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Compute what is missing of a layer's lenses into `out`/microscope.h5 and write the site; returns a summary.

    units: see `parse_units` (default: every unit). atlas: a run folder holding the layer's atlas (default:
    `out` itself); store: its HDF5 store with the grid means (default: <atlas>/store.h5).
    param: the image parameterisation (atlas.optvis.param.PARAMS); lr: default its own.
    """
    if size < 1 or steps < 0 or top_k < 1 or caricatures < 0 or (batch_size is not None and batch_size < 1):
        raise AtlasError("size, top-k and batch size must be positive; steps and caricatures not negative")
    preset(transforms, size)  # validates the names
    lr = param_spec(param).lr if lr is None else lr
    if isinstance(model, Classifier):
        net = model
    else:
        net = load_model(model, weights=weights, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layer = net.resolve_layer(layer or net.default_layer)
    channels = layer_map(net, layer, net.input_size)[0]
    layer_map(net, layer, size)
    chosen = parse_units(units, channels)
    records = list_images(data, net.class_names)[:limit]
    if not records:
        raise AtlasError(f"{data} holds no images")
    for photo in photos or []:
        if not Path(photo).is_file():
            raise AtlasError(f"photo {photo} does not exist")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    timings = {}
    with open_store(out / RESULTS, "a") as results:
        start = time.perf_counter()
        scanned = dataset_examples(results, net, layer, records, top_k=top_k, workers=workers)
        timings["examples_s"] = time.perf_counter() - start

        start = time.perf_counter()
        vis_settings = {"model": net.name, "weights": net.weights, "layer": layer, "size": size, "steps": steps}
        vis_settings |= {"transforms": transforms, "param": param, "lr": lr, "seed": seed}
        vis = lens_group(results, net.name, layer, "units", vis_settings)
        rendered = render_units(
            vis,
            net,
            layer,
            chosen,
            channels,
            size=size,
            steps=steps,
            transforms=transforms,
            param=param,
            lr=lr,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
        timings["units_s"] = time.perf_counter() - start

        start = time.perf_counter()
        chosen_photos = list(photos) if photos else default_photos(records, caricatures)
        layer_images = layer_lenses(
            results,
            net,
            layer,
            chosen_photos,
            size=size,
            steps=steps,
            transforms=transforms,
            param=param,
            lr=lr,
            seed=seed,
        )
        timings["layer_s"] = time.perf_counter() - start

        start = time.perf_counter()
        done_units = np.flatnonzero(vis["done"][()]).tolist()
        atlas_dir = Path(atlas) if atlas else out
        links = link_atlas(out, atlas_dir, Path(store) if store else None, net.name, layer, done_units)
        pages = write_layer_site(out, results, net.name, layer, links)
        index = write_index(out, results)
        timings["site_s"] = time.perf_counter() - start
    return {
        "index": str(index),
        "model": net.name,
        "layer": layer,
        "units": len(pages),
        "rendered": rendered,
        "reused": len(chosen) - rendered,
        "dataset_pass": scanned,
        "layer_images": layer_images,
        "atlas": links is not None,
        **{name: round(seconds, 1) for name, seconds in timings.items()},
    }
