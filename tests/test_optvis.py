"""atlas.optvis: parameterisations, transforms, objectives and the optimisation loop, on CPU with tiny models."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from atlas import AtlasError
from atlas.models.classifier import Classifier
from atlas.optvis import forward, objectives, visualize
from atlas.optvis.objectives import LOGITS
from atlas.optvis.param import image
from atlas.optvis.transform import (
    ImageRandom,
    crop_or_pad_to,
    image_key,
    jitter,
    pad,
    preset,
    random_rotate,
    random_scale,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_classifier(detector: nn.Conv2d) -> Classifier:
    """detector -> relu -> global pool -> 2 logits, on [0, 1] input without normalisation."""
    net = nn.Sequential(
        OrderedDict(
            detector=detector,
            relu=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(detector.out_channels, 2),
        )
    )
    return Classifier("toy", net, nn.Identity(), 48, ["a", "b"], default_layer="relu", weights="hand-set")


def stripe_detector(vertical: bool, period: int = 8) -> Classifier:
    """One channel that responds to stripes of `period` px: columns (or rows) of +1 / -1, 16 px wide."""
    conv = nn.Conv2d(3, 1, 16, bias=False)
    profile = torch.tensor([1.0 if j % period < period // 2 else -1.0 for j in range(16)])
    with torch.no_grad():
        conv.weight.copy_((profile[None, :] if vertical else profile[:, None]).expand(1, 3, 16, 16))
    return toy_classifier(conv)


def colour_detector(rgb: tuple[float, float, float]) -> Classifier:
    conv = nn.Conv2d(3, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(rgb).view(1, 3, 1, 1))
    return toy_classifier(conv)


# param ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fft", "pixel"])
def test_image_param_shape_and_range(kind):
    param = image(24, [image_key(0, i) for i in range(3)], param=kind)
    images = param()
    assert images.shape == (3, 3, 24, 24)
    assert images.min() > 0 and images.max() < 1
    assert abs(images.mean().item() - 0.5) < 0.05  # sd 0.01 noise starts near grey
    assert not torch.equal(images[0], images[1])  # every image has its own start
    assert images.requires_grad


def test_image_param_alpha_adds_a_channel_and_odd_size_works():
    assert image(17, [1, 2], alpha=True)().shape == (2, 4, 17, 17)


def test_image_start_depends_only_on_its_key():
    alone = image(16, [image_key(0, 5)])()
    in_batch = image(16, [image_key(0, 4), image_key(0, 5)])()
    torch.testing.assert_close(alone[0], in_batch[1])


def test_fft_param_concentrates_energy_in_low_frequencies():
    gray = image(64, list(range(8)), decorrelate=False)().mean(1)
    spectrum = torch.fft.rfft2(gray - gray.mean((1, 2), keepdim=True)).abs().mean(0)
    assert spectrum[:4, 1:4].mean() > 4 * spectrum[16:48, 16:].mean()


def test_fft_decay_power_sets_how_fast_the_spectrum_falls():
    def spectrum(decay_power):
        param = image(64, list(range(8)), decorrelate=False, decay_power=decay_power)
        with torch.no_grad():
            param.tensor.fill_(1.0)  # equal coefficients: the image's spectrum is the scale alone
            return torch.fft.rfft2(param.spatial()[0, 0]).abs()

    for decay_power in (1.0, 2.0):  # 4 against 16 cycles per image: (16 / 4) ** decay_power
        falls = spectrum(decay_power)
        assert (falls[0, 4] / falls[0, 16]).item() == pytest.approx(4**decay_power, rel=1e-3)


# transforms -----------------------------------------------------------------------------------------------
def test_image_random_is_per_image_and_batch_invariant():
    both = ImageRandom([7, 8])
    alone = ImageRandom([8])
    a, b = both.uniform(5), alone.uniform(5)
    torch.testing.assert_close(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    draws = ImageRandom(list(range(4000))).uniform()
    assert draws.min() >= 0 and draws.max() < 1 and abs(draws.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize(
    ("transform", "out_size"),
    [
        (pad(5), 30),
        (jitter(4), 16),
        (random_scale([0.9, 1.1]), 20),
        (random_rotate([-10, 10]), 20),
        (crop_or_pad_to(12), 12),
        (crop_or_pad_to(27), 27),
    ],
)
def test_transforms_keep_batch_and_channels_and_are_differentiable(transform, out_size):
    x = torch.rand(3, 3, 20, 20, requires_grad=True)
    y = transform(x, ImageRandom([1, 2, 3]))
    assert y.shape == (3, 3, out_size, out_size)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("degrees", [30, -50, 90])
def test_rotate_moves_a_marked_spot_where_the_angle_says(degrees):
    x = torch.zeros(1, 3, 41, 41)
    x[:, :, 19:22, 29:32] = 1.0  # a 3 x 3 spot 10 px right of the centre (20, 20)
    y = random_rotate([degrees])(x, ImageRandom([0]))[0, 0]
    rows, cols = torch.meshgrid(torch.arange(41.0), torch.arange(41.0), indexing="ij")
    centroid = torch.stack([(y * rows).sum(), (y * cols).sum()]) / y.sum()
    # about the centre, in pixel coordinates (y down): (x, y) -> (x cos a - y sin a, x sin a + y cos a)
    angle = np.deg2rad(degrees)
    expected = torch.tensor([20 + 10 * np.sin(angle), 20 + 10 * np.cos(angle)], dtype=torch.float32)
    torch.testing.assert_close(centroid, expected, atol=0.3, rtol=0)
    assert float(y.sum()) == pytest.approx(9.0, rel=0.05)  # moved, not smeared or lost


def test_jitter_crops_each_image_at_its_own_offset():
    x = torch.arange(20.0).view(1, 1, 1, 20).expand(16, 3, 20, 20)
    y = jitter(8)(x, ImageRandom(list(range(16))))
    offsets = y[:, 0, 0, 0]
    assert ((offsets >= 0) & (offsets <= 8)).all() and len(offsets.unique()) > 3
    torch.testing.assert_close(y[:, 0, 0, :], offsets[:, None] + torch.arange(12.0))  # a crop, not a resample


def test_crop_or_pad_to_centres_and_pads_with_zeros():
    x = torch.ones(1, 3, 6, 6)
    padded = crop_or_pad_to(10)(x, ImageRandom([0]))
    assert padded[0, 0, 2:8, 2:8].eq(1).all() and padded.sum() == 3 * 36


def test_presets():
    for size in (32, 80):
        x = torch.rand(2, 3, size, size)
        rand = ImageRandom([0, 1])
        atlas = preset("atlas", size)
        y = x
        for transform in atlas:
            y = transform(y, rand)
        assert y.shape == x.shape  # the atlas stack returns to the icon size: no upsampling
        y = x
        for transform in preset("standard", size):
            y = transform(y, rand)
        assert y.shape == (2, 3, size + 12, size + 12)  # lucid's stack: pad 12, crop 8 and 4
    assert preset("none", 80) == []
    with pytest.raises(AtlasError, match="unknown transforms"):
        preset("fancy", 80)


# objectives ---------------------------------------------------------------------------------------------
def test_atlas_objective_is_dot_times_floored_true_cosine_at_the_centre():
    torch.manual_seed(0)
    h = torch.randn(3, 6, 5, 5)
    v = torch.randn(3, 6)
    s = torch.eye(6) + 0.1 * torch.ones(6, 6)
    values = objectives.atlas_direction("L", v, cossim_pow=3, whitening=s)({"L": h})
    target = v @ s
    target = target / target.norm(dim=1, keepdim=True)
    centre = h[:, :, 2, 2]
    dot = (centre * target).sum(1)
    cos = dot / centre.norm(dim=1)
    torch.testing.assert_close(values, dot * cos.clamp(min=0.1) ** 3)
    assert values.shape == (3,)
    cosine = objectives.direction_cosine("L", v)({"L": h})
    torch.testing.assert_close(cosine, torch.nn.functional.cosine_similarity(centre, v, dim=1))


def test_objectives_are_per_image_and_compose():
    torch.manual_seed(0)
    acts = {"L": torch.rand(4, 5, 3, 3), LOGITS: torch.randn(4, 7)}
    a = objectives.channel("L", [0, 1, 2, 3])
    b = objectives.neuron("L", 2)
    c = objectives.class_logit(6)
    combined = (a + 2 * b - c) / 2 - 1 + a * c
    expected = (acts["L"][range(4), range(4)].mean((1, 2)) + 2 * acts["L"][:, 2, 1, 1] - acts[LOGITS][:, 6]) / 2
    expected = expected - 1 + acts["L"][range(4), range(4)].mean((1, 2)) * acts[LOGITS][:, 6]
    torch.testing.assert_close(combined(acts), expected)
    assert set(combined.layers) == {"L", LOGITS}
    torch.testing.assert_close((-a)(acts), -a(acts))
    torch.testing.assert_close(sum([a, b])(acts), a(acts) + b(acts))
    for objective in (
        objectives.direction("L", torch.rand(5), cossim_pow=2),
        objectives.deepdream("L"),
        objectives.diversity("L"),
        objectives.caricature("L", torch.rand(5, 4, 4)),
    ):
        assert objective(acts).shape == (4,)


def test_diversity_in_groups_compares_each_image_with_its_own_group_only():
    same, other = torch.rand(5, 3, 3), torch.rand(2, 5, 3, 3)
    batch = {"L": torch.stack([same, same, *other])}  # two units' images in one batch: a pair alike, a pair not
    grouped = objectives.diversity("L", group=2)(batch)
    torch.testing.assert_close(grouped[:2], objectives.diversity("L")({"L": batch["L"][:2]}))
    torch.testing.assert_close(grouped[2:], objectives.diversity("L")({"L": other}))
    assert (grouped[:2] < grouped[2:].min()).all()


def test_diversity_prefers_different_images_and_caricature_prefers_the_reference():
    ref = torch.rand(5, 3, 3)
    same = {"L": ref.expand(3, 5, 3, 3).clone()}
    different = {"L": torch.rand(3, 5, 3, 3)}
    assert (objectives.diversity("L")(different) > objectives.diversity("L")(same)).all()
    caricature = objectives.caricature("L", ref)
    assert caricature(same)[0] > caricature(different).max()


def test_forward_stops_after_the_last_layer_it_needs():
    model = colour_detector((1.0, 0.0, 0.0))
    called = []
    model.net.fc.register_forward_hook(lambda *_: called.append("fc"))
    acts = forward(model, torch.rand(2, 3, 8, 8), ["relu"])
    assert set(acts) == {"relu"} and called == []
    acts = forward(model, torch.rand(2, 3, 8, 8), ["relu", LOGITS])
    assert acts[LOGITS].shape == (2, 2) and called == ["fc"]


# optimisation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vertical", [True, False])
def test_channel_objective_draws_the_stripes_its_filter_detects(vertical):
    model = stripe_detector(vertical)
    noise, start = visualize(model, objectives.channel("relu", 0), size=48, steps=0, param="fft")
    icon, value = visualize(model, objectives.channel("relu", 0), size=48, steps=96, param="fft")
    assert value[0] > 10 * max(start[0], 0.1)
    gray = icon[0].astype(float).mean(-1)
    across = np.abs(np.diff(gray, axis=1)).mean()  # change from column to column: vertical stripes
    along = np.abs(np.diff(gray, axis=0)).mean()
    assert (across > 1.5 * along) if vertical else (along > 1.5 * across)


@pytest.mark.parametrize(("rgb", "channel"), [((1.0, -1.0, -1.0), 0), ((-1.0, 1.0, -1.0), 1)])
def test_channel_objective_paints_the_colour_its_filter_detects(rgb, channel):
    model = colour_detector(rgb)
    objective = objectives.channel("detector", 0)
    noise, _ = visualize(model, objective, size=24, steps=0, param="fft", transforms="standard")
    icon, _ = visualize(model, objective, size=24, steps=128, param="fft", transforms="standard")

    def lead(img: np.ndarray) -> float:
        means = img[0].reshape(-1, 3).astype(float).mean(0)
        return means[channel] - np.delete(means, channel).max()

    assert lead(noise) < 3 and lead(icon) > 25


def test_visualize_with_alpha_and_logit_objective():
    model = colour_detector((1.0, 0.0, 0.0))
    images, values = visualize(model, objectives.class_logit([0, 1]), size=16, batch=2, steps=2, alpha=True)
    assert images.shape == (2, 16, 16, 4) and images.dtype == np.uint8 and values.shape == (2,)


@pytest.mark.parametrize("d", [1, 3])
def test_jitter_reaches_every_offset_from_0_to_d(d):
    x = torch.arange(20.0).view(1, 1, 1, 20).expand(64, 3, 20, 20)
    offsets = jitter(d)(x, ImageRandom(list(range(64))))[:, 0, 0, 0]
    assert sorted(offsets.unique().tolist()) == list(range(d + 1))  # jitter(1) moves about half the images
    rows = jitter(d)(x.transpose(2, 3), ImageRandom(list(range(64))))[:, 0, :, 0]
    assert sorted(rows[:, 0].unique().tolist()) == list(range(d + 1))


@pytest.mark.parametrize("size", [32, 65])
def test_fft_image_is_lucids_formula_at_its_overall_scale(size):
    """lucid's fft_image: spectrum x 1/max(f, 1/size) x sqrt(w h), numpy's (unnormalised) inverse FFT, then / 4."""
    coefficients = torch.randn(1, 3, size, size // 2 + 1, 2, generator=torch.Generator().manual_seed(0))
    param = image(size, [0], decorrelate=False)
    with torch.no_grad():
        param.tensor.copy_(coefficients)
        ours = param.spatial()[0].double().numpy()
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    scale = 1.0 / np.maximum(np.sqrt(fx**2 + fy**2), 1.0 / size) * np.sqrt(size * size)
    real, imaginary = coefficients[0, ..., 0].double().numpy(), coefficients[0, ..., 1].double().numpy()
    spectrum = (real + 1j * imaginary) * scale
    lucid = np.fft.irfft2(spectrum, s=(size, size)) / 4.0
    np.testing.assert_allclose(ours, lucid, rtol=1e-4, atol=1e-5)


def test_visualize_defaults_to_the_measured_best_transforms_random_crops():
    """bench_quality: crops lift Lite1's top-1 on Lite0 class logits from 0.50 to 0.97, so visualize() uses them."""
    model = colour_detector((1.0, 0.0, 0.0))
    objective = objectives.class_logit([0])
    default, _ = visualize(model, objective, size=24, steps=4)
    crops, _ = visualize(model, objective, size=24, steps=4, transforms="crops")
    standard, _ = visualize(model, objective, size=24, steps=4, transforms="standard")
    assert np.array_equal(default, crops) and not np.array_equal(default, standard)
