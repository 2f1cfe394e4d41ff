"""lucid's InceptionV1 (atlas.models.inceptionv1), its classes, the zoo registry and how `make atlas` picks a model."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from atlas import AtlasError
from atlas.classes import imagenet_classes, inceptionv1_classes, normal_name, resolve_class
from atlas.config import CONFIG_DIR
from atlas.images import list_images
from atlas.models.classifier import capture
from atlas.models.inceptionv1 import LocalResponseNorm
from atlas.models.registry import ZOO, class_names, hub_dir, model_for_layer
from atlas.models.zoo import load_model
from pipelines.atlas import pick_model, run_data
from pipelines.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_forward_equals_lucents_inceptionv1_on_the_same_state_dict(tmp_path):
    lucent = pytest.importorskip("lucent.modelzoo.inceptionv1.InceptionV1")  # installed by `make install`
    torch.manual_seed(0)
    reference = lucent.InceptionV1(pretrained=False, redirected_ReLU=False).eval()
    path = tmp_path / "inception5h-random.pth"
    torch.save(reference.state_dict(), path)
    ours = load_model("inceptionv1", weights=str(path))  # strict keys: lucent's names load as they are

    layers = ["mixed3b", "mixed4c", "mixed5a"]
    expected = {}
    modules = {**{n: getattr(reference, n) for n in layers}, "logits": reference.softmax2_pre_activation_matmul}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: expected.update({n: o})) for n, m in modules.items()]
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad(), capture(ours, [*layers, "softmax2_pre_activation"]) as got:
        logits = ours(images)  # [0, 1] input: the model maps it to lucid's range itself
        reference(images * 255 - 117)
    for hook in hooks:
        hook.remove()
    assert got["mixed4c"].shape == (2, 512, 14, 14)
    assert logits.shape == (2, 1008)
    torch.testing.assert_close(got["softmax2_pre_activation"], logits, rtol=0, atol=0)
    for name in layers:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5 * float(expected[name].abs().max()))
    scale = float(expected["logits"].abs().max())
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5 * scale)


def test_weights_of_another_network_are_refused(tmp_path):
    path = tmp_path / "googlenet.pth"
    torch.save(load_model("googlenet", weights="random").net.state_dict(), path)
    with pytest.raises(AtlasError, match="does not fit this model"):
        load_model("inceptionv1", weights=str(path))


@pytest.mark.parametrize("size", [9, 4])  # the graph's odd window, and an even one (torch's window is uneven then)
def test_local_response_norm_equals_torchs_in_value_and_gradient(size):
    x = (torch.randn(2, 13, 5, 6, generator=torch.Generator().manual_seed(0)) * 20).requires_grad_()
    ours, theirs = LocalResponseNorm(size, 1e-3, 0.75, 2.0), torch.nn.LocalResponseNorm(size, 1e-3, 0.75, 2.0)
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    values = [norm(x) for norm in (ours, theirs)]
    grads = [torch.autograd.grad((value * weights).sum(), x)[0] for value in values]
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(values[0], x)  # the norm does something at this scale


def test_max_pools_are_modules_for_the_relaxed_derivative():
    net = load_model("inceptionv1", weights="random").net
    pools = {name for name, m in net.named_modules() if isinstance(m, torch.nn.MaxPool2d)}
    assert {"maxpool0", "maxpool1", "maxpool4", "maxpool10", "mixed4c_pool"} <= pools
    assert len(pools) == 4 + 9


def test_the_1008_class_names_are_lucids():
    names = inceptionv1_classes()
    assert len(names) == 1008 == load_model("inceptionv1", weights="random")(torch.rand(1, 3, 64, 64)).shape[1]
    assert (names[0], names[1], names[6], names[442], names[1000]) == (
        "dummy",
        "kit fox",
        "grey whale",
        "great white shark",
        "dumbbell",
    )
    assert resolve_class("Great White Shark", names) == 442
    assert resolve_class("great_white_shark", load_model("inceptionv1", weights="random").class_names) == 442
    assert len(set(names[1:1001])) == 998  # lucid keeps WordNet's duplicate 'crane' and 'maillot'


def test_imagenet_labels_of_images_become_inceptionv1_logits(tmp_path):
    model = load_model("inceptionv1", weights="random")
    (tmp_path / "n01484850").mkdir()  # great white shark: ImageNet-1k index 2, InceptionV1 logit 442
    Image.new("RGB", (8, 8)).save(tmp_path / "n01484850" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "n02066245_grey_whale.png")  # ImageNet-1k 147, InceptionV1 6
    labels = {Path(r.path).name: r.label for r in list_images(tmp_path, model.class_names, model.imagenet_index)}
    assert labels == {"a.png": 442, "n02066245_grey_whale.png": 6}
    assert {Path(r.path).name: r.label for r in list_images(tmp_path)} == {"a.png": 2, "n02066245_grey_whale.png": 147}
    for record in list_images("demo", model.class_names, model.imagenet_index):  # foolbox names its ImageNet-1k label
        if record.label >= 0:
            imagenet_name = imagenet_classes()[int(Path(record.path).stem.split("_")[-1])]
            assert normal_name(model.class_names[record.label]) == normal_name(imagenet_name)


@pytest.mark.parametrize(
    ("layer", "model"),
    [
        ("mixed4c", "inceptionv1"),
        ("conv2d0", "inceptionv1"),  # also a googlenet alias: aliases do not count
        ("softmax2_pre_activation", "inceptionv1"),
        ("inception4c", "googlenet"),
        ("_blocks.10", "efficientnet-lite0"),
        ("layer3", "resnet50"),
    ],
)
def test_a_layer_picks_the_zoo_model_that_owns_it(layer, model):
    assert model_for_layer(layer) == model


def test_a_layer_no_zoo_model_owns_names_the_close_matches():
    with pytest.raises(AtlasError, match=r"no zoo model's own layer name; did you mean mixed4\w \(inceptionv1\)"):
        model_for_layer("mixed4x")


def test_pick_model_uses_the_layer_only_when_nothing_else_names_the_model():
    assert pick_model(None, ["mixed4c"], None) == ("inceptionv1", CONFIG_DIR / "inceptionv1.yaml")
    assert pick_model("googlenet", ["mixed4c"], None)[0] == "googlenet"
    assert pick_model(None, ["mixed4c"], "my.yaml") == (None, Path("my.yaml"))  # the config names the model
    assert pick_model(None, None, None) == (None, CONFIG_DIR / "efficientnet-lite0.yaml")


def test_missing_data_folder_falls_back_to_the_demo(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert run_data(None, {"data": str(tmp_path / "imagenet" / "train")}) == "demo"
    assert [r.message for r in caplog.records if "demo photos" in r.message]
    assert run_data(None, {"data": str(tmp_path)}) == str(tmp_path)
    assert run_data("mine/", {"data": "demo"}) == "mine/"


def test_offline_without_the_weights_file_stops_with_one_line(tmp_path):
    """No file in the hub cache and no network (a dead proxy): one line naming the file, where and how; no work."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TORCH_HOME": str(tmp_path / "torch"),
        "https_proxy": "http://127.0.0.1:9",  # refused at once: offline, whatever the test machine can reach
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    out = tmp_path / "run"
    command = [sys.executable, "-m", "pipelines.cli", "run", "atlas", "--layer", "mixed4c", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    wanted = tmp_path / "torch" / "hub" / "checkpoints" / "inception5h.pth"
    assert "inception5h.pth" in lines[0] and str(wanted) in lines[0] and "--weights FILE" in lines[0]
    assert not out.exists()  # stopped before any other work


def test_registry_metadata_needs_no_torch_and_matches_the_built_models():
    code = "import sys, atlas.models.registry as z; z.class_names('inceptionv1'); print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout == "False\n"
    assert hub_dir() == Path(torch.hub.get_dir())
    for name in ("inceptionv1", "googlenet", "efficientnet-lite0", "resnet50"):
        info, model = ZOO[name], load_model(name, weights="random")
        assert (model.input_size, model.resize_size, model.default_layer) == (
            info.input_size,
            info.resize_size,
            info.default_layer,
        )
        assert set(info.layers) <= set(model.layer_names()), name  # own names are module paths, not aliases
        assert class_names(name) == model.class_names  # the label set, read without building the model
        model.resolve_layer(info.default_layer)


def test_models_command_lists_the_zoo(capsys):
    assert cli_main(["models"]) == 0
    rows = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[:-1]}
    assert rows["inceptionv1"] == ["224x224", "mixed4c"]
    assert rows["inception_v3"] == ["299x299", "Mixed_6c"]
    assert {"googlenet", "efficientnet-lite0", "alexnet", "vgg19", "resnet50"} <= set(rows)
