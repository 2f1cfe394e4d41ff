"""Stage 4, `atlas render`: one icon per grid cell, by feature inversion of the cell's mean activation.

Reads `/<layer>/grid/<G>/mean` and `count` (and `/<layer>/whitening`) and writes, in the same grid
group, `icons` [G, G, PX, PX, 3] uint8 (icon [y, x] belongs to cell y * G + x), `icon_objective`,
`icon_cosine` and `icon_done`. Every non-empty cell gets the atlas objective of reference 1.5:
dot(h, Sv) * max(0.1, cos(h, Sv))^n at the centre neuron, several attempts per cell, the best kept
by its own final objective. Many cells share one batch, each chasing its own direction.

Resumable: `icon_done` is written and flushed after every batch, and a rerun with the same settings
renders only the cells that are not done. An icon depends only on (seed, cell, attempt), not on the
batch it ran in, so the batch size is free to follow the memory available.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from atlas import AtlasError
from atlas.models import Classifier, load_model, weights_argument
from atlas.optvis import PARAM, layer_map, model_device, optimize_images, visualize
from atlas.optvis.objectives import atlas_direction, direction_cosine
from atlas.optvis.param import param_spec
from atlas.optvis.transform import Transform, image_key, preset
from atlas.runtime import default_device, resolve
from atlas.store import grid_group, layer_group, open_store, store_finished

log = logging.getLogger(__name__)

__all__ = ["render_icons", "render_store", "visualize"]

DEFAULT_CPU_BATCH = 16  # icons per batch on CPU (see benchmarks/bench_render.py)
MAX_BATCH = 512  # beyond a few hundred 80-px icons a GPU gains nothing, and a batch is the unit of resumption
PROBE_BATCH = 8  # icons in the trial step that measures GPU memory per icon
MEMORY_FRACTION = 0.8  # of the free GPU memory, leaving room for allocator fragmentation

IconsDone = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


def _render_batch(
    model: Classifier,
    layer: str,
    directions: torch.Tensor,
    keys: Sequence[int],
    *,
    size: int,
    steps: int,
    cossim_pow: float,
    whitening: torch.Tensor | None,
    transforms: Sequence[Transform],
    param: str,
    lr: float | None,
    mixed_precision: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One attempt for each direction: (icons uint8 [B, PX, PX, 3], objective [B], cosine with the direction [B])."""
    objective = atlas_direction(layer, directions, cossim_pow=cossim_pow, whitening=whitening)
    icons, (values, cosines) = optimize_images(
        model,
        objective,
        keys,
        size=size,
        steps=steps,
        transforms=transforms,
        param=param,
        lr=lr,
        mixed_precision=mixed_precision,
        measures=[direction_cosine(layer, directions)],
    )
    return icons, values, cosines


def choose_batch_size(
    model: Classifier, layer: str, channels: int, size: int, transforms: Sequence[Transform], mixed_precision: bool
) -> int:
    """Icons per batch: on CUDA as many as fit in the free memory (measured by a trial step), else a default."""
    device = model_device(model)
    if device.type != "cuda":
        return DEFAULT_CPU_BATCH
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _render_batch(
        model,
        layer,
        torch.ones(PROBE_BATCH, channels, device=device),
        list(range(PROBE_BATCH)),
        size=size,
        steps=2,
        cossim_pow=0,
        whitening=None,
        transforms=transforms,
        param=PARAM,
        lr=None,
        mixed_precision=mixed_precision,
    )
    per_icon = max(1.0, (torch.cuda.max_memory_allocated(device) - before) / PROBE_BATCH)
    return int(np.clip(MEMORY_FRACTION * free / per_icon, 1, MAX_BATCH))


def render_icons(
    model: Classifier,
    layer: str,
    directions: np.ndarray | torch.Tensor,
    *,
    size: int = 80,  # paper icon size; rendered at this size, never upsampled
    steps: int = 1024,  # production configs (reference 5)
    attempts: int = 4,  # production configs
    batch_size: int | None = None,
    cossim_pow: float = 4,  # lucid's atlas notebooks
    whitening: np.ndarray | torch.Tensor | None = None,
    transforms: str | Sequence[Transform] = "atlas",
    param: str = PARAM,
    lr: float | None = None,
    seed: int = 0,
    keys: Sequence[int] | None = None,
    mixed_precision: bool | None = None,
    memory_format: str = "auto",
    progress: bool = True,
    on_icons: IconsDone | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one icon per direction [N, C] of `layer`; returns (icons uint8 [N, PX, PX, 3], objective [N], cosine [N]).

    Each icon keeps the best of `attempts` by its own final objective; `cosine` is the true cosine
    between the icon's centre activation (on the final, untransformed icon) and its direction.
    keys: a stable id per direction (the cell index in `render_store`), seeding its attempts; default 0..N-1.
    on_icons(indices, icons, objective, cosine) is called after every batch for the icons it finished.
    batch_size: (direction, attempt) pairs optimised together; default from free GPU memory, or 16 on CPU.
    mixed_precision (bf16 autocast; default `atlas.runtime`'s choice) and memory_format: the run-time policy;
    the model is converted to that memory format in place.
    param: the image parameterisation (fft, phase or pixel: atlas.optvis.param.PARAMS), with its own optimiser;
    lr: overrides its learning rate.
    """
    device = model_device(model)
    runtime = resolve("render", device, memory_format=memory_format)
    runtime.prepare(model)
    directions = torch.as_tensor(directions, dtype=torch.float32).to(device)
    count, channels = directions.shape
    keys = list(range(count)) if keys is None else list(keys)
    if whitening is not None:
        whitening = torch.as_tensor(whitening, dtype=torch.float32).to(device)
    if mixed_precision is None:
        mixed_precision = runtime.precision == "bf16"
    stack = preset(transforms, size)
    if batch_size is None:
        batch_size = choose_batch_size(model, layer, channels, size, stack, mixed_precision)
        log.info("rendering %d icons x %d attempts, %d per batch", count, attempts, batch_size)

    icons = np.zeros((count, size, size, 3), np.uint8)
    objective = np.full(count, np.nan, np.float32)
    cosine = np.full(count, np.nan, np.float32)
    items = [(index, attempt) for index in range(count) for attempt in range(attempts)]  # an icon's attempts adjoin
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    for batch in tqdm(batches, desc=f"render {layer}", unit="batch", disable=not progress):
        index = [i for i, _ in batch]
        images, values, cosines = _render_batch(
            model,
            layer,
            directions[index],
            [image_key(seed, keys[i], attempt) for i, attempt in batch],
            size=size,
            steps=steps,
            cossim_pow=cossim_pow,
            whitening=whitening,
            transforms=stack,
            param=param,
            lr=lr,
            mixed_precision=mixed_precision,
        )
        for j, (i, attempt) in enumerate(batch):
            if attempt == 0 or values[j] > objective[i] or np.isnan(objective[i]):
                icons[i], objective[i], cosine[i] = images[j], values[j], cosines[j]
        finished = np.array([i for i, attempt in batch if attempt == attempts - 1], dtype=np.int64)
        if on_icons is not None and len(finished):
            on_icons(finished, icons[finished], objective[finished], cosine[finished])
    return icons, objective, cosine


# the stage ----------------------------------------------------------------------------------------------
def _check_layer(model: Classifier, layer: str, channels: int, size: int) -> None:
    """The layer must give the cell means' channel count and a spatial map at the icon size."""
    found = layer_map(model, layer, size)[0]
    if found != channels:
        raise AtlasError(
            f"layer {layer} of {model.name} has {found} channels but the store's cell means have {channels}; "
            f"was the store collected with another model?"
        )


def _prepare_outputs(grid: h5py.Group, settings: dict, size: int) -> np.ndarray:
    """Create the icon datasets, or keep them when they were made with the same settings; returns icon_done."""
    side = grid["count"].shape[0]
    existing = grid.get("icons")
    same = (
        existing is not None
        and "icon_done" in grid
        and existing.shape == (side, side, size, size, 3)
        and all(existing.attrs.get(key) == value for key, value in settings.items())
    )
    if same:
        return grid["icon_done"][()]
    if existing is not None:
        log.info("%s: render settings changed, rendering every icon again", grid.name)
    for name in ("icons", "icon_objective", "icon_cosine", "icon_done"):
        if name in grid:
            del grid[name]
    icons = grid.create_dataset(
        "icons", shape=(side, side, size, size, 3), dtype=np.uint8, chunks=(1, 1, size, size, 3), fillvalue=255
    )
    icons.attrs.update(settings)
    grid.create_dataset("icon_objective", data=np.full((side, side), np.nan, np.float32))
    grid.create_dataset("icon_cosine", data=np.full((side, side), np.nan, np.float32))
    grid.create_dataset("icon_done", data=np.zeros((side, side), bool))
    return grid["icon_done"][()]


def render_store(
    path: str | Path,
    layer: str | None = None,
    grid: int = 20,
    size: int = 80,
    steps: int = 1024,
    attempts: int = 4,
    batch_size: int | None = None,
    cossim_pow: float = 4,
    transforms: str = "atlas",
    param: str = PARAM,
    whiten: bool = True,
    device: str | None = None,
    seed: int = 0,
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
    if size < 1 or steps < 0 or attempts < 1 or (batch_size is not None and batch_size < 1):
        raise AtlasError("size, attempts and batch size must be positive and steps not negative")
    preset(transforms, size)  # validates the names before anything is loaded
    param_spec(param)
    with open_store(path) as store:
        group = layer_group(store, layer)
        cells = grid_group(group, grid)
        layer = group.name.strip("/")
        counts = cells["count"][()]
        means = cells["mean"][()]
        non_empty = counts >= int(cells.attrs.get("min_count", 1))
        whitening = None
        if whiten:
            if "whitening" not in group:
                raise AtlasError(
                    f"{group.name} has no whitening matrix (run `atlas grid`, or render without whitening)"
                )
            whitening = group["whitening"][()]
        model_name = str(store.attrs.get("model", "")) if model is None else model
        weights = weights if weights is not None else weights_argument(str(store.attrs.get("weights", "")))

    if isinstance(model_name, Classifier):
        net = model_name
        device = model_device(net)
    else:
        device = device or default_device()
        net = load_model(model_name, weights=weights, device=device)
    runtime = resolve("render", device, precision, memory_format)
    runtime.prepare(net)
    net.resolve_layer(layer)  # an AtlasError naming close matches when the model has no such layer
    _check_layer(net, layer, means.shape[-1], size)

    settings = dict(
        size=size,
        steps=steps,
        attempts=attempts,
        cossim_pow=cossim_pow,
        transforms=transforms,
        param=param,
        whiten=whiten,
        seed=seed,
        model=net.name,
        weights=net.weights,
        memory_format=runtime.memory_format,
        precision=runtime.precision,
    )
    start = time.perf_counter()
    with open_store(path, "r+") as store:
        cells = store[f"{layer}/grid/{grid}"]
        done = _prepare_outputs(cells, settings, size)
        todo = np.flatnonzero(non_empty.ravel() & ~done.ravel())  # row-major cell ids, y * G + x
        log.info("%s grid %d: %d of %d non-empty cells to render", layer, grid, len(todo), int(non_empty.sum()))

        def write(indices: np.ndarray, icons: np.ndarray, objective: np.ndarray, cosine: np.ndarray) -> None:
            values = {"icon_objective": objective, "icon_cosine": cosine}
            store_finished(cells, np.divmod(todo[indices], grid), ("icons", icons), values, "icon_done")

        if len(todo):
            (renderer or render_icons)(
                net,
                layer,
                means.reshape(-1, means.shape[-1])[todo],
                size=size,
                steps=steps,
                attempts=attempts,
                batch_size=batch_size,
                cossim_pow=cossim_pow,
                whitening=whitening,
                transforms=transforms,
                param=param,
                seed=seed,
                keys=todo.tolist(),
                progress=progress,
                on_icons=write,
                mixed_precision=runtime.precision == "bf16",
                memory_format=runtime.memory_format,
            )
    return dict(
        layer=layer,
        grid=grid,
        cells=int(non_empty.sum()),
        rendered=len(todo),
        already_done=int(non_empty.sum()) - len(todo),
        seconds=round(time.perf_counter() - start, 2),
    )
