"""The model zoo's OpenAI Microscope models: every one builds offline, its Microscope layers resolve in forward order,
the Places365 models' classes and weights, the timm models' preprocessing and weights, and `atlas models`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from atlas import AtlasError
from atlas.classes import resolve_class
from atlas.images import list_images
from atlas.models.registry import ZOO, class_names, locate_weights, model_for_layer
from atlas.models.zoo import load_model
from pipelines.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
# OpenAI Microscope's eight models, under their zoo names
MICROSCOPE_MODELS = (
    *("alexnet", "alexnet-places365", "inceptionv1", "inceptionv1-places365"),
    *("vgg19", "inception_v3", "inception_v4", "resnetv2_50"),
)
# fully connected layers output vectors (2-D); every other Microscope layer is a feature map (4-D)
FULLY_CONNECTED = re.compile(r"_?fc\d*")


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_model_builds_offline_and_shows_its_microscope_layers_in_forward_order(name, one_thread):
    info, model = ZOO[name], load_model(name, weights="random")
    assert model.class_names == class_names(name)
    canonical = [model.resolve_layer(layer) for layer in info.microscope_layers]
    assert info.microscope_layers and len(set(canonical)) == len(canonical)
    seen: list[tuple[str, int]] = []
    hooks = [
        model.layer_module(layer).register_forward_hook(
            lambda _m, _i, out, layer=layer: seen.append((layer, out.dim()))
        )
        for layer in info.microscope_layers
    ]
    try:
        with torch.no_grad():
            logits = model(torch.rand(1, 3, info.input_size, info.input_size))
    finally:
        for hook in hooks:
            hook.remove()
    assert logits.shape == (1, len(model.class_names))
    assert [layer for layer, _dim in seen] == list(info.microscope_layers)  # each once, in forward order
    assert all(dim == (2 if FULLY_CONNECTED.fullmatch(layer) else 4) for layer, dim in seen), seen
    model.resolve_layer(info.default_layer)


def test_the_zoo_has_microscopes_eight_models_and_their_names():
    assert set(MICROSCOPE_MODELS) <= set(ZOO)
    assert ZOO["alexnet"].microscope_layers == (*(f"conv{i}" for i in range(1, 6)), "fc6", "fc7")
    assert ZOO["vgg19"].microscope_layers[:5] == ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1")
    assert ZOO["vgg19"].microscope_layers[-4:] == ("conv5_3", "conv5_4", "fc6", "fc7")
    assert ZOO["inceptionv1-places365"].microscope_layers == ZOO["inceptionv1"].microscope_layers
    assert ZOO["inception_v4"].microscope_layers[3:7] == ("Mixed_3a", "Mixed_4a", "Mixed_5a", "Mixed_5b")
    assert ZOO["inception_v4"].microscope_layers[-1] == "Mixed_7d"
    assert ZOO["resnetv2_50"].microscope_layers[-1] == "block4_unit_3"
    # aliases name modules: the layer-to-model rule still reads own names only, and a shared name picks no Places model
    assert (model_for_layer("mixed4c"), model_for_layer("layer3")) == ("inceptionv1", "resnet50")


def test_microscope_aliases_name_the_modules_lucid_and_tf_slim_mean():
    alexnet = load_model("alexnet-places365", weights="random")
    assert alexnet.aliases == {
        **{f"conv{i}": f"features.{n}" for i, n in enumerate((1, 4, 7, 9, 11), 1)},
        **{"fc6": "classifier.2", "fc7": "classifier.5"},
    }
    vgg = load_model("vgg19", weights="random")
    assert (vgg.aliases["conv1_1"], vgg.aliases["conv3_4"], vgg.aliases["conv5_4"], vgg.aliases["fc7"]) == (
        "features.1",
        "features.17",
        "features.35",
        "classifier.4",
    )
    assert all(isinstance(vgg.layer_module(layer), nn.ReLU) for layer in ZOO["vgg19"].microscope_layers)
    v4 = load_model("inception_v4", weights="random")
    assert (v4.aliases["Mixed_3a"], v4.aliases["Mixed_7d"]) == ("features.3", "features.21")
    assert type(v4.layer_module("Mixed_6a")).__name__ == "ReductionA"
    resnet = load_model("resnetv2_50", weights="random").aliases
    assert (resnet["block1_unit_1"], resnet["block3_unit_6"], resnet["block4_unit_3"]) == (
        "stages.0.blocks.0",
        "stages.2.blocks.5",
        "stages.3.blocks.2",
    )


def test_places365_class_names():
    names = class_names("alexnet-places365")
    assert names == class_names("inceptionv1-places365") and len(names) == len(set(names)) == 365
    assert (names[0], names[8], names[-1]) == ("airfield", "apartment building/outdoor", "zen garden")
    assert resolve_class("Apartment_Building/Outdoor", names) == 8
    with pytest.raises(AtlasError, match="WordNet id"):
        resolve_class("n01440764", names)  # an ImageNet class is none of its scenes
    assert len(class_names("inception_v4")) == len(class_names("resnetv2_50")) == 1000


def test_a_places_models_images_carry_no_imagenet_label(tmp_path):
    model = load_model("alexnet-places365", weights="random")
    for path in ("airfield/a.jpg", "n01440764_tench.jpg"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_bytes(b"")  # listing reads names only
    labels = {Path(r.path).name: r.label for r in list_images(tmp_path, model.class_names, model.imagenet_index)}
    assert labels == {"a.jpg": 0, "n01440764_tench.jpg": -1}  # a scene-named folder; an ImageNet id: unlabelled
    assert {r.label for r in list_images("demo", model.class_names, model.imagenet_index)} == {-1}


def test_inceptionv1_places365_has_no_published_weights_but_loads_a_state_dict(tmp_path):
    for load in (lambda: load_model("inceptionv1-places365"), lambda: locate_weights("inceptionv1-places365", None)):
        with pytest.raises(AtlasError, match="--weights FILE") as raised:
            load()
        assert "no published PyTorch weights" in str(raised.value) and "\n" not in str(raised.value)
    torch.manual_seed(0)
    source = load_model("inceptionv1-places365", weights="random")
    path = tmp_path / "inceptionv1-places365.pth"
    torch.save(source.net.state_dict(), path)
    loaded = load_model("inceptionv1-places365", weights=str(path))
    assert loaded.weights == str(path) and _same_weights(loaded.net, source.net)
    state = source.net.state_dict()
    state.pop("mixed5b_1x1_pre_relu_conv.bias")
    torch.save(state, path)
    with pytest.raises(AtlasError, match="does not fit"):  # strict keys
        load_model("inceptionv1-places365", weights=str(path))
    # the GoogLeNet paper's channels, as Caffe's GoogLeNet-Places365 has them, not inception5h's
    shapes = {name: channels for name, channels, *_ in source.layer_shapes()}
    assert (shapes["mixed4a"], source.net.mixed5a_5x5_bottleneck_pre_relu_conv.out_channels) == (512, 32)
    assert dict((n, c) for n, c, *_ in load_model("inceptionv1", weights="random").layer_shapes())["mixed4a"] == 508


def test_alexnet_places365_loads_csails_checkpoint_from_torchs_hub_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    source = load_model("alexnet-places365", weights="random")
    # CSAIL's layout: a training checkpoint whose `features` ran under DataParallel, in torch's legacy format
    state = {key.replace("features.", "features.module."): value for key, value in source.net.state_dict().items()}
    checkpoint = {"epoch": 90, "arch": "alexnet", "state_dict": state, "best_prec1": 53.2}
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(checkpoint, cache / "alexnet_places365.pth.tar", _use_new_zipfile_serialization=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    loaded = load_model("alexnet-places365")  # its own weights: the registry's file, found in the cache
    assert loaded.weights == str(cache / "alexnet_places365.pth.tar") and _same_weights(loaded.net, source.net)


def test_timm_models_take_their_pretrained_configs_preprocessing():
    timm = pytest.importorskip("timm")
    for name in ("inception_v4", "resnetv2_50"):
        info, model = ZOO[name], load_model(name, weights="random")
        assert info.timm_tag in timm.list_pretrained(name)
        config = timm.data.resolve_data_config({}, model=model.net)
        resize, crop = timm.data.create_transform(**config).transforms[:2]
        assert (
            (info.input_size, info.resize_size)
            == (config["input_size"][-1], resize.size)
            == (crop.size[0], resize.size)
        )
        assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(config["mean"]))
        assert torch.allclose(model.normalize.std.flatten(), torch.tensor(config["std"]))
    assert ZOO["inception_v4"].timm_tag == "inception_v4.tf_in1k"  # TF-slim's checkpoint, as Microscope's


def test_timm_weights_load_from_a_file_and_offline_say_how_to_pass_one(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = load_model("resnetv2_50", weights="random")
    path = tmp_path / "model.safetensors"  # the Hugging Face hub's file
    save_file(source.net.state_dict(), path)
    assert _same_weights(load_model("resnetv2_50", weights=str(path)).net, source.net)

    code = "from atlas.models.zoo import load_model\ntry: load_model('resnetv2_50')\nexcept Exception as e: print(e)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    message = done.stdout.strip()
    assert "\n" not in message and "resnetv2_50.a1h_in1k" in message and "--weights FILE" in message, done


def test_atlas_models_lists_each_microscope_model_with_its_weights(capsys):
    assert cli_main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    rows = {line.split()[0]: line for line in lines}
    assert list(rows) == list(ZOO)
    for name in MICROSCOPE_MODELS:
        info = ZOO[name]
        assert rows[name].split()[1:4] == [f"{info.input_size}x{info.input_size}", info.default_layer, info.labels]
        assert rows[name].split()[4] == info.attribution and rows[name].endswith(info.about)
    assert rows["efficientnet-lite0"].split()[4] == "integrated" and rows["inceptionv1"].split()[4] == "gradient"
    assert "no published PyTorch weights" in rows["inceptionv1-places365"]
    assert "places365" in rows["alexnet-places365"].split()


def test_load_model_keeps_its_documented_import():
    from atlas.models import load_model
    from atlas.models.zoo import load_model as zoo_load_model

    assert load_model is zoo_load_model
