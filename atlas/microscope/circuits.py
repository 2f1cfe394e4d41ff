"""How a unit is built from the layer below (the Circuits articles): its strongest inputs, and what zeroing them does.

- `expanded_weights`: the linear map from the lower layer's channels to the unit's pre-activation at the centre of
  its map, with every ReLU module between them taken as the identity and max pools as average pools (so through
  InceptionV1's 1x1 bottlenecks, as the articles' "expanded weights", which ignore the bottleneck ReLU). A k x k map
  per input channel; an input's strength is its map's sum.
  Only where that path is affine (checked: the map is the same at two points), so not through a Swish.
- `attribution_inputs`: for any model, activation x gradient of the unit (at its maximum in each of its top dataset
  examples, the crop Microscope shows) with respect to each lower channel, summed over positions and examples.
- `ablation`: how much the unit's activation there falls when one lower channel is zeroed.
- `circuit_report`: all three for one unit on its top examples, and how far each top input's own top examples are
  the unit's; `unit_circuit` finds those examples first (`atlas circuit`), `circuit_lens` reads them from the
  microscope's results file and keeps the reports there (`atlas run microscope --layers below,layer`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atlas import AtlasError
from atlas.images import ImageRecord, load_batches
from atlas.microscope.examples import TOP_K, top_activating
from atlas.microscope.results import latest_group, lens_group
from atlas.models.classifier import Classifier
from atlas.optvis import model_device
from atlas.progress import progress
from atlas.store import STR

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
    weights = grads[0]
    if not np.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6 * max(1e-12, float(np.abs(weights).max()))):
        raise AtlasError(f"no expanded weights: the path from {below} to {layer} is not linear apart from ReLUs")
    support = np.nonzero(np.abs(weights).sum(0))
    if len(support[0]) == 0:
        raise AtlasError(f"{layer}:{unit} does not depend on {below}")
    maps = weights[:, support[0].min() : support[0].max() + 1, support[1].min() : support[1].max() + 1]
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


def circuit_report(
    model: Classifier,
    layer: str,
    unit: int,
    below: str,
    images: torch.Tensor,
    positions: torch.Tensor,
    below_rows: np.ndarray,
    own_rows: Sequence[int],
    top: int = TOP,
) -> dict:
    """How `layer`:`unit` is built from `below`, measured on its top examples (`images` with the unit's peak
    `positions` [N, 2], dataset rows `own_rows`): the expanded weights (where the path is affine; else why not)
    with the top inputs' k x k maps, the attributions, the ablation of the inputs either lists first, and for each
    of those inputs the share of its own top examples (`below_rows` [C_below, k]) that are also the unit's."""
    report: dict = {"layer": layer, "unit": unit, "below": below}
    lenses = []
    try:
        lenses.append(expanded_weights(model, layer, unit, below, top))
    except AtlasError as err:
        report["no_weights"] = str(err)
    lenses.append(attribution_inputs(model, layer, unit, below, images, positions, top))
    report["lenses"] = [
        {
            "how": lens.how,
            "positive": lens.positive,
            "negative": lens.negative,
            "maps": {} if lens.maps is None else {c: lens.maps[c].tolist() for c, _ in lens.positive + lens.negative},
        }
        for lens in lenses
    ]
    inputs = list(dict.fromkeys(c for lens in lenses for c, _ in lens.positive))
    try:
        report["ablation"] = ablation(model, layer, unit, below, images, positions, inputs)
    except AtlasError as err:  # a unit silent on its own top examples: nothing to fall
        report["ablation"], report["no_ablation"] = {}, str(err)
    own = set(int(r) for r in own_rows)
    report["shared_examples"] = {c: len(own & set(below_rows[c].tolist())) / max(1, len(own)) for c in inputs}
    return report


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
    """`circuit_report` of `layer`:`unit` from `below` over `records`, whose top examples it finds first (one pass
    for both layers); the report also lists the unit's examples."""
    layer, below = _check(model, layer, unit, below)
    found = top_activating(model, [layer, below], records, top_k=top_k, workers=workers)
    rows, where = found[layer].row[unit], found[layer].position[unit]
    kept = rows >= 0  # padding where fewer images than top_k were read
    rows, where = rows[kept], where[kept]
    images = example_images(model, [records[r].path for r in rows], workers)
    positions = torch.from_numpy(where).long().to(images.device)
    report = circuit_report(model, layer, unit, below, images, positions, found[below].row, rows.tolist(), top)
    return {**report, "examples": [records[r].path for r in rows]}


def example_images(model: Classifier, paths: Sequence[str], workers: int | None = None) -> torch.Tensor:
    """Images as the model sees them (resize, centre crop), on its device; all readable: they are top examples."""
    sides = (model.resize_size, model.input_size)
    records = [ImageRecord(path) for path in paths]
    ((got, batch, _skipped),) = list(load_batches(records, *sides, [list(range(len(paths)))], workers, progress=False))
    assert batch is not None  # top examples were read before: all readable
    return batch[[got.index(i) for i in range(len(paths))]].to(model_device(model))


def lower_neighbours(model: Classifier, layers: Sequence[str]) -> dict[str, str | None]:
    """Each of `layers`, in forward order, -> the nearest of them below it (None for the lowest): the layer its
    circuit lens reads."""
    order = {name: index for index, (name, *_shape) in enumerate(model.layer_shapes())}
    ranked = sorted((model.resolve_layer(layer) for layer in layers), key=lambda layer: order[layer])
    return {layer: ranked[i - 1] if i else None for i, layer in enumerate(ranked)}


def circuit_lens(
    results: h5py.File,
    model: Classifier,
    layer: str,
    below: str,
    units: Sequence[int],
    top: int = TOP,
    workers: int | None = None,
) -> int:
    """The `circuit_report` of each of `units` of `layer` from `below`, on the dataset examples stored for both
    layers (atlas.microscope.examples), kept per unit as JSON unless it is; returns how many it computed."""
    found: dict[str, h5py.Group] = {}
    for name in (layer, below):
        examples = latest_group(results, model.name, name, "examples")
        if examples is None or "value" not in examples:
            raise AtlasError(f"the circuit lens of {layer} needs the dataset examples of {layer} and {below}")
        found[name] = examples
    keys = {name: group.name.rsplit("/", 1)[-1] for name, group in found.items()}
    settings = {"model": model.name, "weights": model.weights, "layer": layer, "below": below, "top": top}
    group = lens_group(results, model.name, layer, "circuit", {**settings, "examples": keys})
    rows, positions = found[layer]["row"][()], found[layer]["position"][()]
    if "done" not in group:
        group.create_dataset("report", shape=(len(rows),), dtype=STR)
        group.create_dataset("done", data=np.zeros(len(rows), bool))
    todo = [unit for unit in units if not group["done"][unit]]
    paths, below_rows = found[layer]["paths"].asstr()[()], found[below]["row"][()]
    for unit in progress(todo, desc=f"circuits {layer}", unit="unit", disable=not todo):
        kept = rows[unit] >= 0
        images = example_images(model, paths[rows[unit][kept]].tolist(), workers)
        peaks = torch.from_numpy(positions[unit][kept]).long().to(images.device)
        report = circuit_report(model, layer, unit, below, images, peaks, below_rows, rows[unit][kept].tolist(), top)
        group["report"][unit] = json.dumps(report)
        group["done"][unit] = True  # after its report: a killed run redoes only this unit
        results.flush()
    return len(todo)


def stored_circuits(results: h5py.File, model: str, layer: str) -> dict[int, dict]:
    """Unit -> its circuit report, of the latest circuit lens of `layer` in the results file."""
    group = latest_group(results, model, layer, "circuit")
    if group is None or "done" not in group:
        return {}
    reports = group["report"].asstr()
    return {int(unit): json.loads(reports[unit]) for unit in np.flatnonzero(group["done"][()])}


def circuit_inputs(report: dict) -> list[int]:
    """The lower units a circuit report lists, either way, in either lens."""
    listed = (c for lens in report["lenses"] for sign in ("positive", "negative") for c, _ in lens[sign])
    return list(dict.fromkeys(int(c) for c in listed))
