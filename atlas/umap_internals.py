"""umap-learn's internal functions that atlas.layout builds its torch UMAP on, imported here and nowhere else.

They are module-level functions of `umap.umap_` and `umap.spectral`, not umap-learn's documented API, so an
upgrade may change them without notice: `SIGNATURES` lists the leading parameters layout.py passes by position,
and tests/test_layout.py fails when one no longer has them. Checked with umap-learn 0.5.12 (constraints.txt).
Importing this module imports umap (and numba), which takes seconds: layout.py imports it where it is needed.
"""

from umap.spectral import spectral_layout
from umap.umap_ import (
    compute_membership_strengths,
    find_ab_params,
    nearest_neighbors,
    noisy_scale_coords,
    smooth_knn_dist,
)

__all__ = [
    "compute_membership_strengths",
    "find_ab_params",
    "nearest_neighbors",
    "noisy_scale_coords",
    "smooth_knn_dist",
    "spectral_layout",
]

# function -> the parameters layout.py passes, in order (positionally or by these names)
SIGNATURES = {
    "nearest_neighbors": ("X", "n_neighbors", "metric", "metric_kwds", "angular", "random_state"),
    "noisy_scale_coords": ("coords", "random_state", "max_coord", "noise"),
    "find_ab_params": ("spread", "min_dist"),
    "spectral_layout": ("data", "graph", "dim", "random_state", "metric"),
    "smooth_knn_dist": ("distances", "k", "n_iter", "local_connectivity"),
    "compute_membership_strengths": ("knn_indices", "knn_dists", "sigmas", "rhos"),
}
