"""The circuit lens (atlas.microscope.circuits) on a hand-set network: unit 0 of layer 2 is, by construction, built
from units 1 and 3 of layer 1 (a 1x1 bottleneck between them, whose ReLU the expanded weights ignore)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from atlas import AtlasError
from atlas.microscope.circuits import (
    ablation,
    attribution_inputs,
    expanded_weights,
    lower_neighbours,
    unit_circuit,
)
from atlas.microscope.examples import unit_maxima
from atlas.models.classifier import Classifier
from atlas.optvis import forward

A, B = 1, 3  # the inputs unit 0 of layer2 is built from
WEIGHTS = {A: 2.0, B: 1.5, 0: 0.1, 2: -0.4, 4: 0.05, 5: 0.2}


def hand_set_network() -> Classifier:
    """layer1: 6 channels that all see the same smoothed brightness (so they are equally active); a 1x1 bottleneck
    (identity on 6 channels, its own ReLU); layer2: a 3x3 conv whose unit 0 sums layer1's channels with WEIGHTS at
    its centre tap, the other units random."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        conv1 = nn.Conv2d(3, 6, 3, padding=1)
        conv2 = nn.Conv2d(6, 6, 1)
        conv3 = nn.Conv2d(6, 4, 3, padding=1)
        with torch.no_grad():
            conv1.weight.fill_(1 / 27)
            conv1.bias.fill_(0.1)
            conv2.weight.copy_(torch.eye(6)[:, :, None, None])
            conv2.bias.zero_()
            conv3.weight.normal_(0, 0.05)
            conv3.weight[0] = 0
            for channel, weight in WEIGHTS.items():
                conv3.weight[0, channel, 1, 1] = weight
            conv3.bias.zero_()
        layers = OrderedDict(
            conv1=conv1,
            layer1=nn.ReLU(),
            bottleneck_conv=conv2,
            bottleneck=nn.ReLU(),
            conv2=conv3,
            layer2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(4, 3),
        )
    return Classifier("hand-set", nn.Sequential(layers), nn.Identity(), 16, list("abc"), "layer2", "random")


@pytest.fixture(scope="module")
def net() -> Classifier:
    return hand_set_network()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def peaks(net, images) -> torch.Tensor:
    """Where unit 0 of layer2 peaks in each image (as its dataset examples record)."""
    with torch.no_grad():
        _, position = unit_maxima(forward(net, images, ["layer2"])["layer2"])
    return torch.from_numpy(position[:, 0]).long()


def test_the_expanded_weights_list_the_units_own_inputs_first(net):
    inputs = expanded_weights(net, "layer2", 0, "layer1")
    assert [c for c, _ in inputs.positive[:2]] == [A, B]
    np.testing.assert_allclose([v for _, v in inputs.positive[:2]], [2.0, 1.5], rtol=1e-6)
    assert inputs.negative == [(2, pytest.approx(-0.4))]
    assert inputs.maps.shape == (6, 1, 1)  # a 3x3 conv whose only non-zero taps for unit 0 are the centre ones
    assert "expanded weights" in inputs.how


def test_the_attributions_list_the_units_own_inputs_first(net, images, peaks):
    inputs = attribution_inputs(net, "layer2", 0, "layer1", images, peaks)
    assert [c for c, _ in inputs.positive[:2]] == [A, B]
    assert [c for c, _ in inputs.negative] == [2]
    assert "attribution" in inputs.how


def test_zeroing_the_units_own_inputs_drops_its_activation_the_most(net, images, peaks):
    falls = ablation(net, "layer2", 0, "layer1", images, peaks, range(6))
    assert sorted(falls, key=falls.get, reverse=True)[:2] == [A, B]
    assert falls[A] > 0.3 and falls[2] < 0  # zeroing the negative input raises it


def test_a_layer_that_is_not_below_is_refused(net):
    with pytest.raises(AtlasError, match="layer2 is not below layer1"):
        expanded_weights(net, "layer1", 0, "layer2")
    with pytest.raises(AtlasError, match="units 0..3"):
        expanded_weights(net, "layer2", 7, "layer1")


def test_each_layer_reads_its_circuit_from_the_next_one_below_in_the_run(net):
    assert lower_neighbours(net, ["layer2", "conv1", "layer1"]) == {
        "conv1": None,
        "layer1": "conv1",
        "layer2": "layer1",
    }


def test_no_expanded_weights_through_a_smooth_nonlinearity():
    net = hand_set_network()
    net.net.bottleneck = nn.SiLU()  # the path from layer1 to layer2 is no longer affine
    with pytest.raises(AtlasError, match="not linear apart from ReLUs"):
        expanded_weights(net, "layer2", 0, "layer1")


def test_a_units_circuit_over_a_folder_of_photos(tmp_path, net):
    from PIL import Image

    from atlas.images import list_images

    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    report = unit_circuit(net, "layer2", 0, "layer1", list_images(tmp_path), top_k=4, workers=0)
    assert len(report["examples"]) == 4 and "no_weights" not in report
    weights, attribution = report["lenses"]
    assert [c for c, _ in weights["positive"][:2]] == [c for c, _ in attribution["positive"][:2]] == [A, B]
    assert max(report["ablation"], key=report["ablation"].get) == A
    assert set(report["shared_examples"]) == {c for c, _ in weights["positive"]}
    assert all(0 <= share <= 1 for share in report["shared_examples"].values())


def test_atlas_circuit_prints_the_inputs_from_both_lenses_and_the_ablation(tmp_path, capsys):
    import json

    from PIL import Image

    from pipelines.cli import main

    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    argv = ["circuit", "layer2:0", "--from", "layer1", "--model", "tests.test_circuits:hand_set_network"]
    report = tmp_path / "circuit.json"
    argv += ["--data", str(tmp_path), "--top-k", "3", "--device", "cpu", "--json", str(report)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("layer2:0 from layer1, on its top 3 of 6 images")
    assert f"positive  layer1:{A} +2, layer1:{B} +1.5" in out  # the expanded weights, strongest first
    assert json.loads(report.read_text())["unit"] == 0
    assert main([*argv[:1], "layer2", *argv[2:]]) == 2
    assert "name the unit as LAYER:UNIT" in capsys.readouterr().err


def hand_set_inception() -> Classifier:
    """The hand-set network under InceptionV1's names: layer1 is mixed4b, layer2 mixed4c (its unit 0 built from
    mixed4b's units A and B), for the microscope's pages of two layers."""
    net = hand_set_network()
    net.aliases = {"mixed4b": "layer1", "mixed4c": "layer2"}
    return net
