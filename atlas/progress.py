"""Progress on long work: tqdm's bar in a terminal, timed log lines anywhere else.

A bar redrawn with carriage returns is unreadable in a log file, a CI log or a dask worker's output, and tqdm
turns itself off there, so a long collection printed nothing for twenty minutes. Off a terminal, `progress`
logs one line when a tenth of the work more is done or a minute has passed, whichever comes first, with the
rate and the time left.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger("atlas.progress")
T = TypeVar("T")
EVERY_S = 60.0  # at least one line a minute
EVERY_FRACTION = 0.1  # and one per tenth of the work


def progress(
    items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False
) -> Iterator[T]:
    """Yield `items`, showing progress on stderr: a bar in a terminal, else log lines (module docstring)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if disable:
        yield from items
    elif sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit)
    else:
        yield from _logged(items, total, desc, unit)


def _logged(items: Iterable[T], total: int | None, desc: str, unit: str) -> Iterator[T]:
    started = last = time.monotonic()
    step = max(1, round(EVERY_FRACTION * total)) if total else None
    next_count = step
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if done == total or (next_count is not None and done >= next_count) or now - last >= EVERY_S:
            log.info("%s", _line(desc, unit, done, total, now - started))
            last = now
            if step is not None:
                next_count = done + step


def _line(desc: str, unit: str, done: int, total: int | None, seconds: float) -> str:
    rate = done / seconds if seconds > 0 else float("inf")
    if not total:
        return f"{desc}: {done} {unit} in {seconds:.0f} s ({rate:.3g} {unit}/s)"
    left = (total - done) / rate if rate > 0 else float("inf")
    return (
        f"{desc}: {done}/{total} {unit} ({100 * done / total:.0f} %) in {seconds:.0f} s, "
        f"{rate:.3g} {unit}/s, about {left:.0f} s left"
    )
