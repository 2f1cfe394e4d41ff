"""The one runner of every multi-stage run: a `RunContext` (the run folder, its store opened once, the model and its
layer shapes, each stage's runtime) and `run_stage`, which asks each stage (atlas.stages.Stage) for its products
and skips it only when every one is `atlas.store.fresh` and complete, unless the stage is forced."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py

from atlas import AtlasError
from atlas.stages import Stage
from atlas.store import fresh, open_store

if TYPE_CHECKING:
    from atlas.images import ImageRecord
    from atlas.models.classifier import Classifier
    from atlas.runtime import Runtime

log = logging.getLogger("pipelines.runner")
RUNS = Path("data/runs")  # where a run folder goes when none is named


@dataclass(frozen=True)
class RunFolder:
    """A run folder's contract: its store, its atlases' manifest and its viewer, and the one naming rule."""

    path: Path

    @property
    def store(self) -> Path:
        return self.path / "store.h5"

    @property
    def index(self) -> Path:
        return self.path / "index.html"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run folder (made here) for one run: a second run into it stops at once with one line naming the
        first one's process, so no store, shard or atlas is written by two runs. A folder that cannot be made is
        one line too."""
        from filelock import FileLock, Timeout

        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise AtlasError(f"cannot make the run folder {self.path}: {err.strerror}") from None
        holder = self.path / ".lock.pid"
        lock = FileLock(self.path / ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            pid = holder.read_text().strip() if holder.exists() else "?"
            message = f"another run (process {pid}) is writing {self.path}: wait for it, or choose another --out"
            raise AtlasError(message) from None
        try:
            holder.write_text(str(os.getpid()))
            yield
        finally:
            holder.unlink(missing_ok=True)
            lock.release()

    @classmethod
    def named(cls, model: str, layers: list[str], limit: int | None = None) -> RunFolder:
        """data/runs/<model>-<layer>[+<layer>...][-n<limit>]: a run's folder when none is given."""
        return cls(RUNS / f"{model}-{'+'.join(layers)}{f'-n{limit}' if limit else ''}")

    @classmethod
    def latest(cls, model: str, layer: str) -> RunFolder:
        """The newest run folder of `make atlas` for this model and layer, whatever its image limit (else the named
        one): where `make class-atlas` finds its store."""
        plain = cls.named(model, [layer])
        found = [p for p in (plain.path, *RUNS.glob(f"{plain.path.name}-n*")) if (p / "store.h5").is_file()]
        return cls(max(found, key=lambda p: (p / "store.h5").stat().st_mtime)) if found else plain


@dataclass
class RunContext:
    """What a run settles once and every stage reads (atlas.stages.Context): the store, opened once and kept open
    (`existing_store` is None until there is one), the model and its layer shapes, each stage's runtime, the run's
    layers and images, and the stages to redo (`force`)."""

    store_path: Path
    run_dir: Path
    device: str = "cpu"
    model: Classifier | None = None
    records: list[ImageRecord] = field(default_factory=list)
    dataset: str = ""
    layers: list[str] = field(default_factory=list)
    force: frozenset[str] = frozenset()
    grid_sizes: list[int] = field(default_factory=list)
    render_options: dict[str, Any] = field(default_factory=dict)
    mode: str = "a"  # "r" for a store a run only reads (a class atlas's parent)
    _store: h5py.File | None = None
    _writing: bool = False

    @property
    def existing_store(self) -> h5py.File | None:
        """The store, opened read-only for the stages' questions (a run that finds everything fresh leaves the
        file as it was) and for writing once a stage runs (`writable`)."""
        if self._store is None and self.store_path.exists():
            try:
                self._store = open_store(self.store_path, self.mode if self._writing else "r")
            except AtlasError:  # a truncated or foreign file holds no product: collect makes the store again
                if self._writing:
                    raise
                log.info("%s does not open as a store: it holds nothing finished", self.store_path)
        return self._store

    @property
    def store(self) -> h5py.File:
        """The store, which a stage after collect (or select) can count on."""
        found = self.existing_store
        if found is None:  # missing or unreadable: open_store says which, in one line
            self._store = found = open_store(self.store_path, "r")
        return found

    def writable(self) -> None:
        """From now on the store opens for writing (reopened when open read-only), before a stage runs."""
        if self.mode != "r" and not self._writing:
            self._writing = True
            self.close_store()

    def close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close_store()

    @cached_property
    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """(channels, height, width) of every layer of the model: one forward pass per run."""
        assert self.model is not None
        return {name: (channels, height, width) for name, channels, height, width in self.model.layer_shapes()}

    def runtime(self, stage: str, precision: str = "auto", memory_format: str = "auto") -> Runtime:
        return _runtime(stage, self.device, precision, memory_format)


@cache
def _runtime(stage: str, device: str, precision: str, memory_format: str) -> Runtime:
    from atlas.runtime import resolve

    return resolve(stage, device, precision, memory_format)


def up_to_date(ctx: RunContext, stage: Stage, settings: object, layer: str | None = None) -> bool:
    """Whether every product of the stage is fresh (made with what it would record now, from its input as it is now)
    and complete: the one freshness rule of every run."""
    layers = ctx.layers if stage.whole_run else [layer]
    for name in layers:
        record = stage.record(ctx, name, settings)
        products = stage.products(ctx, name, settings)
        if not products or not all(
            fresh(node, record, source) and stage.complete(ctx, name, node) for node, source in products
        ):
            return False
    return True


def run_stage(ctx: RunContext, stage: Stage, settings: object, layer: str | None = None, of: str = "") -> bool:
    """Run the stage unless it is up to date and not forced; returns whether it ran. `of`: the layer named in the
    log, in a run of several."""
    name = f"{stage.name} {of}" if of else stage.name
    if stage.name not in ctx.force and up_to_date(ctx, stage, settings, layer):
        log.info("%s: up to date, skipped", name)
        return False
    started = time.perf_counter()
    log.info("%s: running", name)
    ctx.writable()
    stage.run(ctx, layer, settings)
    log.info("%s: done in %.1f s", name, time.perf_counter() - started)
    return True
