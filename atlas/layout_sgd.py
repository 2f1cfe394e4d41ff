"""UMAP's layout SGD in torch (`optimize_layout`), the part of atlas.layout's UMAP that runs on the device."""

from __future__ import annotations

import numpy as np
import torch

from atlas.progress import progress

EDGE_BLOCK = 1 << 21  # edges per block of an SGD epoch: bounds the epoch's temporaries (about 1 GB at most)


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
    edge_block: int = EDGE_BLOCK,
) -> np.ndarray:
    """UMAP's layout SGD in torch: the edges sampled in an epoch move their ends at once, from the same positions.

    Same schedule as umap-learn's `optimize_layout_euclidean`: edge e is sampled every `epochs_per_sample[e]`
    epochs, pulls its ends together by -2ab d^(2b-2) / (1 + a d^(2b)) (x_i - x_j), and draws
    `negative_sample_rate` random vertices per sample that push its head away by 2b / ((0.001 + d^2)
    (1 + a d^(2b))) (x_i - x_k); each coordinate step is clipped to [-4, 4] and scaled by a learning rate that
    falls linearly from 1 to 0. The graph (`head` -> `tail`, [E]) must be symmetric, as UMAP's fuzzy union
    is: edge (j, i) is sampled with (i, j) and moves i by the same step, so only heads are updated, twice.
    An epoch's attractions are applied together, then its repulsions, from the positions the attractions left.
    Both are summed over blocks of `edge_block` edges into one step buffer, so memory does not grow with the
    number of edges sampled at once (5 negative samples per edge: 9 GB at 1M samples in one piece). The
    schedule is float32 (umap-learn's is float64): at n_epochs <= 1000 its rounding is below 1e-4 of an epoch.
    Returns the layout [N, dim] float32.
    """
    dev = torch.device(device)
    layout = torch.tensor(np.ascontiguousarray(np.asarray(initial).T), dtype=torch.float32, device=dev)  # [dim, N]
    n_vertices = layout.shape[1]
    step = torch.zeros_like(layout)
    # int32 or int64 indices as given (scipy's are int32): no copy of the graph's two largest arrays on the CPU
    heads = torch.as_tensor(np.asarray(head), device=dev)
    tails = torch.as_tensor(np.asarray(tail), device=dev)
    period = torch.as_tensor(np.asarray(epochs_per_sample), dtype=torch.float32, device=dev)
    next_sample = period.clone()
    next_negatives = period / negative_sample_rate
    generator = torch.Generator(device=dev)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    blocks = [slice(start, start + edge_block) for start in range(0, len(period), edge_block)]
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(seed is not None or deterministic)  # CUDA's index_add_ sums in any order
    try:
        for epoch in progress(range(n_epochs), desc="layout", unit="epoch"):
            learning_rate = 1.0 - epoch / n_epochs
            due = [torch.nonzero(next_sample[block] <= epoch).squeeze(1).add_(block.start) for block in blocks]
            step.zero_()
            for sampled in due:
                _attract(layout, step, heads.index_select(0, sampled), tails.index_select(0, sampled), a, b)
            layout.add_(step, alpha=2.0 * learning_rate)
            step.zero_()
            for sampled in due:
                periods = period.index_select(0, sampled)
                next_sample.index_add_(0, sampled, periods)
                negative_period = periods / negative_sample_rate
                owed = (epoch - next_negatives.index_select(0, sampled)) / negative_period
                counts = owed.long().clamp_min_(0)  # umap-learn truncates the same way
                next_negatives.index_add_(0, sampled, counts * negative_period)
                sources = heads.index_select(0, sampled).repeat_interleave(counts)
                others = torch.randint(n_vertices, sources.shape, generator=generator, device=dev)
                _repel(layout, step, sources, others, a, b, repulsion_strength)
            layout.add_(step, alpha=learning_rate)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return layout.T.cpu().numpy()


def _power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """x ** exponent, on one thread on the CPU: torch's vectorised and scalar pow differ in the last bit, and how a
    tensor is split between threads decides which elements take which, so the layout would depend on the thread
    count (tests/test_layout.py)."""
    if x.device.type != "cpu":
        return x.pow(exponent)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return x.pow(exponent)
    finally:
        torch.set_num_threads(threads)


def _attract(layout: torch.Tensor, step: torch.Tensor, heads: torch.Tensor, tails: torch.Tensor, a: float, b: float):
    """Add the clipped attraction of each edge (heads -> tails) to its head's step."""
    # gathered one coordinate row at a time: on the CPU, 1-D index_select beats selecting along dim 1
    offset = torch.stack([row.index_select(0, heads) - row.index_select(0, tails) for row in layout])
    squared = (offset * offset).sum(0)
    power = _power(squared, b)
    pull = (-2.0 * a * b) * power / (squared * (a * power + 1.0))
    pull = torch.where(squared > 0, pull, 0.0)
    # the scale goes on the sum, not index_add_'s `alpha`, which takes a far slower path on the CPU
    step.index_add_(1, heads, (pull * offset).clamp_(-4.0, 4.0))


def _repel(
    layout: torch.Tensor,
    step: torch.Tensor,
    sources: torch.Tensor,
    others: torch.Tensor,
    a: float,
    b: float,
    strength: float,
):
    """Add the clipped repulsion of each negative sample (sources from others) to its source's step."""
    offset = torch.stack([row.index_select(0, sources) - row.index_select(0, others) for row in layout])
    squared = (offset * offset).sum(0)
    push = (2.0 * strength * b) / ((0.001 + squared) * (a * _power(squared, b) + 1.0))
    push = torch.where(squared > 0, push, 0.0)
    step.index_add_(1, sources, (push * offset).clamp_(-4.0, 4.0))
