"""The microscope's static site: the Jinja2 templates of atlas/viewer/microscope/ filled from the results file.

Plain pages with relative links, so the site also works from file://:

    index.html, microscope.css, microscope.js     models and their layers
    <model>/index.html                            the model's layers
    <model>/<layer>/index.html                    DeepDream, caricatures and every unit
    <model>/<layer>/unit-<n>.html                 one unit: visualisation, dataset examples, atlas cells
    <model>/<layer>/vis/, layer/, examples/<key>/ its images; <model>/images/ dataset images as the model saw them
"""

from __future__ import annotations

import json
import re
import shutil
from functools import lru_cache
from pathlib import Path

import h5py
import jinja2
import numpy as np
from PIL import Image

from atlas.examples import patch_box
from atlas.microscope.links import AtlasLinks
from atlas.microscope.results import latest_group
from atlas.site import VIEWER, VIEWER_BESIDE_HOME, image_id, write_patches

TEMPLATES = VIEWER / "microscope"


def slug(name: str) -> str:
    """A folder name for a model or layer: safe in a URL path (no ':' that would read as a scheme)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _number(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.4g}"


@lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters.update(slug=slug, number=_number, basename=lambda path: Path(path).name)
    return env


def _render(template: str, path: Path, **context: object) -> None:
    """Write one page; crumbs are (text, href or None) after the home link."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_templates().get_template(template).render(**context))


def _save_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, compress_level=3)


def write_example_images(examples: h5py.Group, units: list[int], images_dir: Path, patches_dir: Path) -> None:
    """Each example image as the model saw it (images_dir/<id>.jpg) and the patch around each unit's maximum
    (patches_dir/<unit>-<rank>.jpg); patches already there are kept. Unreadable images get no files."""
    settings = json.loads(examples.attrs["settings"])
    rows, positions = examples["row"][()], examples["position"][()]
    wanted: dict[int, list[tuple[str, tuple[int, int]]]] = {}
    for unit in units:
        for rank, row in enumerate(rows[unit]):
            if row >= 0 and not (patches_dir / f"{unit}-{rank}.jpg").exists():
                wanted.setdefault(int(row), []).append((f"{unit}-{rank}.jpg", tuple(positions[unit, rank])))
    if wanted:
        paths = examples["paths"].asstr()[()].tolist()
        map_size = tuple(int(v) for v in examples.attrs["map_size"])
        write_patches(wanted, paths, map_size, settings["input_size"], settings["resize_size"], patches_dir, images_dir)


def _example_figures(examples: h5py.Group, unit: int, root: str, model_dir: str, key: str) -> list[dict]:
    """What the unit page shows of each dataset example: image, patch and the box of the patch in the image."""
    input_size = json.loads(examples.attrs["settings"])["input_size"]
    height, width = examples.attrs["map_size"]
    paths = examples["paths"].asstr()
    figures = []
    for rank, (row, value, (y, x)) in enumerate(
        zip(examples["row"][unit], examples["value"][unit], examples["position"][unit], strict=True)
    ):
        if row < 0:
            break
        path = paths[row]
        left, top, right, bottom = (100 * v / input_size for v in patch_box(y, x, height, width, input_size))
        figures.append(
            {
                "path": path,
                "name": Path(path).name,
                "value": float(value),
                "y": int(y),
                "x": int(x),
                "whole": f"{root}{model_dir}/images/{image_id(path)}.jpg",
                "patch": f"examples/{key}/{unit}-{rank}.jpg",
                "box": f"left:{left:.2f}%;top:{top:.2f}%;width:{right - left:.2f}%;height:{bottom - top:.2f}%",
            }
        )
    return figures


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
    dream = dream if dream is not None and "image" in dream else None
    if dream is not None:
        _save_png(dream["image"][()], layer_dir / "layer" / "deepdream.png")
    cartoons = latest_group(results, model, layer, "caricature")
    photos = cartoons["photos"].asstr()[()].tolist() if cartoons is not None and "images" in cartoons else []
    for i, (photo, image) in enumerate(zip(cartoons["inputs"], cartoons["images"], strict=True) if photos else []):
        Image.fromarray(photo).save(layer_dir / "layer" / f"photo-{i}.jpg", quality=90)
        _save_png(image, layer_dir / "layer" / f"caricature-{i}.png")
    key = examples.name.rsplit("/", 1)[-1] if examples is not None else ""
    if examples is not None:
        for stale in (layer_dir / "examples").glob("*"):  # patches of other example settings
            if stale.name != key:
                shutil.rmtree(stale)
        write_example_images(examples, units, out / slug(model) / "images", layer_dir / "examples" / key)

    root = "../../"
    settings = json.loads(vis.attrs["settings"])
    common = {"root": root, "kind": "unit", "atlas": atlas, "size": settings["size"], "steps": settings["steps"]}
    if examples is not None:
        common |= {"top_k": examples["row"].shape[1], "images": json.loads(examples.attrs["settings"])["images"]}
    for i, unit in enumerate(units):
        _render(
            "unit.html",
            layer_dir / f"unit-{unit}.html",
            **common,
            title=f"{model} · {layer} · unit {unit}",
            crumbs=[(model, "../index.html"), (layer, "index.html"), (f"unit {unit}", None)],
            unit=unit,
            previous=units[i - 1] if i else None,
            following=units[i + 1] if i + 1 < len(units) else None,
            objective=float(vis["objective"][unit]),
            examples=None if examples is None else _example_figures(examples, unit, root, slug(model), key),
            cells=atlas.cells.get(unit, []) if atlas is not None else [],
        )
    _render(
        "layer.html",
        layer_dir / "index.html",
        root=root,
        kind="layer",
        title=f"{model} · {layer}",
        crumbs=[(model, "../index.html"), (layer, None)],
        layer=layer,
        units=units,
        dream_objective=float(dream.attrs["objective"]) if dream is not None else None,
        photos=photos,
        atlas=atlas,
    )
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
    for model, layers in contents.items():
        _render(
            "model.html",
            out / slug(model) / "index.html",
            root="../",
            kind="model",
            title=model,
            crumbs=[(model, None)],
            layers=layers,
        )
    index = out / "index.html"
    _render(
        "home.html",
        index,
        root="",
        kind="home",
        title="Microscope",
        crumbs=[],
        contents=contents,
        has_atlas=(out / VIEWER_BESIDE_HOME).exists(),
    )
    return index
