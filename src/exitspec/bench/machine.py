"""A one-line description of the machine a benchmark ran on (stored with every result)."""

from __future__ import annotations

import os
import platform

import torch


def describe_machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "mem_gib": mem_gib,
            "gpu": gpu, "torch": torch.__version__, "python": platform.python_version()}


def machine_line(m: dict | None = None) -> str:
    m = m or describe_machine()
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (f"{m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), {m['mem_gib']} GiB{gpu}; "
            f"torch {m['torch']}, Python {m['python']}")
