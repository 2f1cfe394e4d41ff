"""Regenerate the phase parameterisation's shipped magnitude spectrum (`param.SPECTRUM_FILE`) from the demo photos:
`python -m atlas.optvis.spectrum`. A maintenance tool, kept apart so that rendering never imports image loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from atlas import images
from atlas.optvis.param import SPECTRUM_FILE, magnitude_spectrum


def demo_spectrum() -> torch.Tensor:
    """The magnitude spectrum of the bundled demo photos (`atlas.images.list_images("demo")`), made by `main`."""
    records = images.list_images("demo")
    to_tensor = [
        torch.from_numpy(np.array(images.load_rgb(record.path))).permute(2, 0, 1).float() / 255 for record in records
    ]
    return magnitude_spectrum(to_tensor)


def write_demo_spectrum() -> Path:
    """Regenerate the shipped spectrum from the demo photos (float16, 50 kB); returns its path.

    `python -m atlas.optvis.spectrum`
    """
    np.save(SPECTRUM_FILE, demo_spectrum().numpy().astype(np.float16))
    return SPECTRUM_FILE


if __name__ == "__main__":
    print(write_demo_spectrum())
