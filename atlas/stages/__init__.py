"""The five stages of an atlas, in order, one module each, talking only through the HDF5 store (atlas.store):
collect (activations and attributions), project (a 2-D layout), grid (cell means), render (an icon per cell) and
compose (atlas images, tiles and the viewer's data).

Each module exports its `Stage` (COLLECT, PROJECT, GRID, RENDER and ACCENTUATE, COMPOSE): what it makes and records,
which pipelines.runner runs with a `Context`. Both protocols are below; nothing here imports the runner."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import h5py

    from atlas.config import Settings
    from atlas.images import ImageRecord
    from atlas.models.classifier import Classifier
    from atlas.runtime import Runtime


class Context(Protocol):
    """What a stage runs with: the run's open store and the rest a run settles once (pipelines.runner.RunContext).

    `existing_store` is None while there is no store yet (before collect), where `store` is an error;
    `close_store` lets a stage that writes the file whole (collect, a class atlas's select) do so, and the next use
    of `store` opens it again."""

    store_path: Path
    run_dir: Path
    device: str
    model: Classifier | None
    records: list[ImageRecord]
    dataset: str
    layers: list[str]
    force: frozenset[str]
    grid_sizes: list[int]  # of the layer being run: the grids that render and compose make their products of
    render_options: dict  # render_store's keywords that are not settings of the result (batch_size, precision)

    @property
    def existing_store(self) -> h5py.File | None: ...

    @property
    def store(self) -> h5py.File: ...

    def close_store(self) -> None: ...

    def runtime(self, stage: str, precision: str = "auto", memory_format: str = "auto") -> Runtime: ...


class Stage(Protocol):
    """What one stage declares to the runner (pipelines.runner): its name and settings class, its products with the
    identity of what each must be made from, exactly what it records, when a product is complete, and how to make
    them. The runner skips it when every product is `atlas.store.fresh` and complete.

    `layer`: the layer it is run for (None: every layer of the run, for collect). A product is a node of the store or
    anything else that records its lineage in `attrs` (atlas.store.Node), as `complete` receives it."""

    @property
    def name(self) -> str: ...

    @property
    def settings(self) -> type[Settings]: ...

    @property
    def whole_run(self) -> bool:  # run once for every layer of the run (collect), its products asked of each layer
        ...

    def products(self, ctx: Context, layer: str | None, settings: Any) -> list[tuple[Any, str]]: ...

    def record(self, ctx: Context, layer: str | None, settings: Any) -> object: ...

    def complete(self, ctx: Context, layer: str | None, node: Any) -> bool: ...

    def run(self, ctx: Context, layer: str | None, settings: Any) -> None: ...
