from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from atlas import AtlasError
from atlas.images import list_images, load_rgb, to_model_input
from atlas.models.classifier import capture
from atlas.models.zoo import load_model
from atlas.stages.collect import MATH_BATCH, attributions, collect, sample_positions
from tests.test_pipeline import write_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lite0():
    return load_model("efficientnet-lite0")


@pytest.fixture(scope="module")
def sample_records(imagenet_sample):
    return list_images(imagenet_sample)[:6]


def test_positions_are_interior_distinct_and_reproducible():
    for row in range(50):
        where = sample_positions(row, "mixed4c", 14, 14, 5, seed=3)
        assert len({tuple(p) for p in where}) == 5
        assert where.min() >= 1 and where.max() <= 12
        np.testing.assert_array_equal(where, sample_positions(row, "mixed4c", 14, 14, 5, seed=3))
    everything = sample_positions(0, "mixed4c", 14, 14, 500, seed=3)
    assert len(everything) == 12 * 12
    assert not np.array_equal(sample_positions(0, "a", 14, 14, 5, 0), sample_positions(1, "a", 14, 14, 5, 0))


def test_store_schema_and_attribution_matches_autograd(tmp_path, lite0, sample_records):
    settings = dict(positions=2, batch_size=4, workers=0, dataset="sample", attribution="gradient")
    out = collect(lite0, sample_records, tmp_path / "s.h5", **settings)
    with h5py.File(out) as f:
        layer = f["_blocks.10"]
        n = len(sample_records) * 2
        assert layer["activations"].shape == (n, 112)
        assert layer["attributions"].shape == (n, 1000)
        assert layer["position"].shape == (n, 2)
        assert list(layer["image_index"][:]) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
        assert f["images/path"].asstr()[0] == sample_records[0].path
        assert list(f["images/label"][:]) == [r.label for r in sample_records]
        assert f["images/skipped"].shape == (0,)
        assert f.attrs["model"] == "efficientnet-lite0" and f.attrs["seed"] == 0 and f.attrs["input_size"] == 224
        assert layer.attrs["height"] == 14 and layer["activations"].chunks is not None
        row = 5  # image 2, second position
        image, (y, x) = int(layer["image_index"][row]), layer["position"][row]
        stored_act, stored_attr = layer["activations"][row], layer["attributions"][row]

    # direct computation: replace the layer output by a leaf tensor and differentiate each logit
    pixels = to_model_input(load_rgb(sample_records[image].path), lite0.resize_size, 224)[None]
    with torch.no_grad(), capture(lite0, ["_blocks.10"]) as acts:
        lite0(pixels)
    leaf = acts["_blocks.10"].clone().requires_grad_(True)
    hook = lite0.layer_module("_blocks.10").register_forward_hook(lambda _m, _i, _o: leaf)
    logits = lite0(pixels)
    hook.remove()
    np.testing.assert_allclose(stored_act, leaf[0, :, y, x].detach().numpy(), rtol=1e-4, atol=1e-5)
    for c in (2, 147, int(logits.argmax())):
        (grad,) = torch.autograd.grad(logits[0, c], leaf, retain_graph=True)
        expected = float((grad[0, :, y, x] * leaf[0, :, y, x]).sum().detach())
        assert stored_attr[c] == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_same_seed_same_store_and_other_seed_other_positions(tmp_path, lite0, sample_records):
    a = collect(lite0, sample_records[:3], tmp_path / "a.h5", positions=2, seed=1, workers=0)
    b = collect(lite0, sample_records[:3], tmp_path / "b.h5", positions=2, seed=1, batch_size=2, workers=1)
    c = collect(lite0, sample_records[:3], tmp_path / "c.h5", positions=2, seed=2, workers=0)
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(c) as fc:
        for key in ("activations", "image_index", "position"):
            np.testing.assert_array_equal(fa["_blocks.10"][key][:], fb["_blocks.10"][key][:])
        np.testing.assert_allclose(fa["_blocks.10/attributions"][:], fb["_blocks.10/attributions"][:], atol=1e-5)
        assert not np.array_equal(fa["_blocks.10/position"][:], fc["_blocks.10/position"][:])


def test_rerun_is_a_no_op_and_other_settings_do_not_overwrite(tmp_path, lite0, sample_records):
    out = collect(lite0, sample_records[:2], tmp_path / "s.h5", workers=0)
    stamp = out.stat().st_mtime_ns
    collect(lite0, sample_records[:2], out, workers=0)
    assert out.stat().st_mtime_ns == stamp
    with pytest.raises(AtlasError, match="different collection"):
        collect(lite0, sample_records[:2], out, positions=3, workers=0)


def test_odd_and_broken_images(tmp_path, lite0, imagenet_sample):
    folder = tmp_path / "odd"
    folder.mkdir()
    photo = Image.open(next(imagenet_sample.glob("*great_white_shark*")))
    photo.convert("L").save(folder / "gray.png")
    photo.convert("RGBA").save(folder / "rgba.png")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    photo.convert("P").save(folder / "palette.gif")
    photo.resize((3, 5)).save(folder / "tiny.png")
    Image.fromarray((np.random.default_rng(0).random((40, 30)) * 65535).astype(np.uint16)).save(folder / "deep.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    (folder / "truncated.jpg").write_bytes((imagenet_sample / "n01440764_tench.JPEG").read_bytes()[:2000])
    records = list_images(folder)
    out = collect(lite0, records, tmp_path / "odd.h5", workers=0)
    with h5py.File(out) as f:
        skipped = sorted(s.split(":")[0] for s in f["images/skipped"].asstr()[:])
        assert [Path(s).name for s in skipped] == ["empty.jpg", "notes.png", "truncated.jpg"]
        assert f["_blocks.10/activations"].shape[0] == 6
        assert np.isfinite(f["_blocks.10/activations"][:]).all()


def test_labels_from_wordnet_ids_and_class_folders(tmp_path, imagenet_sample):
    records = list_images(imagenet_sample)
    assert len(records) == 1000
    assert {r.label for r in records} == set(range(1000))
    shark = next(r for r in records if "great_white_shark" in r.path)
    assert shark.label == 2
    for name in ("great white shark", "my_own_class"):
        (tmp_path / "folders" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "folders" / name / "a.png")
    labels = {
        Path(r.path).parent.name: r.label
        for r in list_images(tmp_path / "folders", load_model("googlenet", "random").class_names)
    }
    assert labels == {"great white shark": 2, "my_own_class": 1}


def test_several_layers_and_relaxed_maxpool_attributions():
    torch.manual_seed(0)
    model = load_model("inceptionv1", weights="random")
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad(), capture(model, ["mixed4c"]) as acts:
        model(images)
    act = acts["mixed4c"]
    where = torch.tensor([[[3, 4], [7, 7]], [[1, 12], [5, 2]]])
    with torch.no_grad():
        fast = attributions(model, images, "mixed4c", act, where)
    # backward-mode reference with the same relaxation: max-pool value, average-pool derivative
    pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]

    def relaxed(pool, inputs, out):
        avg = torch.nn.functional.avg_pool2d(inputs[0], pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode)
        return out.detach() + avg - avg.detach()

    hooks = [p.register_forward_hook(relaxed) for p in pools]
    leaf = act.clone().requires_grad_(True)
    hooks.append(model.layer_module("mixed4c").register_forward_hook(lambda _m, _i, _o: leaf))
    logits = model(images)
    for h in hooks:
        h.remove()
    for c in (0, 500):
        (grad,) = torch.autograd.grad(logits[:, c].sum(), leaf, retain_graph=True)
        for b in range(2):
            for k in range(2):
                y, x = where[b, k]
                expected = float((grad[b, :, y, x] * act[b, :, y, x]).sum())
                assert float(fast[b, k, c]) == pytest.approx(expected, rel=1e-3, abs=1e-9)


def test_unknown_layer_lists_close_matches(lite0):
    with pytest.raises(AtlasError, match="did you mean"):
        lite0.resolve_layer("_blocks.1O")


def test_killed_collection_resumes_to_the_same_store(tmp_path, imagenet_sample):
    data = tmp_path / "list.txt"
    data.write_text("\n".join(str(p) for p in sorted(imagenet_sample.glob("*.JPEG"))[:10]))
    command = [sys.executable, "-m", "pipelines.cli", "collect", "--data", str(data), "--positions", "2",
               "--batch-size", "1", "--workers", "0", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([*command, "--out", str(tmp_path / "whole.h5")], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed.h5"
    proc = subprocess.Popen([*command, "--out", str(killed)], env=env, stderr=subprocess.DEVNULL)
    parts = killed.with_name("killed.h5.parts")
    deadline = time.time() + 120
    while len(list(parts.glob("batch-*.npz"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "the run was meant to be killed before it finished"
    assert 3 <= len(list(parts.glob("batch-*.npz"))) < 10
    subprocess.run([*command, "--out", str(killed)], check=True, env=env, capture_output=True)
    assert not parts.exists()
    with h5py.File(tmp_path / "whole.h5") as whole, h5py.File(killed) as resumed:
        for key in ("activations", "image_index", "position", "attributions"):
            np.testing.assert_array_equal(whole["_blocks.10"][key][:], resumed["_blocks.10"][key][:])
        assert list(whole["images/path"].asstr()[:]) == list(resumed["images/path"].asstr()[:])


@pytest.mark.parametrize(("model", "own_path"), [("inceptionv1", "mixed4c_3x3"), ("googlenet", "inception4c.branch1")])
def test_layers_command_lists_paper_names(model, own_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pipelines.cli", "layers", model]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}
    assert rows["mixed4c"] == ["512", "14", "14"]
    assert rows["mixed5b"] == ["1024", "7", "7"]
    assert own_path in rows  # the model's own module paths are listed too


def test_an_interrupted_collection_keeps_its_finished_shards_and_collects_only_the_rest(tmp_path, monkeypatch):
    import atlas.stages.collect as stage
    from tests.synthetic import tiny_classifier

    records, model = list_images(write_folder(tmp_path / "images", 10)), tiny_classifier()
    settings = dict(positions=3, batch_size=2, workers=0)
    real, seen = stage.collect_batch, []

    def dies_after_three(model, images, rows, *args):
        if len(seen) == 3:
            raise KeyboardInterrupt
        seen.append(rows)
        return real(model, images, rows, *args)

    monkeypatch.setattr(stage, "collect_batch", dies_after_three)
    out = tmp_path / "s.h5"
    with pytest.raises(KeyboardInterrupt):
        collect(model, records, out, **settings)
    parts = out.with_name("s.h5.parts")
    shards = {p.name: p.read_bytes() for p in parts.glob("batch-*.npz")}
    assert sorted(shards) == ["batch-000000000.npz", "batch-000000002.npz", "batch-000000004.npz"]

    def keeps_shards(model, images, rows, *args):  # the finished shards are intact when the rest is collected
        assert {p.name: p.read_bytes() for p in parts.glob("batch-*.npz") if p.name in shards} == shards
        seen.append(rows)
        return real(model, images, rows, *args)

    monkeypatch.setattr(stage, "collect_batch", keeps_shards)
    collect(model, records, out, **settings)
    assert seen == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]  # each batch collected once
    monkeypatch.setattr(stage, "collect_batch", real)
    whole = collect(model, records, tmp_path / "whole.h5", **settings)
    with h5py.File(whole) as a, h5py.File(out) as b:
        for key in ("activations", "image_index", "position", "attributions"):
            np.testing.assert_array_equal(a[f"relu3/{key}"][:], b[f"relu3/{key}"][:])


def test_a_merge_of_more_than_ten_shards_keeps_the_row_order(tmp_path):
    """Shards sort by name: with 12 one-image batches, batch 10 must still come after batch 9."""
    from tests.synthetic import tiny_classifier

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    out = collect(tiny_classifier(), list_images(folder), tmp_path / "s.h5", positions=2, batch_size=1, workers=0)
    with h5py.File(out) as f:
        assert f["relu3/image_index"][()].tolist() == [row for row in range(12) for _ in range(2)]


def _photos(folder: Path, count: int) -> list:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return list_images(folder)


def test_four_layers_are_decoded_and_run_once_per_batch_and_equal_four_one_layer_runs(tmp_path, monkeypatch):
    import atlas.images
    from atlas.store import COLLECTED
    from tests.synthetic import tiny_classifier

    records, model = _photos(tmp_path / "images", 10), tiny_classifier()
    layers = ["conv1", "relu1", "relu2", "relu3"]  # 16x16, 16x16, 8x8, 4x4
    settings = dict(positions=2, batch_size=4, workers=0)
    decoded, forwards = [], []
    real_load = atlas.images.load_rgb
    monkeypatch.setattr(
        atlas.images, "load_rgb", lambda path, *a, **k: decoded.append(path) or real_load(path, *a, **k)
    )
    # the batch size of every forward of real images (layer_shapes probes the model with zeros)
    hook = model.register_forward_pre_hook(lambda _m, x: forwards.append(len(x[0])) if x[0].any() else None)
    try:
        four = collect(model, records, tmp_path / "four.h5", layers=layers, **settings)
    finally:
        hook.remove()
    assert sorted(decoded) == sorted(r.path for r in records)  # every image decoded once
    # 10 images in batches of 4: one forward per batch for all four layers, each run at the math batch of 32
    assert forwards == [MATH_BATCH] * 3
    for layer in layers:
        one = collect(model, records, tmp_path / f"{layer}.h5", layers=[layer], **settings)
        with h5py.File(four) as a, h5py.File(one) as b:
            assert a[layer]["activations"].shape[0] == 20
            for key in COLLECTED:
                np.testing.assert_allclose(a[layer][key][()], b[layer][key][()], rtol=1e-5, atol=1e-7)
            # every layer's row i is the same image's i-th sample
            np.testing.assert_array_equal(a[layer]["image_index"][()], a["relu3"]["image_index"][()])
    with h5py.File(four) as f:  # same-sized layers share their positions
        np.testing.assert_array_equal(f["conv1/position"][()], f["relu1/position"][()])


def test_a_rerun_with_one_more_layer_collects_only_that_layer_and_keeps_the_others(tmp_path, monkeypatch):
    import atlas.stages.collect as stage
    from atlas.store import MADE, PARTIAL
    from tests.synthetic import tiny_classifier

    records, model = _photos(tmp_path / "images", 6), tiny_classifier()
    settings = dict(positions=2, batch_size=4, workers=0)
    out = collect(model, records, tmp_path / "s.h5", layers=["relu2", "relu3"], **settings)
    with h5py.File(out, "a") as f:
        made = {layer: f[layer].attrs[MADE] for layer in ("relu2", "relu3")}
        f.create_group(f"{PARTIAL}/relu1")  # the leftover of a merge killed before it finished
    real, seen = stage.collect_batch, []

    def records_layers(model, images, rows, layers, *args):
        seen.append(sorted(layers))
        return real(model, images, rows, layers, *args)

    monkeypatch.setattr(stage, "collect_batch", records_layers)
    collect(model, records, out, layers=["relu1", "relu2", "relu3"], **settings)
    assert seen == [["relu1"], ["relu1"]]  # two batches, of the new layer only
    seen.clear()
    collect(model, records, out, layers=["relu3", "relu1"], **settings)
    assert seen == []  # nothing left to collect
    monkeypatch.setattr(stage, "collect_batch", real)
    alone = collect(model, records, tmp_path / "relu1.h5", layers=["relu1"], **settings)
    with h5py.File(out) as f, h5py.File(alone) as g:
        assert {layer: f[layer].attrs[MADE] for layer in ("relu2", "relu3")} == made  # untouched
        assert PARTIAL not in f and sorted(k for k in f if k.startswith("relu")) == ["relu1", "relu2", "relu3"]
        np.testing.assert_allclose(f["relu1/attributions"][()], g["relu1/attributions"][()], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(f["relu1/position"][()], g["relu1/position"][()])


def test_integrated_gradients_start_from_the_kept_mean_activation_and_the_store_records_them(tmp_path, monkeypatch):
    """A collection by integrated gradients records its method and settings, stores each layer's baseline (the mean
    activation of its first `baseline_images` images), computes its attributions from it, and a resumed run takes
    the baseline kept in the parts folder rather than computing it again."""
    import atlas.stages.collect as stage
    from tests.synthetic import tiny_classifier

    records, model = list_images(write_folder(tmp_path / "images", 6)), tiny_classifier()
    settings = dict(positions=2, batch_size=2, workers=0, attribution="integrated", attribution_steps=2)
    out = collect(model, records, tmp_path / "s.h5", baseline_images=4, **settings)
    images = torch.stack([to_model_input(load_rgb(r.path), model.resize_size, model.input_size) for r in records])
    with torch.no_grad(), capture(model, ["relu3"]) as acts:
        model(images)
    h = acts["relu3"]
    with h5py.File(out) as f:
        assert f.attrs["attribution"] == "integrated"
        meta = json.loads(f.attrs["collect_meta"])
        assert (meta["attribution"], meta["attribution_steps"], meta["baseline_images"]) == ("integrated", 2, 4)
        base = f["relu3/baseline"][()]
        np.testing.assert_allclose(base, h[:4].mean((0, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
        where = torch.from_numpy(f["relu3/position"][()]).long().reshape(6, 2, 2)
        with torch.no_grad():
            expected = attributions(model, images, "relu3", h, where, 512, "integrated", torch.from_numpy(base), 2)
        np.testing.assert_allclose(f["relu3/attributions"][()], expected.reshape(12, -1).numpy(), rtol=1e-4, atol=1e-6)

    real = stage.collect_batch

    def dies_after_one(model, images, rows, *args):
        if rows[0] > 0:
            raise KeyboardInterrupt
        return real(model, images, rows, *args)

    monkeypatch.setattr(stage, "collect_batch", dies_after_one)
    resumed = tmp_path / "r.h5"
    with pytest.raises(KeyboardInterrupt):
        collect(model, records, resumed, **settings)
    kept = resumed.with_name("r.h5.parts") / stage.BASELINES_FILE
    planted = np.full(16, 0.25, dtype=np.float32)
    np.savez(kept, relu3=planted)  # a resumed run must use these numbers, not compute the mean again
    monkeypatch.setattr(stage, "collect_batch", real)
    collect(model, records, resumed, **settings)
    with h5py.File(resumed) as f:
        np.testing.assert_array_equal(f["relu3/baseline"][()], planted)


def test_the_attribution_method_is_part_of_a_collections_settings(tmp_path, lite0):
    """Lite0 collects by integrated gradients unless told otherwise (its registry default); a store collected one
    way is never extended or reused another way."""
    from tests.synthetic import tiny_classifier

    records = list_images("demo", lite0.class_names)[:1]
    out = collect(lite0, records, tmp_path / "lite0.h5", positions=1, workers=0)
    with h5py.File(out) as f:
        assert f.attrs["attribution"] == "integrated" and "baseline" in f["_blocks.10"]
    tiny = collect(tiny_classifier(), records, tmp_path / "tiny.h5", positions=1, workers=0)
    with h5py.File(tiny) as f:
        assert f.attrs["attribution"] == "gradient" and "baseline" not in f["relu3"]
    with pytest.raises(AtlasError, match="holds a different collection"):
        collect(tiny_classifier(), records, tiny, positions=1, workers=0, attribution="occlusion")


def _collected_at(threads: int, out: Path, records: list, model) -> dict[str, np.ndarray]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        collect(model, records, out, layers=["_blocks.10"], positions=2, batch_size=32, dataset="x", workers=0)
    finally:
        torch.set_num_threads(before)
    with h5py.File(out) as f:
        return {name: f[f"_blocks.10/{name}"][()] for name in ("activations", "attributions", "position")}


def test_the_same_photos_give_the_same_store_at_one_and_two_threads_beside_a_busy_neighbour(tmp_path):
    """Issue 39: the CPU kernels split a batch's work by its shape and the thread count; every batch runs at the
    collection's batch size (the last one, 8 of 40 images here, padded), so one and two threads, with another
    process keeping a core busy, give bit-identical stores."""
    model = load_model("efficientnet-lite0")
    records = list_images(write_folder(tmp_path / "images", 40), model.class_names, model.imagenet_index)
    one = _collected_at(1, tmp_path / "one.h5", records, model)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        two = _collected_at(2, tmp_path / "two.h5", records, model)
    finally:
        busy.kill()
        busy.wait()
    for name, values in one.items():
        np.testing.assert_array_equal(values, two[name], err_msg=name)
