"""Synthetic stores with the collect stage's schema, for tests and benchmarks of later stages."""

from __future__ import annotations

import struct
import zlib
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from atlas.classes import imagenet_classes
from atlas.models.classifier import Classifier
from atlas.store import STR


def tiny_classifier(classes: list[str] | None = None, name: str = "tiny") -> Classifier:
    """Three seeded random stride-2 convolutions: 'relu3' has 16 channels at 1/8 of the 32-px input.

    Without arguments it is a `package.module:factory` model (`tests.synthetic:tiny_classifier`), so worker
    processes can load it by name.
    """
    classes = classes or list("abcdefghij")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = OrderedDict()
        for i, (c_in, c_out) in enumerate([(3, 16), (16, 32), (32, 16)], start=1):
            layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            layers[f"relu{i}"] = nn.ReLU()
        layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(16, len(classes)))
    return Classifier(name, nn.Sequential(layers), nn.Identity(), 32, classes, "relu3", "random")


def tiny_imagenet_classifier() -> Classifier:
    """`tiny_classifier` with the 1000 ImageNet logits, loadable as `tests.synthetic:tiny_imagenet_classifier`."""
    return tiny_classifier(imagenet_classes())


def write_synthetic_store(
    path: str | Path,
    n: int = 2000,
    channels: int = 16,
    classes: int = 10,
    layer: str = "mixed4c",
    clusters: int = 5,
    seed: int = 0,
) -> Path:
    """A store of `n` samples drawn from `clusters` non-negative Gaussian blobs (post-ReLU-like).

    Each blob's attributions favour one class, so class filters and cell labels have a right answer.
    """
    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 1.0, size=(clusters, channels)).astype(np.float32)
    which = rng.integers(0, clusters, size=n)
    activations = np.maximum(centres[which] + rng.normal(0, 0.3, size=(n, channels)), 0).astype(np.float32)
    attributions = rng.normal(0, 0.1, size=(n, classes)).astype(np.float32)
    attributions[np.arange(n), which % classes] += 1.0
    with h5py.File(path, "w") as f:
        f.attrs.update(
            model="synthetic",
            weights="none",
            input_size=224,
            seed=seed,
            dataset="synthetic",
            code_version="test",
            positions=1,
        )
        images = f.create_group("images")
        images.create_dataset("path", data=np.array([f"img{i:06d}.jpg" for i in range(n)], dtype=object), dtype=STR)
        images.create_dataset("label", data=(which % classes).astype(np.int64))
        images.create_dataset("skipped", shape=(0,), dtype=STR)
        g = f.create_group(layer)
        g.attrs.update(channels=channels, height=14, width=14)
        g.create_dataset("activations", data=activations, chunks=(min(n, 4096), channels))
        g.create_dataset("image_index", data=np.arange(n, dtype=np.int64))
        g.create_dataset("position", data=rng.integers(1, 13, size=(n, 2)).astype(np.int32))
        g.create_dataset("attributions", data=attributions, chunks=(min(n, 4096), classes))
    return Path(path)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of width x height, all black, streamed so no full-size buffer is ever made."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path
