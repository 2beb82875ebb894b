"""A one-line description of the machine a benchmark ran on (stored with every result)."""

from __future__ import annotations

import os
import platform
import resource
import threading

import torch

# The vector extensions that decide which kernel build runs and how fast: a figure from an AVX-512
# machine says nothing about an AVX2-only one, so every report names them (the model name alone,
# "AMD EPYC", covers both kinds).
VECTOR_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "BF16", "avx512_vnni": "VNNI", "amx_tile": "AMX"}


def describe_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):  # after the first core's model name: enough
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [name for flag, name in VECTOR_FLAGS.items() if flag in flags]
    if "AVX-512" in isa:
        isa.remove("AVX2")  # implied
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return {"cpu": cpu, "isa": " ".join(isa) or "no AVX2", "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "mem_gib": mem_gib,
            "gpu": gpu, "torch": torch.__version__, "python": platform.python_version()}


def machine_line(m: dict | None = None) -> str:
    m = m or describe_machine()
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    isa = f" ({m['isa']})" if m.get("isa") else ""
    return (f"{m['cpu']}{isa}, {m['cores']} cores ({m['threads']} torch threads), {m['mem_gib']} GiB{gpu}; "
            f"torch {m['torch']}, Python {m['python']}")


class PeakMemory:
    """Peak memory while the `with` block runs, in MiB.

    GPU: torch.cuda.max_memory_allocated after a reset (exact). CPU: the resident set size sampled
    every 5 ms by a background thread with psutil (the process-lifetime peak from `resource` cannot
    be reset, so it is only the fallback when psutil is missing, reported as `ru_maxrss`).
    """

    def __init__(self, device: str = "cpu", interval_s: float = 0.005):
        self.device = str(device)
        self.interval_s = interval_s
        self.peak_mib: float | None = None
        self.source = ""

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = None
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.source = "cuda_max_allocated"
            return self
        try:
            import psutil  # optional (the bench extra): sampled RSS, else the kernel's peak
        except ImportError:
            self.source = "ru_maxrss"
            return self
        proc = psutil.Process()
        self.source = "rss_sampled"
        self._peak = proc.memory_info().rss

        def sample():
            while not self._stop.wait(self.interval_s):
                self._peak = max(self._peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.source == "cuda_max_allocated":
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        elif self.source == "rss_sampled":
            self._stop.set()
            self._thread.join()
            import psutil  # optional: present, as __enter__ found

            self.peak_mib = max(self._peak, psutil.Process().memory_info().rss) / 2**20
        else:
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return False
