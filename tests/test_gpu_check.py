"""benchmarks/gpu_check.py at toy size on the CPU: every check holds and is written; a failed check fails the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_the_toy_run_passes_every_check_and_writes_its_results(tmp_path):
    # no photos folder: the demo photos, so neither ../shared nor `make wheelhouse` is needed
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--size", "toy"]
    command += ["--photos", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert result["device"] == "cpu" and result["size"] == "toy" and result["photos"].startswith("demo")
    rows = {row["name"]: row for row in result["rows"]}
    checks = [row for row in rows.values() if row["kind"] == "check"]
    assert len(checks) == 6 and all(row["status"] == "pass" for row in checks)
    assert rows["render: objective bf16"]["device_mean_objective"] > 0
    measured = [name for name, row in rows.items() if row["kind"] == "measure"]
    for stage in ("collect: efficientnet-lite0", "collect: inceptionv1", "render: batch 2 bf16", "project: 1000 x 512"):
        assert stage in measured and rows[stage]["status"] == "measured"
    assert rows["estimate: paper's full run"]["hours"] > 0
    assert rows["render: torch.compile, batch 1"]["status"] in ("measured", "not supported")
    assert "| check | umap: trustworthiness | pass |" in (tmp_path / "out" / "gpu_check.md").read_text()
    assert done.stdout.rstrip().endswith(f"every check holds (results in {tmp_path / 'out'})")


def failing_check(ctx: gpu_check.Context) -> list[dict]:
    return [gpu_check._check("always off", False, "2", "<= 1")]


def check_missing(ctx: gpu_check.Context) -> list[dict]:
    raise ModuleNotFoundError("No module named 'umap'", name="umap")


@pytest.mark.usefixtures("one_thread")  # restores the thread count that a toy run sets
def test_a_failed_or_unrunnable_check_fails_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "CHECKS", [failing_check, check_missing])
    monkeypatch.setattr(gpu_check, "MEASUREMENTS", [])
    assert gpu_check.main(["--device", "cpu", "--size", "toy", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert [(row["name"], row["status"]) for row in rows] == [("always off", "FAIL"), ("check_missing", "FAIL")]
    assert rows[1]["result"].startswith("missing package: umap")
    assert "FAILED: always off, check_missing" in capsys.readouterr().out
