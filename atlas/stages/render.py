"""Stage 4, `atlas render`: one icon per grid cell, by feature inversion of the cell's mean activation.

Reads `/<layer>/grid/<G>/mean` and `count` (and `/<layer>/whitening`) and writes, in the same grid
group, `icons` [G, G, PX, PX, 3] uint8 (icon [y, x] belongs to cell y * G + x), `icon_objective`,
`icon_cosine` and `icon_done`. Every non-empty cell gets the atlas objective of reference 1.5:
dot(h, Sv) * max(0.1, cos(h, Sv))^n at the centre neuron, several attempts per cell, the best kept
by its own final objective. Many cells share one batch, each chasing its own direction.

With `accentuate` set, an icon starts from its cell's most typical example patch instead of noise (feature
accentuation, Hamblin et al. 2024) and stays within that distance of it; render then also reads the grid's
`cell`, the layer's activations, image_index and position, and the photos (`atlas.examples`), and writes the
grid's second icon set, `accentuated/` (the same datasets), beside its feature visualisations.

Resumable: `icon_done` is written and flushed after every batch, and a rerun with the same settings
renders only the cells that are not done. An icon depends only on (seed, cell, attempt), not on the
batch it ran in, so the batch size is free to follow the memory available.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from atlas import AtlasError
from atlas.config import Settings
from atlas.examples import example_crops, pick_examples
from atlas.models.classifier import Classifier
from atlas.models.zoo import load_model, weights_argument
from atlas.optvis import PARAM, choose_batch_size, layer_map, model_device, optimize_images, visualize
from atlas.optvis.objectives import atlas_direction, direction_cosine
from atlas.optvis.param import RADIUS, param_spec
from atlas.optvis.transform import Transform, image_key, preset
from atlas.progress import progress as progress_of
from atlas.runtime import Runtime, resolve
from atlas.stages import Context
from atlas.store import (
    ACCENTUATED,
    ACTIVATIONS,
    CELL,
    COUNT,
    GRIDS,
    ICON_COSINE,
    ICON_DONE,
    ICON_OBJECTIVE,
    ICONS,
    IMAGE_INDEX,
    LAYOUT,
    MADE_FROM,
    MEAN,
    RENDERED,
    SETTINGS,
    WHITENING,
    Grid,
    Layer,
    Node,
    fresh,
    made,
    opened,
    record_lineage,
    remade,
    store_finished,
)

log = logging.getLogger(__name__)

__all__ = ["RenderSettings", "render_icons", "render_store", "visualize"]


IconsDone = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class RenderSettings(Settings):
    """What defines an icon, validated once; recorded with the icons, and a rerun with equal settings resumes.

    Batch size, device and progress are not settings of the result: an icon depends only on (seed, cell, attempt).
    """

    size: int = 80  # paper icon size; rendered at this size, never upsampled
    steps: int = 1024  # production configs (reference 5)
    attempts: int = 4  # production configs; the best by its own final objective is kept
    cossim_pow: float = 4.0  # lucid's atlas notebooks
    transforms: str = "atlas"  # Shan Carter's stack (reference 1.5); or standard (lucid), none, crops
    param: str = PARAM  # the image parameterisation (atlas.optvis.param.PARAMS), with its own optimiser
    lr: float | None = None  # overrides the parameterisation's learning rate
    decay_power: float = 1.0  # fft spectrum 1/f^decay_power: lucid's 1; configs cite the measured choice
    whiten: bool = True  # paper, mixed4a-5b: the objective's direction is whitened by the layer's S
    # None: icons start from noise (paper). A number: each icon accentuates its cell's most typical example patch,
    # staying within that distance of it in every pixel (feature accentuation, Hamblin et al. 2024)
    accentuate: float | None = None
    seed: int = 0

    section = "render"
    bounds = {"seed": (0, None)}

    def validate(self) -> None:
        if self.size < 1 or self.steps < 0 or self.attempts < 1:
            raise AtlasError("size and attempts must be positive and steps not negative")
        if self.lr is not None and not self.lr > 0:
            raise AtlasError(f"lr must be positive, not {self.lr}")
        if not self.decay_power >= 0:
            raise AtlasError(f"decay_power must not be negative, not {self.decay_power}")
        if self.accentuate is not None and not 0 < self.accentuate <= 1:
            raise AtlasError(f"accentuate must be a distance in (0, 1], not {self.accentuate}")
        preset(self.transforms, self.size)  # an AtlasError naming the known stacks
        param_spec(self.param)


def _render_batch(
    model: Classifier,
    layer: str,
    directions: torch.Tensor,
    keys: Sequence[int],
    settings: RenderSettings,
    *,
    whitening: torch.Tensor | None,
    transforms: Sequence[Transform],
    mixed_precision: bool,
    starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One attempt for each direction: (icons uint8 [B, PX, PX, 3], objective [B], cosine with the direction [B]).

    starts: uint8 [B, PX, PX, 3] images to accentuate (settings.accentuate), else the icons start from noise."""
    objective = atlas_direction(layer, directions, cossim_pow=settings.cossim_pow, whitening=whitening)
    icons, (values, cosines) = optimize_images(
        model,
        objective,
        keys,
        size=settings.size,
        steps=settings.steps,
        transforms=transforms,
        param=settings.param,
        lr=settings.lr,
        decay_power=settings.decay_power,
        mixed_precision=mixed_precision,
        measures=[direction_cosine(layer, directions)],
        start=starts,
        radius=settings.accentuate or RADIUS,  # unused without starts
    )
    return icons, values, cosines


def _probe(
    model: Classifier,
    layer: str,
    channels: int,
    settings: RenderSettings,
    transforms: Sequence[Transform],
    mixed_precision: bool,
) -> Callable[[int], object]:
    """A trial of the render objective on n icons (two steps), for choose_batch_size to measure."""
    trial = RenderSettings(size=settings.size, steps=2, attempts=1, cossim_pow=0)
    device = model_device(model)

    def run(n: int) -> object:
        directions = torch.ones(n, channels, device=device)
        return _render_batch(
            model,
            layer,
            directions,
            list(range(n)),
            trial,
            whitening=None,
            transforms=transforms,
            mixed_precision=mixed_precision,
        )

    return run


def _attempt_batches(count: int, attempts: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """(direction, attempt) pairs in batches of batch_size; an icon's attempts adjoin, so it finishes soon."""
    items = [(index, attempt) for index in range(count) for attempt in range(attempts)]
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def render_icons(
    model: Classifier,
    layer: str,
    directions: np.ndarray | torch.Tensor,
    settings: RenderSettings = RenderSettings(),
    *,
    whitening: np.ndarray | torch.Tensor | None = None,
    keys: Sequence[int] | None = None,
    batch_size: int | None = None,
    mixed_precision: bool | None = None,
    memory_format: str = "auto",
    progress: bool = True,
    on_icons: IconsDone | None = None,
    starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one icon per direction [N, C] of `layer`; returns (icons uint8 [N, PX, PX, 3], objective [N], cosine [N]).

    Each icon keeps the best of `settings.attempts` by its own final objective; `cosine` is the true cosine
    between the icon's centre activation (on the final, untransformed icon) and its direction.
    whitening: the matrix S of the objective (settings.whiten is the store's switch; here the matrix decides).
    keys: a stable id per direction (the cell index in `render_store`), seeding its attempts; default 0..N-1.
    on_icons(indices, icons, objective, cosine) is called after every batch for the icons it finished.
    batch_size: (direction, attempt) pairs optimised together; default from free GPU memory, or 16 on CPU.
    mixed_precision (bf16 autocast; default `atlas.runtime`'s choice) and memory_format: the run-time policy;
    the model is converted to that memory format in place.
    starts: uint8 [N, PX, PX, 3], the image each icon accentuates; required when settings.accentuate is set.
    """
    if (starts is None) != (settings.accentuate is None):
        raise AtlasError("accentuated icons need start images (and only they take them)")
    device = model_device(model)
    runtime = resolve("render", device, memory_format=memory_format)
    runtime.prepare(model)
    directions = torch.as_tensor(directions, dtype=torch.float32).to(device)
    count, channels = directions.shape
    keys = list(range(count)) if keys is None else list(keys)
    whitening = None if whitening is None else torch.as_tensor(whitening, dtype=torch.float32).to(device)
    mixed_precision = runtime.precision == "bf16" if mixed_precision is None else mixed_precision
    stack = preset(settings.transforms, settings.size)
    if batch_size is None:
        batch_size = choose_batch_size(model, _probe(model, layer, channels, settings, stack, mixed_precision))
        log.info("rendering %d icons x %d attempts, %d per batch", count, settings.attempts, batch_size)

    icons = np.zeros((count, settings.size, settings.size, 3), np.uint8)
    objective = np.full(count, np.nan, np.float32)
    cosine = np.full(count, np.nan, np.float32)
    batches = _attempt_batches(count, settings.attempts, batch_size)
    for batch in progress_of(batches, desc=f"render {layer}", unit="batch", disable=not progress):
        index = [i for i, _ in batch]
        seeds = [image_key(settings.seed, keys[i], attempt) for i, attempt in batch]
        images, values, cosines = _render_batch(
            model, layer, directions[index], seeds, settings,
            whitening=whitening, transforms=stack, mixed_precision=mixed_precision,
            starts=None if starts is None else starts[index],
        )  # fmt: skip
        for j, (i, attempt) in enumerate(batch):  # keep each icon's best attempt so far
            if attempt == 0 or values[j] > objective[i] or np.isnan(objective[i]):
                icons[i], objective[i], cosine[i] = images[j], values[j], cosines[j]
        finished = np.array([i for i, attempt in batch if attempt == settings.attempts - 1], dtype=np.int64)
        if on_icons is not None and len(finished):
            on_icons(finished, icons[finished], objective[finished], cosine[finished])
    return icons, objective, cosine


def timed_rate(model: Classifier, layer: str, channels: int, settings: RenderSettings, steps: int = 3) -> float:
    """Icon-steps per second of `render_icons` at `settings` on random directions, one batch as a run sizes it,
    after a one-step warm-up: a short measurement on this device for a run's plan, not a benchmark."""
    stack = preset(settings.transforms, settings.size)
    runtime = resolve("render", model_device(model))
    runtime.prepare(model)
    batch = choose_batch_size(model, _probe(model, layer, channels, settings, stack, runtime.precision == "bf16"))
    directions = torch.rand(batch, channels, generator=torch.Generator().manual_seed(0))
    seconds = []
    for count in (1, 1, 1 + steps):  # warm-up, then the difference leaves out each call's fixed costs
        started = time.perf_counter()
        # from noise: a start image changes no step's cost, and a plan has no photos to start from
        short = dataclasses.replace(settings, steps=count, attempts=1, accentuate=None)
        render_icons(model, layer, directions, short, batch_size=batch, progress=False)
        seconds.append(time.perf_counter() - started)
    return batch * steps / max(seconds[2] - seconds[1], 1e-9)


# the stage ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Cells:
    """What render reads of one grid: the layer's name, the non-empty mask [G, G], the means [G, G, C], S."""

    layer: str
    non_empty: np.ndarray
    means: np.ndarray
    whitening: np.ndarray | None
    model: str
    weights: str | None


def _read_cells(path: str | Path | h5py.File, layer: str | None, grid: int, whiten: bool) -> _Cells:
    with opened(path) as store:
        view = Layer(store, layer)
        group, cell_view = view.group, view.grid(grid, needs=(COUNT, MEAN))
        layout_made, grid_from = made(group.get(LAYOUT)), str(cell_view.group.attrs.get(MADE_FROM, ""))
        if layout_made and grid_from and grid_from != layout_made:
            raise AtlasError(
                f"grid {grid} of {group.name} was made from an earlier layout: run `atlas grid` again first "
                f"(`atlas render` does it for you)"
            )
        whitening = None
        if whiten:
            if WHITENING not in group:
                raise AtlasError(
                    f"{group.name} has no whitening matrix (run `atlas grid`, or render without whitening)"
                )
            whitening = view.read(WHITENING)
        return _Cells(
            layer=view.name,
            non_empty=cell_view.non_empty(),
            means=cell_view.read(MEAN),
            whitening=whitening,
            model=str(store.attrs.get("model", "")),
            weights=weights_argument(str(store.attrs.get("weights", ""))),
        )


def _check_layer(model: Classifier, layer: str, channels: int, size: int) -> None:
    """The layer must give the cell means' channel count and a spatial map at the icon size."""
    model.resolve_layer(layer)  # an AtlasError naming close matches when the model has no such layer
    found = layer_map(model, layer, size)[0]
    if found != channels:
        raise AtlasError(
            f"layer {layer} of {model.name} has {found} channels but the store's cell means have {channels}; "
            f"was the store collected with another model?"
        )


def icon_set(grid: h5py.Group, settings: RenderSettings, create: bool = False) -> h5py.Group | None:
    """The group that holds the grid's icons of these settings (None while it does not exist, unless `create`): the
    grid itself for feature visualisations, its ACCENTUATED group for accentuated icons."""
    if settings.accentuate is None:
        return grid
    return grid.require_group(ACCENTUATED) if create else grid.get(ACCENTUATED)


def _prepare_outputs(cells: h5py.Group, grid: h5py.Group, recorded: dict, size: int) -> np.ndarray:
    """Create the icon datasets in `grid`, the icon set of the grid `cells` (`icon_set`), or keep them when they
    were made with the same settings; returns its icon_done."""
    side = cells[COUNT].shape[0]
    existing = grid.get(ICONS)
    grid_made = made(cells)
    if existing is not None and ICON_DONE in grid and fresh(existing, recorded, grid_made):
        return grid[ICON_DONE][()]
    if existing is not None:
        log.info("%s: render settings or the grid changed, rendering every icon again", grid.name)
    for name in (ICONS, ICON_OBJECTIVE, ICON_COSINE, ICON_DONE):
        if name in grid:
            del grid[name]
    icons = grid.create_dataset(
        ICONS, shape=(side, side, size, size, 3), dtype=np.uint8, chunks=(1, 1, size, size, 3), fillvalue=255
    )
    icons.attrs.update({key: value for key, value in recorded.items() if value is not None})  # readable as attrs
    record_lineage(icons, recorded, grid_made)
    grid.create_dataset(ICON_OBJECTIVE, data=np.full((side, side), np.nan, np.float32))
    grid.create_dataset(ICON_COSINE, data=np.full((side, side), np.nan, np.float32))
    grid.create_dataset(ICON_DONE, data=np.zeros((side, side), bool))
    return grid[ICON_DONE][()]


def typical_examples(store: h5py.File, layer: str, grid: int, cells: np.ndarray, size: int) -> np.ndarray:
    """uint8 [len(cells), size, size, 3]: each cell's most typical example patch (compose's first example, the
    sample nearest the cell's mean), which its accentuated icon starts from."""
    view = Layer(store, layer, needs=(ACTIVATIONS, IMAGE_INDEX))
    cell_view = view.grid(grid, needs=(CELL, MEAN))
    picked = pick_examples(
        view[ACTIVATIONS], cell_view.read(CELL).astype(np.int64), cell_view.read(MEAN), 1, view.read(IMAGE_INDEX)
    )
    return example_crops(store, layer, picked[cells, 0].tolist(), size)


def _load_net(model: str | Classifier | None, weights: str | None, device: str | None, cells: _Cells) -> Classifier:
    """The given Classifier as is, else the named model (default the store's) with its weights on `device`."""
    if isinstance(model, Classifier):
        return model
    weights = weights if weights is not None else cells.weights
    return load_model(model or cells.model, weights=weights, device=resolve("render", device).device)


def _recorded_settings(settings: RenderSettings, model: str, weights: str, runtime: Runtime) -> dict:
    """The icons' settings as the store records them: the icon-defining ones, the model (its name and weights'
    label) and the run-time policy."""
    policy = dict(memory_format=runtime.memory_format, precision=runtime.precision)
    return {**dataclasses.asdict(settings), "model": model, "weights": weights, **policy}


def render_store(
    path: str | Path | h5py.File,
    layer: str | None = None,
    grid: int = 20,
    settings: RenderSettings = RenderSettings(),
    *,
    batch_size: int | None = None,
    device: str | None = None,
    model: str | Classifier | None = None,
    weights: str | None = None,
    progress: bool = True,
    renderer: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    precision: str = "auto",
    memory_format: str = "auto",
) -> dict:
    """Render the icons of one grid of a store (see the module docstring); returns a summary dict.

    model/weights: override the store's root attrs `model` and `weights` (a loaded Classifier is used as is).
    device: default CUDA when available. precision, memory_format: `atlas.runtime.resolve` settings, recorded in
    the icons' attrs.
    renderer: a stand-in for `render_icons` with its arguments (atlas.cluster's runs the cells on dask workers).
    """
    if batch_size is not None and batch_size < 1:
        raise AtlasError(f"batch size must be positive, not {batch_size}")
    cells = _read_cells(path, layer, grid, settings.whiten)
    net = _load_net(model, weights, device, cells)
    runtime = resolve("render", model_device(net), precision, memory_format)
    runtime.prepare(net)
    _check_layer(net, cells.layer, cells.means.shape[-1], settings.size)

    start = time.perf_counter()
    with opened(path, "r+") as store:
        recorded = _recorded_settings(settings, net.name, net.weights, runtime)
        cells_group = store[f"{cells.layer}/grid/{grid}"]
        group = icon_set(cells_group, settings, create=True)
        assert group is not None  # made on demand
        done = _prepare_outputs(cells_group, group, recorded, settings.size)
        todo = np.flatnonzero(cells.non_empty.ravel() & ~done.ravel())  # row-major cell ids, y * G + x
        total = int(cells.non_empty.sum())
        log.info("%s grid %d: %d of %d non-empty cells to render", cells.layer, grid, len(todo), total)

        def write(indices: np.ndarray, icons: np.ndarray, objective: np.ndarray, cosine: np.ndarray) -> None:
            values = {ICON_OBJECTIVE: objective, ICON_COSINE: cosine}
            store_finished(group, np.divmod(todo[indices], grid), (ICONS, icons), values, ICON_DONE)

        if len(todo):
            starts = None
            if settings.accentuate is not None:
                starts = typical_examples(store, cells.layer, grid, todo, settings.size)
            (renderer or render_icons)(
                net,
                cells.layer,
                cells.means.reshape(-1, cells.means.shape[-1])[todo],
                settings,
                whitening=cells.whitening,
                keys=todo.tolist(),
                batch_size=batch_size,
                mixed_precision=runtime.precision == "bf16",
                memory_format=runtime.memory_format,
                progress=progress,
                on_icons=write,
                starts=starts,
            )
            remade(group[ICONS])  # new icons: what was composed from them is stale
    seconds = round(time.perf_counter() - start, 2)
    return dict(
        layer=cells.layer, grid=grid, cells=total, rendered=len(todo), already_done=total - len(todo), seconds=seconds
    )


class RenderStage:
    """The stage (atlas.stages.Stage): the icons of every grid of a layer, each set from its grid as it is; named
    "accentuate" for the second icon set (settings with `accentuate`). It resumes: a rerun renders only the icons
    not yet made, and a forced one (`--force render`) renders them all again."""

    settings, whole_run = RenderSettings, False

    def __init__(self, name: str = "render"):
        self.name = name

    def products(self, ctx: Context, layer: str | None, settings: RenderSettings) -> list[tuple[Node | None, str]]:
        found = []
        for size in ctx.grid_sizes:
            grid = ctx.store[f"{layer}/{GRIDS}/{size}"]
            icons = icon_set(grid, settings)
            found.append((None if icons is None else icons.get(ICONS), made(grid)))
        return found

    def record(self, ctx: Context, layer: str | None, settings: RenderSettings) -> dict:
        """With no model given, the icons are the store's model's: the one their own record names, as it is the
        one `render_store` would load again."""
        if ctx.model is not None:
            return _recorded_settings(settings, ctx.model.name, str(ctx.model.weights), ctx.runtime("render"))
        icons = (node for node, _source in self.products(ctx, layer, settings) if node is not None)
        made_with: dict = next((json.loads(str(node.attrs.get(SETTINGS, "{}"))) for node in icons), {})
        model, weights = str(made_with.get("model")), str(made_with.get("weights"))
        return _recorded_settings(settings, model, weights, ctx.runtime("render"))

    def complete(self, ctx: Context, layer: str | None, node: h5py.Dataset) -> bool:
        icons = node.parent
        size = int(node.shape[0])
        non_empty = Grid(ctx.store[layer], size).non_empty()
        return ICON_DONE in icons and bool(icons[ICON_DONE][()][non_empty].all())

    def run(self, ctx: Context, layer: str | None, settings: RenderSettings) -> None:
        for size in ctx.grid_sizes:
            grid = ctx.store[f"{layer}/{GRIDS}/{size}"]
            if self.name in ctx.force:  # render them all again: drop both icon sets
                for name in (*RENDERED, ICON_DONE, ACCENTUATED):
                    if name in grid:
                        del grid[name]
            render_store(ctx.store, layer, size, settings, model=ctx.model, device=ctx.device, **ctx.render_options)


RENDER, ACCENTUATE = RenderStage(), RenderStage("accentuate")
