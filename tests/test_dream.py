"""Classic DeepDream on a photo (atlas.optvis.dream, `atlas dream`): the photo's layout stays, the layer's
activations grow."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from atlas.optvis import forward
from atlas.optvis.dream import dream
from tests.synthetic import tiny_classifier


def _photo() -> torch.Tensor:
    """A 48 x 64 photo-like image: a bright disc on a dark left half and a light right half."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 64), indexing="ij")
    base = torch.where(x < 0, 0.2, 0.7) + 0.25 * ((x - 0.4) ** 2 + y**2 < 0.15).float()
    return torch.stack([base, base * 0.9, base * 0.8]).clamp(0, 1)


def test_a_dream_raises_the_layers_activation_and_keeps_the_photos_layout():
    model, photo = tiny_classifier(), _photo()
    dreamt = dream(model, photo, "relu2", octaves=3, steps=8)
    assert dreamt.shape == photo.shape and float(dreamt.min()) >= 0 and float(dreamt.max()) <= 1

    def energy(image: torch.Tensor) -> float:
        with torch.no_grad():
            return float(forward(model, image[None], ["relu2"])["relu2"].pow(2).mean())

    assert energy(dreamt) > 1.2 * energy(photo)  # the layer's patterns were added
    change = (dreamt - photo).abs().mean()
    assert 0.01 < float(change) < 0.2  # changed, not replaced
    correlation = np.corrcoef(dreamt.flatten().numpy(), photo.flatten().numpy())[0, 1]
    assert correlation > 0.8  # the photo's layout (the halves, the disc) stays
    np.testing.assert_array_equal(dreamt.numpy(), dream(model, photo, "relu2", octaves=3, steps=8).numpy())


def test_atlas_dream_writes_the_dreamt_photo_and_refuses_an_unreadable_one(tmp_path, capsys):
    from pipelines.cli import main

    photo = tmp_path / "photo.png"
    Image.fromarray((_photo().permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(photo)
    out = tmp_path / "dream.png"
    argv = ["dream", str(photo), "--layer", "relu2", "--out", str(out), "--model", "tests.synthetic:tiny_classifier"]
    assert main([*argv, "--octaves", "2", "--steps", "3", "--device", "cpu"]) == 0
    assert Image.open(out).size == (64, 48)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    argv[1] = str(tmp_path / "broken.jpg")
    assert main([*argv, "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().startswith("atlas dream: error: cannot read")
