"""Stage 2, `atlas project`: lay a layer's activation vectors out in 2-D and normalise to [0, 1].

The layout itself is `atlas.layout.embed` (UMAP or t-SNE; atlas/layout.py's docstring holds the methods, their measured
defaults and the memory at 1M samples). This stage reads the store, normalises the layout as the paper does,
and records it with every parameter used.

Output: `/<layer>/layout` [N, 2] float32 in [0, 1], attrs: the method and every parameter used.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import h5py
import numpy as np

from atlas import AtlasError
from atlas.layout import TSNE_ONLY, UMAP_ONLY, LayoutSettings, embed, resolve_knn
from atlas.stages import Context
from atlas.store import ACTIVATIONS, GRIDS, LAYOUT, Layer, Node, made, opened, record_lineage, replace_dataset

log = logging.getLogger(__name__)


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


def layout_attrs(settings: LayoutSettings, device: str, shape: tuple[int, int]) -> dict:
    """What `/<layer>/layout` records: method, metric, seed ("none" when unseeded), device and the method's own."""
    attrs: dict[str, object] = dict(method=settings.method, metric=settings.metric, device=device)
    attrs["seed"] = "none" if settings.seed is None else settings.seed
    if settings.method == "tsne":
        return {**attrs, "perplexity": settings.perplexity, "learning_rate": settings.learning_rate}
    umap = dict(n_neighbors=settings.n_neighbors, min_dist=settings.min_dist, n_epochs=settings.n_epochs or "default")
    knn = resolve_knn(settings.knn, settings.metric, device, shape)
    return {**attrs, **umap, "knn": knn, "sgd": settings.sgd, "init": settings.init}


def layout_record(settings: LayoutSettings, device: str) -> dict:
    """What a layout records as its settings (atlas.store lineage): its method's own parameters and the device, so
    that changing t-SNE's perplexity leaves a UMAP layout fresh."""
    other = TSNE_ONLY if settings.method == "umap" else UMAP_ONLY
    own = {name: value for name, value in dataclasses.asdict(settings).items() if name not in other}
    return {"settings": own, "device": device}


def project_store(
    path: str | Path | h5py.File,
    layer: str | None = None,
    settings: LayoutSettings = LayoutSettings(),
    device: str = "cpu",
) -> np.ndarray:
    """Lay out a layer's activations, normalise to [0, 1], and write `/<layer>/layout` [N, 2] with its parameters.

    Everything is checked before the store is written; a failure leaves it as it was. Returns the layout.
    """
    if settings.n_components != 2:
        raise AtlasError(f"a layer's layout is 2-D, not {settings.n_components}-D")
    with opened(path) as store:
        view = Layer(store, layer)
        layer, shape = view.name, view[ACTIVATIONS].shape
        layout = normalize_layout(embed(view[ACTIVATIONS], settings, device))
    with opened(path, "r+") as store:
        group = store[layer]
        if GRIDS in group:
            log.warning("%s has grids made from its previous layout: rerun `atlas grid`", layer)
        written = replace_dataset(group, LAYOUT, layout, **layout_attrs(settings, device, shape))
        record_lineage(written, layout_record(settings, device), made(group))
    log.info("wrote /%s/layout %s", layer, layout.shape)
    return layout


class ProjectStage:
    """The stage (atlas.stages.Stage): a layer's layout of every sample, from the layer as collected."""

    name, settings, whole_run = "project", LayoutSettings, False

    def products(self, ctx: Context, layer: str | None, settings: LayoutSettings) -> list[tuple[Node | None, str]]:
        group = ctx.store[layer]
        return [(group.get(LAYOUT), made(group))]

    def record(self, ctx: Context, layer: str | None, settings: LayoutSettings) -> dict:
        return layout_record(settings, ctx.device)

    def complete(self, ctx: Context, layer: str | None, node: h5py.Dataset) -> bool:
        return node.shape == (ctx.store[layer][ACTIVATIONS].shape[0], 2)

    def run(self, ctx: Context, layer: str | None, settings: LayoutSettings) -> None:
        project_store(ctx.store, layer, settings, ctx.device)


PROJECT = ProjectStage()
