"""Scale-out on dask.distributed: collection (and rendering) as tasks on a cluster, driven from one process.

`connect("local")` starts a LocalCluster of worker processes (one per GPU when there are GPUs, else a
few CPU workers); `connect("tcp://HOST:PORT")` joins an existing scheduler (`dask scheduler` and
`dask worker` by hand, or dask-jobqueue on SLURM). The workers must see the driver's files at the same
paths: a shared file system for the images and the output.

Collection reuses the single-process machinery unchanged: the image rows are cut into the same fixed
batches, a task is a run of pending batches, and its worker writes one atomic shard per batch into
`<out>.parts/` with `write_batches`, the very function `collect` uses. Positions are seeded per image
row, so a batch has the same rows wherever it runs; the driver then merges the shards in row order
with `merge_parts`, giving the store a single-process run with the same seed would give. A worker
that dies mid-task loses only its unfinished batch: dask runs the task again elsewhere (the
scheduler's allowed-failures for a dead worker, `retries` for an exception), and the rerun skips the
shards already written. Projection and gridding stay on one machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import multiprocessing
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import dask
import numpy as np
import torch
from distributed import Client, LocalCluster, as_completed, get_worker
from tqdm import tqdm

from atlas import AtlasError
from atlas.images import ImageRecord
from atlas.models.classifier import Classifier
from atlas.models.zoo import load_model, weights_argument
from atlas.runtime import resolve
from atlas.stages.collect import (
    Attribution,
    CollectionPlan,
    attribution_record,
    baselines_of,
    math_batch,
    merge_parts,
    missing_batches,
    plan_collection,
    write_batches,
)
from atlas.stages.render import IconsDone, RenderSettings, render_icons, render_store

log = logging.getLogger(__name__)

MAX_LOCAL_CPU_WORKERS = 4  # "a few": past this, CPU workers mostly compete for memory bandwidth
TASKS_PER_WORKER = 4  # enough tasks to balance uneven workers and to make a lost task cheap
MAX_CELLS_PER_TASK = 128  # a GPU batch holds up to 512 (cell, attempt) pairs: 128 cells of the paper's 4 attempts
MAX_BATCHES_PER_TASK = 16  # a task's batches are lost work only up to the one it was writing; this bounds queueing
RETRIES = 2  # dask reruns a task that raised this many times (a dead worker's task is rerun by the scheduler)


# the cluster ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def connect(address: str, workers: int | None = None, wait: float = 600) -> Iterator[Client]:
    """A dask client: `address` "local" starts a LocalCluster of `workers` processes, else joins that scheduler.

    Local default: one worker per GPU, else up to MAX_LOCAL_CPU_WORKERS CPU workers with the cores
    shared out among them. With a scheduler address (reached within dask's connect timeout), waits up
    to `wait` s for `workers` workers (default 1) to have joined, e.g. while batch jobs start.
    """
    if workers is not None and workers < 1:
        raise AtlasError(f"--workers must be at least 1, not {workers}")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_dask_logs())
        if address == "local":
            cores = os.cpu_count() or 1
            count = workers or torch.cuda.device_count() or min(MAX_LOCAL_CPU_WORKERS, cores)
            settings = {
                # not daemonic, so a worker may start DataLoader processes to decode images for its GPU
                "distributed.worker.daemon": False,
                # torch's intra-op threads per worker: the machine's cores shared out (dask's default is 1)
                "distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": max(1, cores // count),
                # dask sets it to 64 KiB, which also pins glibc's mmap threshold: every large torch temporary is then
                # mapped and unmapped afresh, and collection ran ~1.7x slower in a worker than in one process
                "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
            }
            # in force for the cluster's whole life: the nanny reads them again when it restarts a dead worker
            stack.enter_context(dask.config.set(settings))
            cluster = stack.enter_context(
                LocalCluster(n_workers=count, threads_per_worker=1, processes=True, dashboard_address=":0")
            )
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(address))
            except (OSError, TimeoutError) as err:
                raise AtlasError(f"cannot reach a dask scheduler at {address}: {err}") from err
            try:
                client.wait_for_workers(workers or 1, timeout=wait)
            except TimeoutError as err:
                have = len(client.scheduler_info()["workers"])
                raise AtlasError(f"{address} has {have} workers after {wait:.0f} s, not {workers or 1}") from err
        _announce(client)
        yield client


@contextlib.contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """dask logs every nanny, worker and connection at INFO, which drowns the progress; keep its warnings."""
    logger = logging.getLogger("distributed")
    level = logger.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # `atlas -v` shows them
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _announce(client: Client) -> None:
    info = client.scheduler_info()
    log.info("dask scheduler %s with %d workers", info["address"], len(info["workers"]))
    if "dashboard" in info.get("services", {}):
        log.info("dask dashboard: %s", client.dashboard_link)


# on a worker ----------------------------------------------------------------------------------------------
def _worker_device(device: str | None) -> str:
    """The worker's device: as asked; "cuda" (or None with CUDA) gives LocalCluster worker i GPU i."""
    device = str(resolve("render", device).device)  # as asked, else CUDA when there is one
    if device != "cuda" or torch.cuda.device_count() < 2:
        return device
    name = get_worker().name  # LocalCluster names its workers 0, 1, ...; other clusters give each worker its GPU
    return f"cuda:{name % torch.cuda.device_count()}" if isinstance(name, int) else device


# a worker's tasks share its model, whose forward hooks (capture, attributions, objectives) are per module, not per
# thread: on a worker with several threads, tasks take turns
_MODEL_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _worker_model(name: str, weights: str | None, device: str) -> Classifier:
    """Loaded once per worker process and kept for its later tasks."""
    return load_model(name, weights=weights, device=device)


def _image_loaders(loaders: int | None, device: str) -> int:
    if multiprocessing.current_process().daemon:
        return 0  # a daemonic worker may not start processes; decode in the task itself
    if loaders is None:
        # on CPU the forward and JVP passes dwarf decoding and the cores are already shared out among workers
        return 0 if device == "cpu" else min(4, os.cpu_count() or 1)
    return loaders


def _collect_task(
    model: str,
    weights: str | None,
    device: str | None,
    records: list[ImageRecord],
    start: int,
    batches: list[list[int]],
    parts: Path,
    layer_shapes: dict[str, tuple[int, int, int]],
    positions: int,
    seed: int,
    loaders: int | None,
    precision: str,
    memory_format: str,
    attribution: Attribution,
    batch_size: int,
) -> None:
    """Write the shards of `batches` that are still missing, each run at the collection's batch size."""
    todo = missing_batches(parts, batches)  # a rerun of a task whose worker died redoes only the unfinished
    if todo:
        device = _worker_device(device)
        loaders = _image_loaders(loaders, device)
        with _MODEL_LOCK:
            net = _worker_model(model, weights, device)
            runtime = resolve("collect", device, precision, memory_format)
            shape = (positions, seed, loaders, runtime, attribution)
            write_batches(
                net,
                records,
                todo,
                parts,
                layer_shapes,
                *shape,
                start=start,
                progress=False,
                pad_to=math_batch(batch_size),
            )


def _render_task(
    model: str,
    weights: str | None,
    device: str | None,
    layer: str,
    directions: np.ndarray,
    keys: list[int],
    settings: RenderSettings,
    options: dict,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`render_icons` of one run of cells on a worker: (icons, objective, cosine)."""
    device = _worker_device(device)
    with _MODEL_LOCK:
        net = _worker_model(model, weights, device)
        return render_icons(net, layer, directions, settings, keys=keys, progress=False, **options)


# the drivers ----------------------------------------------------------------------------------------------
def _per_task(items: int, workers: int, most: int) -> int:
    """Items per task: TASKS_PER_WORKER tasks per worker (load balance), but at most `most` (resume granularity)."""
    return max(1, min(most, math.ceil(items / (TASKS_PER_WORKER * workers))))


def _runs(items: Sequence | np.ndarray, per_task: int) -> list:
    """`items` in consecutive runs of `per_task`, one run a task."""
    return [items[i : i + per_task] for i in range(0, len(items), per_task)]


def collect_on_cluster(
    client: Client,
    model: str,
    records: list[ImageRecord],
    out: str | Path,
    weights: str | None = None,
    layers: list[str] | None = None,
    positions: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    loaders: int | None = None,
    device: str | None = None,
    dataset: str = "",
    batches_per_task: int | None = None,
    precision: str = "auto",
    memory_format: str = "auto",
    attribution: str | None = None,
    attribution_steps: int = 1,
    baseline_images: int = 256,
) -> Path:
    """`atlas.stages.collect.collect` with the batches run as tasks on `client`'s workers; the same store, resumable.

    model/weights: as for `load_model`; every worker loads its own copy once. device: the workers'
    (default: CUDA where they have it). loaders: image-decoding processes per worker (default: none
    on CPU, up to 4 with a GPU). Relative image paths are taken relative to this process's folder.
    """
    out = Path(out)
    planner = load_model(model, weights=weights)  # names, shapes and the store's metadata, as `collect` records them
    # collection's policy is the same on every device (atlas.runtime), so the settings resolved here are the workers'
    runtime = resolve("collect", "cpu", precision, memory_format)
    method = attribution_record(planner, attribution, attribution_steps, baseline_images)
    plan = plan_collection(planner, records, out, layers, positions, seed, batch_size, dataset, runtime, method)
    if plan is None:
        return out
    how = baselines_of(planner, records, plan, runtime, loaders)  # here, once: every worker gets the same
    readable = _absolute(records)  # what workers open; not stored
    workers = max(1, len(client.scheduler_info()["workers"]))
    groups = _runs(plan.pending, batches_per_task or _per_task(len(plan.pending), workers, MAX_BATCHES_PER_TASK))
    parts = plan.parts.absolute()
    futures = {
        client.submit(
            _collect_task,
            model,
            weights,
            device,
            readable[group[0][0] : group[-1][-1] + 1],
            group[0][0],
            group,
            parts,
            plan.layer_shapes,
            positions,
            seed,
            loaders,
            precision,
            memory_format,
            how,
            batch_size,
            retries=RETRIES,
            pure=False,
        ): group
        for group in groups
    }
    log.info("collecting %d batches as %d tasks on %d workers", len(plan.pending), len(futures), workers)
    for _ in _as_done(client, futures, "collect", "batch", f"finished batches are kept in {parts}"):
        pass
    _merge_when_complete(plan, out, records, planner.class_names)
    return out


def _absolute(records: list[ImageRecord]) -> list[ImageRecord]:
    """The records with their paths relative to this process's folder made absolute, for workers elsewhere."""
    here = Path.cwd()
    return [dataclasses.replace(r, path=str(here / r.path)) for r in records]


def _merge_when_complete(plan: CollectionPlan, out: Path, records: list[ImageRecord], class_names: list[str]) -> None:
    """Merge the shards into the store once every batch has one (else an AtlasError: a rerun goes on)."""
    left = missing_batches(plan.parts, plan.batches)
    if left:
        raise AtlasError(f"{len(left)} batches have no shard in {plan.parts} after the cluster run; rerun to go on")
    merge_parts(plan.parts, out, records, plan.meta, plan.layer_shapes, class_names)


def render_on_cluster(
    client: Client,
    path: str | Path,
    device: str | None = None,
    cells_per_task: int | None = None,
    **options,
) -> dict:
    """`atlas.stages.render.render_store` with runs of cells rendered as tasks on `client`'s workers.

    Every worker loads the store's model (or `model=`, a name) once; the driver checks the store on
    CPU and writes each finished run of cells into the icon datasets, so a rerun goes on where the
    last one stopped, exactly as in one process. device: the workers' (default: CUDA where they
    have it). options: those of `render_store` (layer, grid, settings, batch_size, ...).
    """
    renderer = functools.partial(_render_on_cluster, client, device=device, cells_per_task=cells_per_task)
    return render_store(path, device="cpu", renderer=renderer, **options)


def _render_on_cluster(
    client: Client,
    model: Classifier,
    layer: str,
    directions: np.ndarray,
    settings: RenderSettings,
    *,
    device: str | None,
    cells_per_task: int | None,
    keys: list[int],
    on_icons: IconsDone,
    progress: bool = True,
    starts: np.ndarray | None = None,
    **options,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A stand-in for `render_icons` (same arguments and results) that spreads the directions over the workers."""
    weights = weights_argument(model.weights)
    workers = max(1, len(client.scheduler_info()["workers"]))
    runs = _runs(np.arange(len(directions)), cells_per_task or _per_task(len(directions), workers, MAX_CELLS_PER_TASK))
    futures = {
        client.submit(
            _render_task,
            model.name,
            weights,
            device,
            layer,
            directions[run],
            [keys[i] for i in run],
            settings,
            {**options, "starts": None if starts is None else starts[run]},
            retries=RETRIES,
            pure=False,
        ): run
        for run in runs
    }
    log.info("rendering %d icons as %d tasks on %d workers", len(directions), len(futures), workers)
    icons = np.zeros((len(directions), settings.size, settings.size, 3), np.uint8)
    objective = np.full(len(directions), np.nan, np.float32)
    cosine = np.full(len(directions), np.nan, np.float32)
    done = _as_done(client, futures, f"render {layer}", "icon", "finished icons are kept in the store", progress)
    for run, (run_icons, run_objective, run_cosine) in done:
        icons[run], objective[run], cosine[run] = run_icons, run_objective, run_cosine
        on_icons(run, run_icons, run_objective, run_cosine)
    return icons, objective, cosine


def _as_done(
    client: Client, futures: dict, what: str, unit: str, kept: str, progress: bool | None = None
) -> Iterator[tuple]:
    """(work, result) of each task as it finishes, with a progress bar counting `len(work)` per task.

    A task that failed for good (an exception on every retry, or workers dying under it) cancels the rest.
    """
    total = sum(len(work) for work in futures.values())
    with tqdm(total=total, desc=what, unit=unit, disable=None if progress is None else not progress) as bar:
        for future in as_completed(list(futures)):
            try:
                result = future.result()
            except AtlasError:
                client.cancel(list(futures))
                raise
            except Exception as err:  # KilledWorker, or a task that failed on every retry
                client.cancel(list(futures))
                raise AtlasError(
                    f"{what}: task {future.key} failed on the cluster ({type(err).__name__}: {err}); "
                    f"{kept}, rerun the same command to go on"
                ) from err
            work = futures[future]
            bar.update(len(work))
            yield work, result
