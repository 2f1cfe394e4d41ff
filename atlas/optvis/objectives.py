"""Objectives for feature visualisation (after lucid's optvis.objectives): values to MAXIMISE.

An `Objective` maps the recorded activations `{layer: [B, C, H, W]}` (plus `LOGITS`: [B, K] when an
objective asks for them) to one value per image, shape [B], so that every image of a batch can chase
its own target and attempts can be compared per image. Objectives combine with `+`, `-`, `*` (by a
number or another objective) and `/` by a number:

    objective = channel("mixed4c", 447) - 0.5 * deepdream("mixed3a")

Arguments named `n`, `vec` or `label` take one value for the whole batch or one per image
(a sequence of length B, or a [B, C] matrix of directions).
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

LOGITS = "logits"  # the key of the model's output in the activations dict
COSSIM_FLOOR = 0.1  # colah's floor on the cosine (lucid#116): never multiply the dot product by <= 0
EPS = 1e-4  # lucid's epsilon on norms

Activations = dict[str, torch.Tensor]


class Objective:
    """A per-image objective: `objective(acts)` -> [B]. `layers` are the activations it reads."""

    def __init__(self, fn: Callable[[Activations], torch.Tensor], layers: Sequence[str], name: str):
        self.fn = fn
        self.layers = tuple(dict.fromkeys(layers))
        self.name = name

    def __call__(self, acts: Activations) -> torch.Tensor:
        return self.fn(acts)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    def _combine(self, other: Objective | float, op: Callable, symbol: str, swap: bool = False) -> Objective:
        if isinstance(other, Objective):
            left, right = (other, self) if swap else (self, other)
            return Objective(
                lambda acts: op(left(acts), right(acts)),
                left.layers + right.layers,
                f"({left.name} {symbol} {right.name})",
            )
        if not isinstance(other, numbers.Real):
            return NotImplemented
        if swap:
            return Objective(lambda acts: op(other, self(acts)), self.layers, f"({other:g} {symbol} {self.name})")
        return Objective(lambda acts: op(self(acts), other), self.layers, f"({self.name} {symbol} {other:g})")

    def __add__(self, other: Objective | float) -> Objective:
        return self._combine(other, operator.add, "+")

    def __radd__(self, other: Objective | float) -> Objective:  # also makes sum([...]) work
        return self._combine(other, operator.add, "+", swap=True)

    def __sub__(self, other: Objective | float) -> Objective:
        return self._combine(other, operator.sub, "-")

    def __rsub__(self, other: Objective | float) -> Objective:
        return self._combine(other, operator.sub, "-", swap=True)

    def __mul__(self, other: Objective | float) -> Objective:
        return self._combine(other, operator.mul, "*")

    def __rmul__(self, other: Objective | float) -> Objective:
        return self._combine(other, operator.mul, "*", swap=True)

    def __truediv__(self, other: float) -> Objective:
        if isinstance(other, Objective):
            return NotImplemented
        return self._combine(other, operator.truediv, "/")

    def __neg__(self) -> Objective:
        return -1 * self


# helpers ----------------------------------------------------------------------------------------------
def _acts(acts: Activations, layer: str) -> torch.Tensor:
    return acts[layer].float()  # objectives run in float32 even when the network ran in bfloat16


def _on_device(make: Callable[[torch.device], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A constant made once per device (not copied at every step): `lookup(like)` gives it on like's device."""
    made: dict[torch.device, torch.Tensor] = {}

    def lookup(like: torch.Tensor) -> torch.Tensor:
        if like.device not in made:
            made[like.device] = make(like.device)
        return made[like.device]

    return lookup


def _indices(value: int | Sequence[int] | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Channel or class indices: one for the whole batch (a 0-d tensor) or one per image ([B])."""
    return _on_device(lambda device: torch.as_tensor(value, dtype=torch.int64).to(device))


def _unit_directions(vec: Sequence[float] | torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """[1 or B, C] float32 unit vectors, so objective values are in activation units along the direction."""

    def make(device: torch.device) -> torch.Tensor:
        unit = torch.as_tensor(vec, dtype=torch.float32).to(device)
        unit = unit[None] if unit.dim() == 1 else unit
        return unit / unit.norm(dim=1, keepdim=True).clamp(min=EPS)

    return _on_device(make)


def _pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[b, index_b] for every image b (index: one value, or one per image)."""
    return t[torch.arange(t.shape[0], device=t.device), index.expand(t.shape[0])]


def _position(h: torch.Tensor, x: int | None, y: int | None) -> torch.Tensor:
    """[B, C] activations at (y, x); the centre position H//2, W//2 by default (lucid's convention)."""
    height, width = h.shape[-2:]
    return h[:, :, height // 2 if y is None else y, width // 2 if x is None else x]


def _dot_cossim(h: torch.Tensor, unit: torch.Tensor, cossim_pow: float) -> torch.Tensor:
    """dot(h, v) * max(0.1, cos(h, v))^pow over dim 1, for unit v: the true cosine, not lucid's atlas variant."""
    dot = (h * unit).sum(1)
    if cossim_pow == 0:
        return dot
    cos = dot / h.norm(dim=1).clamp(min=EPS)
    return dot * cos.clamp(min=COSSIM_FLOOR) ** cossim_pow


# objectives ---------------------------------------------------------------------------------------------
def channel(layer: str, n: int | Sequence[int]) -> Objective:
    """Mean activation of channel `n` over all positions."""

    index = _indices(n)

    def fn(acts: Activations) -> torch.Tensor:
        h = _acts(acts, layer)
        return _pick(h, index(h)).mean((1, 2))

    return Objective(fn, [layer], f"channel({layer}, {n})")


def neuron(layer: str, n: int | Sequence[int], x: int | None = None, y: int | None = None) -> Objective:
    """Activation of channel `n` at one position (the centre by default)."""

    index = _indices(n)

    def fn(acts: Activations) -> torch.Tensor:
        h = _position(_acts(acts, layer), x, y)
        return _pick(h, index(h))

    return Objective(fn, [layer], f"neuron({layer}, {n})")


def direction(layer: str, vec: Sequence[float] | torch.Tensor, cossim_pow: float = 0) -> Objective:
    """dot * max(0.1, cos)^cossim_pow with a direction, averaged over all positions."""

    unit = _unit_directions(vec)

    def fn(acts: Activations) -> torch.Tensor:
        h = _acts(acts, layer)
        return _dot_cossim(h, unit(h)[:, :, None, None], cossim_pow).mean((1, 2))

    return Objective(fn, [layer], f"direction({layer})")


def direction_neuron(
    layer: str, vec: Sequence[float] | torch.Tensor, x: int | None = None, y: int | None = None, cossim_pow: float = 0
) -> Objective:
    """dot * max(0.1, cos)^cossim_pow with a direction at one position (the centre by default)."""

    unit = _unit_directions(vec)

    def fn(acts: Activations) -> torch.Tensor:
        h = _position(_acts(acts, layer), x, y)
        return _dot_cossim(h, unit(h), cossim_pow)

    return Objective(fn, [layer], f"direction_neuron({layer})")


def whiten(vec: Sequence[float] | torch.Tensor, whitening: torch.Tensor | None) -> torch.Tensor:
    """S v for each row v (S symmetric), the target the atlas objective chases; v itself without S."""
    vec = torch.as_tensor(vec, dtype=torch.float32)
    if whitening is None:
        return vec
    return vec @ torch.as_tensor(whitening, dtype=torch.float32, device=vec.device)


def atlas_direction(
    layer: str,
    vec: Sequence[float] | torch.Tensor,
    cossim_pow: float = 4,  # lucid's atlas notebooks (reference 1.5)
    whitening: torch.Tensor | None = None,
) -> Objective:
    """The activation-atlas icon objective: dot(h, Sv) * max(0.1, cos(h, Sv))^n at the centre neuron.

    The paper's form with a true cosine (lucid's recipe divides by C and skips |Sv|). S is the grid
    stage's whitening matrix; v is normalised, so values are activation units along Sv.
    """
    objective = direction_neuron(layer, whiten(vec, whitening), cossim_pow=cossim_pow)
    objective.name = f"atlas_direction({layer}, pow={cossim_pow:g}, whitened={whitening is not None})"
    return objective


def direction_cosine(
    layer: str, vec: Sequence[float] | torch.Tensor, x: int | None = None, y: int | None = None
) -> Objective:
    """cos(h, v) at one position (the centre by default): the quality number of an atlas icon."""

    unit = _unit_directions(vec)

    def fn(acts: Activations) -> torch.Tensor:
        h = _position(_acts(acts, layer), x, y)
        return (h * unit(h)).sum(1) / h.norm(dim=1).clamp(min=EPS)

    return Objective(fn, [layer], f"direction_cosine({layer})")


def deepdream(layer: str) -> Objective:
    """Mean squared activation of a whole layer (DeepDream, Microscope's op-level lens)."""
    return Objective(lambda acts: _acts(acts, layer).pow(2).mean((1, 2, 3)), [layer], f"deepdream({layer})")


def caricature(layer: str, reference: torch.Tensor, cossim_pow: float = 1) -> Objective:
    """Match the activations `reference` ([C, H, W] or [B, C, H, W]) of a real image (lucid's caricature).

    dot * max(0.1, cos)^cossim_pow over the whole flattened map; when the maps differ in size (the
    transforms changed the image size) both are centre-cropped to the common size.
    """

    reference_on = _on_device(lambda device: torch.as_tensor(reference, dtype=torch.float32).to(device))

    def fn(acts: Activations) -> torch.Tensor:
        h = _acts(acts, layer)
        ref = reference_on(h)
        ref = ref[None] if ref.dim() == 3 else ref
        height, width = min(h.shape[-2], ref.shape[-2]), min(h.shape[-1], ref.shape[-1])
        h, ref = _centre_crop(h, height, width).flatten(1), _centre_crop(ref, height, width).flatten(1)
        return _dot_cossim(h, ref / ref.norm(dim=1, keepdim=True).clamp(min=EPS), cossim_pow)

    return Objective(fn, [layer], f"caricature({layer})")


def _centre_crop(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top, left = (t.shape[-2] - height) // 2, (t.shape[-1] - width) // 2
    return t[..., top : top + height, left : left + width]


def diversity(layer: str, group: int | None = None) -> Objective:
    """Minus each image's mean cosine similarity of Gram matrices with the other images of its group.

    Lucid's diversity, with the sign flipped so that it is maximised like every other objective
    (lucid returns +similarity and is used with a negative weight). group: the batch is consecutive groups of
    this many images, each made diverse on its own (several units' images in one batch); None: the whole batch.
    Zero for a group of one.
    """

    def fn(acts: Activations) -> torch.Tensor:
        h = _acts(acts, layer).flatten(2)  # [B, C, HW]
        size = group or h.shape[0]
        grams = F.normalize(torch.bmm(h, h.transpose(1, 2)).flatten(1), dim=1).unflatten(0, (-1, size))
        similarity = grams @ grams.transpose(1, 2)  # [groups, size, size]
        others = similarity.sum(2) - similarity.diagonal(dim1=1, dim2=2)
        return (-others / max(1, size - 1)).flatten()

    return Objective(fn, [layer], f"diversity({layer})")


def class_logit(label: int | Sequence[int]) -> Objective:
    """The logit of class `label` (the model's own class order, e.g. torchvision's ImageNet order)."""

    index = _indices(label)

    def fn(acts: Activations) -> torch.Tensor:
        logits = acts[LOGITS].float()
        return _pick(logits, index(logits))

    return Objective(fn, [LOGITS], f"class_logit({label})")
