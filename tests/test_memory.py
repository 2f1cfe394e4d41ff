"""Bounded memory: a stage streams a store that would not fit in its memory if it loaded a dataset whole.

The stage runs in a subprocess whose data segment (RLIMIT_DATA: heap and private writable mappings, where numpy
arrays live) may grow by BUDGET_MIB over what Python, torch and h5py already hold. The store's attributions are
larger than that budget, so loading them whole fails there: the control case checks that the limit bites.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROWS, CHANNELS, CLASSES = 200_000, 16, 1008  # attributions: 770 MiB
BUDGET_MIB = 640  # grid's streamed blocks (65,536 rows) and per-cell sums need about 450 MiB

LIMITED = """
import re, resource, sys
import h5py
from atlas.stages.grid import grid_store

def data_bytes():
    return int(re.search(r"VmData:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

limit = data_bytes() + {budget} * 2**20
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
path, what = sys.argv[1], sys.argv[2]
if what == "whole":
    with h5py.File(path) as store:
        store["mixed4c/attributions"][()]
else:
    grid_store(path, "mixed4c", sizes=(20, 40, 80))
print("finished")
"""


def _write_store(path: Path) -> None:
    rng = np.random.default_rng(0)
    block = rng.standard_normal((16384, CLASSES), np.float32)  # repeated: drawing 200M normals would take longer
    with h5py.File(path, "w") as store:
        group = store.create_group("mixed4c")
        group.create_dataset("activations", data=rng.random((ROWS, CHANNELS), np.float32), chunks=(4096, CHANNELS))
        attributions = group.create_dataset("attributions", (ROWS, CLASSES), np.float32, chunks=(4096, CLASSES))
        for start in range(0, ROWS, len(block)):
            attributions[start : start + len(block)] = block[: ROWS - start]
        group["layout"] = rng.random((ROWS, 2), np.float32)


def _run_limited(store: Path, what: str) -> subprocess.CompletedProcess:
    code = LIMITED.format(budget=BUDGET_MIB)
    return subprocess.run([sys.executable, "-c", code, str(store), what], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def large_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("memory") / "store.h5"
    _write_store(path)
    return path


def test_the_store_does_not_fit_in_the_budget(large_store: Path) -> None:
    done = _run_limited(large_store, "whole")
    assert done.returncode != 0 and "MemoryError" in done.stderr, done.stdout + done.stderr[-2000:]


def test_grid_streams_a_store_larger_than_its_memory(large_store: Path) -> None:
    done = _run_limited(large_store, "grid")
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-2000:]
    with h5py.File(large_store) as store:
        counts = store["mixed4c/grid/20/count"][()]
        assert counts.sum() == ROWS
        # the streamed means equal a direct computation on a slice that does fit
        cell = store["mixed4c/grid/20/cell"][()]
        first = np.flatnonzero(cell == cell[0])
        expected = store["mixed4c/attributions"][np.sort(first)].mean(axis=0)
        y, x = divmod(int(cell[0]), 20)
        np.testing.assert_allclose(store["mixed4c/grid/20/attribution"][y, x], expected, rtol=1e-4, atol=1e-5)
