"""Progress off a terminal: timed log lines with rate and time left, not a bar's carriage returns."""

from __future__ import annotations

import io
import logging

import pytest

from atlas import progress as progress_module
from atlas.progress import progress


def test_off_a_terminal_progress_logs_a_line_per_tenth_with_rate_and_time_left(caplog, monkeypatch):
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())  # not a terminal
    with caplog.at_level(logging.INFO, logger="atlas.progress"):
        assert list(progress(range(40), desc="collect", unit="batch")) == list(range(40))
    lines = [r.message for r in caplog.records]
    assert len(lines) == 10
    assert lines[0].startswith("collect: 4/40 batch (10 %) in ")
    assert lines[-1].startswith("collect: 40/40 batch (100 %) in ") and "batch/s, about 0 s left" in lines[-1]
    assert progress_module.sys.stderr.getvalue() == ""  # no bar


def test_off_a_terminal_progress_logs_at_least_once_a_minute(caplog, monkeypatch):
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())
    clock = iter(range(0, 10_000, 61))  # every item takes 61 s
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="atlas.progress"):
        list(progress(iter(range(3)), desc="layout", unit="epoch"))  # no length: no fraction to log at
    assert [r.message for r in caplog.records] == [
        "layout: 1 epoch in 61 s (0.0164 epoch/s)",
        "layout: 2 epoch in 122 s (0.0164 epoch/s)",
        "layout: 3 epoch in 183 s (0.0164 epoch/s)",
    ]


@pytest.mark.parametrize("terminal", [True, False])
def test_disabled_progress_says_nothing(caplog, monkeypatch, terminal):
    stderr = io.StringIO()
    stderr.isatty = lambda: terminal
    monkeypatch.setattr(progress_module.sys, "stderr", stderr)
    with caplog.at_level(logging.INFO, logger="atlas.progress"):
        assert list(progress([1, 2, 3], desc="render", disable=True)) == [1, 2, 3]
    assert not caplog.records and stderr.getvalue() == ""


def test_in_a_terminal_progress_draws_tqdm_s_bar(monkeypatch, caplog):
    stderr = io.StringIO()
    stderr.isatty = lambda: True
    monkeypatch.setattr(progress_module.sys, "stderr", stderr)
    with caplog.at_level(logging.INFO, logger="atlas.progress"):
        list(progress(range(5), desc="render", unit="batch"))
    assert "render: 100%" in stderr.getvalue() and "5/5" in stderr.getvalue()
    assert not caplog.records
