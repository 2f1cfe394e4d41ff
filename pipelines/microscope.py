"""`atlas run microscope`: the Microscope lenses of one layer into a site folder (after OpenAI Microscope, reference 6).

Computes what is missing into `<out>/microscope.h5` (atlas.microscope.results), in order: dataset
examples, unit visualisations, DeepDream and caricatures, the atlas links; then writes the site.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from atlas import AtlasError
from atlas.images import list_images
from atlas.microscope.examples import TOP_K, dataset_examples
from atlas.microscope.lenses import (
    CARICATURES,
    LensSettings,
    default_photos,
    layer_lenses,
    parse_units,
    render_units,
)
from atlas.microscope.links import link_atlas
from atlas.microscope.results import RESULTS, lens_group
from atlas.microscope.site import write_index, write_layer_site
from atlas.models.classifier import Classifier
from atlas.models.zoo import load_model
from atlas.optvis import layer_map, model_device
from atlas.runtime import resolve
from atlas.store import open_store


def run_microscope(
    model: str | Classifier,
    out: str | Path,
    *,
    layer: str | None = None,
    data: str | Path = "demo",
    units: str | int | None = None,
    lens: LensSettings = LensSettings(),
    top_k: int = TOP_K,
    limit: int | None = None,
    photos: Sequence[str] | None = None,
    caricatures: int = CARICATURES,
    atlas: str | Path | None = None,
    store: str | Path | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    weights: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Compute what is missing of a layer's lenses into `out`/microscope.h5 and write the site; returns a summary.

    units: see `parse_units` (default: every unit). atlas: a run folder holding the layer's atlas (default:
    `out` itself); store: its HDF5 store with the grid means (default: <atlas>/store.h5).
    lens: how the unit visualisations, DeepDream and caricatures are optimised.
    """
    if top_k < 1 or caricatures < 0 or (batch_size is not None and batch_size < 1):
        raise AtlasError("top-k and batch size must be positive and caricatures not negative")
    net, layer, channels = _prepare_layer(model, weights, device, layer, lens.size)
    chosen = parse_units(units, channels)
    records = _checked_images(net, data, limit, photos)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with open_store(out / RESULTS, "a") as results:
        with _timed(timings, "examples_s"):
            scanned = dataset_examples(results, net, layer, records, top_k=top_k, workers=workers)
        with _timed(timings, "units_s"):
            vis_settings = {"model": net.name, "weights": net.weights, "layer": layer, **lens.record()}
            vis = lens_group(results, net.name, layer, "units", vis_settings)
            rendered = render_units(vis, net, layer, chosen, channels, lens, batch_size=batch_size, progress=progress)
        with _timed(timings, "layer_s"):
            chosen_photos = list(photos) if photos else default_photos(records, caricatures)
            layer_images = layer_lenses(results, net, layer, chosen_photos, lens)
        with _timed(timings, "site_s"):
            done_units = np.flatnonzero(vis["done"][()]).tolist()
            links = link_atlas(out, Path(atlas or out), Path(store) if store else None, net.name, layer, done_units)
            pages = write_layer_site(out, results, net.name, layer, links)
            index = write_index(out, results)
    work = {"dataset_pass": scanned, "layer_images": layer_images, "atlas": links is not None}
    counts = {"units": len(pages), "rendered": rendered, "reused": len(chosen) - rendered, **work}
    seconds = {name: round(value, 1) for name, value in timings.items()}
    return {"index": str(index), "model": net.name, "layer": layer, **counts, **seconds}


def _prepare_layer(
    model: str | Classifier, weights: str | None, device: str | None, layer: str | None, size: int
) -> tuple[Classifier, str, int]:
    """The model (loaded when named) in the renderer's policy, the layer's canonical name and its channels; an
    AtlasError when the layer has no spatial map at the visualisation size."""
    net = (
        model
        if isinstance(model, Classifier)
        else load_model(model, weights=weights, device=resolve("render", device).device)
    )
    resolve("render", model_device(net)).prepare(net)  # the renderer's policy: channels_last
    layer = net.resolve_layer(layer or net.default_layer)
    channels = layer_map(net, layer, net.input_size)[0]
    layer_map(net, layer, size)
    return net, layer, channels


def _checked_images(net: Classifier, data: str | Path, limit: int | None, photos: Sequence[str] | None) -> list:
    """The dataset's image records (at most `limit`); an AtlasError when there are none or a photo is missing."""
    records = list_images(data, net.class_names, net.imagenet_index)[:limit]
    if not records:
        raise AtlasError(f"{data} holds no images")
    for photo in photos or []:
        if not Path(photo).is_file():
            raise AtlasError(f"photo {photo} does not exist")
    return records


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the seconds the block took as timings[name]."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
