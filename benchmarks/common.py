"""Shared benchmark helpers: run a measurement in a fresh process so its peak memory is its own, and the plain
pixel loop that the renderer is measured against."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-sample"


def in_subprocess(
    module: str, function: str, timeout: float | None = None, drop_env: tuple[str, ...] = (), **kwargs: object
) -> dict | None:
    """Call `module.function(**kwargs)` in a new Python process; return its dict plus `peak_rss_mib`.

    The function returns a JSON-serialisable dict; peak RSS is the child's own resident high-water mark (Linux).
    With `timeout` (seconds), a call still running then is killed and None returned. `drop_env`: environment
    variables the child does not inherit.
    """
    code = (
        "import json, re, sys, importlib\n"
        f"result = importlib.import_module({module!r}).{function}(**json.loads(sys.argv[1]))\n"
        # VmHWM is this process's own high-water mark; ru_maxrss would carry the parent's across fork and exec
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
        "result['peak_rss_mib'] = round(int(hwm) / 1024, 1)\n"
        "print('@@' + json.dumps(result))\n"
    )
    env = {**{k: v for k, v in os.environ.items() if k not in drop_env}, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, json.dumps(kwargs)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode:
        raise RuntimeError(f"{module}.{function} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("@@"))
    return json.loads(line[2:])


def plain_pixel_loop(model, layer: str, directions, size: int = 80, device: str = "cpu") -> Callable[[int], None]:
    """The plain way to render the atlas objective of `directions` [N, C] at `layer`: raw pixels [N, 3, size, size],
    Adam 0.05, the whole network in NCHW fp32 every step (no early stop, no transforms). Returns run(steps), which
    goes on from where the last call stopped."""
    import torch

    from atlas.models.classifier import capture
    from atlas.optvis.objectives import atlas_direction

    objective = atlas_direction(layer, torch.as_tensor(directions, device=device))
    pixels = torch.rand(len(directions), 3, size, size, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([pixels], lr=0.05)

    def run(steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            with capture(model, [layer]) as acts:
                model(pixels)
            (-objective(acts).sum()).backward()
            optimizer.step()

    return run
