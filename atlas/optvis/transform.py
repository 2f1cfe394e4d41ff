"""Random, differentiable, batched image transforms for feature visualisation (after lucid's optvis.transform).

A transform is a callable `(images [B, C, H, W], rand: ImageRandom) -> images`. Every image in a batch
draws its own random values from `rand`, whose numbers depend only on that image's key, so an icon
comes out the same whatever batch it is rendered in (batch size may follow free GPU memory, and a
resumed render repeats an interrupted one).

Differences from lucid, kept on purpose:
- random draws are per image, not one per batch;
- `random_scale` rescales about the centre inside the same canvas (zero fill when shrinking, cropping
  when growing), so images with different factors still stack into one batch. Lucid resizes the whole
  tensor; in the atlas stack `crop_or_pad_to` then zero-pads it back, which this reproduces.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

from atlas import AtlasError

_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B  # a well-mixing odd constant below 2**31, so products of 32-bit values fit in int64
_Bits = TypeVar("_Bits", torch.Tensor, int)  # _mix32 hashes a tensor to a tensor, an int to an int


def _mix32(x: _Bits) -> _Bits:
    """A 32-bit integer hash (xor-shift-multiply); works on Python ints and int64 tensors alike."""
    x = x & _MASK32
    for _ in range(2):
        x = ((x ^ (x >> 16)) * _HASH_MULTIPLIER) & _MASK32
    return x ^ (x >> 16)


def image_key(seed: int, index: int, attempt: int = 0) -> int:
    """The random key of one image: a hash of (seed, image index, attempt)."""
    return int(_mix32(_mix32(_mix32(seed) ^ index) ^ attempt))


class ImageRandom:
    """Counter-based random numbers per image: draw k gives image b `hash(key_b, k, element)`.

    Scalar draws (one number per image, what transforms take every step) come from a pool made
    `POOL` draws at a time, so a step costs one slice per draw rather than a hash.
    """

    POOL = 1024

    def __init__(self, keys: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"):
        self.keys = torch.as_tensor(keys, dtype=torch.int64).to(device) & _MASK32
        self.draws = 0
        self.pool = self.keys.new_empty(0)
        self.pooled = 0

    @property
    def batch(self) -> int:
        return len(self.keys)

    def _uniform(self, count: int) -> torch.Tensor:
        """[B, count] float32 in [0, 1): the next draw."""
        self.draws += 1
        element = torch.arange(count, dtype=torch.int64, device=self.keys.device)
        bits = _mix32(self.keys[:, None] ^ _mix32(element ^ _mix32(self.draws)))
        return (bits >> 8).float() / 2**24  # 24 bits: exact in float32, never 1.0

    def uniform(self, *shape: int) -> torch.Tensor:
        """[B, *shape] float32 in [0, 1)."""
        if shape:
            return self._uniform(math.prod(shape)).view(self.batch, *shape)
        if self.pooled == self.pool.shape[-1]:
            self.pool, self.pooled = self._uniform(self.POOL), 0
        self.pooled += 1
        return self.pool[:, self.pooled - 1]

    def normal(self, *shape: int) -> torch.Tensor:
        """[B, *shape] standard normal (Box-Muller)."""
        radius = torch.sqrt(-2.0 * torch.log1p(-self.uniform(*shape)))  # log1p(-u): u < 1, so finite
        return radius * torch.cos(2 * math.pi * self.uniform(*shape))

    def choice(self, values: Sequence[float]) -> torch.Tensor:
        """[B] float32: one of `values` per image, uniformly (repeats in `values` weight the draw)."""
        table = _table(tuple(values), self.keys.device)
        return table[(self.uniform() * len(table)).long()]

    def integers(self, high: int) -> torch.Tensor:
        """[B] int64 in [0, high)."""
        return (self.uniform() * high).long()


@functools.cache
def _table(values: tuple, device: torch.device) -> torch.Tensor:
    """A constant tensor, copied to each device once rather than at every step."""
    return torch.tensor(values, dtype=torch.float32, device=device)


Transform = Callable[[torch.Tensor, ImageRandom], torch.Tensor]


def pad(width: int, mode: str = "constant", value: float = 0.5) -> Transform:
    """Pad every side by `width` px with a constant (lucid's default fill 0.5) or by reflection."""

    def apply(images: torch.Tensor, _rand: ImageRandom) -> torch.Tensor:
        if mode == "constant":
            return F.pad(images, [width] * 4, mode="constant", value=value)
        return F.pad(images, [width] * 4, mode=mode)

    return apply


def jitter(d: int) -> Transform:
    """Lucid's jitter: a random crop that shrinks each side by `d` px (offsets 0..d, per image)."""

    def apply(images: torch.Tensor, rand: ImageRandom) -> torch.Tensor:
        b, c, h, w = images.shape
        rows = rand.integers(d + 1)[:, None] + torch.arange(h - d, device=images.device)
        cols = rand.integers(d + 1)[:, None] + torch.arange(w - d, device=images.device)
        images = images.gather(2, rows[:, None, :, None].expand(b, c, h - d, w))
        return images.gather(3, cols[:, None, None, :].expand(b, c, h - d, w - d))

    return apply


def _affine(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample each image through its own 2x2 pixel-space matrix about the centre (output -> input), zero fill."""
    b, _, h, w = images.shape
    # in affine_grid's normalised coordinates (x by w/2, y by h/2) entry (i, j) scales by size_j / size_i
    aspect = _table(((1.0, h / w), (w / h, 1.0)), images.device)
    theta = torch.cat([matrices * aspect, matrices.new_zeros(b, 2, 1)], 2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def random_scale(scales: Sequence[float]) -> Transform:
    """Rescale each image by a factor drawn from `scales`, about the centre, in the same canvas."""

    def apply(images: torch.Tensor, rand: ImageRandom) -> torch.Tensor:
        inverse = 1.0 / rand.choice(scales)
        eye = torch.eye(2, device=images.device)
        return _affine(images, inverse[:, None, None] * eye)

    return apply


def random_rotate(angles: Sequence[float]) -> Transform:
    """Rotate each image about its centre by an angle (degrees) drawn from `angles`; corners fill with 0."""

    def apply(images: torch.Tensor, rand: ImageRandom) -> torch.Tensor:
        radians = torch.deg2rad(rand.choice(angles))
        cos, sin = torch.cos(radians), torch.sin(radians)
        # output -> input is the inverse rotation
        matrices = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
        return _affine(images, matrices)

    return apply


def random_crop(smallest: float) -> Transform:
    """A random square crop per image, its side a fraction in [smallest, 1] of the image's, resized back to full size.

    The robustness MACO gets from crops of a larger canvas: each part of the image must work at several scales.
    """

    def apply(images: torch.Tensor, rand: ImageRandom) -> torch.Tensor:
        b = images.shape[0]
        fraction = smallest + (1 - smallest) * rand.uniform()
        # in affine_grid's coordinates the crop's centre may move by (1 - fraction) either way
        shift = (1 - fraction)[:, None] * (2 * torch.stack([rand.uniform(), rand.uniform()], 1) - 1)
        theta = torch.zeros(b, 2, 3, device=images.device)
        theta[:, 0, 0] = theta[:, 1, 1] = fraction
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", align_corners=False)

    return apply


def crop_or_pad_to(size: int) -> Transform:
    """Centre-crop or zero-pad to `size` x `size` (lucid's crop_or_pad_to)."""

    def apply(images: torch.Tensor, _rand: ImageRandom) -> torch.Tensor:
        h, w = images.shape[-2:]
        extra_h, extra_w = size - h, size - w
        # F.pad amounts (left, right, top, bottom); negative ones crop
        return F.pad(images, [extra_w // 2, extra_w - extra_w // 2, extra_h // 2, extra_h - extra_h // 2])

    return apply


def collapse_alpha(images: torch.Tensor, rand: ImageRandom) -> torch.Tensor:
    """RGBA -> RGB over per-image random noise, so that the optimiser cannot rely on any background."""
    rgb, alpha = images[:, :3], images[:, 3:]
    background = rand.uniform(3, *images.shape[-2:]).to(images.dtype)
    return rgb * alpha + background * (1 - alpha)


def compose(transforms: Sequence[Transform]) -> Transform:
    def apply(images: torch.Tensor, rand: ImageRandom) -> torch.Tensor:
        for transform in transforms:
            images = transform(images, rand)
        return images

    return apply


def atlas_transforms(size: int) -> list[Transform]:
    """Shan Carter's stack from lucid's activation-atlas recipe (reference 1.5), ending at `size` px."""
    return [
        pad(16, mode="constant", value=0.5),
        jitter(4),
        jitter(4),
        jitter(8),
        jitter(8),
        jitter(8),
        random_scale([0.998**n for n in range(20, 40)]),  # 0.961 ... 0.925
        random_rotate(list(range(-20, 20)) + list(range(-10, 10)) + list(range(-5, 5)) + 5 * [0]),
        jitter(2),
        crop_or_pad_to(size),
    ]


def standard_transforms() -> list[Transform]:
    """Lucid's `standard_transforms` (reference 2.3); the network sees 12 px more than the image, as in lucid."""
    return [
        pad(12, mode="constant", value=0.5),
        jitter(8),
        random_scale([1 + (i - 5) / 50 for i in range(11)]),  # 0.90 ... 1.10
        random_rotate(list(range(-10, 11)) + 5 * [0]),
        jitter(4),
    ]


def crop_transforms() -> list[Transform]:
    """Lucid's standard stack after a random crop of 50-100 % of the side (measured: benchmarks/bench_quality.py)."""
    return [random_crop(0.5), *standard_transforms()]


PRESETS: dict[str, Callable[[int], list[Transform]]] = {
    "atlas": atlas_transforms,
    "crops": lambda size: crop_transforms(),
    "standard": lambda size: standard_transforms(),
    "none": lambda size: [],
}


def preset(name: str | Sequence[Transform], size: int) -> list[Transform]:
    """A named stack (atlas, standard, none) for images of `size` px, or a given list of transforms as is."""
    if not isinstance(name, str):
        return list(name)
    if name not in PRESETS:
        raise AtlasError(f"unknown transforms {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name](size)
