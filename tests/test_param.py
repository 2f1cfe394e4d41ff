"""The phase-only parameterisation (MACO) and the parameterisation registry, on CPU with tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from atlas import AtlasError
from atlas.microscope.lenses import LensSettings
from atlas.optvis import evaluate, objectives, optimize_images, visualize
from atlas.optvis.param import (
    PARAMS,
    SPECTRUM_SIZE,
    image,
    magnitude_spectrum,
    resample_spectrum,
    shipped_spectrum,
)
from atlas.optvis.transform import ImageRandom, image_key, random_crop
from atlas.stages.render import RenderSettings, render_icons
from pipelines.class_atlas import class_settings
from tests.test_optvis import colour_detector, stripe_detector

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = [image_key(0, i) for i in range(3)]


def interior(spectrum: torch.Tensor) -> torch.Tensor:
    """rfft columns 1 .. W/2-1 and every row but 0: the frequencies whose phase is free (the others are real-valued)."""
    return spectrum[..., 1:, 1:-1]


def test_phase_param_keeps_the_given_magnitude_whatever_the_phase():
    magnitude = torch.rand(3, 32, 17) + 0.1
    param = image(32, KEYS, param="phase", decorrelate=False, magnitude=magnitude)
    for phase in (param.tensor.detach().clone(), torch.randn_like(param.tensor) * 10):
        with torch.no_grad():
            param.tensor.copy_(phase)
            spectrum = torch.fft.rfft2(param.spatial(), norm="ortho").abs()
        ratio = interior(spectrum) / interior(magnitude)
        # standardising scales each image by one factor: the spectrum's shape is the given one
        assert torch.allclose(ratio, ratio.mean((1, 2, 3), keepdim=True).expand_as(ratio), rtol=1e-3)


def test_phase_images_stay_in_range_and_keep_their_contrast():
    param = image(48, KEYS, param="phase")
    with torch.no_grad():
        start = param()
        param.tensor.mul_(0.0)  # a degenerate phase that would flatten an unstandardised image
        flat = param()
    for images in (start, flat):
        assert images.min() >= 0 and images.max() <= 1
        assert (images.std((1, 2, 3)) > 0.05).all()  # sigmoid(standardised): contrast cannot collapse


def test_phase_param_repeats_per_key_and_any_size_with_alpha():
    a, b = image(40, KEYS, param="phase")(), image(40, KEYS[1:], param="phase")()
    assert torch.equal(a[1:], b) and not torch.equal(a[0], a[1])
    assert image(37, [1, 2], param="phase", alpha=True)().shape == (2, 4, 37, 37)


def test_resample_spectrum_follows_frequency_not_index():
    fy = torch.fft.fftfreq(64)[:, None]
    fx = torch.fft.rfftfreq(64)[None, :]
    radial = (1 / (fx**2 + fy**2).sqrt().clamp(min=1 / 64))[None]
    small = resample_spectrum(radial, 32, 32)
    fy, fx = torch.fft.fftfreq(32)[:, None], torch.fft.rfftfreq(32)[None, :]
    expected = 1 / (fx**2 + fy**2).sqrt().clamp(min=1 / 64)
    assert torch.allclose(small[0, 1:, 1:], expected[1:, 1:], rtol=0.2)  # the negative frequencies stay high too


def test_magnitude_spectrum_of_images_and_the_shipped_one():
    stripes = torch.zeros(2, 3, 64, 64)
    stripes[..., ::8, :] = 1.0  # a line every 8 px: energy at vertical frequency 1/8 (and its harmonics)
    spectrum = magnitude_spectrum(stripes, size=64)
    assert spectrum.shape == (3, 64, 33)
    assert spectrum[0, 8, 0] > 50 * max(spectrum[0, 4, 0], spectrum[0, 0, 8])  # at the stripes' frequency only
    shipped = shipped_spectrum()
    assert shipped.shape == (3, SPECTRUM_SIZE, SPECTRUM_SIZE // 2 + 1) and (shipped >= 0).all()
    assert shipped[0, 1, 1] > 10 * shipped[0, 32, 32]  # natural photos: far more energy at low frequencies
    with pytest.raises(AtlasError, match="no images"):
        magnitude_spectrum([])


def test_each_param_names_its_optimizer_and_unknown_names_are_refused():
    param = image(16, KEYS, param="phase")
    optimizer = param.optimizer()
    assert isinstance(optimizer, PARAMS["phase"].optimizer) and optimizer.defaults["lr"] == PARAMS["phase"].lr
    assert param.optimizer(0.01).defaults["lr"] == 0.01
    with pytest.raises(AtlasError, match="unknown image parameterisation"):
        image(16, KEYS, param="wavelet")


@pytest.mark.parametrize("vertical", [True, False])
def test_phase_param_draws_the_stripes_its_filter_detects(vertical):
    # the magnitude is fixed, so the stripes show in the arrangement (the phase): the icon excites its own
    # detector more than it did at the start, and far more than it excites the same stripes turned by 90 degrees
    model, turned = stripe_detector(vertical), stripe_detector(not vertical)
    objective = objectives.channel("relu", 0)
    _, start = visualize(model, objective, size=48, steps=0, param="phase", transforms="standard")
    icon, value = visualize(model, objective, size=48, steps=64, param="phase", transforms="standard")
    (other,) = evaluate(turned, [objective], torch.from_numpy(icon).permute(0, 3, 1, 2).float() / 255)
    assert value[0] > 1.3 * start[0] and value[0] > 2 * other[0].item()


def test_random_crop_zooms_each_image_by_its_own_amount():
    images = torch.arange(32.0)[None, None, None, :].expand(4, 1, 32, 32).contiguous()
    out = random_crop(0.5)(images, ImageRandom([1, 2, 3, 4]))
    assert out.shape == images.shape
    spans = out[:, 0, 16, -1] - out[:, 0, 16, 0]
    assert (spans <= 31 + 1e-4).all() and (spans >= 14).all() and len(set(spans.round().tolist())) > 1


def test_renderers_take_the_parameterisation_by_name(tmp_path):
    model = stripe_detector(True)
    directions = torch.ones(2, 1)
    icons = {
        kind: render_icons(
            model, "relu", directions, RenderSettings(size=32, steps=2, attempts=1, param=kind), progress=False
        )[0]
        for kind in PARAMS
    }
    assert all(icon.shape == (2, 32, 32, 3) for icon in icons.values())
    assert not np.array_equal(icons["phase"], icons["fft"]) and not np.array_equal(icons["fft"], icons["pixel"])
    with pytest.raises(AtlasError, match="unknown image parameterisation"):
        RenderSettings(param="wavelet")  # refused before any store is opened
    with pytest.raises(AtlasError, match="unknown image parameterisation"):
        LensSettings(param="wavelet")
    config = Path(__file__).resolve().parents[1] / "configs" / "efficientnet-lite0.yaml"
    settings = class_settings(config, "_blocks.10", False, {"render": {"param": "pixel"}})
    assert settings["render"].param == "pixel"


# feature accentuation -------------------------------------------------------------------------------------
def _photo(size: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(60, 190, (batch, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("param", ["fft", "pixel"])
def test_accentuation_starts_from_the_given_image_and_stays_within_its_distance(param):
    model = colour_detector((1.0, -1.0, -1.0))  # a red detector
    objective = objectives.channel("detector", 0)
    photo, radius = _photo(24), 0.2
    keys = [image_key(0, i) for i in range(2)]
    options = dict(size=24, transforms=[], param=param, start=photo, radius=radius)
    begun, (before,) = optimize_images(model, objective, keys, steps=0, **options)
    accented, (after,) = optimize_images(model, objective, keys, steps=48, **options)
    change = np.abs(accented.astype(int) - photo).max(axis=(1, 2, 3))
    assert np.abs(begun.astype(int) - photo).max() <= 1  # starts as the photo
    assert (change <= radius * 255 + 1).all() and (change >= radius * 255 / 2).all()  # moved, within the ball
    # towards the objective (redder), by no more than the ball allows: r, g and b each move at most `radius`
    assert (after - before > radius / 2).all() and (after - before <= 3 * radius + 0.02).all()


def test_accentuation_refuses_what_it_cannot_start_from():
    with pytest.raises(AtlasError, match="fft or pixel"):
        image(8, KEYS, param="phase", start=torch.zeros(3, 3, 8, 8))
    with pytest.raises(AtlasError, match=r"\[3, 3, 8, 8\]"):
        image(8, KEYS, start=torch.zeros(3, 3, 9, 9))
    with pytest.raises(AtlasError, match="accentuate"):
        RenderSettings(accentuate=0)
    model = colour_detector((1.0, 0.0, 0.0))
    with pytest.raises(AtlasError, match="start images"):
        render_icons(model, "detector", np.ones((2, 1)), RenderSettings(size=8, steps=1, accentuate=0.2))
