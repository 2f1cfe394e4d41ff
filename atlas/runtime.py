"""How a model runs on a device: the one place for device choice, memory format and precision.

Every stage that runs a network resolves one `Runtime` from its settings (`auto` or an explicit
value), prepares the model with it, feeds its inputs through it and records its memory format and
precision in the store (not the device: a run may resume on another). `auto` follows the measurements
in issue 15 and `benchmarks/bench_collect.py`, `benchmarks/bench_render.py` (2-core AMX CPU,
EfficientNet-Lite0 batch 32):

- memory format: channels_last everywhere. Forward 42.1 against 25.9 img/s NCHW, collection 19.7
  against 9.5, rendering 155 against 124 icon-steps/s; results unchanged (attributions within 5.8e-4
  relative, every row keeps its top class). On CUDA convolutions prefer NHWC as well (tensor cores).
- precision: bf16 autocast where the stage tolerates it and the device computes bf16 natively (CUDA,
  or a CPU with AVX512-BF16/AMX): rendering (171 against 155 icon-steps/s). Collection stays fp32: its
  attributions must match fp32 to 1e-3 relative, and bf16's 8-bit mantissa alone is 4e-3.
- CUDA: TF32 matmuls and convolutions and `cudnn.benchmark` (fixed input sizes in every stage).

torch.compile is not part of the policy: the attribution pass runs under torch.func transforms and
the renderer adds and removes hooks every step, so each call would recompile.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeVar

import torch

from atlas import AtlasError

PRECISIONS = ("auto", "fp32", "bf16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
LOADAVG = Path("/proc/loadavg")  # Linux: "1.73 0.87 0.48 2/81 19581", the 4th field running/all threads
STAGES_TOLERATING_BF16 = ("render",)  # collection's attributions do not (see the module docstring)
M = TypeVar("M", bound=torch.nn.Module)


def default_device() -> str:
    """CUDA when available, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_threads() -> int:
    """torch's intra-op threads when none are asked for: the cores this process may run on (its affinity, which
    containers and taskset narrow; torch counts every core), less the threads that other processes are running
    now. torch's threads spin on a core that another process holds: on 2 cores beside one busy process, 13 icons
    took 97 s on torch's 2 threads against 3 s on one (issue 28)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = running_elsewhere()
    if busy is None:  # no /proc: the 1-minute load average, which still counts work that has ended
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


def running_elsewhere(reads: int = 5, interval_s: float = 0.02) -> float | None:
    """Threads running or runnable now besides the one reading (the median of a few reads of /proc/loadavg's
    running count); None where there is no /proc. Now, not the 1-minute average: a job that has just ended, this
    process's own start-up included, would cost a quiet machine a core (bench_threads: 71 against 87
    icon-steps/s)."""
    counts = []
    try:
        for read in range(reads):
            if read:
                time.sleep(interval_s)
            counts.append(int(LOADAVG.read_text().split()[3].split("/")[0]) - 1)
    except (OSError, IndexError, ValueError):
        return None
    return float(statistics.median(counts))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: `default_threads()`) and return how many."""
    from atlas.config import check_number  # atlas.config stays free of torch; this module is not

    count = default_threads() if threads is None else int(check_number("threads", threads, 1))
    torch.set_num_threads(count)
    return count


def visible_devices() -> list[str]:
    """The devices torch sees here: the CPU, each CUDA device, and Apple's MPS when present."""
    mps = getattr(torch.backends, "mps", None)
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda, *(["mps"] if mps is not None and mps.is_available() else [])]


def check_device(device: str | torch.device) -> str:
    """The device, when torch knows it and sees it here; else a one-line AtlasError naming the devices torch sees."""
    seen = visible_devices()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise AtlasError(f"unknown device {str(device)!r}; torch sees: {', '.join(seen)}") from err
    wanted = f"cuda:{parsed.index or 0}" if parsed.type == "cuda" else parsed.type  # plain "cuda" is cuda:0
    if parsed.type != "cpu" and wanted not in seen:
        raise AtlasError(f"device {str(device)!r} is not here; torch sees: {', '.join(seen)}")
    return str(device)


@cache
def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Runtime:
    """A resolved policy: the device, the memory format of model and inputs, the autocast precision."""

    device: torch.device
    memory_format: str  # "channels_last" or "contiguous"
    precision: str  # "fp32" or "bf16"

    @property
    def torch_memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.memory_format == "channels_last" else torch.contiguous_format

    def prepare(self, model: M) -> M:
        """Move `model` to the device and memory format (in place, as nn.Module.to); set the CUDA switches."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # nn.Module.to takes memory_format (as Tensor.to does), which torch's overloads of it leave out
        return model.to(self.device, memory_format=self.torch_memory_format).eval()  # type: ignore[call-overload]

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """An image batch [B, 3, H, W] on the device in the memory format (asynchronous from pinned memory)."""
        return images.to(self.device, non_blocking=True).contiguous(memory_format=self.torch_memory_format)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast, or nothing for fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def settings(self) -> dict[str, str]:
        """What the store records (collect root attrs, render icon attrs)."""
        return {"device": self.device.type, "memory_format": self.memory_format, "precision": self.precision}


def resolve(
    stage: str,
    device: str | torch.device | None = None,
    precision: str = "auto",
    memory_format: str = "auto",
) -> Runtime:
    """The policy for `stage` ("collect", "render", ...) on `device` (default: `default_device()`)."""
    if precision not in PRECISIONS:
        raise AtlasError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if memory_format not in MEMORY_FORMATS:
        raise AtlasError(f"memory format {memory_format!r}: choose one of {', '.join(MEMORY_FORMATS)}")
    device = torch.device(check_device(device or default_device()))
    if memory_format == "auto":
        memory_format = "channels_last"
    if precision == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        precision = "bf16" if native and stage in STAGES_TOLERATING_BF16 else "fp32"
    return Runtime(device, memory_format, precision)
