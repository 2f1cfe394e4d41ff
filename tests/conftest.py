from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from threadpoolctl import threadpool_limits

from tests.synthetic import write_synthetic_store

# Property tests draw new examples on every local run, to find new bugs; CI (.ci/run sets CI=1) draws the same ones
# every time, so that a red CI names a change, not a lucky draw
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"


@pytest.fixture
def synthetic_store(tmp_path: Path) -> Path:
    """A 2000-sample store of layer 'mixed4c' (16 channels, 10 classes, 5 clusters)."""
    return write_synthetic_store(tmp_path / "store.h5")


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """../shared/data/imagenet-sample (1000 real photos), skipped where it is absent."""
    if not SAMPLE.is_dir():
        pytest.skip("../shared/data/imagenet-sample is not beside the checkout")
    return SAMPLE


@pytest.fixture
def one_thread():
    """For tests on tiny inputs: more threads only wait on each other (torch, OpenMP), worst on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)
