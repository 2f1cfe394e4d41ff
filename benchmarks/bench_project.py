"""Projection (`atlas project`): our UMAP path beside plain `umap.UMAP(...).fit_transform`, same data, same run.

Cases: plain umap-learn seeded (as the paper's notebooks ran it: one thread) and unseeded (all cores, not
repeatable); our default path (exact or all-core NN-descent kNN, torch SGD); and at 100k our path with
umap-learn's SGD, to separate the two changes. On a CUDA machine, 1M x 512 adds our path on the GPU (both
inits) against plain umap-learn on all the machine's CPU cores.

Data: N x 512 synthetic activations, a mixture of 100 Gaussian clusters of unequal size on a 32-dim
subspace plus noise, through ReLU (about half the entries are zero, as in a post-ReLU layer). Both paths use
the paper's settings (n_neighbors 50, min_dist 0.05, cosine) and seed 0. Quality: trustworthiness
(sklearn, 10 neighbours, cosine) of the same 3000-sample subsample of each embedding.

Timings exclude numba's compilation, which both paths pay once per process (its own row, measured first
on a small input). Peak memory is the resident high-water mark during the call above what the process held
before it (Linux: reset through /proc/self/clear_refs), so it counts what the method itself allocates.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

SIZES = (10_000, 100_000)
CHANNELS = 512
SETTINGS = {"n_neighbors": 50, "min_dist": 0.05, "metric": "cosine"}  # the paper's, mixed4a-5b
SUBSAMPLE = 3000
INITS = ("pca", "spectral")


def clustered_activations(n: int, channels: int = CHANNELS, clusters: int = 100, seed: int = 0) -> np.ndarray:
    """Post-ReLU-like vectors from a mixture of Gaussian clusters of unequal size on a low-dimensional subspace."""
    rng = np.random.default_rng(seed)
    latent = 32
    mixing = rng.normal(size=(latent, channels)) / np.sqrt(latent)
    centres = rng.normal(size=(clusters, latent))
    which = rng.choice(clusters, size=n, p=rng.dirichlet(np.ones(clusters)))
    points = (centres[which] + 0.8 * rng.normal(size=(n, latent))) @ mixing  # clusters touch: one connected graph
    return np.maximum(points + 0.2 * rng.normal(size=(n, channels)), 0).astype(np.float32)


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def measure(function, *args, **kwargs) -> tuple[object, float, float]:
    """(result, seconds, peak resident MiB above the resident size before the call)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the high-water mark VmHWM to the current resident size
    before = _resident_kib("VmRSS:")
    started = time.perf_counter()
    result = function(*args, **kwargs)
    seconds = time.perf_counter() - started
    return result, seconds, (_resident_kib("VmHWM:") - before) / 1024


def plain_umap(x: np.ndarray, **extra: object) -> np.ndarray:
    import umap

    extra = {"random_state": 0, **extra}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value")  # umap-learn drops to one thread when seeded
        return umap.UMAP(**SETTINGS, **extra).fit_transform(x)


def our_umap(x: np.ndarray, **extra: object) -> np.ndarray:
    from atlas.layout import LayoutSettings, embed

    options = {"seed": 0, "device": "cpu", **extra}
    device = options.pop("device")
    return embed(x, LayoutSettings(**SETTINGS, **options), device)


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def cases(n: int) -> list[tuple[str, object, dict]]:
    """(name, function, keyword arguments) of each measurement at N samples."""
    unseeded = ("plain umap-learn", plain_umap, {"random_state": None})
    if n >= 1_000_000:  # the GPU path; plain umap-learn seeded would run its SGD on one core for an hour
        return [unseeded] + [("atlas.layout.embed", our_umap, {"device": "cuda", "init": i}) for i in INITS]
    ours = [("atlas.layout.embed", our_umap, {})]
    if n == 100_000:  # our kNN and start with umap-learn's SGD: the two changes apart
        ours.append(("atlas.layout.embed", our_umap, {"sgd": "umap-learn"}))
    return [("plain umap-learn", plain_umap, {}), unseeded, *ours]


def run() -> list[dict]:
    import torch
    from sklearn.manifold import trustworthiness

    from atlas.layout import resolve_knn

    small = clustered_activations(5000, seed=1)  # above 4096 rows, where umap-learn also uses pynndescent
    _, compile_seconds, _ = measure(
        lambda: [plain_umap(small, n_epochs=5)] + [our_umap(small, n_epochs=5, knn=k) for k in ("nndescent", "exact")]
    )
    rows = [{"case": "numba compile (once per process, both paths)", "device": "cpu", "seconds": compile_seconds}]
    sizes = SIZES + ((1_000_000,) if torch.cuda.is_available() else ())
    for n in sizes:
        x = clustered_activations(n)
        subsample = np.random.default_rng(0).choice(n, SUBSAMPLE, replace=False)
        for name, function, extra in cases(n):
            embedding, seconds, peak = measure(function, x, **extra)
            device = extra.get("device", "cpu")
            if function is plain_umap:
                knn, sgd, init = "umap-learn (1 thread when seeded)", "umap-learn", extra.get("init", "spectral")
            else:
                knn = resolve_knn(extra.get("knn", "auto"), "cosine", device, x.shape)
                sgd, init = extra.get("sgd", "torch"), extra.get("init", "pca")
            rows.append(
                {
                    "case": name,
                    "device": device_name(device),
                    "n": n,
                    "channels": CHANNELS,
                    "knn": knn,
                    "sgd": sgd,
                    "init": init,
                    "seeded": extra.get("random_state", 0) is not None,
                    "seconds": seconds,
                    "peak_extra_mib": round(peak),
                    "trustworthiness": trustworthiness(
                        x[subsample], embedding[subsample], n_neighbors=10, metric="cosine"
                    ),
                }
            )
    return rows
