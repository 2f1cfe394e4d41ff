"""Stage 2, `atlas project`: lay the activation vectors out in 2-D (UMAP or t-SNE) and normalise to [0, 1].

UMAP runs in four parts: the k-nearest-neighbour graph, umap-learn's fuzzy graph, the initial layout, and
the layout SGD. The kNN graph is chosen by `knn`:
- "umap-learn": umap-learn's pynndescent search as umap.UMAP runs it: on one thread when seeded.
- "nndescent": pynndescent on all CPU cores, with pynndescent's own number of random-projection trees (10 at
  100k, 12 at 1M) where umap-learn asks for 5 + sqrt(N) / 20 (21 at 100k, 55 at 1M). Each tree keeps one C-dim
  hyperplane per split; with umap-learn's count the stage peaked at 9.3 GB at 1M x 512 (benchmarks/results.md,
  scale; not yet measured again with pynndescent's). At 100k both counts gave recall@50 above 0.996 at equal
  memory. The trees only start the search, which NN-descent then refines. pynndescent gives every thread its
  own seeded random stream over a fixed block of rows, so a seeded run is repeatable for a given thread count;
  on oversubscribed cores it can be slower than one thread (OpenMP threads spin-wait).
- "exact": brute-force search in torch, in blocks of query rows, on `device`: the GPU path (1M x 512 is
  5e14 multiply-adds). On the CPU it is quicker than NN-descent only for small inputs.
- "auto" (default): "exact" on an accelerator and for small inputs on the CPU (N^2 C up to 2e11, e.g.
  20k x 512: seconds, where pynndescent's numba code alone takes 30-100 s to compile in each new process),
  otherwise (and for metrics the exact search lacks) "nndescent".
The layout SGD is chosen by `sgd`:
- "torch" (default): `optimize_layout`, umap-learn's per-edge schedule, gradients, clipping and negative
  sampling, with each epoch's sampled edges applied at once (as GPU UMAPs do), in torch on `device`: the GPU
  path, and on 2 CPU cores 1.3x faster than umap-learn's at 100k samples (51 vs 65 s, 200 epochs) with
  trustworthiness within 0.003. Seeded, it repeats exactly.
- "umap-learn": umap-learn's numba SGD on the CPU, edge after edge, as the paper ran it. Seeded, it runs on
  one thread (its parallel SGD is not repeatable); `seed=None` trades repeatability for all cores.
The fuzzy graph comes from umap-learn in both cases; the initial layout (`init`) is:
- "pca" (default): the first two principal components, fitted on at most 100k evenly strided rows and
  applied in blocks (sklearn's PCA would centre a copy of all the data: 2 GB at 1M x 512). At 100k x 512 it
  took 0.35 s against 11.3 s for the spectral init, and the layout's trustworthiness was 0.9847 against
  0.9827; at 1M samples the spectral init ran for more than 9 minutes on 2 cores before it was stopped
  (ARPACK with 1000 Lanczos vectors).
- "spectral": umap-learn's default, the paper's: the graph Laplacian's eigenvectors.

Output: `/<layer>/layout` [N, 2] float32 in [0, 1], attrs: the method and every parameter used.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atlas import AtlasError
from atlas.config import Settings
from atlas.progress import progress
from atlas.runtime import check_device
from atlas.store import iter_rows, layer_group, open_store, record_settings, replace_dataset

log = logging.getLogger(__name__)

METHODS = ("umap", "tsne")
KNN_SEARCHES = ("auto", "umap-learn", "nndescent", "exact")
SGD_ENGINES = ("torch", "umap-learn")
INITS = ("pca", "spectral")
EXACT_METRICS = ("cosine", "euclidean")
EXACT_KNN_MAX_WORK = 2e11  # N^2 C multiply-adds up to which 'auto' searches exactly on the CPU
PCA_ROWS = 100_000  # rows the PCA start is fitted on: two components of C <= 1024 channels are settled by then


def normalize_layout(
    layout: np.ndarray,
    min_percentile: float = 1.0,
    max_percentile: float = 99.0,
    relative_margin: float = 0.1,
) -> np.ndarray:
    """Clip each axis to its [1st, 99th] percentile widened by 10 % of that range, then rescale it to [0, 1].

    The paper's `normalize_layout` (lucid recipe); lucid widens the upper bound from the already widened lower
    one (an 11 % margin), here both margins are 10 %. An axis with no spread maps to 0.5.
    """
    layout = np.asarray(layout, dtype=np.float64)
    low, high = np.percentile(layout, [min_percentile, max_percentile], axis=0)
    margin = relative_margin * (high - low)
    low, high = low - margin, high + margin
    span = np.where(high > low, high - low, 1.0)
    scaled = np.where(high > low, (np.clip(layout, low, high) - low) / span, 0.5)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def exact_knn(
    x: np.ndarray,
    n_neighbors: int,
    metric: str = "cosine",
    device: str = "cpu",
    block_bytes: int = 1 << 30,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row (itself first), by blocks of queries against all rows in torch.

    Returns (indices [N, k] int32, distances [N, k] float32) as umap-learn's `precomputed_knn` wants them.
    Distances are umap-learn's: 1 - cosine similarity, or euclidean. `block_bytes` bounds the distance block.
    """
    if metric not in EXACT_METRICS:
        raise AtlasError(f"exact kNN supports metrics {EXACT_METRICS}, not {metric!r}")
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    n = data.shape[0]
    if metric == "cosine":
        data = torch.nn.functional.normalize(data, dim=1)
    squared_norms = (data * data).sum(dim=1)
    rows_per_block = max(1, block_bytes // (4 * n))
    indices = np.empty((n, n_neighbors), dtype=np.int32)
    distances = np.empty((n, n_neighbors), dtype=np.float32)
    for start in range(0, n, rows_per_block):
        stop = min(start + rows_per_block, n)
        block = data[start:stop] @ data.T  # turned into distances in place: one block in memory
        if metric == "cosine":
            block.mul_(-1.0).add_(1.0)
        else:
            block.mul_(-2.0).add_(squared_norms[start:stop, None]).add_(squared_norms[None, :]).clamp_min_(0.0)
        rows = torch.arange(stop - start, device=data.device)
        block[rows, rows + start] = -1.0  # each point is its own first neighbour, even among duplicates
        nearest, where = torch.topk(block, n_neighbors, dim=1, largest=False, sorted=True)
        nearest[:, 0] = 0.0
        if metric == "euclidean":
            nearest = nearest.sqrt_()
        indices[start:stop] = where.cpu().numpy()
        distances[start:stop] = nearest.clamp_min_(0.0).cpu().numpy()
    return indices, distances


@dataclass(frozen=True)
class LayoutSettings(Settings):
    """How a layout is made: the method and its parameters, validated once; recorded with the layout.

    Defaults are the paper's: UMAP n_neighbors 50, min_dist 0.05, cosine (production configs for mixed4a-5b;
    early layers use 200 / 0.05 / euclidean); t-SNE perplexity 50 and cosine as in lucid's notebooks, whose
    learning rate of 10 suits their few thousand points only, hence sklearn's 'auto'. `n_epochs` None is
    umap-learn's default (200 above 10k samples, else 500), as the paper's notebooks used. knn, sgd and init:
    the module docstring. The device is not a setting: `embed` and `project_store` take it beside these.
    """

    method: str = "umap"
    n_components: int = 2
    n_neighbors: int = 50
    min_dist: float = 0.05
    metric: str = "cosine"
    n_epochs: int | None = None
    perplexity: float = 50.0
    learning_rate: float | str = "auto"
    seed: int | None = 0
    knn: str = "auto"
    sgd: str = "torch"
    init: str = "pca"

    def __post_init__(self) -> None:
        """Raise AtlasError on a setting that cannot work, before any data is loaded."""
        if self.method not in METHODS:
            raise AtlasError(f"unknown projection method {self.method!r}; choose one of {METHODS}")
        if self.n_components not in (1, 2):
            raise AtlasError(f"n_components must be 1 or 2, not {self.n_components}")
        if self.method == "umap":
            self._check_umap()
        else:
            from sklearn.neighbors import VALID_METRICS

            if self.metric not in VALID_METRICS["brute"]:
                raise AtlasError(f"unknown metric {self.metric!r} for t-SNE")

    def _check_umap(self) -> None:
        from pynndescent.distances import named_distances

        if self.knn not in KNN_SEARCHES:
            raise AtlasError(f"unknown knn search {self.knn!r}; choose one of {KNN_SEARCHES}")
        if self.sgd not in SGD_ENGINES:
            raise AtlasError(f"unknown layout sgd {self.sgd!r}; choose one of {SGD_ENGINES}")
        if self.init not in INITS:
            raise AtlasError(f"unknown UMAP init {self.init!r}; choose one of {INITS}")
        if self.knn == "exact" and self.metric not in EXACT_METRICS:
            raise AtlasError(f"exact kNN supports metrics {EXACT_METRICS}, not {self.metric!r} (use knn='nndescent')")
        if self.metric not in named_distances:
            raise AtlasError(f"unknown metric {self.metric!r} for UMAP")
        if self.n_neighbors < 2:
            raise AtlasError(f"n_neighbors must be at least 2, not {self.n_neighbors}")
        if not 0.0 <= self.min_dist <= 1.0:
            raise AtlasError(f"min_dist must be in [0, 1] (UMAP's spread is 1), not {self.min_dist}")

    def check_samples(self, n_samples: int) -> None:
        """Raise AtlasError when `n_samples` are too few for these settings."""
        if self.method == "umap" and n_samples <= self.n_neighbors:
            raise AtlasError(
                f"{n_samples} samples are too few for n_neighbors={self.n_neighbors}; collect more or lower it"
            )
        if self.method == "tsne" and n_samples <= self.perplexity:
            raise AtlasError(
                f"{n_samples} samples are too few for perplexity={self.perplexity}; collect more or lower it"
            )


def embed(
    x: np.ndarray,
    settings: LayoutSettings = LayoutSettings(),
    device: str = "cpu",
) -> np.ndarray:
    """Raw (unnormalised) embedding [N, n_components] float32 of the rows of `x`, by UMAP or t-SNE.

    Used for a layer's layout and for any other array (class-atlas subsets; 1-D t-SNE with n_components=1).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise AtlasError(f"expected a 2-D array of samples, got shape {x.shape}")
    settings.check_samples(x.shape[0])
    check_device(device)
    _check_finite(x)
    started = time.perf_counter()
    result = _tsne(x, settings) if settings.method == "tsne" else _umap(x, settings, device)
    log.info("%s of %d x %d in %.1f s", settings.method, *x.shape, time.perf_counter() - started)
    return result.astype(np.float32)


def resolve_knn(knn: str, metric: str, device: str, shape: tuple[int, int]) -> str:
    """The kNN search that `knn` means for an [N, C] input on `device` (see the module docstring for 'auto')."""
    if knn != "auto":
        return knn
    n, channels = shape
    small = n * n * channels <= EXACT_KNN_MAX_WORK
    return "exact" if metric in EXACT_METRICS and (small or torch.device(device).type != "cpu") else "nndescent"


def _check_finite(x: np.ndarray, rows: int = 65536) -> None:
    # by blocks: a full-size boolean mask would be a quarter of the data's size
    for start in range(0, x.shape[0], rows):
        if not np.isfinite(x[start : start + rows]).all():
            bad = start + int(np.flatnonzero(~np.isfinite(x[start : start + rows]).all(axis=1))[0])
            raise AtlasError(f"activations contain NaN or infinite values (first in sample {bad})")


def _umap(x: np.ndarray, settings: LayoutSettings, device: str) -> np.ndarray:
    import umap

    knn = resolve_knn(settings.knn, settings.metric, device, x.shape)
    n_neighbors, metric, seed = settings.n_neighbors, settings.metric, settings.seed
    if settings.sgd == "torch":
        # the neighbour arrays are passed unnamed: _umap_torch drops them once the fuzzy graph is made
        return _umap_torch(x, *_knn_graph(x, n_neighbors, metric, seed, device, knn), settings, device)
    precomputed = (None, None, None)  # umap-learn searches itself
    if knn != "umap-learn":
        precomputed = (*_knn_graph(x, n_neighbors, metric, seed, device, knn), None)
    reducer = umap.UMAP(
        n_components=settings.n_components,
        n_neighbors=n_neighbors,
        min_dist=settings.min_dist,
        metric=metric,
        n_epochs=settings.n_epochs,
        init=settings.init,
        random_state=seed,
        n_jobs=1 if seed is not None else -1,  # umap-learn's parallel SGD is not repeatable
        precomputed_knn=precomputed,
    )
    with warnings.catch_warnings():
        # without a search index umap-learn cannot `transform` new points: not needed here
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        return reducer.fit_transform(x)


def _knn_graph(
    x: np.ndarray, n_neighbors: int, metric: str, seed: int | None, device: str, knn: str
) -> tuple[np.ndarray, np.ndarray]:
    from pynndescent import NNDescent
    from umap.umap_ import nearest_neighbors

    started = time.perf_counter()
    random_state = np.random.RandomState(seed)
    if knn == "exact":
        indices, distances = exact_knn(x, n_neighbors, metric=metric, device=device)
    elif knn == "nndescent":  # umap-learn's settings but pynndescent's tree count (module docstring)
        iterations = max(5, round(math.log2(len(x))))
        search = NNDescent(
            x, metric=metric, n_neighbors=n_neighbors, random_state=random_state, n_iters=iterations, max_candidates=60
        )
        indices, distances = search.neighbor_graph
    else:  # umap-learn's own search runs on one thread when seeded, as umap.UMAP does
        threads = -1 if seed is None else 1
        indices, distances, _ = nearest_neighbors(x, n_neighbors, metric, {}, False, random_state, n_jobs=threads)
    log.info("kNN graph (%s, k=%d, %s) in %.1f s", knn, n_neighbors, metric, time.perf_counter() - started)
    return indices, distances


def _umap_torch(
    x: np.ndarray, indices: np.ndarray, distances: np.ndarray, settings: LayoutSettings, device: str
) -> np.ndarray:
    """umap-learn's fuzzy graph and initial layout, then `optimize_layout` on `device`, as umap.UMAP prepares them."""
    from umap.spectral import spectral_layout
    from umap.umap_ import find_ab_params, fuzzy_simplicial_set, make_epochs_per_sample, noisy_scale_coords

    started = time.perf_counter()
    metric, n_epochs, seed, init = settings.metric, settings.n_epochs, settings.seed, settings.init
    random_state = np.random.RandomState(seed)
    graph, _, _ = fuzzy_simplicial_set(x, indices.shape[1], random_state, metric, {}, indices, distances)
    del indices, distances  # 400 MB at 1M x 50, not needed by the layout SGD
    graph = graph.tocoo()
    graph.sum_duplicates()
    if n_epochs is None:
        n_epochs = 500 if graph.shape[0] <= 10_000 else 200  # umap-learn's defaults
    graph.data[graph.data < graph.data.max() / n_epochs] = 0.0  # edges sampled less than once are dropped
    graph.eliminate_zeros()
    if init == "spectral":
        initial = spectral_layout(x, graph, settings.n_components, random_state, metric=metric)
    else:
        initial = pca_start(x, settings.n_components, random_state)
    initial = noisy_scale_coords(initial, random_state, max_coord=10, noise=0.0001)
    initial = 10.0 * (initial - initial.min(0)) / (initial.max(0) - initial.min(0))
    log.info("fuzzy graph (%d edges) and %s init in %.1f s", graph.nnz, init, time.perf_counter() - started)
    a, b = find_ab_params(1.0, settings.min_dist)
    epochs_per_sample = make_epochs_per_sample(graph.data, n_epochs)
    head, tail = graph.row, graph.col
    del graph  # its weights (a float per edge) are in epochs_per_sample now
    return optimize_layout(initial, head, tail, epochs_per_sample, n_epochs, a, b, seed=seed, device=device)


def pca_start(
    x: np.ndarray, n_components: int, random_state: np.random.RandomState, max_rows: int = PCA_ROWS
) -> np.ndarray:
    """The first principal components of the rows of `x` [N, n_components], fitted on at most `max_rows` evenly
    strided rows and applied in row blocks: no centred copy of `x` (2 GB at 1M x 512) is ever made."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components, random_state=random_state).fit(x[:: math.ceil(len(x) / max_rows)])
    return np.concatenate([pca.transform(rows) for _, rows in iter_rows(x)])


def optimize_layout(
    initial: np.ndarray,
    head: np.ndarray,
    tail: np.ndarray,
    epochs_per_sample: np.ndarray,
    n_epochs: int,
    a: float,
    b: float,
    negative_sample_rate: float = 5,
    repulsion_strength: float = 1.0,
    seed: int | None = 0,
    device: str = "cpu",
) -> np.ndarray:
    """UMAP's layout SGD in torch: the edges sampled in an epoch move their ends at once, from the same positions.

    Same schedule as umap-learn's `optimize_layout_euclidean`: edge e is sampled every `epochs_per_sample[e]`
    epochs, pulls its ends together by -2ab d^(2b-2) / (1 + a d^(2b)) (x_i - x_j), and draws
    `negative_sample_rate` random vertices per sample that push its head away by 2b / ((0.001 + d^2)
    (1 + a d^(2b))) (x_i - x_k); each coordinate step is clipped to [-4, 4] and scaled by a learning rate that
    falls linearly from 1 to 0. The graph (`head` -> `tail`, [E]) must be symmetric, as UMAP's fuzzy union
    is: edge (j, i) is sampled with (i, j) and moves i by the same step, so only heads are updated, twice.
    Returns the layout [N, dim] float32.

    A numeric kernel kept in one piece (over 60 lines): its epoch loop mirrors umap-learn's, step for step, so the
    two can be read side by side, and splitting it would pass a dozen tensors of schedule state every epoch.
    """
    dev = torch.device(device)
    layout = torch.tensor(np.ascontiguousarray(np.asarray(initial).T), dtype=torch.float32, device=dev)  # [dim, N]
    n_vertices = layout.shape[1]
    # int32 or int64 indices as given (scipy's are int32): no copy of the graph's two largest arrays on the CPU
    head = torch.as_tensor(np.asarray(head), device=dev)
    tail = torch.as_tensor(np.asarray(tail), device=dev)
    period = torch.as_tensor(np.asarray(epochs_per_sample), dtype=torch.float64, device=dev)
    next_sample = period.clone()
    next_negatives = period / negative_sample_rate
    generator = torch.Generator(device=dev)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(seed is not None or deterministic)  # CUDA's index_add_ sums in any order
    try:
        for epoch in progress(range(n_epochs), desc="layout", unit="epoch"):
            learning_rate = 1.0 - epoch / n_epochs
            sampled = torch.nonzero(next_sample <= epoch).squeeze(1)
            if sampled.numel() == 0:
                continue
            heads = head.index_select(0, sampled)
            tails = tail.index_select(0, sampled)
            # gathered one coordinate row at a time: on the CPU, 1-D index_select beats selecting along dim 1
            offset = torch.stack([row.index_select(0, heads) - row.index_select(0, tails) for row in layout])
            squared = (offset * offset).sum(0)
            power = squared.pow(b)
            pull = (-2.0 * a * b) * power / (squared * (a * power + 1.0))
            pull = torch.where(squared > 0, pull, 0.0)
            # the scale goes on the step, not index_add_'s `alpha`, which takes a far slower path on the CPU
            layout.index_add_(1, heads, (pull * offset).clamp_(-4.0, 4.0).mul_(2.0 * learning_rate))

            periods = period.index_select(0, sampled)
            next_sample.index_add_(0, sampled, periods)
            negative_period = periods / negative_sample_rate
            due = next_negatives.index_select(0, sampled)
            counts = ((epoch - due) / negative_period).long().clamp_min_(0)  # umap-learn truncates the same way
            next_negatives.index_add_(0, sampled, counts * negative_period)
            sources = heads.repeat_interleave(counts)
            others = torch.randint(n_vertices, sources.shape, generator=generator, device=dev)
            offset = torch.stack([row.index_select(0, sources) - row.index_select(0, others) for row in layout])
            squared = (offset * offset).sum(0)
            push = (2.0 * repulsion_strength * b) / ((0.001 + squared) * (a * squared.pow(b) + 1.0))
            push = torch.where(squared > 0, push, 0.0)
            layout.index_add_(1, sources, (push * offset).clamp_(-4.0, 4.0).mul_(learning_rate))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return layout.T.cpu().numpy()


def _tsne(x: np.ndarray, settings: LayoutSettings) -> np.ndarray:
    from sklearn.manifold import TSNE

    tsne = TSNE(
        n_components=settings.n_components,
        perplexity=settings.perplexity,
        learning_rate=settings.learning_rate,
        metric=settings.metric,
        init="pca",
        random_state=settings.seed,
        n_jobs=-1,  # processes for the neighbour search
    )
    return tsne.fit_transform(x)


def layout_attrs(settings: LayoutSettings, device: str, shape: tuple[int, int]) -> dict:
    """What `/<layer>/layout` records: method, metric, seed ("none" when unseeded), device and the method's own."""
    attrs = dict(method=settings.method, metric=settings.metric, device=device)
    attrs["seed"] = "none" if settings.seed is None else settings.seed
    if settings.method == "tsne":
        return {**attrs, "perplexity": settings.perplexity, "learning_rate": settings.learning_rate}
    umap = dict(n_neighbors=settings.n_neighbors, min_dist=settings.min_dist, n_epochs=settings.n_epochs or "default")
    knn = resolve_knn(settings.knn, settings.metric, device, shape)
    return {**attrs, **umap, "knn": knn, "sgd": settings.sgd, "init": settings.init}


def project_store(
    path: str | Path,
    layer: str | None = None,
    settings: LayoutSettings = LayoutSettings(),
    device: str = "cpu",
) -> np.ndarray:
    """Lay out a layer's activations, normalise to [0, 1], and write `/<layer>/layout` [N, 2] with its parameters.

    Everything is checked before the store is written; a failure leaves it as it was. Returns the layout.
    """
    if settings.n_components != 2:
        raise AtlasError(f"a layer's layout is 2-D, not {settings.n_components}-D")
    with open_store(path) as store:
        group = layer_group(store, layer)
        layer = group.name.strip("/")
        activations = group["activations"]
        settings.check_samples(activations.shape[0])
        check_device(device)
        x = activations[:]  # UMAP needs all of it in memory
    layout = normalize_layout(embed(x, settings, device))
    with open_store(path, "r+") as store:
        group = store[layer]
        if "grid" in group:
            log.warning("%s has grids made from its previous layout: rerun `atlas grid`", layer)
        made = replace_dataset(group, "layout", layout, **layout_attrs(settings, device, x.shape))
        record_settings(made, {"settings": settings, "device": device})
    log.info("wrote /%s/layout %s", layer, layout.shape)
    return layout
