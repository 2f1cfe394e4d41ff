"""`make bench`: run every benchmarks/bench_*.py and write their figures to benchmarks/results.md.

Each benchmark module has `run() -> list[dict]`; every dict is one measured row and names its
settings. Rows are grouped by module, one `## name` section each, stamped with the time and machine
they ran on. Running some benchmarks replaces their sections and keeps the others' earlier figures.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPU cores"
    return f"CPU only: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmark names (bench_<name>.py); default: all")
    parser.add_argument("--out", default=str(HERE / "results.md"))
    args = parser.parse_args()
    names = args.names or sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}, torch {torch.__version__}"
    out = Path(args.out)
    sections = read_sections(out)
    for name in names:
        print(f"== bench {name}", flush=True)
        rows = importlib.import_module(f"benchmarks.bench_{name}").run()
        for row in rows:
            print(json.dumps(row), flush=True)
        sections[name] = f"{stamp}\n\n" + _table(rows)
        # written after every benchmark, so an interrupted `make bench` keeps what it measured
        out.write_text("# Benchmark results\n\n" + "\n".join(f"## {k}\n\n{v.strip()}\n" for k, v in sections.items()))
    print(f"wrote {out}", file=sys.stderr)


def read_sections(path: Path) -> dict[str, str]:
    """The `## name` sections of an earlier results file, in order (empty when there is none)."""
    if not path.exists():
        return {}
    parts = re.split(r"^## (\S+)\n", path.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
