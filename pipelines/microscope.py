"""`atlas run microscope`: the Microscope lenses of one or more layers into a site folder (after OpenAI Microscope,
reference 6).

Computes what is missing into `<out>/microscope.h5` (atlas.microscope.results), in order: dataset examples (one
pass for all the layers), circuits (each layer from the next one below it in the run), unit visualisations
(channel, neuron, diversity), DeepDream, caricatures and a photo dreamt at each layer, the model graph and the
atlas links; then writes the site.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from atlas import AtlasError
from atlas.images import list_images
from atlas.microscope.circuits import circuit_inputs, circuit_lens, lower_neighbours, stored_circuits
from atlas.microscope.dreams import dream_lens
from atlas.microscope.examples import TOP_K, dataset_examples
from atlas.microscope.graph import graph_layers, microscope_layers, store_graph
from atlas.microscope.lenses import (
    CARICATURES,
    LensSettings,
    checked_lenses,
    default_photos,
    layer_lenses,
    parse_units,
    render_units,
    unit_lens_group,
)
from atlas.microscope.links import link_atlas
from atlas.microscope.results import RESULTS, done_units
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
    layers: Sequence[str] | None = None,
    data: str | Path = "demo",
    units: str | int | None = None,
    lens: LensSettings = LensSettings(),
    lenses: Sequence[str] | None = None,
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
    """Compute what is missing of the lenses of `layers` into `out`/microscope.h5 and write the site; returns a
    summary.

    layers: layer names, or ["all"] for the model's Microscope layers (default: the model's atlas layer). Each
    layer but the lowest gets the circuit lens of its units from the next layer below it in the run, and the lower
    units those circuits list are visualised too, so the links between the layers' unit pages all lead somewhere.
    units: see `parse_units` (default: every unit), per layer. atlas: a run folder holding a layer's atlas (default:
    `out` itself); store: its HDF5 store with the grid means (default: <atlas>/store.h5).
    lens: how the unit visualisations, DeepDream and caricatures are optimised; lenses: the unit lenses to render
    (UNIT_LENSES; default: all; "channel" is always among them).
    """
    if top_k < 1 or caricatures < 0 or (batch_size is not None and batch_size < 1):
        raise AtlasError("top-k and batch size must be positive and caricatures not negative")
    kinds = checked_lenses(lenses)
    net = _prepared_model(model, weights, device)
    below_of = lower_neighbours(net, _run_layers(net, layers))  # in forward order
    channels = {layer: _layer_channels(net, layer, lens.size) for layer in below_of}
    chosen = {layer: parse_units(units, count) for layer, count in channels.items()}
    records = _checked_images(net, data, limit, photos)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    counts = {"rendered": 0, "circuits": 0, "layer_images": 0}
    with open_store(out / RESULTS, "a") as results:
        with _timed(timings, "examples_s"):
            scanned = dataset_examples(results, net, list(channels), records, top_k=top_k, workers=workers)
        with _timed(timings, "circuits_s"):
            shown = {layer: list(units_of) for layer, units_of in chosen.items()}  # with the inputs circuits list
            for layer, below in below_of.items():
                if below is not None:
                    counts["circuits"] += circuit_lens(results, net, layer, below, chosen[layer], workers=workers)
                    listed = stored_circuits(results, net.name, layer)
                    inputs = [c for unit in chosen[layer] for c in circuit_inputs(listed[unit])]
                    shown[below] = list(dict.fromkeys(shown[below] + inputs))
        with _timed(timings, "units_s"):
            for layer, count in channels.items():
                for kind in kinds:
                    group = unit_lens_group(results, net, layer, kind, lens)
                    todo = shown[layer] if kind == "channel" else chosen[layer]  # thumbnails for the listed inputs
                    counts["rendered"] += render_units(
                        group, net, layer, todo, count, lens, kind=kind, batch_size=batch_size, progress=progress
                    )
        with _timed(timings, "layer_s"):
            chosen_photos = list(photos) if photos else default_photos(records, caricatures)
            for layer in channels:
                counts["layer_images"] += layer_lenses(results, net, layer, chosen_photos, lens)
                if chosen_photos:
                    counts["layer_images"] += dream_lens(results, net, layer, chosen_photos[0])
        with _timed(timings, "site_s"):
            store_graph(results, net, graph_layers(net, list(channels)))
            pages, linked = {}, []
            for layer in channels:
                done = done_units(results, net.name, layer)
                links = link_atlas(out, Path(atlas or out), Path(store) if store else None, net.name, layer, done)
                linked += [layer] if links is not None else []
                pages[layer] = len(write_layer_site(out, results, net.name, layer, links))
            index = write_index(out, results)
    work = {"dataset_pass": scanned, "atlas": linked, "pages": pages}
    seconds = {name: round(value, 1) for name, value in timings.items()}
    return {"index": str(index), "model": net.name, "layers": list(channels), **counts, **work, **seconds}


def _prepared_model(model: str | Classifier, weights: str | None, device: str | None) -> Classifier:
    """The model (loaded when named) in the renderer's policy (channels_last)."""
    net = (
        model
        if isinstance(model, Classifier)
        else load_model(model, weights=weights, device=resolve("render", device).device)
    )
    resolve("render", model_device(net)).prepare(net)
    return net


def _run_layers(net: Classifier, layers: Sequence[str] | None) -> list[str]:
    """The run's layers by their canonical names: the given ones, the model's Microscope layers for ["all"], or
    the model's atlas layer."""
    if not layers:
        return [net.resolve_layer(net.default_layer)]
    if list(layers) == ["all"]:
        return microscope_layers(net, spatial=True)
    return list(dict.fromkeys(net.resolve_layer(layer) for layer in layers))


def _layer_channels(net: Classifier, layer: str, size: int) -> int:
    """The layer's channels; an AtlasError when it has no spatial map at the input or the visualisation size."""
    channels = layer_map(net, layer, net.input_size)[0]
    layer_map(net, layer, size)
    return channels


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
