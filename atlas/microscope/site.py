"""The microscope's static site: the Jinja2 templates of atlas/viewer/microscope/ filled from the results file.

Plain pages with relative links, so the site also works from file://:

    index.html, microscope.css, microscope.js     models and their layers
    <model>/index.html                            the model's graph of layers, each linked to its page
    <model>/<layer>/index.html                    DeepDream, caricatures, a photo dreamt at each depth, every unit
    <model>/<layer>/<unit>.html                   one unit (a stable URL to cite): channel, neuron and diverse
                                                  visualisations, dataset examples, its circuit from the layer
                                                  below (linked to those units' pages), atlas cells
    <model>/<layer>/vis/, neuron/, diversity/, circuit/, layer/, examples/<key>/
                                                  its images; <model>/images/ dataset images as the model saw them
"""

from __future__ import annotations

import json
import re
import shutil
from functools import lru_cache
from pathlib import Path

import h5py
import jinja2
import markupsafe
import numpy as np
from PIL import Image

from atlas.examples import patch_box
from atlas.microscope.circuits import stored_circuits
from atlas.microscope.graph import graph_svg, stored_graph
from atlas.microscope.links import AtlasLinks
from atlas.microscope.results import done_units, latest_group
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
        height, width = (int(v) for v in examples.attrs["map_size"])
        write_patches(
            wanted, paths, (height, width), settings["input_size"], settings["resize_size"], patches_dir, images_dir
        )


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


def _weight_map(values: list[list[float]], scale: float, path: Path) -> None:
    """A k x k map of expanded weights (h x w at a map's edge) as a small picture: red positive, blue negative,
    white zero."""
    share = np.clip(np.asarray(values) / max(scale, 1e-12), -1, 1)[..., None]
    red, blue = np.array([214.0, 39, 40]), np.array([31.0, 119, 180])
    rgb = 255 + np.where(share > 0, share * (red - 255), -share * (blue - 255))
    height, width = share.shape[:2]
    picture = Image.fromarray(rgb.round().astype(np.uint8)).resize((12 * width, 12 * height), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def _circuit_figure(report: dict, layer_dir: Path, below_pages: set[int]) -> dict:
    """What a unit page shows of its circuit: per lens its inputs either way (linked where the lower unit has a
    page, with its k x k expanded-weight map where there is one) and the ablation of its top inputs."""
    below = slug(report["below"])
    lenses = []
    for lens in report["lenses"]:
        maps = lens.get("maps", {})
        scale = max((np.abs(m).max() for m in map(np.asarray, maps.values())), default=1.0)
        listed: dict[str, list[dict]] = {}
        for sign in ("positive", "negative"):
            listed[sign] = []
            for channel, value in lens[sign]:
                entry = {"unit": channel, "value": value, "page": channel in below_pages, "map": None}
                entry["href"], entry["thumb"] = f"../{below}/{channel}.html", f"../{below}/vis/{channel}.png"
                if str(channel) in maps:
                    entry["map"] = f"circuit/{report['unit']}-{channel}.png"
                    _weight_map(maps[str(channel)], scale, layer_dir / entry["map"])
                listed[sign].append(entry)
        lenses.append({"how": lens["how"], **listed})
    return {
        "below": report["below"],
        "lenses": lenses,
        "no_weights": report.get("no_weights"),
        "no_ablation": report.get("no_ablation"),
        "ablation": sorted(((int(c), f) for c, f in report["ablation"].items()), key=lambda item: -item[1]),
        "shared": {int(c): share for c, share in report["shared_examples"].items()},
    }


def _users(results: h5py.File, model: str, layer: str) -> dict[int, list[tuple[str, int, float]]]:
    """Lower unit -> [(upper layer, unit, attribution)] of the stored circuits that list it as a positive input."""
    users: dict[int, list[tuple[str, int, float]]] = {}
    for upper in results[model]:
        circuit = latest_group(results, model, upper, "circuit")
        if circuit is None or json.loads(circuit.attrs["settings"])["below"] != layer:
            continue  # read from another layer: its reports need not be parsed
        for unit, report in stored_circuits(results, model, upper).items():
            for channel, value in report["lenses"][-1]["positive"]:  # the attribution lens: any model has it
                users.setdefault(int(channel), []).append((upper, unit, value))
    return users


def _forward_order(results: h5py.File, model: str) -> list[str]:
    """The model's layers in the results file, in the stored graph's (forward) order; layers not in it last."""
    order = [node[0] for node in stored_graph(results, model).nodes]
    return sorted(results[model], key=lambda name: (order.index(name) if name in order else len(order), name))


def _dreams(results: h5py.File, model: str) -> list[dict]:
    """The stored photo dreams of the model's layers, in forward order: [{layer, photo}]."""
    dreams = []
    for layer in _forward_order(results, model):
        group = latest_group(results, model, layer, "dream")
        if group is not None and "image" in group:
            dreams.append({"layer": layer, "photo": json.loads(group.attrs["settings"])["photo"]})
    return dreams


def write_layer_site(out: Path, results: h5py.File, model: str, layer: str, atlas: AtlasLinks | None) -> list[int]:
    """The layer page and a page per visualised unit (latest settings) of one layer; returns those units."""
    units = done_units(results, model, layer)
    if not units:
        return []
    vis = latest_group(results, model, layer, "units")
    assert vis is not None  # it holds the units done
    examples = latest_group(results, model, layer, "examples")
    examples = examples if examples is not None and "value" in examples else None
    layer_dir = out / slug(model) / slug(layer)
    (layer_dir / "layer").mkdir(parents=True, exist_ok=True)
    for unit in units:
        _save_png(vis["images"][unit], layer_dir / "vis" / f"{unit}.png")
    extra: dict[int, dict[str, list[str]]] = {}  # the other unit lenses: unit -> the images of each
    for lens in ("neurons", "diversity"):
        group = latest_group(results, model, layer, lens)
        if group is None:
            continue  # no units done in this lens
        for unit in set(done_units(results, model, layer, lens)) & set(units):
            images = group["images"][unit]
            images = images if images.ndim == 4 else images[None]
            extra.setdefault(unit, {})[lens] = [f"{lens}/{unit}-{i}.png" for i in range(len(images))]
            for i, image in enumerate(images):
                _save_png(image, layer_dir / lens / f"{unit}-{i}.png")
    dream = latest_group(results, model, layer, "deepdream")
    dream = dream if dream is not None and "image" in dream else None
    if dream is not None:
        _save_png(dream["image"][()], layer_dir / "layer" / "deepdream.png")
    photo_dream = latest_group(results, model, layer, "dream")
    if photo_dream is not None and "image" in photo_dream:
        Image.fromarray(photo_dream["input"][()]).save(layer_dir / "layer" / "dream-photo.jpg", quality=90)
        Image.fromarray(photo_dream["image"][()]).save(layer_dir / "layer" / "dream.jpg", quality=90)
    cartoons = latest_group(results, model, layer, "caricature")
    photos = cartoons["photos"].asstr()[()].tolist() if cartoons is not None and "images" in cartoons else []
    if cartoons is not None and photos:
        for i, (photo, image) in enumerate(zip(cartoons["inputs"], cartoons["images"], strict=True)):
            Image.fromarray(photo).save(layer_dir / "layer" / f"photo-{i}.jpg", quality=90)
            _save_png(image, layer_dir / "layer" / f"caricature-{i}.png")
    key = examples.name.rsplit("/", 1)[-1] if examples is not None else ""
    if examples is not None:
        for stale in (layer_dir / "examples").glob("*"):  # patches of other example settings
            if stale.name != key:
                shutil.rmtree(stale)
        write_example_images(examples, units, out / slug(model) / "images", layer_dir / "examples" / key)
    circuits = stored_circuits(results, model, layer)
    below_pages = {
        name: set(done_units(results, model, name)) for name in {report["below"] for report in circuits.values()}
    }
    users = _users(results, model, layer)

    root = "../../"
    settings = json.loads(vis.attrs["settings"])
    common = {"root": root, "kind": "unit", "atlas": atlas, "size": settings["size"], "steps": settings["steps"]}
    if examples is not None:
        common |= {"top_k": examples["row"].shape[1], "images": json.loads(examples.attrs["settings"])["images"]}
    for i, unit in enumerate(units):
        report = circuits.get(unit)
        _render(
            "unit.html",
            layer_dir / f"{unit}.html",
            **common,
            title=f"{model} · {layer} · unit {unit}",
            crumbs=[(model, "../index.html"), (layer, "index.html"), (f"unit {unit}", None)],
            layer=layer,
            unit=unit,
            previous=units[i - 1] if i else None,
            following=units[i + 1] if i + 1 < len(units) else None,
            objective=float(vis["objective"][unit]),
            lenses={"neurons": [], "diversity": [], **extra.get(unit, {})},
            examples=None if examples is None else _example_figures(examples, unit, root, slug(model), key),
            circuit=None if report is None else _circuit_figure(report, layer_dir, below_pages[report["below"]]),
            users=sorted(users.get(unit, []), key=lambda use: -use[2]),
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
        dreams=_dreams(results, model),
        photos=photos,
        atlas=atlas,
    )
    return units


def _site_contents(results: h5py.File) -> dict[str, list[tuple[str, int, bool]]]:
    """Model -> [(layer, visualised units, has a DeepDream)] of everything in the results file."""
    contents: dict[str, list[tuple[str, int, bool]]] = {}
    for model in results:
        for layer in _forward_order(results, model):
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
        graph = stored_graph(results, model)
        pages = {layer: f"{slug(layer)}/index.html" for layer, *_ in layers}
        _render(
            "model.html",
            out / slug(model) / "index.html",
            root="../",
            kind="model",
            title=model,
            crumbs=[(model, None)],
            layers=layers,
            graph=markupsafe.Markup(graph_svg(graph, pages.get)) if graph.nodes else None,
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
