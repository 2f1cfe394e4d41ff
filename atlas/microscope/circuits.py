"""How a unit is built from the layer below (the Circuits articles): its strongest inputs, and what zeroing them does.

- `expanded_weights`: the linear map from the lower layer's channels to the unit's pre-activation at the centre of
  its map, with every ReLU module between them taken as the identity and max pools as average pools (so through
  InceptionV1's 1x1 bottlenecks, as the articles' "expanded weights", which ignore the bottleneck ReLU). A k x k map
  per input channel; an input's strength is its map's sum.
  Only where that path is affine (checked: the map is the same at two points), so not through a Swish.
- `attribution_inputs`: for any model, activation x gradient of the unit (at its maximum in each of its top dataset
  examples, the crop Microscope shows) with respect to each lower channel, summed over positions and examples.
- `ablation`: how much the unit's activation there falls when one lower channel is zeroed.
- `unit_circuit`: all three for one unit over a dataset, and how far each top input's own top examples are the unit's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atlas import AtlasError
from atlas.images import ImageRecord, load_batches
from atlas.microscope.examples import TOP_K, top_activating
from atlas.models.classifier import Classifier
from atlas.optvis import model_device

TOP = 8  # inputs listed each way, as many as a Circuits figure shows


@dataclass(frozen=True)
class Inputs:
    """A unit's inputs from the layer below, strongest first each way; `how` names the method."""

    how: str
    positive: list[tuple[int, float]]
    negative: list[tuple[int, float]]
    maps: np.ndarray | None = None  # expanded weights only: [C_in, k, k], centred on the unit


def _ranked(strength: np.ndarray, how: str, top: int, maps: np.ndarray | None = None) -> Inputs:
    order = np.argsort(-strength)
    positive = [(int(c), float(strength[c])) for c in order[:top] if strength[c] > 0]
    negative = [(int(c), float(strength[c])) for c in order[::-1][:top] if strength[c] < 0]
    return Inputs(how, positive, negative, maps)


def _check(model: Classifier, layer: str, unit: int, below: str) -> tuple[str, str]:
    layer, below = model.resolve_layer(layer), model.resolve_layer(below)
    shapes = {name: shape for name, *shape in model.layer_shapes()}
    if not 0 <= unit < shapes[layer][0]:
        raise AtlasError(f"{layer} has units 0..{shapes[layer][0] - 1}, not {unit}")
    order = list(shapes)
    if order.index(below) >= order.index(layer):
        raise AtlasError(f"{below} is not below {layer}: choose an earlier layer (`atlas layers {model.name}`)")
    return layer, below


@contextlib.contextmanager
def _replaced(model: Classifier, below: str, value: torch.Tensor) -> Iterator[None]:
    """Every forward pass sees `value` as the output of `below`."""
    hook = model.layer_module(below).register_forward_hook(lambda *_: value)
    try:
        yield
    finally:
        hook.remove()


@contextlib.contextmanager
def _linearised(model: Classifier) -> Iterator[None]:
    """ReLU modules pass their input through, max pools average: the network between two layers becomes affine."""
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            hooks.append(module.register_forward_hook(lambda _m, inputs, _out: inputs[0]))
        elif isinstance(module, nn.MaxPool2d):
            hooks.append(
                module.register_forward_hook(
                    lambda m, inputs, _out: F.avg_pool2d(inputs[0], m.kernel_size, m.stride, m.padding, m.ceil_mode)
                )
            )
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _layer_output(model: Classifier, layer: str, images: torch.Tensor) -> torch.Tensor:
    """The output of `layer` on `images` (with whatever hooks are in place)."""
    seen: dict[str, torch.Tensor] = {}
    hook = model.layer_module(layer).register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out))
    try:
        model(images)
    finally:
        hook.remove()
    return seen["out"]


def expanded_weights(model: Classifier, layer: str, unit: int, below: str, top: int = TOP) -> Inputs:
    """The unit's expanded weights from `below`: the gradient of its linearised pre-activation at the centre of its
    map with respect to the lower layer's map (constant where the path is affine), cropped to where it is non-zero.

    Raises AtlasError where the path is not affine once ReLUs and max pools are linearised (a Swish, a Sigmoid)."""
    layer, below = _check(model, layer, unit, below)
    device = model_device(model)
    dummy = torch.zeros(1, 3, model.input_size, model.input_size, device=device)
    with torch.no_grad():
        shape = _layer_output(model, below, dummy).shape
    generator = torch.Generator().manual_seed(0)
    grads = []
    for start in (torch.zeros(shape), torch.randn(shape, generator=generator)):
        lower = start.to(device).requires_grad_(True)
        with _linearised(model), _replaced(model, below, lower):  # in this order: the replacement is the last hook
            out = _layer_output(model, layer, dummy)
            height, width = out.shape[-2:]
            (grad,) = torch.autograd.grad(out[0, unit, height // 2, width // 2], lower)
        grads.append(grad[0].detach().cpu().numpy())  # [C_in, H_in, W_in]
    grad = grads[0]
    if not np.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6 * max(1e-12, float(np.abs(grad).max()))):
        raise AtlasError(f"no expanded weights: the path from {below} to {layer} is not linear apart from ReLUs")
    support = np.nonzero(np.abs(grad).sum(0))
    if len(support[0]) == 0:
        raise AtlasError(f"{layer}:{unit} does not depend on {below}")
    maps = grad[:, support[0].min() : support[0].max() + 1, support[1].min() : support[1].max() + 1]
    return _ranked(maps.sum((1, 2)), "expanded weights (ReLUs as identity, max pools as average)", top, maps)


def _unit_at(model: Classifier, layer: str, unit: int, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The unit's activation in each image at its (y, x) in `positions` [N, 2]."""
    out = _layer_output(model, layer, images)[:, unit]
    return out[torch.arange(len(images)), positions[:, 0], positions[:, 1]]


def attribution_inputs(
    model: Classifier,
    layer: str,
    unit: int,
    below: str,
    images: torch.Tensor,
    positions: torch.Tensor,
    top: int = TOP,
) -> Inputs:
    """Activation x gradient of the unit at `positions` [N, 2] of `images` (its top examples and where it peaks)
    with respect to each channel of `below`, summed over positions and images."""
    layer, below = _check(model, layer, unit, below)
    lower = _layer_output(model, below, images).detach().requires_grad_(True)
    with _replaced(model, below, lower):
        (grad,) = torch.autograd.grad(_unit_at(model, layer, unit, images, positions).sum(), lower)
    strength = (lower * grad).sum((0, 2, 3)).detach().cpu().numpy()
    return _ranked(strength, f"attribution (activation x gradient on its {len(images)} top examples)", top)


@torch.no_grad()
def ablation(
    model: Classifier,
    layer: str,
    unit: int,
    below: str,
    images: torch.Tensor,
    positions: torch.Tensor,
    channels: Sequence[int],
) -> dict[int, float]:
    """The share by which the unit's mean activation at `positions` of `images` falls when each of `channels` of
    `below` is zeroed (negative: it rises)."""
    layer, below = _check(model, layer, unit, below)
    lower = _layer_output(model, below, images)
    base = float(_unit_at(model, layer, unit, images, positions).mean())
    if base <= 0:
        raise AtlasError(f"{layer}:{unit} is not active on these images: no ablation to measure")
    falls = {}
    for channel in channels:
        zeroed = lower.clone()
        zeroed[:, channel] = 0
        with _replaced(model, below, zeroed):
            falls[int(channel)] = (base - float(_unit_at(model, layer, unit, images, positions).mean())) / base
    return falls


def unit_circuit(
    model: Classifier,
    layer: str,
    unit: int,
    below: str,
    records: list[ImageRecord],
    top_k: int = TOP_K,
    top: int = TOP,
    workers: int | None = None,
) -> dict:
    """How `layer`:`unit` is built from `below` over `records`: its top examples, the expanded weights (where the
    path is affine; else why not), the attributions on those examples, the ablation of the inputs either lists
    first, and for each of those inputs the share of its own top examples that are also the unit's."""
    layer, below = _check(model, layer, unit, below)
    found = {name: top_activating(model, name, records, top_k=top_k, workers=workers) for name in (layer, below)}
    rows, where = found[layer].row[unit], found[layer].position[unit]
    kept = rows >= 0  # padding where fewer images than top_k were read
    rows, where = rows[kept], where[kept]
    images = _images(model, records, rows.tolist(), workers)
    positions = torch.from_numpy(where).long().to(images.device)
    report: dict = {"layer": layer, "unit": unit, "below": below, "examples": [records[r].path for r in rows]}
    lenses = []
    try:
        lenses.append(expanded_weights(model, layer, unit, below, top))
    except AtlasError as err:
        report["no_weights"] = str(err)
    lenses.append(attribution_inputs(model, layer, unit, below, images, positions, top))
    inputs = list(dict.fromkeys(c for lens in lenses for c, _ in lens.positive))
    report["lenses"] = [{"how": lens.how, "positive": lens.positive, "negative": lens.negative} for lens in lenses]
    report["ablation"] = ablation(model, layer, unit, below, images, positions, inputs)
    own = set(rows.tolist())
    report["shared_examples"] = {c: len(own & set(found[below].row[c].tolist())) / max(1, len(own)) for c in inputs}
    return report


def _images(model: Classifier, records: list[ImageRecord], rows: list[int], workers: int | None) -> torch.Tensor:
    """The images at `rows`, as the model sees them (all readable: they are top examples)."""
    sides = (model.resize_size, model.input_size)
    ((got, batch, _skipped),) = list(load_batches(records, *sides, [rows], workers, progress=False))
    order = [got.index(r) for r in rows]
    return batch[order].to(model_device(model))
