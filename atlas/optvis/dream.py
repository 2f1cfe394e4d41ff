"""Classic DeepDream (Mordvintsev, Olah and Tyka, 2015) on a given photo: the photo itself is changed, by normalised
gradient ascent on the mean squared activation of a layer (`objectives.deepdream`), at several scales (octaves), each
step at a random shift (jitter). Early layers paint strokes and textures over the photo; middle layers eyes and
faces. Unlike Microscope's DeepDream lens, which dreams from noise, the photo's layout stays.

The defaults are the 2015 notebook's: 4 octaves a factor 1.4 apart, 10 steps each of 1.5/255 of the normalised
gradient, jitter of 32 px.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from atlas import AtlasError
from atlas.models.classifier import Classifier
from atlas.optvis import forward, model_device, to_uint8
from atlas.optvis.objectives import Objective, deepdream

OCTAVES = 4
OCTAVE_SCALE = 1.4
STEPS = 10
STEP_SIZE = 1.5 / 255  # the notebook's 1.5 on 0-255 pixels
JITTER = 32


def dream(
    model: Classifier,
    photo: torch.Tensor,
    layer: str,
    octaves: int = OCTAVES,
    octave_scale: float = OCTAVE_SCALE,
    steps: int = STEPS,
    step_size: float = STEP_SIZE,
    jitter: int = JITTER,
    seed: int = 0,
) -> torch.Tensor:
    """`photo` [3, H, W] in [0, 1] dreamt at `layer`: the same size, in [0, 1].

    The smallest octave is dreamt first; each larger one starts from the photo at its scale plus the detail the
    smaller ones added, so the dream grows from coarse to fine as in the notebook.
    """
    if photo.dim() != 3 or photo.shape[0] != 3:
        raise AtlasError(f"a photo to dream on is [3, H, W], not {list(photo.shape)}")
    objective = deepdream(layer)
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    base = photo.to(device, torch.float32)[None]
    sizes = [base.shape[-2:]]
    for _ in range(octaves - 1):
        height, width = sizes[-1]
        smaller = (max(1, round(height / octave_scale)), max(1, round(width / octave_scale)))
        sizes.append(torch.Size(smaller))
    detail = torch.zeros_like(F.interpolate(base, size=sizes[-1], mode="bilinear", align_corners=False))
    for size in reversed(sizes):
        scaled = F.interpolate(base, size=size, mode="bilinear", align_corners=False)
        detail = F.interpolate(detail, size=size, mode="bilinear", align_corners=False)
        image = (scaled + detail).clamp(0, 1)
        for _ in range(steps):
            image = _step(model, objective, layer, image, step_size, jitter, generator)
        detail = image - scaled
    return image[0].clamp(0, 1)


def dream_picture(
    model: Classifier, picture: Image.Image, layer: str, side: int, **options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB picture, its longer side scaled to at most `side` px, and it dreamt at `layer` (`dream`'s keyword
    `options`): uint8 [H, W, 3] each."""
    picture = picture.copy()
    picture.thumbnail((side, side))
    photo = np.asarray(picture)
    pixels = torch.from_numpy(photo.astype(np.float32) / 255).permute(2, 0, 1)
    return photo, to_uint8(dream(model, pixels, layer, **options)[None])[0]


def _step(
    model: Classifier,
    objective: Objective,
    layer: str,
    image: torch.Tensor,
    step_size: float,
    jitter: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One normalised gradient step at a random shift (rolled back after), as the notebook's make_step."""
    dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator))
    shifted = image.roll((dy, dx), (-2, -1)).detach().requires_grad_(True)
    value = objective(forward(model, shifted, [layer])).sum()
    (grad,) = torch.autograd.grad(value, shifted)
    shifted = shifted.detach() + step_size * grad / grad.abs().mean().clamp_min(1e-12)
    return shifted.roll((-dy, -dx), (-2, -1)).clamp(0, 1)
