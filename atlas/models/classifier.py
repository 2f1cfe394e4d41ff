"""The uniform interface of every model: a `Classifier` is a torch module that maps an image batch in [0, 1]
(N, 3, H, W, RGB) to class logits, with its own preprocessing inside (`normalize`), its input size, its class names,
named layers (module paths, plus the paper's aliases for torchvision's GoogLeNet) and a default atlas layer.

`capture` records layer outputs on a forward pass. Building a model is `atlas.models.load_model`'s job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from atlas import AtlasError
from atlas.classes import close_matches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImagenetNormalize(nn.Module):
    """(x - mean) / std for a [0, 1] batch, differentiable: torchvision's preprocessing, or a timm model's (its
    pretrained_cfg's mean and std)."""

    mean: torch.Tensor  # buffers, which nn.Module's typing gives as Tensor | Module
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TFLiteNormalize(nn.Module):
    """(255 x - 127) / 128: the preprocessing of the TensorFlow EfficientNet-Lite checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 255.0 - 127.0) / 128.0


class Classifier(nn.Module):
    """A classifier on [0, 1] RGB input: `normalize` then `net`, returning logits."""

    def __init__(
        self,
        name: str,
        net: nn.Module,
        normalize: nn.Module,
        input_size: int,
        class_names: list[str],
        default_layer: str,
        weights: str,
        aliases: dict[str, str] | None = None,
        resize_size: int | None = None,
        imagenet_index: list[int] | None = None,
        attribution: str = "gradient",
    ):
        super().__init__()
        self.name = name
        self.net = net
        self.normalize = normalize
        self.input_size = input_size
        self.resize_size = resize_size or round(input_size * 256 / 224)
        self.class_names = class_names
        self.default_layer = default_layer
        self.weights = weights
        self.aliases = dict(aliases or {})
        # the model's class index of each ImageNet-1k class (torchvision's order), where it is not the identity:
        # image labels (WordNet ids, the demo's indices) are ImageNet-1k indices
        self.imagenet_index = imagenet_index
        # the attribution method a collection uses unless told otherwise (atlas.attribution.METHODS)
        self.attribution = attribution
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images))

    # layers -------------------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """Module paths of `net` (torchvision's names), in definition order."""
        return [name for name, _ in self.net.named_modules() if name]

    def resolve_layer(self, name: str) -> str:
        """The canonical name of a layer: its alias when it has one, else its module path.

        Raises an AtlasError listing close matches when the name is unknown.
        """
        by_path = {path: alias for alias, path in self.aliases.items()}
        if name in self.aliases:
            return name
        modules = dict(self.net.named_modules())
        if name in modules and name:
            return by_path.get(name, name)
        known = list(self.aliases) + self.layer_names()
        close = close_matches(name, known)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; `atlas layers {self.name}` lists them"
        raise AtlasError(f"unknown layer {name!r} for {self.name}{hint}")

    def layer_module(self, name: str) -> nn.Module:
        path = self.aliases.get(self.resolve_layer(name), name)
        return dict(self.net.named_modules())[path]

    def layer_shapes(self) -> list[tuple[str, int, int, int]]:
        """(name, channels, height, width) of every module with a 4-D output at the input size: a forward pass the
        first time, remembered after (a module's shapes do not change; a run asks for them at every stage)."""
        known = self.__dict__.get("_layer_shapes")
        if known is None or known[0] != self.input_size:
            known = (self.input_size, self._measure_layer_shapes())
            self.__dict__["_layer_shapes"] = known
        return list(known[1])

    def _measure_layer_shapes(self) -> list[tuple[str, int, int, int]]:
        by_path = {path: alias for alias, path in self.aliases.items()}
        shapes: dict[str, tuple[int, int, int]] = {}
        hooks = []
        for path, module in self.net.named_modules():
            if not path:
                continue

            def record(_m, _i, out, path=path):
                if isinstance(out, torch.Tensor) and out.dim() == 4 and path not in shapes:
                    shapes[path] = tuple(out.shape[1:])

            hooks.append(module.register_forward_hook(record))
        try:
            device = next(self.parameters()).device
            with torch.no_grad():
                self(torch.zeros(1, 3, self.input_size, self.input_size, device=device))
        finally:
            for hook in hooks:
                hook.remove()
        return [(by_path.get(path, path), *shape) for path, shape in shapes.items()]


@contextlib.contextmanager
def capture(model: Classifier, layers: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of `layers` on every forward pass: `with capture(m, ["mixed4c"]) as acts:`."""
    acts: dict[str, torch.Tensor] = {}
    hooks = []
    for name in layers:

        def record(_m, _i, out, name=name):
            acts[name] = out

        hooks.append(model.layer_module(name).register_forward_hook(record))
    try:
        yield acts
    finally:
        for hook in hooks:
            hook.remove()
