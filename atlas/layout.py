"""Layouts of activation vectors: UMAP (kNN graph, fuzzy graph, torch SGD) and t-SNE, with no store.

`embed(x, settings, device)` is the function; `TorchUMAP` the same as a scikit-learn-style estimator.

UMAP runs in four parts: the k-nearest-neighbour graph, the fuzzy graph (`fuzzy_graph`: umap-learn's
memberships and union, in less memory), the initial layout, and the layout SGD. The kNN graph is chosen by `knn`:
- "umap-learn": umap-learn's pynndescent search as umap.UMAP runs it: on one thread when seeded.
- "nndescent": pynndescent on all CPU cores, with pynndescent's own number of random-projection trees (10 at
  100k, 12 at 1M) where umap-learn asks for 5 + sqrt(N) / 20 (21 at 100k, 55 at 1M). Each tree keeps one C-dim
  hyperplane per split; with umap-learn's count the stage peaked at 9.3 GB at 1M x 512 (benchmarks/results.md,
  scale, before the changes under "Memory"). At 100k both counts gave recall@50 above 0.996 at equal memory.
  The trees only start the search, which NN-descent then refines. pynndescent gives every thread its
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
The initial layout (`init`) is:
- "pca" (default): the first two principal components, fitted on at most 100k evenly strided rows and
  applied in blocks (sklearn's PCA would centre a copy of all the data: 2 GB at 1M x 512). At 100k x 512 it
  took 0.35 s against 11.3 s for the spectral init, and the layout's trustworthiness was 0.9847 against
  0.9827; at 1M samples the spectral init ran for more than 9 minutes on 2 cores before it was stopped
  (ARPACK with 1000 Lanczos vectors).
- "spectral": umap-learn's default, the paper's: the graph Laplacian's eigenvectors.

Memory, at 1M x 512 with the defaults (peak RSS with 0.7 GB of imports; /tmp probe of `project_store` on the
scale benchmark's store, one thread on a busy machine): the kNN search 4.4 GB, the fuzzy graph 3.7 GB, the
layout SGD 2.9 GB. Before (issue 21's first scale run): 9.3 GB. What changed:
- cosine layouts read the store as unit rows, so pynndescent makes no normalised copy (2 GB);
- `fuzzy_graph` unites the memberships through one sorted key per edge, where umap-learn's sparse-matrix sums
  took 2.8 GB above their input;
- the rows are dropped once the kNN graph and the PCA start are made, when `embed` is given the dataset;
- the SGD works through each epoch in blocks of edges (1.7 GB of temporaries at 200k in one piece, growing
  with N), with a float32 schedule.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import h5py
import numpy as np
import torch
from sklearn.base import BaseEstimator

from atlas import AtlasError
from atlas.config import Settings
from atlas.layout_sgd import optimize_layout
from atlas.runtime import check_device
from atlas.store import iter_rows

log = logging.getLogger(__name__)

METHODS = ("umap", "tsne")
# the parameters of one method only: a layout records its own method's (atlas.stages.project.layout_record)
UMAP_ONLY = ("n_neighbors", "min_dist", "n_epochs", "knn", "sgd", "init")
TSNE_ONLY = ("perplexity", "learning_rate")
KNN_SEARCHES = ("auto", "umap-learn", "nndescent", "exact")
SGD_ENGINES = ("torch", "umap-learn")
INITS = ("pca", "spectral")
EXACT_METRICS = ("cosine", "euclidean")
EXACT_KNN_MAX_WORK = 2e11  # N^2 C multiply-adds up to which 'auto' searches exactly on the CPU
PCA_ROWS = 100_000  # rows the PCA start is fitted on: two components of C <= 1024 channels are settled by then


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

    section = "project"
    bounds = {"n_epochs": (1, None), "perplexity": (1.0, None), "seed": (0, None)}

    def validate(self) -> None:
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
    x: np.ndarray | h5py.Dataset,
    settings: LayoutSettings = LayoutSettings(),
    device: str = "cpu",
) -> np.ndarray:
    """Raw (unnormalised) embedding [N, n_components] float32 of the rows of `x`, by UMAP or t-SNE.

    Used for a layer's layout and for any other array (class-atlas subsets; 1-D t-SNE with n_components=1).
    `x` may be an HDF5 dataset: it is then read here, and the torch UMAP drops the rows once it has the kNN
    graph and a PCA start (at 1M x 512 they are 2 GB of the 5 GB its layout SGD would otherwise hold).
    """
    _check_input(x, settings, device)
    started = time.perf_counter()
    result = _tsne(read_rows(x, settings.metric), settings) if settings.method == "tsne" else _umap(x, settings, device)
    log.info("%s of %d x %d in %.1f s", settings.method, *x.shape, time.perf_counter() - started)
    return result.astype(np.float32)


def _check_input(x: np.ndarray | h5py.Dataset, settings: LayoutSettings, device: str) -> None:
    if len(x.shape) != 2:
        raise AtlasError(f"expected a 2-D array of samples, got shape {x.shape}")
    settings.check_samples(x.shape[0])
    check_device(device)


class TorchUMAP(BaseEstimator):
    """UMAP with this module's torch path, as a scikit-learn estimator: `__init__` only stores the parameters
    (defaults: `LayoutSettings`', the paper's); `fit(X)` computes the fuzzy graph (`graph_`, a sparse [N, N] matrix
    of the symmetric memberships, as umap.UMAP's) and the raw embedding (`embedding_` [N, n_components] float32,
    equal to `embed`'s); `fit_transform(X)` returns the embedding. `X` may be an HDF5 dataset, which is then read
    and dropped as `embed` does."""

    def __init__(
        self,
        n_neighbors: int = LayoutSettings.n_neighbors,
        min_dist: float = LayoutSettings.min_dist,
        metric: str = LayoutSettings.metric,
        n_components: int = LayoutSettings.n_components,
        n_epochs: int | None = LayoutSettings.n_epochs,
        knn: str = LayoutSettings.knn,
        init: str = LayoutSettings.init,
        random_state: int | None = LayoutSettings.seed,
        device: str = "cpu",
    ) -> None:
        self.n_neighbors, self.min_dist, self.metric = n_neighbors, min_dist, metric
        self.n_components, self.n_epochs, self.knn, self.init = n_components, n_epochs, knn, init
        self.random_state, self.device = random_state, device

    def fit(self, X: np.ndarray | h5py.Dataset, y: None = None) -> TorchUMAP:  # noqa: N803 (sklearn's name)
        from scipy.sparse import coo_matrix

        settings = LayoutSettings(
            method="umap",
            sgd="torch",
            seed=self.random_state,
            **{name: getattr(self, name) for name in ("n_neighbors", "min_dist", "metric", "n_components")},
            **{name: getattr(self, name) for name in ("n_epochs", "knn", "init")},
        )
        _check_input(X, settings, self.device)
        random_state = np.random.RandomState(settings.seed)
        edges, initial = _graph_and_start(X, settings, self.device, random_state)
        head, tail, weight = edges
        self.graph_ = coo_matrix((weight, (head, tail)), shape=(len(initial), len(initial))).tocsr()
        self.embedding_ = _lay_out(edges, initial, settings, self.device, random_state).astype(np.float32)
        return self

    def fit_transform(self, X: np.ndarray | h5py.Dataset, y: None = None) -> np.ndarray:  # noqa: N803 (sklearn's name)
        return self.fit(X).embedding_


def read_rows(x: np.ndarray | h5py.Dataset, metric: str) -> np.ndarray:
    """The rows of `x` as a float32 array, checked finite. A dataset is read, as unit rows for cosine: the cosine
    distance ignores a row's length, and pynndescent then needs no normalised copy."""
    if isinstance(x, h5py.Dataset):
        x = read_unit_rows(x) if metric == "cosine" else x[:]
    x = np.asarray(x, dtype=np.float32)
    _check_finite(x)
    return x


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


def unit_rows(x: np.ndarray, tolerance: float = 1e-4, rows: int = 65536) -> bool:
    """Whether every row of `x` has length 1 (or 0, as a normalised all-zero row keeps), checked by blocks."""
    for start in range(0, x.shape[0], rows):
        lengths = np.linalg.norm(x[start : start + rows], axis=1)
        if not (np.abs(lengths - 1.0) <= tolerance)[lengths > 0].all():
            return False
    return True


def read_unit_rows(dataset: h5py.Dataset | np.ndarray, rows: int = 65536) -> np.ndarray:
    """All rows of `dataset` [N, C] as float32, each scaled to length 1 (all-zero rows stay zero), by blocks."""
    x = np.empty(dataset.shape, dtype=np.float32)
    for start, block in iter_rows(dataset, rows):
        lengths = np.linalg.norm(block, axis=1, keepdims=True)
        with np.errstate(invalid="ignore"):  # an infinite row becomes NaN, which embed reports by sample
            x[start : start + len(block)] = block / np.where(lengths > 0, lengths, 1.0)
    return x


def _umap(source: np.ndarray | h5py.Dataset, settings: LayoutSettings, device: str) -> np.ndarray:
    import umap

    if settings.sgd == "torch":
        return _umap_torch(source, settings, device)
    x = read_rows(source, settings.metric)
    knn = resolve_knn(settings.knn, settings.metric, device, x.shape)
    n_neighbors, metric, seed = settings.n_neighbors, settings.metric, settings.seed
    precomputed: tuple = (None, None, None)  # umap-learn searches itself
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

    from atlas.umap_internals import nearest_neighbors

    started = time.perf_counter()
    random_state = np.random.RandomState(seed)
    if knn == "exact":
        indices, distances = exact_knn(x, n_neighbors, metric=metric, device=device)
    elif knn == "nndescent":  # umap-learn's settings but pynndescent's tree count (module docstring)
        # pynndescent searches cosine on an L2-normalised copy (2 GB at 1M x 512); rows that are already unit
        # length are searched as they are, by squared euclidean distance, which is twice the cosine distance
        unit = metric == "cosine" and unit_rows(x)
        iterations = max(5, round(math.log2(len(x))))
        search = NNDescent(
            x,
            metric="sqeuclidean" if unit else metric,
            n_neighbors=n_neighbors,
            random_state=random_state,
            n_iters=iterations,
            max_candidates=60,
        )
        indices, distances = search.neighbor_graph
        if unit:
            distances = distances / 2.0
    else:  # umap-learn's own search runs on one thread when seeded, as umap.UMAP does
        threads = -1 if seed is None else 1
        indices, distances, _ = nearest_neighbors(x, n_neighbors, metric, {}, False, random_state, n_jobs=threads)
    log.info("kNN graph (%s, k=%d, %s) in %.1f s", knn, n_neighbors, metric, time.perf_counter() - started)
    return indices, distances


def _umap_torch(source: np.ndarray | h5py.Dataset, settings: LayoutSettings, device: str) -> np.ndarray:
    """umap-learn's fuzzy graph and initial layout, then `optimize_layout` on `device`, as umap.UMAP prepares them."""
    random_state = np.random.RandomState(settings.seed)
    edges, initial = _graph_and_start(source, settings, device, random_state)
    return _lay_out(edges, initial, settings, device, random_state)


def _lay_out(
    edges: tuple[np.ndarray, ...],
    initial: np.ndarray,
    settings: LayoutSettings,
    device: str,
    random_state: np.random.RandomState,
) -> np.ndarray:
    """The layout SGD of a fuzzy graph's edges (head, tail, weight) from an initial layout, as umap.UMAP runs it."""
    from atlas.umap_internals import find_ab_params, noisy_scale_coords

    head, tail, weight = edges
    n_epochs = settings.n_epochs or (500 if len(initial) <= 10_000 else 200)  # umap-learn's defaults
    sampled = weight >= weight.max() / n_epochs  # edges sampled less than once are dropped, as umap-learn does
    head, tail, weight = head[sampled], tail[sampled], weight[sampled]
    epochs_per_sample = weight.max() / weight  # umap-learn's make_epochs_per_sample, in float32
    del weight
    initial = noisy_scale_coords(initial, random_state, max_coord=10, noise=0.0001)
    initial = 10.0 * (initial - initial.min(0)) / (initial.max(0) - initial.min(0))
    a, b = find_ab_params(1.0, settings.min_dist)
    seed = settings.seed
    return optimize_layout(initial, head, tail, epochs_per_sample, n_epochs, a, b, seed=seed, device=device)


def _graph_and_start(
    source: np.ndarray | h5py.Dataset, settings: LayoutSettings, device: str, random_state: np.random.RandomState
) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """The fuzzy graph's edges and the initial layout: the only step that holds the rows (read here from a dataset)."""
    from scipy.sparse import coo_matrix

    from atlas.umap_internals import spectral_layout

    x = read_rows(source, settings.metric)
    knn = resolve_knn(settings.knn, settings.metric, device, x.shape)
    indices, distances = _knn_graph(x, settings.n_neighbors, settings.metric, settings.seed, device, knn)
    started = time.perf_counter()
    if settings.init == "pca":
        initial = pca_start(x, settings.n_components, random_state)
        n = len(x)
        del x, source  # the rows are not needed after this: freed here when read from a dataset
        edges = fuzzy_graph(indices, distances)
    else:
        edges = fuzzy_graph(indices, distances)
        n = len(x)
        graph = coo_matrix((edges[2], (edges[0], edges[1])), shape=(n, n))
        initial = spectral_layout(x, graph, settings.n_components, random_state, metric=settings.metric)
    log.info(
        "fuzzy graph (%d edges) and %s init in %.1f s", len(edges[0]), settings.init, time.perf_counter() - started
    )
    return edges, initial


def fuzzy_graph(indices: np.ndarray, distances: np.ndarray, block: int = 1 << 22) -> tuple[np.ndarray, ...]:
    """UMAP's fuzzy simplicial set of a kNN graph as symmetric edges (head, tail, weight): int32, int32, float32.

    The memberships are umap-learn's (`smooth_knn_dist`, `compute_membership_strengths`); each pair's weight is
    their fuzzy union a + b - ab, as `fuzzy_simplicial_set` makes it. There it is built from sparse-matrix sums
    that took 2.8 GB above its input at 1M x 50; here from one sorted key per edge, searched `block` at a time.
    Self-loops and missing neighbours (-1) are dropped. Edge order: each row's kNN edges by tail, then the
    reverse of every edge whose reverse is not among them.
    """
    from atlas.umap_internals import compute_membership_strengths, smooth_knn_dist

    n, k = indices.shape
    distances = distances.astype(np.float32, copy=False)
    sigmas, rhos = smooth_knn_dist(distances, float(k), local_connectivity=1.0)
    _, tail, weight, _ = compute_membership_strengths(indices, distances, sigmas, rhos)
    by_tail = np.argsort(tail.reshape(n, k), axis=1)  # each row's edges in tail order: the keys are then sorted
    tail = np.take_along_axis(tail.reshape(n, k), by_tail, axis=1).ravel()
    weight = np.take_along_axis(weight.reshape(n, k), by_tail, axis=1).ravel()
    del by_tail
    head = np.repeat(np.arange(n, dtype=np.int32), k)
    kept = weight > 0  # self-loops have weight 0, missing neighbours were left at (0, 0, 0)
    head, tail, weight = head[kept], tail[kept], weight[kept]
    del kept
    keys = head.astype(np.int64) * n + tail
    reverse = np.zeros_like(weight)  # the weight of each edge's reverse, 0 where it has none
    for start in range(0, len(keys), block):
        wanted = tail[start : start + block].astype(np.int64) * n + head[start : start + block]
        where = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        found = keys[where] == wanted
        reverse[start : start + block][found] = weight[where[found]]
    del keys
    union = weight + reverse - weight * reverse
    lonely = reverse == 0
    del reverse, weight
    return (
        np.concatenate([head, tail[lonely]]),
        np.concatenate([tail, head[lonely]]),
        np.concatenate([union, union[lonely]]),
    )


def pca_start(
    x: np.ndarray, n_components: int, random_state: np.random.RandomState, max_rows: int = PCA_ROWS
) -> np.ndarray:
    """The first principal components of the rows of `x` [N, n_components], fitted on at most `max_rows` evenly
    strided rows and applied in row blocks: no centred copy of `x` (2 GB at 1M x 512) is ever made."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components, random_state=random_state).fit(x[:: math.ceil(len(x) / max_rows)])
    return np.concatenate([pca.transform(rows) for _, rows in iter_rows(x)])


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
