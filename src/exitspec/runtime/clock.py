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


class ForwardClock:
    """Seconds spent inside a model's forward passes (a `with` block each), the rest of a decode step
    being host work: drafting, verification's argmax, bookkeeping (decoding/engine.py keeps the
    split per row, bench/prediction.py prices the two parts separately).

    Nested blocks count once (a forward inside a timed drafting pass). It reads time.perf_counter()
    without waiting for the device: on a CPU that is the work's time; on an asynchronous device it is
    the time to queue it, so the split there says how much the host spends, not where the device does."""

    __slots__ = ("seconds", "_depth", "_t0")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._t0 = 0.0

    def __enter__(self) -> ForwardClock:
        if self._depth == 0:
            self._t0 = time.perf_counter()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._t0
