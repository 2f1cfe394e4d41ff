"""`make class-atlas` and `atlas run class-atlas`: a class activation atlas, or a two-class comparison (reference 1.7).

From a collected store (the parent) into a run folder, beside the atlases already there:
select (winner and magnitude filters -> a subset store holding the whole layer's whitening) -> layout (t-SNE or
UMAP; for a comparison, attribution difference x 1-D t-SNE) -> grid (keeping that whitening) -> render -> compose.
When the parent's layer has rendered grids (a layer atlas), the attribution heat-map of each class is composed too.

Subset stores are <out>/stores/<atlas id>.h5. As in pipelines.atlas, each product records its settings and what it
was made from (atlas.store lineage; a subset store's layer, the parent's layer), and a repeated run skips the stages
whose products are up to date.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import h5py

from atlas import AtlasError
from atlas.class_atlas import (
    ComparisonSettings,
    SelectSettings,
    comparison_layout_store,
    fit_perplexity,
    select_samples,
    winner_counts,
    write_subset_store,
)
from atlas.classes import resolve_class
from atlas.config import CONFIG_DIR, Settings, config_path, load_config
from atlas.runtime import resolve
from atlas.site import MANIFEST
from atlas.stages import Context
from atlas.stages.compose import ComposeSettings, ComposeStage
from atlas.stages.grid import GRID, RIDGE, GridSettings
from atlas.stages.project import PROJECT, LayoutSettings
from atlas.stages.render import RENDER, RenderSettings
from atlas.store import (
    ACTIVATIONS,
    ATTRIBUTIONS,
    COLLECT_SETTINGS,
    GRIDS,
    ICONS,
    LAYOUT,
    WHITENING,
    Layer,
    Node,
    class_names,
    made,
    open_store,
    record_lineage,
)
from pipelines.runner import RunContext, RunFolder, run_stage

log = logging.getLogger("pipelines.class_atlas")

# The paper's class-atlas settings are configs/inceptionv1.yaml's `class_atlas:` (reference 1.7 and 5), stated once
# there: every config's own `class_atlas:` overrides them (configs/efficientnet-lite0.yaml: CPU-sized renders).
PAPER_CONFIG = CONFIG_DIR / "inceptionv1.yaml"
COMPARE_SECTIONS = ("select", "layout", "grid", "render")
SECTIONS: dict[str, type[Settings]] = {
    "select": SelectSettings,
    "project": LayoutSettings,
    "layout": ComparisonSettings,
    "grid": GridSettings,
    "render": RenderSettings,
    "compose": ComposeSettings,
}
MIN_SAMPLES = 5
FEW_WINNERS = 64  # winner samples below which a class is warned of: fewer than the class grid's 8 x 8 cells


def class_settings(config_file: Path, layer: str, comparison: bool, overrides: dict | None = None) -> dict:
    """The sections (select, project or layout, grid, render, compose) for a class atlas or a comparison: the
    paper's (PAPER_CONFIG), then the config's `class_atlas:` (with its per-layer overrides), then `overrides`;
    checked."""
    paper, paper_compare = _class_section(PAPER_CONFIG, None)
    section, compare = _class_section(config_file, layer)
    own = ("select", "layout", "grid", "render") if comparison else ("select", "project", "grid", "render")
    settings = {}
    for name in (*own, "compose"):
        nested = comparison and name != "compose"
        configured, defaults = (compare, paper_compare) if nested else (section, paper)
        where = f"{config_file} (class_atlas: {'compare: ' if nested else ''}{name}:)"
        values = {**(defaults.get(name) or {}), **(configured.get(name) or {}), **(overrides or {}).get(name, {})}
        settings[name] = SECTIONS[name].from_config(values, where)
    return settings


def _class_section(config_file: Path, layer: str | None) -> tuple[dict, dict]:
    """A config's `class_atlas:` and its `compare:`, checked for unknown sections."""
    section = load_config(config_file, {}, layer).get("class_atlas") or {}
    if not isinstance(section, dict) or not isinstance(section.get("compare") or {}, dict):
        raise AtlasError(f"config {config_file}: class_atlas and its compare must be mappings")
    compare = section.get("compare") or {}
    unknown = (set(section) - ({*SECTIONS, "compare"} - {"layout"})) | (set(compare) - set(COMPARE_SECTIONS))
    if unknown:
        raise AtlasError(f"unknown key(s) {sorted(unknown)} in {config_file} (class_atlas:)")
    return section, compare


@dataclass(frozen=True)
class Parent:
    """What a class atlas takes from its parent store's layer, and what identifies that layer's data."""

    layer: str
    names: list[str]
    model: str
    identity: dict  # store, layer, rows, collection, whitening ridge: a select stage's upstream
    grids: list[int]  # the layer atlas's rendered grid sizes (then the classes' heat-maps are composed too)
    made: str  # the parent layer's identity (atlas.store lineage): what a subset store is made from


def read_parent(store: Path, layer: str | None) -> Parent:
    with open_store(store) as parent:
        view = Layer(parent, layer, needs=(ACTIVATIONS, ATTRIBUTIONS))
        group, layer = view.group, view.name
        whitening = group.get(WHITENING)
        identity = {
            "store": str(store.resolve()),
            "layer": layer,
            "rows": view.rows,
            "collection": str(parent.attrs.get(COLLECT_SETTINGS, "")),
            "whitening_ridge": float(whitening.attrs.get("ridge", RIDGE)) if whitening is not None else RIDGE,
        }
        return Parent(
            layer=layer,
            names=class_names(parent, view.classes),
            model=str(parent.attrs.get("model", "")),
            identity=identity,
            grids=sorted(int(size) for size, grid in group.get(GRIDS, {}).items() if ICONS in grid),
            made=made(group),
        )


def atlas_head(layer: str, classes: list[int], names: list[str]) -> dict:
    """The manifest fields of a class atlas (one class) or a comparison (two) but its paths and sample count."""
    if len(classes) == 2:
        a, b = classes
        return {
            "id": f"compare-{layer}-{a}-{b}",
            "kind": "comparison",
            "class": f"{names[a]} vs {names[b]}",
            "classes": classes,
            "title": f"{layer}: {names[a]} (left) vs {names[b]} (right)",
        }
    (c,) = classes
    return {
        "id": f"class-{layer}-{c}",
        "kind": "class",
        "class": names[c],
        "class_index": c,
        "title": f"{layer}: {names[c]}",
    }


def run_class_atlas(
    store: str | Path,
    out: str | Path,
    class_name: str | int,
    vs: str | int | None = None,
    layer: str | None = None,
    config_file: str | Path | None = None,
    device: str | None = None,
    overrides: dict | None = None,
    batch_size: int | None = None,
    force: bool = False,
) -> list[dict]:
    """Build the class atlas of `class_name` (or, with `vs`, the comparison of the two) into the run folder `out`,
    plus the classes' heat-maps when the parent layer has a rendered atlas. Returns the manifest entries written.

    overrides: {section: {key: value}} over the config, e.g. {"render": {"steps": 64}}.
    batch_size: icon attempts rendered together (not a setting of the result: `render_store`'s default).
    force: build it even for a class that no sample of the store has as its top attribution.
    """

    store, out = Path(store), Path(out)
    parent = read_parent(store, layer)
    layer, names = parent.layer, parent.names
    classes = [resolve_class(name, names) for name in ([class_name] if vs is None else [class_name, vs])]
    if len(set(classes)) != len(classes):
        raise AtlasError(f"--class and --vs are the same class ({names[classes[0]]})")
    settings = class_settings(Path(config_file or config_path(parent.model)), layer, vs is not None, overrides)
    device = str(resolve("render", device).device)
    head = atlas_head(layer, classes, names)
    with RunFolder(out).lock():  # the run folder is written by one run at a time
        (out / "stores").mkdir(exist_ok=True)
        subset = RunContext(
            out / "stores" / f"{head['id']}.h5",
            out,
            device,
            layers=[layer],
            grid_sizes=list(settings["grid"].sizes),
            render_options={"batch_size": batch_size},
        )
        with subset:
            chosen = {**parent.identity, "classes": classes, "select": settings["select"]}
            run_stage(subset, Select(store, parent, classes, head["kind"], chosen, force), settings["select"], layer)
            head = {**head, "samples": subset.store[layer][ACTIVATIONS].shape[0]}
            lay_out_and_render(subset, layer, classes, head["samples"], settings)
            run_stage(subset, ComposeStage(head=head), settings["compose"], layer)
        written = [head["id"]]
        if parent.grids:
            with RunContext(store, out, device, grid_sizes=parent.grids, mode="r") as layer_atlas:
                for c in classes:  # each class's heat-map over the layer atlas (redone when its icons changed)
                    heatmap = ComposeStage(heatmap_class=c)
                    run_stage(layer_atlas, heatmap, settings["compose"], layer, f"heat-map {c}")
                    written.append(heatmap.atlas_id(layer))
        else:
            log.info("%s has no rendered layer atlas in %s: no heat-map composed", layer, store)
    manifest = json.loads((out / MANIFEST).read_text())["atlases"]
    return [entry for entry in manifest if entry["id"] in written]


@dataclass(frozen=True)
class Select:
    """The class atlas's first stage (atlas.stages.Stage): the subset store of the samples chosen for the classes,
    made from the parent layer as it is (`chosen`: what identifies the choice)."""

    parent_store: Path
    parent: Parent
    classes: list[int]
    kind: str
    chosen: dict
    force: bool = False
    name, settings, whole_run = "select", SelectSettings, False

    def products(self, ctx: Context, layer: str | None, settings: SelectSettings) -> list[tuple[Node | None, str]]:
        store = ctx.existing_store
        return [(None if store is None else store.get(str(layer)), self.parent.made)]

    def record(self, ctx: Context, layer: str | None, settings: SelectSettings) -> dict:
        return self.chosen

    def complete(self, ctx: Context, layer: str | None, node: h5py.Group | h5py.Dataset) -> bool:
        return True

    def run(self, ctx: Context, layer: str | None, settings: SelectSettings) -> None:
        ctx.close_store()  # the subset store is written whole
        chosen = (self.classes, self.kind, settings, self.chosen)
        select_subset(self.parent_store, ctx.store_path, self.parent, *chosen, self.force)


@dataclass(frozen=True)
class ComparisonLayout:
    """A comparison's layout stage (atlas.stages.Stage): attribution difference x 1-D t-SNE of the subset store."""

    classes: list[int]
    name, settings, whole_run = "layout", ComparisonSettings, False

    def products(self, ctx: Context, layer: str | None, settings: ComparisonSettings) -> list[tuple[Node | None, str]]:
        group = ctx.store[layer]
        return [(group.get(LAYOUT), made(group))]

    def record(self, ctx: Context, layer: str | None, settings: ComparisonSettings) -> dict:
        return {"classes": self.classes, "settings": settings}

    def complete(self, ctx: Context, layer: str | None, node: h5py.Group | h5py.Dataset) -> bool:
        return True

    def run(self, ctx: Context, layer: str | None, settings: ComparisonSettings) -> None:
        ctx.close_store()  # written by path
        class_a, class_b = self.classes
        comparison_layout_store(ctx.store_path, class_a, class_b, layer=layer, **asdict(settings))


def select_subset(
    store: Path,
    subset: Path,
    parent: Parent,
    classes: list[int],
    kind: str,
    select: SelectSettings,
    chosen: dict,
    force: bool = False,
) -> None:
    """Write the subset store of the samples `select_samples` picks for the classes (an AtlasError when too few),
    recording `chosen` and the parent layer it was made from."""
    with open_store(store) as h5:
        attributions = h5[parent.layer][ATTRIBUTIONS]
        check_winners(
            winner_counts(attributions, classes), [parent.names[c] for c in classes], len(attributions), force
        )
        rows = select_samples(attributions, classes, **asdict(select))
    if len(rows) < MIN_SAMPLES:
        raise AtlasError(
            f"only {len(rows)} samples attribute to {', '.join(parent.names[c] for c in classes)}: too few for an "
            f"atlas (collect more images or positions)"
        )
    write_subset_store(store, subset, rows, parent.layer, kind=kind, classes=classes)
    with open_store(subset, "r+") as h5:
        record_lineage(h5[parent.layer], chosen, parent.made)


def lay_out_and_render(ctx: RunContext, layer: str, classes: list[int], samples: int, settings: dict) -> None:
    """The subset store's layout (t-SNE or UMAP; a comparison's own), grid and icons, each skipped when up to date."""
    if len(classes) == 2:  # the comparison's layout lowers the perplexity itself when there are few samples
        run_stage(ctx, ComparisonLayout(classes), settings["layout"], layer)
    else:
        project = settings["project"]
        perplexity = fit_perplexity(samples, project.perplexity)
        plane = replace(project, perplexity=perplexity, n_neighbors=min(project.n_neighbors, samples - 1))
        run_stage(ctx, PROJECT, plane, layer)
    run_stage(ctx, GRID, replace(settings["grid"], whitening=False), layer)  # keeps the whole layer's whitening
    run_stage(ctx, RENDER, settings["render"], layer)  # resumes: renders only the icons not yet made


def default_store() -> Path:
    """The store of the newest `make atlas` run of the default config (whatever its image limit)."""
    config = load_config(config_path(None), {})
    return RunFolder.latest(config["model"], config["layer"]).store


def check_winners(counts: list[int], names: list[str], samples: int, force: bool) -> None:
    """Say when the data cannot answer: a warning line for a class with few winner samples (its atlas rests on
    weak attributions), and an AtlasError, unless forced, for one with none (its atlas would show other classes)."""
    for name, count in zip(names, counts, strict=True):
        if count == 0 and not force:
            raise AtlasError(
                f"no sample of the store has {name!r} as its top class (0 of {samples:,} winner samples): its atlas "
                f"would show other classes; collect images of it, or force it (--force; FORCE=1 with make)"
            )
        if count < FEW_WINNERS:
            log.warning(
                "class %r: only %d of %s samples have it as their top class (fewer than %d): its atlas rests "
                "mostly on weak attributions",
                name,
                count,
                f"{samples:,}",
                FEW_WINNERS,
            )


def print_written(entries: list[dict], out: Path, seconds: float) -> None:
    """The atlas images written and how to view them."""
    for entry in entries:
        images = ", ".join(str(out / grid["image"]) for grid in entry["grids"])
        print(f"{entry['kind']:<10} {entry['class']}: {images}")
    print(f"viewer: {out / 'index.html'}  (serve it with `atlas view {out}`), {seconds:.0f} s")
    if len({entry["layer"] for entry in entries}) > 1:
        print(f"the class through the layers: {out / 'layers.html'}")
