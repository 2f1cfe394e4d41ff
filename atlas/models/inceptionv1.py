"""lucid's InceptionV1 (the TF "inception5h" graph of the paper, Microscope and lucent) in plain torch.

Module names are lucid's tensor names: `conv2d0`, `mixed4c` (the post-ReLU concat), `mixed4c_3x3`
(a branch after its ReLU), `mixed4c_pool`, `softmax2_pre_activation` (the 1008 logits). Parameter
names are those of lucent's state dict (`mixed4c_3x3_pre_relu_conv.weight`, ...), so lucent's
`inception5h.pth` loads with strict keys. Differences from torchvision's GoogLeNet: local response
norm instead of BatchNorm, TF 'SAME' padding, 1008 outputs, input range [-117, 138].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypedDict

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from atlas.classes import INCEPTIONV1_LOGITS

# (in, 1x1, 3x3 bottleneck, 3x3, 5x5 bottleneck, 5x5, pool reduce) channels of each mixed block
MIXED_CHANNELS = {
    "mixed3a": (192, 64, 96, 128, 16, 32, 32),
    "mixed3b": (256, 128, 128, 192, 32, 96, 64),
    "mixed4a": (480, 192, 96, 204, 16, 48, 64),
    "mixed4b": (508, 160, 112, 224, 24, 64, 64),
    "mixed4c": (512, 128, 128, 256, 24, 64, 64),
    "mixed4d": (512, 112, 144, 288, 32, 64, 64),
    "mixed4e": (528, 256, 160, 320, 32, 128, 128),
    "mixed5a": (832, 256, 160, 320, 48, 128, 128),
    "mixed5b": (832, 384, 192, 384, 48, 128, 128),
}
# the GoogLeNet paper's plan (Szegedy et al. 2014, table 1), which Caffe's GoogLeNet-Places365 follows: inception5h
# differs in mixed4a's 3x3 (208 there, so 512 into mixed4b) and mixed5a's 5x5 bottleneck (32 there)
PAPER_CHANNELS = MIXED_CHANNELS | {
    "mixed4a": (480, 192, 96, 208, 16, 48, 64),
    "mixed4b": (512, 160, 112, 224, 24, 64, 64),
    "mixed5a": (832, 256, 160, 320, 32, 128, 128),
}
STRIDE2_POOL_BEFORE = {"mixed4a": "maxpool4", "mixed5a": "maxpool10"}  # lucid's names for the grid reductions


class LRNArgs(TypedDict):
    """LocalResponseNorm's arguments, typed one by one (size is an int)."""

    size: int
    alpha: float
    beta: float
    k: float


# the graph's LRN: depth radius 4, bias 1, beta 0.5; alpha as in lucent's conversion (torch divides it by size)
LRN: LRNArgs = {"size": 9, "alpha": 9.99999974738e-05, "beta": 0.5, "k": 1.0}


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero-pad x [N, C, H, W] as TensorFlow's 'SAME' does: the extra pixel, if any, goes right and bottom."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def stride2_pool() -> nn.MaxPool2d:
    """3x3 / 2 max pool; ceil_mode equals TF 'SAME' (one -inf column right and bottom) on even inputs.

    An nn.MaxPool2d, not a padded functional pool, so collect's relaxed max-pool derivative applies.
    """
    return nn.MaxPool2d(3, 2, ceil_mode=True)


class LocalResponseNorm(nn.Module):
    """torch's LocalResponseNorm as a banded channel matmul: the same values, 2-3x faster forward and backward.

    torch sums the squares over a channel window with a 3-D average pool, which was a third of a render step
    of InceptionV1 on CPU (benchmarks/bench_render.py); a [C, C] band matrix does the same sum as one matmul,
    which stays in the memory format and precision of the run (channels_last, bf16 autocast).
    """

    def __init__(self, size: int, alpha: float, beta: float, k: float):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = torch.arange(x.shape[1], device=x.device)
        # band[c, d]: input channel c is in output d's window (torch's: size // 2 before, (size - 1) // 2 after)
        offset = channel[:, None] - channel[None, :]
        band = ((offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)).to(x.dtype)
        window_sum = torch.einsum("bchw,cd->bdhw", x * x, band)
        return x / (self.k + (self.alpha / self.size) * window_sum).pow(self.beta)


class Concat(nn.Module):
    """Channel concat of the branches: a module, so a mixed layer can be hooked like any other."""

    def forward(self, *branches: torch.Tensor) -> torch.Tensor:
        return torch.cat(branches, 1)


class InceptionV1(nn.Module):
    """The inception5h graph on input in [-117, 138] (255 x - 117 for x in [0, 1]); returns the 1008 logits."""

    def __init__(self, classes: int = INCEPTIONV1_LOGITS, channels: Mapping[str, tuple[int, ...]] = MIXED_CHANNELS):
        super().__init__()
        self.channels = channels
        # registered in forward order, so listings of the layers read top to bottom
        self._conv("conv2d0", 3, 64, 7, stride=2)  # TF 'SAME' padded in forward (asymmetric on even input)
        self.maxpool0 = stride2_pool()
        self.localresponsenorm0 = LocalResponseNorm(**LRN)
        self._conv("conv2d1", 64, 64, 1)
        self._conv("conv2d2", 64, 192, 3)
        self.localresponsenorm1 = LocalResponseNorm(**LRN)
        self.maxpool1 = stride2_pool()
        for name, (cin, c1, c3r, c3, c5r, c5, cpool) in channels.items():
            if name in STRIDE2_POOL_BEFORE:
                setattr(self, STRIDE2_POOL_BEFORE[name], stride2_pool())
            self._conv(f"{name}_1x1", cin, c1, 1)
            self._conv(f"{name}_3x3_bottleneck", cin, c3r, 1)
            self._conv(f"{name}_3x3", c3r, c3, 3)
            self._conv(f"{name}_5x5_bottleneck", cin, c5r, 1)
            self._conv(f"{name}_5x5", c5r, c5, 5)
            setattr(self, f"{name}_pool", nn.MaxPool2d(3, 1, padding=1))  # 'SAME' at stride 1 is symmetric
            self._conv(f"{name}_pool_reduce", cin, cpool, 1)
            setattr(self, name, Concat())
        self.avgpool0 = nn.AdaptiveAvgPool2d(1)  # lucid: 7x7 average at 224 px; global, so other sizes work too
        self.softmax2_pre_activation_matmul = nn.Linear(1024, classes)
        self.softmax2_pre_activation = nn.Identity()  # the logits under lucid's name

    def _conv(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        padding = kernel // 2 if stride == 1 else 0  # TF 'SAME' at stride 1 with an odd kernel
        setattr(self, f"{name}_pre_relu_conv", nn.Conv2d(cin, cout, kernel, stride, padding))
        setattr(self, name, nn.ReLU())

    def _conv_relu(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)(getattr(self, f"{name}_pre_relu_conv")(x))

    def _mixed(self, name: str, x: torch.Tensor) -> torch.Tensor:
        b1 = self._conv_relu(f"{name}_1x1", x)
        b3 = self._conv_relu(f"{name}_3x3", self._conv_relu(f"{name}_3x3_bottleneck", x))
        b5 = self._conv_relu(f"{name}_5x5", self._conv_relu(f"{name}_5x5_bottleneck", x))
        bpool = self._conv_relu(f"{name}_pool_reduce", getattr(self, f"{name}_pool")(x))
        return getattr(self, name)(b1, b3, b5, bpool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv_relu("conv2d0", tf_same_pad(x, 7, 2))
        x = self.localresponsenorm0(self.maxpool0(x))
        x = self._conv_relu("conv2d2", self._conv_relu("conv2d1", x))
        x = self.maxpool1(self.localresponsenorm1(x))
        for name in self.channels:
            if name in STRIDE2_POOL_BEFORE:
                x = getattr(self, STRIDE2_POOL_BEFORE[name])(x)
            x = self._mixed(name, x)
        logits = self.softmax2_pre_activation_matmul(self.avgpool0(x).flatten(1))
        return self.softmax2_pre_activation(logits)
