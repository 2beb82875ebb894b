"""Build (once) and load the C++ kernels; say plainly why when they cannot be used."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

SOURCES = ("gemm.cpp", "attention.cpp", "llama.cpp")
HEADERS = ("vec.h", "gemm.h", "attention.h")
# Explicit ISA flags rather than -march=native: the cached binary is keyed by these, and the CPU is
# checked for exactly them before loading. -fopenmp: at::parallel_for expands to OpenMP pragmas in our
# own code; the runtime is the libgomp torch already loaded (same soname).
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mf16c", "-mfma",
          "-fopenmp"]
NEEDED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "f16c", "fma")

_state: dict = {}


def _csrc() -> Path:
    return Path(__file__).with_name("csrc")


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _why_not() -> str | None:
    if os.environ.get("EXITSPEC_KERNELS", "1").lower() in ("0", "off", "false", "no"):
        return "disabled by EXITSPEC_KERNELS=0"
    if sys.platform != "linux":
        return f"the kernels are built for Linux only (this is {sys.platform})"
    flags = _cpu_flags()
    if flags is None:
        return "could not read the CPU's instruction sets from /proc/cpuinfo"
    missing = [f for f in NEEDED_CPU_FLAGS if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)} (the kernels need AVX512-BF16)"
    return None


def _build_dir() -> Path:
    from exitspec.models.loading import cache_dir

    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((_csrc() / name).read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return cache_dir() / "kernels" / h.hexdigest()[:16]


def _import_built(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("exitspec_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load() -> ModuleType | None:
    """The compiled kernel module, building it on first use; None (see `unavailable_reason`) if it
    cannot be used on this machine."""
    if "module" in _state:
        return _state["module"]
    reason = _why_not()
    mod = None
    if reason is None:
        folder = _build_dir()
        built = folder / "exitspec_kernels.so"
        try:
            if built.is_file():
                mod = _import_built(built)
            else:
                from torch.utils.cpp_extension import load as build

                folder.mkdir(parents=True, exist_ok=True)
                print("exitspec: compiling the CPU kernels (once per machine, ~40 s)...", file=sys.stderr, flush=True)
                mod = build(name="exitspec_kernels", sources=[str(_csrc() / s) for s in SOURCES],
                            extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], build_directory=str(folder),
                            verbose=False)
        except Exception as err:  # a missing compiler or ninja, a failed build: fall back, say why
            reason = f"building them failed ({type(err).__name__}: {str(err).strip().splitlines()[-1][:300]})"
            mod = None
    _state["module"], _state["reason"] = mod, reason
    return mod


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None when the kernels are in use)."""
    load()
    return _state["reason"]
