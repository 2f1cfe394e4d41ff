"""`atlas microscope`: the Microscope lenses of one layer into a site folder (after OpenAI Microscope, reference 6).

Computes what is missing into `<out>/microscope.h5` (atlas.microscope.results), in order: dataset
examples, unit visualisations, DeepDream and caricatures, the atlas links; then writes the site.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atlas import AtlasError
from atlas.images import list_images
from atlas.microscope.examples import TOP_K, dataset_examples
from atlas.microscope.lenses import (
    CARICATURES,
    SIZE,
    STEPS,
    TRANSFORMS,
    LensSettings,
    default_photos,
    layer_lenses,
    parse_units,
    render_units,
)
from atlas.microscope.links import link_atlas
from atlas.microscope.results import RESULTS, lens_group
from atlas.microscope.site import write_index, write_layer_site
from atlas.models import Classifier, load_model
from atlas.optvis import PARAM, layer_map, model_device
from atlas.runtime import default_device, resolve
from atlas.store import open_store


def run_microscope(
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
    if top_k < 1 or caricatures < 0 or (batch_size is not None and batch_size < 1):
        raise AtlasError("top-k and batch size must be positive and caricatures not negative")
    lens = LensSettings(size=size, steps=steps, transforms=transforms, param=param, lr=lr, seed=seed)
    if isinstance(model, Classifier):
        net = model
    else:
        net = load_model(model, weights=weights, device=device or default_device())
    resolve("render", model_device(net)).prepare(net)  # the renderer's policy: channels_last
    layer = net.resolve_layer(layer or net.default_layer)
    channels = layer_map(net, layer, net.input_size)[0]
    layer_map(net, layer, size)
    chosen = parse_units(units, channels)
    records = list_images(data, net.class_names, net.imagenet_index)[:limit]
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
        vis_settings = {"model": net.name, "weights": net.weights, "layer": layer, **lens.record()}
        vis = lens_group(results, net.name, layer, "units", vis_settings)
        rendered = render_units(vis, net, layer, chosen, channels, lens, batch_size=batch_size, progress=progress)
        timings["units_s"] = time.perf_counter() - start

        start = time.perf_counter()
        chosen_photos = list(photos) if photos else default_photos(records, caricatures)
        layer_images = layer_lenses(results, net, layer, chosen_photos, lens)
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
