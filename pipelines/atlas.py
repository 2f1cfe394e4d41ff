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

import logging
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from atlas import AtlasError
from atlas.config import Settings, check_number, config_path, load_config, run_layers
from atlas.models.registry import locate_weights, model_for_layer
from pipelines.runner import RunContext, RunFolder, run_stage, up_to_date

if TYPE_CHECKING:  # torch is imported only once the run's settings are checked
    from atlas.stages import Stage

    pass

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
    named = layers or (run_layers(base) if same_model else None)
    wanted: list[str | None] = list(named) if named else [None]
    # the stages' settings of every layer, validated before any work (None: the model's own layer)
    configs = {name: load_config(config_file, stage_settings(), name) for name in wanted}
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
    by_layer = {model.resolve_layer(name or model.default_layer): config for name, config in configs.items()}
    layers = list(by_layer)
    folder = RunFolder(Path(out)) if out else RunFolder.named(model_name, layers, limit)
    records = list_images(data, model.class_names, model.imagenet_index)[:limit]  # before anything is made
    log.info(
        "model %s, %s %s, data %s -> %s",
        model_name,
        "layers" if len(layers) > 1 else "layer",
        "+".join(layers),
        data,
        folder.path,
    )
    if weights == "random":
        log.warning("random weights: the atlas shows an untrained network (grey icons, labels of no class)")
    with (
        folder.lock(),
        RunContext(folder.store, folder.path, device, model, records, str(data), layers, frozenset(force)) as ctx,
    ):
        _run_stages(ctx, by_layer)
    return folder.index


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


def run_plan(configs: dict[str, dict], ctx: RunContext) -> str:
    """One line: images, samples, cells per grid, icons x attempts x steps, and the time that collect and render
    should take, from a few seconds' timed warm-up of each on the run's device (projection and composition not
    counted)."""
    from atlas.stages import collect, render

    assert ctx.model is not None
    first = next(iter(configs.values()))
    positions = first["collect"].positions  # checked against every layer's interior before the plan
    images, samples = len(ctx.records), len(ctx.records) * positions
    icons, render_s = 0, 0.0
    for layer, config in configs.items():
        made = sum(min(size * size, samples // config["grid"].min_count) for size in config["grid"].sizes)
        icons += made  # at most one per cell of min_count
        for settings in filter(None, (config["render"], config.get("accentuated"))):
            rate = render.timed_rate(ctx.model, layer, ctx.shapes[layer][0], settings)
            render_s += made * settings.attempts * settings.steps / rate
    collect_s = images / collect.timed_rate(ctx.model, list(configs), positions)
    sizes = list(dict.fromkeys(size for config in configs.values() for size in config["grid"].sizes))
    settings = first["render"]
    each = f" in each of {len(configs)} layers" if len(configs) > 1 else ""
    return (
        f"plan: {images:,} images x {positions} positions = {samples:,} samples{each}; grids "
        f"{', '.join(f'{g}x{g}' for g in sizes)} ({', '.join(f'{g * g:,}' for g in sizes)} cells); at most {icons:,} "
        f"icons x {settings.attempts} attempts x {settings.steps} steps; estimate {_duration(collect_s + render_s)} "
        f"(collect {_duration(collect_s)}, render {_duration(render_s)}, from a timed warm-up on {ctx.device})"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _run_stages(ctx: RunContext, configs: dict[str, dict]) -> None:
    """collect (every layer at once) -> project -> grid -> render -> accentuate -> compose (each layer) into the run
    folder's store, each skipped when up to date (pipelines.runner)."""
    from atlas.stages import collect
    from atlas.stages.collect import COLLECT
    from atlas.stages.compose import COMPOSE
    from atlas.stages.grid import GRID, check_room
    from atlas.stages.project import PROJECT
    from atlas.stages.render import ACCENTUATE, RENDER

    model = ctx.model
    assert model is not None  # a layer atlas run has its model
    configs = shared_positions(configs, ctx.shapes)
    wanted = next(iter(configs.values()))["collect"]
    collect.check_counts(ctx.records, {layer: ctx.shapes[layer] for layer in ctx.layers}, wanted.positions)
    samples, classes = len(ctx.records) * wanted.positions, len(model.class_names)
    for layer, config in configs.items():  # every grid fits this machine's memory, before collect starts
        check_room(list(config["grid"].sizes), samples, ctx.shapes[layer][0], classes)
        for section in ("render", "accentuated"):  # an icon of no steps is its start: noise, or a photo
            if config.get(section) and config[section].steps < 1:
                raise AtlasError(f"{section}: steps 0 would draw each icon's starting image; an atlas needs at least 1")
    sections: list[tuple[Stage, str]] = [(PROJECT, "project"), (GRID, "grid"), (RENDER, "render")]
    sections += [(ACCENTUATE, "accentuated"), (COMPOSE, "compose")]
    plan: list[tuple[Stage, object, str | None, list[int]]] = [(COLLECT, wanted, None, [])]
    for name, config in configs.items():  # accentuated: only where the config asks for a second icon set
        sizes = list(config["grid"].sizes)
        plan += [(stage, config[section], name, sizes) for stage, section in sections if config.get(section)]
    if ctx.force or not all(_fresh(ctx, *step) for step in plan):  # a rerun with nothing to do has no warm-up
        log.info("%s", run_plan(configs, ctx))
    for stage, settings, at, sizes in plan:
        ctx.grid_sizes = sizes
        run_stage(ctx, stage, settings, at, at if len(configs) > 1 and at else "")


def _fresh(ctx: RunContext, stage: Stage, settings: object, layer: str | None, sizes: list[int]) -> bool:
    ctx.grid_sizes = sizes
    return up_to_date(ctx, stage, settings, layer)


def shared_positions(configs: dict[str, dict], shapes: dict[str, tuple[int, int, int]]) -> dict[str, dict]:
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
