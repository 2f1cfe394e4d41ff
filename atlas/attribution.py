"""Attributions of sampled activation vectors to every class logit: pure functions over tensors.

A sample is one position of a layer's activation map. Its attribution to class c says how much the vector there
moves logit c. Three methods, chosen per run (`collect: attribution:`) and recorded in the store:

- "gradient": h . d logit_c / d h at the position, the paper's (reference 1.1) and lucid's. It is the first-order
  estimate of the logit's change from zero, right for post-ReLU layers such as InceptionV1's mixed4c.
- "integrated": integrated gradients (Sundararajan et al. 2017) along the straight line from the layer's mean
  activation (every position at once) to the image's own map, for the one position: (h_p - m) . mean over
  alpha of d logit_c / d h_p at m + alpha (h - m) (midpoint rule, `steps` points). Summed over every position
  it is logit(h) - logit(mean map), the exact counterfactual, which is right where the gradient at h is not:
  on a signed residual layer such as EfficientNet-Lite0's `_blocks.10` (benchmarks/results.md, attributions).
- "occlusion": logit(h) - logit(h with the one position replaced by the mean activation).

Each position is one tangent (gradient, integrated) or one copy of the network above the layer (occlusion); all
of them run vectorised (`torch.func.vmap`) through the layers after the one they enter, and the layers before
run once. Max pools pass the average-pool derivative (the paper's relaxed max-pool gradient).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn
from torch.func import jvp, vmap

from atlas.models.classifier import Classifier, capture

METHODS = ("gradient", "integrated", "occlusion")
FROM_BASELINE = ("integrated", "occlusion")  # the methods that need the layer's mean activation


class _RelaxedMaxPool:
    """Max pool forward, average-pool derivative: the paper's continuous relaxation for attributions."""

    def __init__(self, pool: nn.MaxPool2d):
        self.pool = pool

    def __call__(self, _module: nn.Module, inputs: tuple[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        p = self.pool
        average = nn.functional.avg_pool2d(inputs[0], p.kernel_size, p.stride, p.padding, p.ceil_mode)
        return out.detach() + average - average.detach()


@contextlib.contextmanager
def _quiet_vmap() -> Iterator[None]:
    """vmap without torch's warning that asks every user to file an issue about a slower fallback (a pooling op)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        yield


def attribution_pass(
    model: Classifier,
    images: torch.Tensor,
    positions: dict[str, torch.Tensor],
    sizes: dict[str, tuple[int, int]],
    max_rows: int = 512,
    activations: dict[str, torch.Tensor] | None = None,
    method: str = "gradient",
    baselines: dict[str, torch.Tensor] | None = None,
    steps: int = 1,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One batch's attributions for every layer in `positions` (layer -> [B, K, 2]; `sizes`: layer -> its (H, W)):
    layer -> (its activations [B, C, H, W], attributions [B, K, classes] at its positions).

    method: one of METHODS; "integrated" and "occlusion" need `baselines` (layer -> its mean activation [C]);
    steps: the integration points of "integrated". `max_rows` bounds B x (positions per pass), i.e. the memory
    of one pass; each further pass runs the network again.
    """
    if method not in METHODS:
        raise ValueError(f"attribution method {method!r}: choose one of {', '.join(METHODS)}")
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    relax = [pool.register_forward_hook(_RelaxedMaxPool(pool)) for pool in pools]
    try:
        if method == "gradient":
            return _gradient_pass(model, images, positions, sizes, max_rows, activations)
        if baselines is None:
            raise ValueError(f"attribution method {method!r} needs the layers' mean activations (baselines)")
        return _baseline_pass(model, images, positions, max_rows, activations, method, baselines, steps)
    finally:
        for handle in relax:
            handle.remove()


def _gradient_pass(
    model: Classifier,
    images: torch.Tensor,
    positions: dict[str, torch.Tensor],
    sizes: dict[str, tuple[int, int]],
    max_rows: int,
    activations: dict[str, torch.Tensor] | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """h . grad_h logit at every position: each position is one tangent, h (the layer's own output, or
    `activations[layer]`) masked to it, entering at the layer's forward hook inside the one forward pass that also
    records the activations; the tail carries every layer's tangents at once, and a tangent adds nothing to the
    layers it enters after."""
    modules = {layer: model.layer_module(layer) for layer in positions}
    batch = images.shape[0]
    rows = torch.arange(batch, device=images.device)
    slots = [(layer, k) for layer, where in positions.items() for k in range(where.shape[1])]
    per_pass = max(1, max_rows // batch)

    def pass_of(
        chunk: list[tuple[str, int]], capture: set[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The attributions of the chunk's tangents, by layer, and the activations of the layers in `capture`."""
        entering = list(dict.fromkeys(layer for layer, _ in chunk))  # the layers whose tangents this pass carries

        def logits_with(*scales: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            seen: dict[str, torch.Tensor] = {}

            def hook(layer: str):
                def enter(_m: nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor:
                    if layer in capture:
                        seen[layer] = out
                    if layer not in entering:
                        return out
                    h = out if activations is None else activations[layer]
                    # primal: out unchanged (scale is 0); tangent: h at the masked position, in the layer's dtype
                    return out + h * scales[entering.index(layer)].to(out.dtype)

                return enter

            hooked = [layer for layer in modules if layer in capture or layer in entering]
            hooks = [modules[layer].register_forward_hook(hook(layer)) for layer in hooked]
            try:
                return model(images), seen
            finally:
                for handle in hooks:
                    handle.remove()

        zeros = tuple(torch.zeros(batch, 1, *sizes[layer], device=images.device) for layer in entering)

        def masks(layer: str, k: int) -> tuple[torch.Tensor, ...]:
            out = tuple(torch.zeros_like(zero) for zero in zeros)
            where = positions[layer][:, k]
            out[entering.index(layer)][rows, 0, where[:, 0], where[:, 1]] = 1
            return out

        tangents = tuple(torch.stack(parts) for parts in zip(*(masks(layer, k) for layer, k in chunk), strict=True))
        # with has_aux, jvp gives (output, tangent, aux); its annotation admits a pair too
        jvp_with_aux = cast(Callable[..., tuple[Any, Any, Any]], jvp)
        with _quiet_vmap():
            attributions, seen = vmap(lambda *m: jvp_with_aux(logits_with, zeros, m, has_aux=True)[1:])(*tangents)
        by_layer: dict[str, list[torch.Tensor]] = {layer: [] for layer in entering}
        for (layer, _k), row in zip(chunk, attributions, strict=True):
            by_layer[layer].append(row)
        return {layer: torch.stack(parts, 1).float() for layer, parts in by_layer.items()}, seen

    found: dict[str, list[torch.Tensor]] = {layer: [] for layer in positions}
    seen: dict[str, torch.Tensor] = {}
    for start in range(0, len(slots), per_pass):
        # the first pass records every layer's activations; they do not depend on the tangents
        got, captured = pass_of(slots[start : start + per_pass], set(positions) - set(seen))
        seen.update({layer: h[0] for layer, h in captured.items()})  # vmap gives each tangent the same copy
        for layer, parts in got.items():
            found[layer].append(parts)
    return {layer: (seen[layer], torch.cat(parts, 1)) for layer, parts in found.items()}


def _with_output(model: Classifier, module: nn.Module, images: torch.Tensor, output: Callable) -> torch.Tensor:
    """The logits of `images` with `module`'s output replaced by output(its output)."""
    handle = module.register_forward_hook(lambda _m, _i, out: output(out))
    try:
        return model(images)
    finally:
        handle.remove()


def _baseline_pass(
    model: Classifier,
    images: torch.Tensor,
    positions: dict[str, torch.Tensor],
    max_rows: int,
    activations: dict[str, torch.Tensor] | None,
    method: str,
    baselines: dict[str, torch.Tensor],
    steps: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Integrated gradients or occlusion from each layer's mean activation, one layer at a time (a position moves
    only its own layer's map): a plain forward records the activations and logits, then the positions run
    vectorised, at most max_rows // B of them per pass."""
    with capture(model, list(positions)) as captured:
        logits = model(images)
    seen = dict(captured)
    batch = images.shape[0]
    rows = torch.arange(batch, device=images.device)
    per_pass = max(1, max_rows // batch)
    alphas = [(j + 0.5) / steps for j in range(steps)]  # integrated: the midpoint rule
    found = {}
    for layer, where in positions.items():
        module = model.layer_module(layer)
        h = seen[layer] if activations is None else activations[layer]
        base = baselines[layer].to(h.device, h.dtype).view(1, -1, 1, 1)
        masks = torch.zeros(where.shape[1], batch, 1, *h.shape[-2:], device=h.device, dtype=h.dtype)
        for k in range(where.shape[1]):
            masks[k, rows, 0, where[:, k, 0], where[:, k, 1]] = 1
        parts = []
        for chunk in masks.split(per_pass):
            if method == "occlusion":
                parts.append(logits - _occluded(model, module, images, h, base, chunk))
            else:
                parts.append(sum(_gradient_at(model, module, images, h, base, chunk, a) for a in alphas) / steps)
        found[layer] = (seen[layer], torch.cat(parts).transpose(0, 1).float())
    return found


def _occluded(
    model: Classifier, module: nn.Module, images: torch.Tensor, h: torch.Tensor, base: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """The logits [M, B, classes] with each mask's position of h set to the baseline."""
    with _quiet_vmap():
        return vmap(lambda mask: _with_output(model, module, images, lambda _out: h + mask * (base - h)))(masks)


def _gradient_at(
    model: Classifier,
    module: nn.Module,
    images: torch.Tensor,
    h: torch.Tensor,
    base: torch.Tensor,
    masks: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """(h - base) . grad logit at each mask's position [M, B, classes], the gradient taken at alpha on the line
    from the mean map to h: the tangent (h - base) at the position enters where the primal is that point."""

    def along(scale: torch.Tensor) -> torch.Tensor:
        return _with_output(model, module, images, lambda _out: base + (alpha + scale) * (h - base))

    zero = torch.zeros_like(masks[0])
    with _quiet_vmap():
        return vmap(lambda mask: jvp(along, (zero,), (mask,))[1])(masks).float()


def attributions(
    model: Classifier,
    images: torch.Tensor,
    layer: str,
    activations: torch.Tensor,
    positions: torch.Tensor,
    max_rows: int = 512,
    method: str = "gradient",
    baseline: torch.Tensor | None = None,
    steps: int = 1,
) -> torch.Tensor:
    """The attributions to every class at `positions` [B, K, 2] of `layer`: returns [B, K, classes].

    `activations` is the layer's output h for `images` [B, C, H, W]; method, baseline (the layer's mean
    activation [C]) and steps as for `attribution_pass`, which `collect_batch` uses for several layers at once.
    """
    size = (activations.shape[-2], activations.shape[-1])
    baselines = None if baseline is None else {layer: baseline}
    found = attribution_pass(
        model, images, {layer: positions}, {layer: size}, max_rows, {layer: activations}, method, baselines, steps
    )
    return found[layer][1]


def mean_activation(model: Classifier, batches: Iterable[torch.Tensor], layers: list[str]) -> dict[str, torch.Tensor]:
    """Each layer's mean activation vector [C] over every position of every image in `batches`: the baseline of
    the methods in FROM_BASELINE. A ValueError when `batches` holds no image."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with torch.no_grad(), capture(model, layers) as seen:
        for images in batches:
            model(images)
            for layer in layers:
                h = seen[layer].double()  # sums of many positions: the same to the last digit in any batch size
                sums[layer] = sums.get(layer, 0) + h.sum((0, 2, 3))
                counts[layer] = counts.get(layer, 0) + h.shape[0] * h.shape[2] * h.shape[3]
    if not counts:
        raise ValueError("no images to take the mean activation of")
    return {layer: (sums[layer] / counts[layer]).float() for layer in layers}
