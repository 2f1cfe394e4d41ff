from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import dask
import h5py
import numpy as np
import pytest
import torch

from atlas import AtlasError
from atlas.cluster import _collect_task, collect_on_cluster, connect
from atlas.images import list_images
from atlas.models.classifier import Classifier
from atlas.models.zoo import load_model
from atlas.runtime import resolve
from atlas.shards import shard_name
from atlas.stages.collect import baselines_of, collect, plan_collection
from atlas.stages.render import RenderSettings, render_store
from pipelines.cli import main
from tests import synthetic
from tests.synthetic import write_synthetic_store

IMAGES = 4
SETTINGS = dict(positions=2, seed=5, batch_size=1)  # one image per batch: a task holds several, a kill splits them


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread here and in every worker: the same summation order, so the stores are equal to the bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the nanny lets the environment override its per-worker thread count
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def records(imagenet_sample):
    return list_images(imagenet_sample)[:IMAGES]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, records, imagenet_sample) -> Path:
    """The single-process store."""
    out = tmp_path_factory.mktemp("single") / "single.h5"
    return collect(load_model("efficientnet-lite0"), records, out, workers=0, dataset=str(imagenet_sample), **SETTINGS)


@pytest.fixture(scope="module")
def client():
    with connect("local", workers=2) as client:
        yield client


def made_aside(node: h5py.HLObject) -> dict:
    """A node's attrs but its identity (atlas.store lineage), which is new each time it is made."""
    return {key: value for key, value in node.attrs.items() if key != "made"}


def assert_same_store(got: Path, expected: Path) -> None:
    with h5py.File(got) as a, h5py.File(expected) as b:
        assert dict(a.attrs) == dict(b.attrs)
        names: list[str] = []
        b.visit(names.append)
        got: list[str] = []
        a.visit(got.append)
        assert got == names
        for name in names:
            if isinstance(b[name], h5py.Dataset):
                assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
                np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
            else:
                assert made_aside(a[name]) == made_aside(b[name]), name


def test_cli_on_two_workers_writes_the_single_process_store(tmp_path, client, reference, imagenet_sample, capsys):
    out = tmp_path / "cluster.h5"
    address = client.scheduler_info()["address"]  # an existing scheduler, as `--cluster tcp://HOST:PORT` finds it
    argv = ["collect", "--data", str(imagenet_sample), "--limit", str(IMAGES), "--positions", "2", "--seed", "5",
            "--batch-size", "1", "--out", str(out), "--cluster", address, "--workers", "2"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert not out.with_name("cluster.h5.parts").exists()
    with h5py.File(out) as f:
        assert list(f["_blocks.10/image_index"][:]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert_same_store(out, reference)


def test_a_killed_worker_loses_nothing_and_the_store_is_complete(tmp_path, client, records, reference, imagenet_sample):
    out = tmp_path / "killed.h5"
    parts = out.with_name("killed.h5.parts")
    pids = client.run(os.getpid)  # worker address -> its process id
    killed: dict = {}

    def kill_a_busy_worker_after_the_first_shard() -> None:
        deadline = time.time() + 120
        while not list(parts.glob("batch-*.npz")) and time.time() < deadline:
            time.sleep(0.02)
        busy = [address for address, keys in client.processing().items() if keys]
        killed.update(shards=len(list(parts.glob("batch-*.npz"))), finished=out.exists(), busy=busy)
        os.kill(pids[busy[0]], signal.SIGKILL)
        killed["pid"] = pids[busy[0]]

    killer = threading.Thread(target=kill_a_busy_worker_after_the_first_shard, daemon=True)
    killer.start()
    collect_on_cluster(
        client,
        "efficientnet-lite0",
        records,
        out,
        dataset=str(imagenet_sample),
        batches_per_task=2,  # two tasks: the killed worker's has a finished and an unfinished batch
        **SETTINGS,
    )
    killer.join(timeout=10)
    assert "pid" in killed, killed
    assert 1 <= killed["shards"] < IMAGES and not killed["finished"], "the kill was meant to land mid-collection"
    assert killed["pid"] not in client.run(os.getpid).values()  # a real kill: the nanny started a new process
    assert not parts.exists()
    assert_same_store(out, reference)


def test_a_rerun_task_keeps_the_shards_already_written(tmp_path, records):
    model = load_model("efficientnet-lite0")
    runtime = resolve("collect", "cpu")
    plan = plan_collection(model, records[:2], tmp_path / "s.h5", None, 1, 0, 1, "", runtime)
    finished = plan.parts / shard_name(1)
    finished.write_bytes(b"written before the worker died")
    how = baselines_of(model, records[:2], plan, runtime, 0)
    _collect_task("efficientnet-lite0", None, "cpu", records[:2], 0, plan.batches, plan.parts, plan.layer_shapes,
                  1, 0, 0, "auto", "auto", how, 1)  # fmt: skip
    assert finished.read_bytes() == b"written before the worker died"
    with np.load(plan.parts / shard_name(0)) as shard:
        assert list(shard["_blocks.10/image_index"]) == [0]


def test_unreachable_scheduler_and_bad_worker_count_are_one_line_errors():
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(AtlasError, match="cannot reach a dask scheduler"),
        connect("tcp://127.0.0.1:1"),
    ):
        pass
    with pytest.raises(AtlasError, match="at least 1"), connect("local", workers=0):
        pass


# rendering ----------------------------------------------------------------------------------------------
TINY = "tests.test_cluster:tiny_classifier"


def tiny_classifier() -> Classifier:
    """The shared tiny classifier under a name that dask workers can load it by."""
    return synthetic.tiny_classifier(name=TINY)


def grid_store(path: Path) -> Path:
    """A 3 x 3 grid of the tiny model's layer, as `atlas grid` leaves it; cell (0, 0) is empty."""
    write_synthetic_store(path, n=300, channels=16, layer="relu3")
    rng = np.random.default_rng(1)
    counts = rng.integers(5, 40, size=(3, 3))
    counts[0, 0] = 0
    with h5py.File(path, "r+") as f:
        f.attrs.update(model=TINY, weights="random")
        cells = f.create_group("relu3/grid/3")
        cells.attrs["min_count"] = 5
        cells.create_dataset("count", data=counts)
        cells.create_dataset("mean", data=rng.gamma(2.0, 1.0, size=(3, 3, 16)).astype(np.float32))
    return path


def test_render_on_two_workers_fills_the_same_icons_and_resumes(tmp_path, client, capsys):
    # one cell's two attempts per batch in both runs (a cluster task is one cell here), so the same arithmetic
    single = grid_store(tmp_path / "single.h5")
    icon = RenderSettings(size=32, steps=4, attempts=2, transforms="none", whiten=False)
    render_store(single, grid=3, settings=icon, batch_size=2)
    spread = grid_store(tmp_path / "cluster.h5")
    argv = ["render", str(spread), "--grid", "3", "--size", "32", "--steps", "4", "--attempts", "2",
            "--batch-size", "2", "--transforms", "none", "--no-whiten",
            "--cluster", client.scheduler_info()["address"]]  # fmt: skip
    assert main(argv) == 0
    assert "rendered 8 icons (0 already done)" in capsys.readouterr().out
    with h5py.File(single) as a, h5py.File(spread) as b:
        for name in ("icons", "icon_objective", "icon_cosine", "icon_done"):
            np.testing.assert_array_equal(b[f"relu3/grid/3/{name}"][()], a[f"relu3/grid/3/{name}"][()], err_msg=name)
        assert b["relu3/grid/3/icon_done"][()].sum() == 8 and not b["relu3/grid/3/icon_done"][0, 0]
        assert made_aside(b["relu3/grid/3/icons"]) == made_aside(a["relu3/grid/3/icons"])
    assert main(argv) == 0
    assert "rendered 0 icons (8 already done)" in capsys.readouterr().out
