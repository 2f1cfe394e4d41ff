"""`atlas run atlas` (`make atlas`): collect -> project -> grid -> render -> compose, into one run folder.

The run folder holds `store.h5` (the stages' HDF5 contract), the composed atlases and their viewer. A run of
several layers collects them in one pass over the images into one store (a group per layer), then projects,
grids, renders and composes each layer with its own settings (the config's per-layer overrides); a rerun that
asks for one more layer collects only that layer.
The store is the truth: each product records its settings and what it was made from (atlas.store lineage), and
a stage is skipped only when `store.fresh` says its product is up to date and complete. An interrupted or repeated
run only does what is missing; a changed stage setting redoes that stage and, as their inputs are then new, every
later one; `--force [STAGE ...]` redoes stages whatever the store holds.

Everything that can stop a run (the model a layer picks, the config, a missing weights file) is settled
before torch and the stages are imported, so such a run stops within a second.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from atlas import AtlasError
from atlas.config import Settings, check_number, config_path, load_config, run_layers
from atlas.models.registry import locate_weights, model_for_layer
from atlas.store import (
    ACCENTUATED,
    ACTIVATIONS,
    CELL,
    COLLECT_SETTINGS,
    COLLECTED,
    GRIDDED,
    GRIDS,
    ICON_DONE,
    LAYOUT,
    RENDERED,
    fingerprint,
    fresh,
    icons_made,
    made,
)

if TYPE_CHECKING:  # torch is imported only once the run's settings are checked
    from atlas.images import ImageRecord
    from atlas.models.classifier import Classifier

log = logging.getLogger("pipelines.atlas")


def stage_settings() -> dict[str, type[Settings]]:
    """Each config section's settings class (imported on demand: torch and umap take seconds to import)."""
    from atlas.layout import LayoutSettings
    from atlas.stages.collect import CollectSettings
    from atlas.stages.compose import ComposeSettings
    from atlas.stages.grid import GridSettings
    from atlas.stages.render import RenderSettings

    return {
        "collect": CollectSettings,
        "project": LayoutSettings,
        "grid": GridSettings,
        "render": RenderSettings,
        "compose": ComposeSettings,
    }


def pick_model(
    model_name: str | None, layers: list[str] | None, config_file: str | Path | None
) -> tuple[str | None, Path]:
    """The model and config of a run: with no model or config named, a layer picks the zoo model that owns it.

    `mixed4c` is only lucid InceptionV1's own layer name, so it selects `inceptionv1` and configs/inceptionv1.yaml.
    """
    if model_name is None and config_file is None and layers:
        model_name = model_for_layer(layers[0])
    return model_name, Path(config_file) if config_file else config_path(model_name)


def run_data(data: str | None, config: dict) -> str:
    """The data argument, else the config's; the demo photos when the config's folder is not there.

    On the demo photos a config that names a `demo_config` runs at that config's settings instead (the paper's
    one position per image gives 22 samples); one log line says which data and settings the run uses.
    """
    demo = f" at the settings of configs/{config['demo_config']}" if config.get("demo_config") else ""
    configured = data or config.get("data") or "demo"
    missing = not data and configured != "demo" and not Path(configured).exists()
    if missing:
        log.info(
            "data folder %s does not exist: using the bundled demo photos%s (give yours with DATA=)", configured, demo
        )
    elif configured == "demo" and demo:
        log.info("data: the bundled demo photos%s", demo)
    return "demo" if missing else configured


STAGES = ("collect", "project", "grid", "render", "compose")


def run_stage(
    stage: str, up_to_date: bool, work: Callable[[], object], force: Collection[str] = (), of: str = ""
) -> bool:
    """Run `work` unless its product is up to date (and the stage is not forced); returns whether it ran. `of`:
    the layer it is run for, in a run of several."""
    name = f"{stage} {of}" if of else stage
    if up_to_date and stage not in force:
        log.info("%s: up to date, skipped", name)
        return False
    started = time.perf_counter()
    log.info("%s: running", name)
    work()
    log.info("%s: done in %.1f s", name, time.perf_counter() - started)
    return True


def collected(store: Path, layer: str | None = None) -> bool:
    """Whether the store opens as a finished collection (its settings record) and, with `layer`, holds that
    layer's every per-sample dataset, all with the same number of rows (more than none)."""
    import h5py

    try:
        with h5py.File(store, "r") as f:
            if COLLECT_SETTINGS not in f.attrs:
                return False
            if layer is None:
                return True
            group = f.get(layer)
            if group is None or not all(n in group for n in COLLECTED):
                return False
            rows = {group[name].shape[0] for name in COLLECTED}
    except OSError:  # missing, truncated or not HDF5
        return False
    return len(rows) == 1 and rows.pop() > 0


def projected(store: Path, layer: str, recorded: dict) -> bool:
    """Whether the layer has a layout of every sample, made with these settings from the collection as it is."""
    import h5py

    try:
        with h5py.File(store, "r") as f:
            layout = f[layer].get(LAYOUT)
            rows = len(f[layer][ACTIVATIONS])
            return fresh(layout, recorded, made(f[layer])) and layout.shape == (rows, 2)
    except (OSError, KeyError):
        return False


def gridded(store: Path, layer: str, settings: Settings) -> bool:
    """Whether every grid size exists with its cells of every sample, made with these settings from the layout."""
    import h5py

    try:
        with h5py.File(store, "r") as f:
            rows, layout = len(f[layer][ACTIVATIONS]), made(f[layer].get(LAYOUT))
            grids = [f[layer].get(f"{GRIDS}/{size}") for size in settings.sizes]
            return all(
                fresh(g, settings, layout) and all(name in g for name in GRIDDED) and len(g[CELL]) == rows
                for g in grids
            )
    except (OSError, KeyError):
        return False


def composed(run_dir: Path, store: Path, atlas_id: str, layer: str, sizes: list[int], settings: Settings) -> bool:
    """Whether the run folder's manifest lists this atlas, composed with these settings from the icons as they are
    now, and holds its viewer and every grid's atlas image."""
    import h5py

    from atlas.site import MANIFEST

    try:
        entries = {e["id"]: e for e in json.loads((run_dir / MANIFEST).read_text())["atlases"]}
        with h5py.File(store, "r") as f:
            icons = {str(size): icons_made(f[layer][f"{GRIDS}/{size}"]) for size in sizes}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    entry = entries.get(atlas_id, {})
    pngs = [run_dir / atlas_id / f"grid-{size}" / "atlas.png" for size in sizes]
    return (
        all(icons.values())
        and entry.get("made_from") == icons
        and entry.get("settings") == fingerprint(settings)
        and (run_dir / "index.html").is_file()
        and all(png.is_file() for png in pngs)
    )


def regrid_stale(store: Path, layer: str | None, size: int) -> bool:
    """Grid the layer again, with the settings its grid recorded, when that grid was made from an earlier layout
    (`atlas project` ran since), so that `atlas render` renders the layout as it is; returns whether it did."""
    from atlas.stages.grid import GridSettings, grid_store
    from atlas.store import MADE_FROM, SETTINGS, layer_group, open_store

    with open_store(store) as f:
        group = layer_group(f, layer)
        cells = group.get(f"{GRIDS}/{size}")
        if cells is None or SETTINGS not in cells.attrs:
            return False  # no grid (render says so), or one from before lineage was recorded
        if made(group.get(LAYOUT)) == str(cells.attrs.get(MADE_FROM, "")):
            return False
        name, recorded = group.name.strip("/"), GridSettings.from_config(json.loads(cells.attrs[SETTINGS]))
    log.info("%s: the layout changed since grid %d was made: gridding it again", name, size)
    grid_store(store, layer=name, **asdict(recorded))
    return True


def drop_icons(store: Path, layer: str, sizes: list[int]) -> None:
    """Delete the layer's icons at these grid sizes, so that a forced render renders every one again."""
    import h5py

    with h5py.File(store, "a") as f:
        for size in sizes:
            grid = f[layer][f"{GRIDS}/{size}"]
            for name in (*RENDERED, ICON_DONE, ACCENTUATED):
                if name in grid:
                    del grid[name]


def fresh_store(store: Path, forced: bool) -> None:
    """Before collect runs: remove a store that is not a finished collection (a rerun merges it anew from the
    batch shards), and when forced, the store and its shards both. A finished store stays: collect adds the
    layers it lacks."""
    import shutil

    parts = store.with_name(store.name + ".parts")
    if forced and parts.exists():
        shutil.rmtree(parts)
    if store.exists() and (forced or not collected(store)):
        store.unlink()


def run_atlas(
    config_file: Path,
    model_name: str | None = None,
    layers: list[str] | None = None,
    data: str | None = None,
    limit: int | None = None,
    device: str | None = None,
    out: Path | None = None,
    weights: str | None = None,
    force: Collection[str] = (),
    threads: int | None = None,
) -> Path:
    """Build the atlas of each of a model's `layers` (default: the config's) into one run folder; returns the
    viewer's index.html. `force`: stages to redo (and with them every later stage) even when the store holds
    their outputs."""
    base = load_config(config_file, {}, None)
    same_model = model_name in (None, base.get("model"))
    model_name = model_name or base["model"]
    weights = locate_weights(model_name, weights or (base.get("weights") if same_model else None))
    data = run_data(data, base)
    if data == "demo" and base.get("demo_config"):
        config_file = Path(config_file).parent / base["demo_config"]
        base = load_config(config_file, {}, None)
    wanted = layers or (run_layers(base) if same_model else None)
    # the stages' settings of every layer, validated before any work
    configs = {name: load_config(config_file, stage_settings(), name) for name in (wanted or [None])}
    for config in configs.values():
        config["accentuated"] = accentuated_settings(config.get("accentuated"), str(config_file))
    check_shared_collection(configs)
    if limit is not None:
        check_number("--limit (N)", limit, 1)

    from atlas.images import list_images
    from atlas.models.zoo import load_model
    from atlas.runtime import resolve, set_threads

    device = str(resolve("collect", device).device)  # checked: one a run can use
    first = next(iter(configs.values()))
    log.info("%d torch threads", set_threads(threads or first.get("threads")))

    model = load_model(model_name, weights=weights, device=device)
    configs = {model.resolve_layer(name or model.default_layer): config for name, config in configs.items()}
    names = "+".join(configs)
    run_dir = Path(out) if out else Path("data/runs") / f"{model_name}-{names}{f'-n{limit}' if limit else ''}"
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "model %s, %s %s, data %s -> %s", model_name, "layers" if len(configs) > 1 else "layer", names, data, run_dir
    )
    records = list_images(data, model.class_names, model.imagenet_index)[:limit]
    _run_stages(configs, model, records, str(data), run_dir, device, force)
    return run_dir / "index.html"


def accentuated_settings(values: dict | None, where: str) -> Settings | None:
    """A config's `accentuated:` section: the render settings of each grid's second icon set, its cells' most
    typical example patches accentuated (atlas.stages.render); None when the config asks for none."""
    from atlas.stages.render import RenderSettings

    if not values:
        return None
    if not isinstance(values, dict):
        raise AtlasError(f"config {where} (accentuated:) must be a mapping")
    settings = RenderSettings.from_config(values, f"{where} (accentuated:)")
    if settings.accentuate is None:
        raise AtlasError(f"config {where} (accentuated:) needs accentuate: the distance an icon may move, in (0, 1]")
    return settings


def check_shared_collection(configs: dict[str | None, dict]) -> None:
    """One line when the layers of a run ask for different collect settings: one pass over the images collects
    them all, so they share their positions (a layer's sample i is every layer's sample i)."""
    first, *others = configs.items()
    for name, config in others:
        if config["collect"] != first[1]["collect"]:
            raise AtlasError(
                f"layers {first[0]} and {name} have different collect settings: a run collects its layers in one "
                f"pass, with one collect: section (per-layer overrides may set project, grid, render and compose)"
            )


def run_plan(configs: dict[str, dict], model: Classifier, images: int, device: str) -> str:
    """One line: images, samples, cells per grid, icons x attempts x steps, and the time that collect and render
    should take, from a few seconds' timed warm-up of each on `device` (projection and composition not counted)."""
    from atlas.stages import collect, render

    first = next(iter(configs.values()))
    positions = first["collect"].positions  # checked against every layer's interior before the plan
    samples = images * positions
    channels = {name: s[0] for name, *s in model.layer_shapes()}
    icons, render_s = 0, 0.0
    for layer, config in configs.items():
        made = sum(min(size * size, samples // config["grid"].min_count) for size in config["grid"].sizes)
        icons += made  # at most one per cell of min_count
        for settings in filter(None, (config["render"], config.get("accentuated"))):
            rate = render.timed_rate(model, layer, channels[layer], settings)
            render_s += made * settings.attempts * settings.steps / rate
    collect_s = images / collect.timed_rate(model, list(configs), positions)
    sizes = list(dict.fromkeys(size for config in configs.values() for size in config["grid"].sizes))
    settings = first["render"]
    each = f" in each of {len(configs)} layers" if len(configs) > 1 else ""
    return (
        f"plan: {images:,} images x {positions} positions = {samples:,} samples{each}; grids "
        f"{', '.join(f'{g}x{g}' for g in sizes)} ({', '.join(f'{g * g:,}' for g in sizes)} cells); at most {icons:,} "
        f"icons x {settings.attempts} attempts x {settings.steps} steps; estimate {_duration(collect_s + render_s)} "
        f"(collect {_duration(collect_s)}, render {_duration(render_s)}, from a timed warm-up on {device})"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _run_stages(
    configs: dict[str, dict],
    model: Classifier,
    records: list[ImageRecord],
    dataset: str,
    run_dir: Path,
    device: str,
    force: Collection[str] = (),
) -> None:
    """collect (every layer at once) -> project -> grid -> render -> compose (each layer) into run_dir/store.h5,
    each skipped when up to date."""
    from atlas.runtime import resolve
    from atlas.stages import collect

    layers = list(configs)
    shapes = {name: tuple(s) for name, *s in model.layer_shapes()}
    configs = shared_positions(configs, shapes)
    wanted = next(iter(configs.values()))["collect"]
    collect.check_counts(records, {layer: shapes[layer] for layer in layers}, wanted.positions)
    log.info("%s", run_plan(configs, model, len(records), device))
    store = run_dir / "store.h5"
    collect_args = {**asdict(wanted), "layers": layers, "device": device, "dataset": dataset}

    def collect_stage() -> None:
        fresh_store(store, "collect" in force)
        collect.collect(model, records, store, **collect_args)

    policy = resolve("collect", device, wanted.precision, wanted.memory_format)
    method = collect.attribution_record(model, wanted.attribution, wanted.attribution_steps, wanted.baseline_images)
    settings = collect.collection_settings(
        model, records, wanted.positions, wanted.seed, wanted.batch_size, dataset, policy, method
    )
    run_stage("collect", collect.collected(store, settings, layers), collect_stage, force)
    for layer, config in configs.items():
        _run_layer(config, model, layer, store, run_dir, device, force, layer if len(layers) > 1 else "")


def shared_positions(configs: dict[str, dict], shapes: dict[str, tuple]) -> dict[str, dict]:
    """The configs of a run of several layers with at most as many positions as the smallest layer's interior has
    (one log line when that is fewer than configured): the layers share their samples, so a 7x7 layer's 25 interior
    positions bound them all. A run of one layer keeps its number, and `check_counts` refuses one too large."""
    from atlas.stages.collect import smallest_interior

    if len(configs) < 2:
        return configs
    layer, height, width, interior = smallest_interior({name: shapes[name] for name in configs})
    positions = next(iter(configs.values()))["collect"].positions  # an int >= 1 (CollectSettings)
    if positions <= interior or interior < 1:  # none: check_counts says so
        return configs
    log.info(
        "positions: %d per image, all of %s's interior (%dx%d), not the configured %d: the layers of a run share "
        "their samples",
        interior,
        layer,
        height,
        width,
        positions,
    )
    return {
        name: {**config, "collect": replace(config["collect"], positions=interior)} for name, config in configs.items()
    }


def _render_all(store: Path, layer: str, sizes: list[int], settings: Settings, model: Classifier, device: str) -> None:
    """Render the icons of these settings at every grid size (each resumes: only the icons not yet made)."""
    from atlas.stages import render

    for size in sizes:
        render.render_store(store, layer, size, settings, model=model, device=device)


def _run_layer(
    config: dict,
    model: Classifier,
    layer: str,
    store: Path,
    run_dir: Path,
    device: str,
    force: Collection[str],
    of: str,
) -> None:
    """project -> grid -> render -> compose of one collected layer, each skipped when up to date."""
    from atlas.runtime import resolve
    from atlas.stages import compose, grid, project, render

    sizes = list(config["grid"].sizes)
    layout, icons, grids = config["project"], config["render"], config["grid"]
    recorded = {"settings": layout, "device": device}
    run_stage(
        "project",
        projected(store, layer, recorded),
        lambda: project.project_store(store, layer, layout, device),
        force,
        of,
    )
    run_stage(
        "grid", gridded(store, layer, grids), lambda: grid.grid_store(store, layer=layer, **asdict(grids)), force, of
    )

    def render_stage() -> None:
        if "render" in force:
            drop_icons(store, layer, sizes)
        _render_all(store, layer, sizes, icons, model, device)

    policy = resolve("render", device)
    done = all(render.rendered(store, layer, size, icons, policy, model) for size in sizes)
    run_stage("render", done, render_stage, force, of)
    accentuated = config.get("accentuated")
    if accentuated is not None:  # the second icon set, after the first: a forced render dropped both
        done = all(render.rendered(store, layer, size, accentuated, policy, model) for size in sizes)
        run_stage("accentuate", done, lambda: _render_all(store, layer, sizes, accentuated, model, device), (), of)
    drawn = config["compose"]
    run_stage(
        "compose",
        composed(run_dir, store, f"layer-{layer}", layer, sizes, drawn),
        lambda: compose.compose_run(store, run_dir, [layer], settings=drawn),
        force,
        of,
    )
