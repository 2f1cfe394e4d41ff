"""attributions() against plain backward passes, on a small seeded network with max pools (no ../shared needed)."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from atlas.attribution import attribution_pass
from atlas.models.classifier import Classifier, capture
from atlas.stages.collect import attributions, collect_batch

LAYER = "relu2"


def pooled_classifier() -> Classifier:
    """Convolutions and max pools on 32-px input, seeded; 'relu2' is 16 x 16 x 16 and max pools follow it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(8, 16, 3, padding=1),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(3, stride=2, padding=1),
            conv3=nn.Conv2d(16, 16, 3, padding=1),
            relu3=nn.ReLU(),
            pool3=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc=nn.Linear(16 * 4 * 4, 10),
        )
        for module in layers.values():  # He initialisation keeps activations and logits near 1 through the stack
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return Classifier("pooled", nn.Sequential(layers), nn.Identity(), 32, list("abcdefghij"), LAYER, "random")


class _MaxValueAverageGradient(torch.autograd.Function):
    """max_pool2d forward; backward is the derivative of avg_pool2d with the same window."""

    @staticmethod
    def forward(ctx, x, pool):
        ctx.pool, ctx.shape = pool, x.shape
        return nn.functional.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.pool
        with torch.enable_grad():
            x = torch.zeros(ctx.shape, requires_grad=True)
            y = nn.functional.avg_pool2d(x, p.kernel_size, p.stride, p.padding, ceil_mode=p.ceil_mode)
            (dx,) = torch.autograd.grad(y, x, grad)
        return dx, None


class _RelaxedPool(nn.Module):
    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return _MaxValueAverageGradient.apply(x, self.pool)


def reference(model: Classifier, images, positions, relaxed: bool = True) -> np.ndarray:
    """h . d logit_c / d h at each position, one backward pass per class, through a copy of the model."""
    model = copy.deepcopy(model)
    if relaxed:
        for name, module in list(model.net.named_children()):
            if isinstance(module, nn.MaxPool2d):
                setattr(model.net, name, _RelaxedPool(module))
    with torch.no_grad(), capture(model, [LAYER]) as acts:
        model(images)
    leaf = acts[LAYER].clone().requires_grad_(True)
    hook = model.layer_module(LAYER).register_forward_hook(lambda _m, _i, _o: leaf)
    logits = model(images)
    hook.remove()
    out = np.zeros((*positions.shape[:2], logits.shape[1]))
    for c in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, c].sum(), leaf, retain_graph=True)
        for b in range(positions.shape[0]):
            for k, (y, x) in enumerate(positions[b].tolist()):
                out[b, k, c] = float((grad[b, :, y, x] * leaf[b, :, y, x]).sum().detach())
    return out


@pytest.fixture(scope="module")
def case():
    model = pooled_classifier()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture(model, [LAYER]) as acts:
        model(images)
    generator = torch.Generator().manual_seed(2)
    positions = torch.stack([torch.randperm(14 * 14, generator=generator)[:6] for _ in range(4)])
    positions = torch.stack([1 + positions // 14, 1 + positions % 14], dim=-1)  # [4, 6, 2], interior, distinct
    return model, images, acts[LAYER], positions, reference(model, images, positions)


def _close(actual: torch.Tensor, expected: np.ndarray) -> None:
    scale = np.abs(expected).max()
    assert scale > 0.01, "attributions of a normal size (logits ~2 spread over 256 positions), not 1e-15"
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("max_rows", [512, 8, 4, 1])  # one pass; 2, 4 and 6 positions per pass are left over
def test_attributions_match_backward_passes_with_the_relaxed_max_pool(case, max_rows):
    model, images, act, positions, expected = case
    with torch.no_grad():
        fast = attributions(model, images, LAYER, act, positions, max_rows=max_rows)
    assert fast.shape == (4, 6, 10)
    _close(fast, expected)


def test_the_relaxed_max_pool_derivative_matters_on_this_network(case):
    model, images, act, positions, expected = case
    plain = reference(model, images, positions, relaxed=False)
    assert np.linalg.norm(plain - expected) > 0.2 * np.linalg.norm(expected)


def test_collect_batch_stores_the_attributions_of_its_positions(case):
    model, images, act, _positions, _expected = case
    shape = tuple(act.shape[1:])
    out = collect_batch(model, images, [10, 11, 12, 13], {LAYER: shape}, positions=5, seed=3)[LAYER]
    where = torch.from_numpy(out["position"]).long().reshape(4, 5, 2)
    np.testing.assert_array_equal(out["image_index"], np.repeat([10, 11, 12, 13], 5))
    vectors = act.permute(0, 2, 3, 1)[torch.arange(4)[:, None], where[..., 0], where[..., 1]]
    np.testing.assert_allclose(out["activations"], vectors.reshape(20, -1).numpy(), rtol=1e-5, atol=1e-6)
    expected = reference(model, images, where).reshape(20, -1)
    _close(torch.from_numpy(out["attributions"]).double(), expected)


# integrated gradients and occlusion from the layer's mean activation (issue 37) --------------------------------
def reference_integrated(model: Classifier, images, positions, base: torch.Tensor, steps: int) -> np.ndarray:
    """(h - base) . d logit_c / d h_p averaged over the midpoints alpha of the line from the mean map to h, one
    backward pass per class and alpha, through a copy of the model with relaxed max pools."""
    model = copy.deepcopy(model)
    for name, module in list(model.net.named_children()):
        if isinstance(module, nn.MaxPool2d):
            setattr(model.net, name, _RelaxedPool(module))
    with torch.no_grad(), capture(model, [LAYER]) as acts:
        model(images)
    h, base = acts[LAYER].clone(), base.view(1, -1, 1, 1)
    out = np.zeros((*positions.shape[:2], 10))
    for alpha in [(j + 0.5) / steps for j in range(steps)]:
        leaf = (base + alpha * (h - base)).requires_grad_(True)
        hook = model.layer_module(LAYER).register_forward_hook(lambda _m, _i, _o, leaf=leaf: leaf)
        logits = model(images)
        hook.remove()
        for c in range(10):
            (grad,) = torch.autograd.grad(logits[:, c].sum(), leaf, retain_graph=True)
            for b in range(positions.shape[0]):
                for k, (y, x) in enumerate(positions[b].tolist()):
                    out[b, k, c] += float((grad[b, :, y, x] * (h - base)[b, :, y, x]).sum()) / steps
    return out


def reference_occlusion(model: Classifier, images, positions, base: torch.Tensor) -> np.ndarray:
    """logit(h) - logit(h with the one position set to base), one forward pass per position."""
    with torch.no_grad(), capture(model, [LAYER]) as acts:
        logits = model(images)
    out = np.zeros((*positions.shape[:2], 10))
    for k in range(positions.shape[1]):
        changed = acts[LAYER].clone()
        for b, (y, x) in enumerate(positions[:, k].tolist()):
            changed[b, :, y, x] = base
        hook = model.layer_module(LAYER).register_forward_hook(lambda _m, _i, _o, changed=changed: changed)
        with torch.no_grad():
            out[:, k] = (logits - model(images)).numpy()
        hook.remove()
    return out


@pytest.mark.parametrize("max_rows", [512, 8])
@pytest.mark.parametrize("steps", [1, 3])
def test_integrated_gradients_match_backward_passes_along_the_line_from_the_mean(case, steps, max_rows):
    model, images, act, positions, _expected = case
    base = act.mean((0, 2, 3))
    with torch.no_grad():
        fast = attributions(model, images, LAYER, act, positions, max_rows, "integrated", base, steps)
    _close(fast, reference_integrated(model, images, positions, base, steps))


@pytest.mark.parametrize("max_rows", [512, 8])
def test_occlusion_matches_one_forward_pass_per_position(case, max_rows):
    model, images, act, positions, _expected = case
    base = act.mean((0, 2, 3))
    with torch.no_grad():
        fast = attributions(model, images, LAYER, act, positions, max_rows, "occlusion", base)
    expected = reference_occlusion(model, images, positions, base)
    assert np.abs(expected).max() > 0.01
    # differences of two float32 logits of size ~1: equal to their rounding (1e-5), not to the difference's
    np.testing.assert_allclose(fast.numpy(), expected, rtol=0, atol=1e-5)


class _SaturatedHead(nn.Module):
    """Three logits from a 2-channel map: 'saturated' = sum tanh(3 h0) (the class the model uses: it is far the
    largest), 'linear' = 0.1 sum h0 (small, but with the larger gradient at h), 'other' = sum h1."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.tanh(3 * h[:, 0]).sum((1, 2)), 0.1 * h[:, 0].sum((1, 2)), h[:, 1].sum((1, 2))], 1)


def saturated_classifier() -> Classifier:
    """A 1x1 convolution makes h0 = 2 x (mean of the RGB input), h1 = 0, then _SaturatedHead: on a white image the
    model says 'saturated' (logit 16 x tanh 6 ~ 16 against 3.2), where the first-order estimate h . grad says
    'linear' (tanh is flat at 6)."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0] = 2 / 3
    net = nn.Sequential(OrderedDict(layer=conv, head=_SaturatedHead()))
    return Classifier("saturated", net, nn.Identity(), 4, ["saturated", "linear", "other"], "layer", "hand-set")


def test_first_order_attribution_fails_where_the_counterfactual_is_right():
    model = saturated_classifier()
    images = torch.ones(1, 3, 4, 4)
    positions = torch.tensor([[[1, 1], [2, 2]]])
    with torch.no_grad(), capture(model, ["layer"]) as acts:
        logits = model(images)
    assert logits.argmax(1).item() == 0
    base = torch.zeros(2)  # the mean activation of black images
    by = {}
    with torch.no_grad():
        for method in ("gradient", "integrated", "occlusion"):
            by[method] = attributions(model, images, "layer", acts["layer"], positions, 512, method, base, 8)[0]
    assert (by["gradient"].argmax(1) == 1).all()  # h . grad points at 'linear'
    for method in ("integrated", "occlusion"):
        assert (by[method].argmax(1) == 0).all(), method
    # each position's share of the counterfactual logit(h) - logit(mean map): tanh(6) for 'saturated', 0.2 'linear'
    np.testing.assert_allclose(by["occlusion"][:, :2].numpy(), [[np.tanh(6), 0.2]] * 2, rtol=1e-5)
    np.testing.assert_allclose(by["integrated"][:, :2].numpy(), [[np.tanh(6), 0.2]] * 2, rtol=1e-3)


def test_a_method_that_needs_a_baseline_says_so():
    model = saturated_classifier()
    with pytest.raises(ValueError, match="mean activations"):
        attribution_pass(model, torch.ones(1, 3, 4, 4), {"layer": torch.tensor([[[1, 1]]])}, {"layer": (4, 4)},
                         method="integrated")  # fmt: skip
    with pytest.raises(ValueError, match="choose one of gradient, integrated, occlusion"):
        attribution_pass(model, torch.ones(1, 3, 4, 4), {"layer": torch.tensor([[[1, 1]]])}, {"layer": (4, 4)},
                         method="saliency")  # fmt: skip
