"""The model graph of the Microscope's model page: which of the chosen layers feeds which, drawn as an SVG.

`layer_graph` runs one forward pass of a zeros image with hooks on the layers and reads the edges off the autograd
graph, not the module tree: it sees the functional ops that module hooks miss (`torch.cat` in Inception blocks,
residual additions). From each layer's output `grad_fn` it walks `next_functions` backwards and ends a branch at the
first `grad_fn` that is another layer's output (an edge lower -> upper), at a leaf (the input, a parameter) or at a
constant. Each layer's `grad_fn` is read when its hook fires, so an in-place op that later rewrites the output (a
torchvision `ReLU(inplace=True)` after a conv) does not take the layer's place in the graph.

Ties: layers whose outputs share one `grad_fn` (an `nn.Identity`, an in-place op returning its input) are the same
point of the graph; they form a chain in forward order, the first takes the edges from below and the last gives the
edges upwards. A module called more than once is the layer at its first call, as in `Classifier.layer_shapes`.

`graph_svg` draws the graph without graphviz: rows by depth (the longest path from a source), top to bottom.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

import h5py
import torch

from atlas import AtlasError
from atlas.models.classifier import Classifier
from atlas.models.registry import ZOO
from atlas.optvis import model_device


@dataclass(frozen=True)
class LayerGraph:
    """The layers (name, units, height, width) in forward order, and the edges (lower, upper) between them."""

    nodes: list[tuple[str, int, int, int]]
    edges: list[tuple[str, str]]


def layer_graph(model: Classifier, layers: Sequence[str]) -> LayerGraph:
    """The graph of `layers` (aliases or module paths): upper depends on lower with no other layer on the path."""
    names = list(dict.fromkeys(model.resolve_layer(layer) for layer in layers))
    outputs: dict[str, tuple[torch.Size, torch.autograd.graph.Node | None]] = {}  # filled in forward order
    hooks = []
    for name in names:

        def record(_m, _i, out, name=name):
            if name in outputs:
                return
            if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4):
                raise AtlasError(f"layer {name} of {model.name} does not output a 2-D or 4-D tensor")
            outputs[name] = (out.shape, out.grad_fn)

        hooks.append(model.layer_module(name).register_forward_hook(record))
    image = torch.zeros(1, 3, model.input_size, model.input_size, device=model_device(model), requires_grad=True)
    try:
        with torch.enable_grad():  # the graph is what we are after, whatever the caller's mode
            model(image)
    finally:
        for hook in hooks:
            hook.remove()
    missing = [name for name in names if name not in outputs]
    if missing:
        raise AtlasError(f"layers {', '.join(missing)} of {model.name} do not run in a forward pass")

    order = list(outputs)
    owner: dict[torch.autograd.graph.Node, str] = {}  # a grad_fn -> the last layer in forward order that outputs it
    first: dict[torch.autograd.graph.Node, str] = {}
    edges: set[tuple[str, str]] = set()
    for name in order:
        fn = outputs[name][1]
        if fn is None:
            continue
        if fn in owner:
            edges.add((owner[fn], name))
        first.setdefault(fn, name)
        owner[fn] = name
    for fn, name in first.items():
        for lower in _nearest_below(fn, owner):
            edges.add((lower, name))
    rank = {name: i for i, name in enumerate(order)}
    nodes = [(name, shape[1], *(shape[2:] if len(shape) == 4 else (1, 1))) for name, (shape, _) in outputs.items()]
    return LayerGraph(nodes, sorted(edges, key=lambda e: (rank[e[1]], rank[e[0]])))


def microscope_layers(model: Classifier, spatial: bool = False) -> list[str]:
    """The layers a Microscope shows of `model`, in forward order: a zoo model's `microscope_layers` (Microscope's
    own names where they exist), else the top-level modules of its network with a spatial output. spatial: only
    those with a spatial map (the ones with unit visualisations; not fc6)."""
    info = ZOO.get(model.name)
    if info is not None and info.microscope_layers:
        layers = [model.resolve_layer(layer) for layer in info.microscope_layers]
        if not spatial:
            return layers
    else:
        layers = [model.resolve_layer(name) for name, _ in model.net.named_children()]
    maps = {name for name, *_shape in model.layer_shapes()}  # a forward pass: only where a map is asked about
    return [layer for layer in layers if layer in maps]


def graph_layers(model: Classifier, layers: Sequence[str]) -> list[str]:
    """The model page's nodes: its Microscope layers and any other layer the site has pages for."""
    return list(dict.fromkeys([*microscope_layers(model), *(model.resolve_layer(layer) for layer in layers)]))


def store_graph(results: h5py.File, model: Classifier, layers: Sequence[str]) -> LayerGraph:
    """The graph of `layers`, kept as JSON in the model's group of the microscope's results file (attribute
    `graph`: {"layers", "nodes", "edges"}), where the site reads it; made again only when the layers change."""
    group = results.require_group(model.name)
    if json.loads(group.attrs.get("graph", "{}")).get("layers") == list(layers):
        return stored_graph(results, model.name)
    graph = layer_graph(model, layers)
    group.attrs["graph"] = json.dumps({"layers": list(layers), "nodes": graph.nodes, "edges": graph.edges})
    return graph


def stored_graph(results: h5py.File, model: str) -> LayerGraph:
    """The graph `store_graph` kept for `model` (empty when there is none)."""
    stored = json.loads(results[model].attrs.get("graph", "{}")) if model in results else {}
    nodes, edges = stored.get("nodes", []), stored.get("edges", [])
    return LayerGraph([tuple(node) for node in nodes], [tuple(edge) for edge in edges])


def _nearest_below(start: torch.autograd.graph.Node, owner: dict[torch.autograd.graph.Node, str]) -> set[str]:
    """The layers whose outputs `start` reaches backwards without passing through another layer's output."""
    found: set[str] = set()
    seen = {start}
    stack = [start]
    while stack:
        for fn, _ in stack.pop().next_functions:
            if fn is None or fn in seen:  # None: an input that needs no grad
                continue
            seen.add(fn)
            if fn in owner:
                found.add(owner[fn])
            else:  # AccumulateGrad leaves have no next_functions: the branch ends there
                stack.append(fn)
    return found


# drawing ------------------------------------------------------------------------------------------------
CHAR_W, NODE_H, ROW_GAP, COL_GAP, MARGIN = 7, 40, 36, 24, 16


def _depths(graph: LayerGraph) -> dict[str, int]:
    """Longest path from a source; nodes are in forward order, so every lower node comes before its uppers."""
    depth = {name: 0 for name, *_ in graph.nodes}
    for name in depth:
        for lower, upper in graph.edges:
            if upper == name:
                depth[name] = max(depth[name], depth[lower] + 1)
    return depth


def _label(units: int, height: int, width: int) -> str:
    return f"{units} units" + (f" · {height}×{width}" if (height, width) != (1, 1) else "")


def graph_svg(graph: LayerGraph, href: Callable[[str], str | None]) -> str:
    """A self-contained SVG of `graph`, input side at the top; a node links to `href(layer)` where that is not None."""
    depth = _depths(graph)
    rows: dict[int, list[str]] = {}
    for name in depth:
        rows.setdefault(depth[name], []).append(name)
    node_w = CHAR_W * max([len(n) for n in depth] + [len(_label(*s)) for _, *s in graph.nodes] + [8]) + 20
    cols = max((len(row) for row in rows.values()), default=1)
    width: float = 2 * MARGIN + cols * node_w + (cols - 1) * COL_GAP  # widened below for the lanes of long edges
    height = 2 * MARGIN + len(rows) * NODE_H + max(len(rows) - 1, 0) * ROW_GAP
    pos: dict[str, tuple[float, float]] = {}  # top-left corners
    for level, row in rows.items():
        left = MARGIN + (cols - len(row)) * (node_w + COL_GAP) / 2
        for i, name in enumerate(row):
            pos[name] = (left + i * (node_w + COL_GAP), MARGIN + level * (NODE_H + ROW_GAP))

    edges = []
    for lower, upper in graph.edges:
        (x1, y1), (x2, y2) = pos[lower], pos[upper]
        x1, y1, x2 = x1 + node_w / 2, y1 + NODE_H, x2 + node_w / 2
        if depth[upper] - depth[lower] == 1:
            mid = (y1 + y2) / 2
            d = f"M{x1:g},{y1:g} C{x1:g},{mid:g} {x2:g},{mid:g} {x2:g},{y2:g}"
        else:  # it skips rows: out through the gaps to a lane right of the rows between, down, and back in
            between = [pos[n][0] + node_w for n in depth if depth[lower] < depth[n] < depth[upper]]
            lane = max(between + [x1, x2]) + COL_GAP / 2 + 6 * (depth[upper] - depth[lower] - 2)
            width = max(width, lane + MARGIN)
            g = ROW_GAP / 2
            d = f"M{x1:g},{y1:g} C{x1:g},{y1 + g:g} {lane:g},{y1:g} {lane:g},{y1 + g:g} L{lane:g},{y2 - g:g}"
            d += f" C{lane:g},{y2:g} {x2:g},{y2 - g:g} {x2:g},{y2:g}"
        edges.append(
            f'<path class="edge" data-from="{escape(lower)}" data-to="{escape(upper)}" fill="none" stroke="#666"'
            f' marker-end="url(#arrow)" d="{d}"/>'
        )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{height}" viewBox="0 0 {width:g} {height}"'
        ' font-family="sans-serif" font-size="12" class="layer-graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7"'
        ' orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>',
        *edges,
    ]
    for name, *shape in graph.nodes:
        x, y = pos[name]
        node = (
            f'<g class="node" data-layer="{escape(name)}">'
            f'<rect x="{x:g}" y="{y:g}" width="{node_w}" height="{NODE_H}" rx="6" fill="#f4f4f4" stroke="#888"/>'
            f'<text x="{x + node_w / 2:g}" y="{y + 16:g}" text-anchor="middle" font-weight="bold">{escape(name)}</text>'
            f'<text x="{x + node_w / 2:g}" y="{y + 32:g}" text-anchor="middle" fill="#555">{_label(*shape)}</text></g>'
        )
        link = href(name)
        parts.append(f'<a href="{escape(link)}">{node}</a>' if link is not None else node)
    parts.append("</svg>")
    return "\n".join(parts)
