"""The model graph (atlas.microscope.graph): edges read off the autograd graph through functional concats, residual
additions and in-place ReLUs, and the SVG the model page shows."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

from atlas import AtlasError
from atlas.microscope.graph import LayerGraph, graph_svg, layer_graph
from atlas.models.classifier import Classifier
from atlas.models.zoo import load_model

SVG = "{http://www.w3.org/2000/svg}"


class Branching(nn.Module):
    """stem -> two branches (branch1; branch2a -> branch2b) -> torch.cat -> merge, then block = relu(merge + stem)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch1 = nn.Conv2d(8, 4, 1)
        self.branch2a = nn.Conv2d(8, 4, 1)
        self.branch2b = nn.Conv2d(4, 4, 3, padding=1)
        self.merge = nn.Conv2d(8, 8, 1)
        self.block = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)
        self.logits = nn.Identity()  # shares the fc output's grad_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.stem(x)
        mixed = torch.cat([self.branch1(stem), self.branch2b(self.branch2a(stem))], 1)
        out = self.block(self.merge(mixed) + stem)
        return self.logits(self.fc(self.pool(out).flatten(1)))


class InplaceAfterBranch(nn.Module):
    """`a` feeds `b`, then a ReLU rewrites `a` in place and `c` reads it: `b` must still see `a` as its input."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        b = self.b(a)
        return torch.cat([b, self.c(self.relu(a))], 1).mean((2, 3))


def classifier(net: nn.Module) -> Classifier:
    return Classifier("test-net", net, nn.Identity(), 16, list("abc"), "block", "random")


@pytest.fixture(scope="module")
def branching() -> Classifier:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return classifier(Branching())


def test_branches_concat_and_residual_give_the_edges(branching):
    graph = layer_graph(branching, ["stem", "branch1", "branch2a", "branch2b", "merge", "block"])
    assert graph.nodes == [
        ("stem", 8, 16, 16),
        ("branch1", 4, 16, 16),
        ("branch2a", 4, 16, 16),
        ("branch2b", 4, 16, 16),
        ("merge", 8, 16, 16),
        ("block", 8, 16, 16),
    ]
    assert set(graph.edges) == {
        ("stem", "branch1"),
        ("stem", "branch2a"),
        ("branch2a", "branch2b"),
        ("branch1", "merge"),  # through the functional torch.cat
        ("branch2b", "merge"),
        ("merge", "block"),
        ("stem", "block"),  # the residual, skipping both branches
    }
    assert len(graph.edges) == 7


def test_layers_left_out_are_walked_through():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        frozen = classifier(Branching()).requires_grad_(False)
    with torch.no_grad():  # the walk needs the autograd graph whatever the caller's mode and the parameters
        graph = layer_graph(frozen, ["stem", "branch2b", "block"])
    assert set(graph.edges) == {("stem", "branch2b"), ("branch2b", "block"), ("stem", "block")}


def test_layers_sharing_a_grad_fn_chain_in_forward_order(branching):
    graph = layer_graph(branching, ["block", "fc", "logits"])
    assert graph.nodes[1:] == [("fc", 3, 1, 1), ("logits", 3, 1, 1)]
    assert graph.edges == [("block", "fc"), ("fc", "logits")]


def test_an_unknown_layer_is_an_atlas_error(branching):
    with pytest.raises(AtlasError, match="unknown layer 'nope'"):
        layer_graph(branching, ["stem", "nope"])


def test_inplace_relus_give_the_chain():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3), nn.ReLU(inplace=True), nn.Flatten()
        )
    graph = layer_graph(classifier(net), ["0", "1", "2", "3"])
    assert graph.edges == [("0", "1"), ("1", "2"), ("2", "3")]
    # the conv's output is read before the ReLU rewrites it in place: `b` still hangs off `a`
    graph = layer_graph(classifier(InplaceAfterBranch()), ["a", "b", "c"])
    assert graph.edges == [("a", "b"), ("a", "c")]


def test_torchvision_alexnet_is_a_chain():
    modules = ["features.1", "features.4", "features.7", "features.9", "features.11"]  # the ReLUs, in place
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5"]  # their Microscope names, as the graph reports them
    graph = layer_graph(load_model("alexnet", weights="random"), modules)
    assert [name for name, *_ in graph.nodes] == layers
    assert graph.edges == list(zip(layers[:-1], layers[1:], strict=True))


def test_inceptionv1_is_a_chain_through_its_mixed_blocks():
    layers = ["conv2d0", "conv2d1", "conv2d2", "mixed3a", "mixed3b"]
    layers += ["mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e", "mixed5a", "mixed5b"]
    graph = layer_graph(load_model("inceptionv1", weights="random"), layers)
    assert [name for name, *_ in graph.nodes] == layers
    assert graph.nodes[3] == ("mixed3a", 256, 28, 28)
    assert graph.edges == list(zip(layers[:-1], layers[1:], strict=True))


def _href(layer: str) -> str | None:
    return None if layer == "merge" else f'layers/{layer}.html?a=1&b="2"'


def test_the_svg_links_each_node_and_draws_each_edge(branching):
    graph = layer_graph(branching, ["stem", "branch1", "branch2a", "branch2b", "merge", "block", "fc"])
    root = ET.fromstring(graph_svg(graph, _href))
    assert float(root.get("width")) > 100 and float(root.get("height")) > 100
    nodes = [g.get("data-layer") for g in root.iter(f"{SVG}g") if g.get("data-layer")]
    assert nodes == [name for name, *_ in graph.nodes]
    links = {a.find(f"{SVG}g").get("data-layer"): a.get("href") for a in root.iter(f"{SVG}a")}
    assert links == {name: _href(name) for name in nodes if name != "merge"}
    edges = [(p.get("data-from"), p.get("data-to")) for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]
    assert edges == graph.edges
    texts = " ".join(t.text for t in root.iter(f"{SVG}text"))
    assert "8 units · 16×16" in texts and "3 units" in texts and "3 units ·" not in texts


def _points(d: str) -> list[tuple[float, float]]:
    """Points along an SVG path of absolute M, L and C commands, 20 a segment."""
    points: list[tuple[float, float]] = []
    for command in re.findall(r"[MLC][^MLC]*", d):
        xy = [tuple(map(float, p.split(","))) for p in command[1:].split()]
        if command[0] == "M":
            points.append(xy[0])
            continue
        start = points[-1]
        controls = [start, *xy] if command[0] == "C" else [start, start, xy[0], xy[0]]  # a line as a cubic
        for t in [i / 20 for i in range(1, 21)]:
            weights = ((1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3)
            points.append(tuple(sum(w * c[k] for w, c in zip(weights, controls, strict=True)) for k in (0, 1)))
    return points


def test_no_edge_runs_through_a_node(branching):
    """The residual and the edge past branch2a skip rows: they go round the nodes between, not through them."""
    graph = layer_graph(branching, ["stem", "branch1", "branch2a", "branch2b", "merge", "block", "fc"])
    root = ET.fromstring(graph_svg(graph, _href))
    rects = {g.get("data-layer"): g.find(f"{SVG}rect") for g in root.iter(f"{SVG}g") if g.get("data-layer")}
    boxes = {name: [float(r.get(k)) for k in ("x", "y", "width", "height")] for name, r in rects.items()}
    for path in root.iter(f"{SVG}path"):
        if path.get("class") != "edge":
            continue
        ends = {path.get("data-from"), path.get("data-to")}
        for x, y in _points(path.get("d")):
            inside = [n for n, (bx, by, w, h) in boxes.items() if n not in ends and bx < x < bx + w and by < y < by + h]
            assert not inside, f"{ends} runs through {inside}"


def test_the_svg_escapes_names():
    graph = LayerGraph([("a<&>", 2, 1, 1), ("b", 2, 1, 1)], [("a<&>", "b")])
    root = ET.fromstring(graph_svg(graph, lambda layer: f"?layer={layer}"))
    assert [a.get("href") for a in root.iter(f"{SVG}a")] == ["?layer=a<&>", "?layer=b"]
    assert [t.text for t in root.iter(f"{SVG}text")][0] == "a<&>"
