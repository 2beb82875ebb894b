"""Give the heap's freed pages back to the operating system between large passes (glibc only).

Why: glibc's malloc serves large blocks with mmap and returns them on free, but each free of such a
block raises its mmap threshold to that block's size (up to 32 MiB), so after the first pass's
(N, V) logits are freed, every later pass's come from the heap instead. The small tensors a loop
keeps from each pass (per-token statistics) are then allocated between the freed large ones and
pin them: the heap cannot shrink, the next pass's blocks do not fit the holes, and the resident
size grows by about one pass's working set per pass. A held-out evaluation of a few dozen
sequences grew until the kernel's OOM killer ended it (benchmarks/README.md, "Memory: a held-out
evaluation that grew"). malloc_trim(0) releases every free page of the heap, the ones between live
blocks too, at the cost of a system call per pass; elsewhere (another libc, macOS) there is
nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (malloc_trim(0)); a no-op without glibc."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
