"""Clock reads that time the work, not its launch.

CUDA runs kernels asynchronously: `time.perf_counter()` after a forward on a GPU returns when the
kernels are queued, not done. Every timer of exitspec (profiling, the decode loop's statistics, the
benchmarks) reads the clock through `now(device)`, which waits for the device first; on a CPU it is
`time.perf_counter()`.
"""

from __future__ import annotations

import time

import torch


def now(device: torch.device | str | None = None) -> float:
    """Seconds (perf_counter) once the work queued on `device` has finished."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
