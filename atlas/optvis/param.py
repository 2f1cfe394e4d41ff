"""Image parameterisations (after lucid's optvis.param): what the optimiser changes to make an image.

`image(size, keys)` is lucid's default: a Fourier spectrum scaled by 1/frequency, decorrelated colour
and a sigmoid into [0, 1]. Calling the returned module gives the current images [B, 3 (+1 alpha), H, W].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from atlas.optvis.transform import ImageRandom

# Square root of ImageNet's colour correlation (lucid's `color_correlation_svd_sqrt`), scaled so that its
# largest column has unit norm: optimising in this basis decorrelates the colour channels.
COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_CORRELATION = COLOR_CORRELATION_SVD_SQRT / COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()
FFT_MAGIC = 4.0  # lucid divides the inverse FFT by 4 ("magic constant"); a larger value gives less saturated images


def spectrum_scale(height: int, width: int, decay_power: float = 1.0) -> torch.Tensor:
    """[H, W//2+1] 1/f^decay_power per rfft frequency (lowest frequency clamped to one cycle per image)."""
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    freqs = torch.sqrt(fx**2 + fy**2)
    return 1.0 / freqs.clamp(min=1.0 / max(height, width)) ** decay_power


class ImageParam(nn.Module):
    """A batch of images as trainable tensors: FFT spectrum or plain pixels, then colour and sigmoid."""

    def __init__(
        self,
        size: int,
        rand: ImageRandom,
        *,
        fft: bool = True,
        decorrelate: bool = True,
        alpha: bool = False,
        sd: float = 0.01,  # lucid's initial standard deviation
        decay_power: float = 1.0,
    ):
        super().__init__()
        self.size, self.fft, self.decorrelate, self.alpha = size, fft, decorrelate, alpha
        channels = 4 if alpha else 3
        device = rand.keys.device
        if fft:
            scale = spectrum_scale(size, size, decay_power)
            self.register_buffer("scale", scale.to(device)[..., None])  # broadcast over (real, imaginary)
            init = rand.normal(channels, *scale.shape, 2)
        else:
            init = rand.normal(channels, size, size)
        self.tensor = nn.Parameter(init * sd)
        self.register_buffer("color", COLOR_CORRELATION.to(device))

    def forward(self) -> torch.Tensor:
        t = self.tensor
        if self.fft:
            spectrum = torch.view_as_complex((t * self.scale).contiguous())
            t = torch.fft.irfftn(spectrum, s=(self.size, self.size), norm="ortho") / FFT_MAGIC
        rgb, alpha = t[:, :3], t[:, 3:]
        if self.decorrelate:
            rgb = torch.einsum("dc,bchw->bdhw", self.color, rgb)
        return torch.sigmoid(torch.cat([rgb, alpha], 1))


def image(
    size: int,
    keys: Sequence[int] | ImageRandom,
    *,
    fft: bool = True,
    decorrelate: bool = True,
    alpha: bool = False,
    sd: float = 0.01,
    device: torch.device | str = "cpu",
) -> ImageParam:
    """`len(keys)` images of `size` px, each initialised from its own random key (see transform.ImageRandom)."""
    rand = keys if isinstance(keys, ImageRandom) else ImageRandom(keys, device)
    return ImageParam(size, rand, fft=fft, decorrelate=decorrelate, alpha=alpha, sd=sd)
