"""Build (once) and load the C++ kernels for this CPU's instruction set; say plainly why when they
cannot be used."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from exitspec.paths import cache_dir


@dataclass(frozen=True)
class Isa:
    """One build of the kernels: the compiler flags, the CPU flags they need, the product source."""

    name: str
    cpu_flags: tuple[str, ...]
    cflags: tuple[str, ...]
    gemm: str  # the source with this instruction set's products (gemm.h is their interface)
    kquant: str  # the source with its products over GGML K-quant blocks (kquant.h)


# Best first. Explicit ISA flags rather than -march=native: the cached binary is keyed by these, and
# the CPU is checked for exactly them before loading. -fopenmp: at::parallel_for expands to OpenMP
# pragmas in our own code; the runtime is the libgomp torch already loaded (same soname).
ISAS = (
    # avx512_vnni: the q8 LM head's vpdpbusd (every AVX512-BF16 CPU has it).
    Isa("avx512bf16", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni", "f16c", "fma"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni", "-mf16c", "-mfma"),
        "gemm_avx512.cpp", "kquant_avx512.cpp"),
    Isa("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"), "gemm_avx2.cpp", "kquant_avx2.cpp"),
)
SOURCES = ("attention.cpp", "llama.cpp", "kquant_ops.cpp", "gemma.cpp")
HEADERS = ("vec.h", "gemm.h", "attention.h", "ggml_blocks.h", "kquant.h", "kquant_matrix.h", "stack.h")
COMMON_CFLAGS = ("-O3", "-fopenmp")
OFF = ("0", "off", "false", "no")

_state: dict[str, tuple[ModuleType | None, str | None]] = {}


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


def _isa(name: str) -> Isa:
    for isa in ISAS:
        if isa.name == name:
            return isa
    raise ValueError(f"unknown kernel instruction set {name!r}; known: {', '.join(i.name for i in ISAS)}")


def _why_not(isa: Isa) -> str | None:
    """Why `isa`'s build cannot run here (None: it can)."""
    if sys.platform != "linux":
        return f"the kernels are built for Linux only (this is {sys.platform})"
    flags = _cpu_flags()
    if flags is None:
        return "could not read the CPU's instruction sets from /proc/cpuinfo"
    missing = [f for f in isa.cpu_flags if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)} (the {isa.name} kernels need them)"
    return None


def supported_isas() -> list[str]:
    """The instruction sets whose kernels this CPU runs, best first."""
    return [isa.name for isa in ISAS if _why_not(isa) is None]


def chosen_isa() -> tuple[str | None, str | None]:
    """(the instruction set the runtime uses, None) or (None, why none): the best this CPU runs, or
    the one `EXITSPEC_KERNELS` names (`0` turns the kernels off; `avx2` on an AVX-512 machine runs
    the AVX2 build, e.g. to test it)."""
    want = os.environ.get("EXITSPEC_KERNELS", "").strip().lower()
    if want in OFF:
        return None, "disabled by EXITSPEC_KERNELS=0"
    if want and want not in ("1", "on", "auto"):
        isa = _isa(want)
        why = _why_not(isa)
        return (None, f"EXITSPEC_KERNELS={want}: {why}") if why else (isa.name, None)
    reasons = []
    for isa in ISAS:
        why = _why_not(isa)
        if why is None:
            return isa.name, None
        reasons.append(why)
    return None, reasons[-1]


def _build_dir(isa: Isa) -> Path:
    h = hashlib.sha256()
    for name in (isa.gemm, isa.kquant, *SOURCES, *HEADERS):
        h.update(name.encode())
        h.update((_csrc() / name).read_bytes())
    h.update(" ".join(COMMON_CFLAGS + isa.cflags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return cache_dir() / "kernels" / f"{isa.name}-{h.hexdigest()[:16]}"


def _import_built(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(isa: Isa) -> ModuleType:
    folder = _build_dir(isa)
    name = f"exitspec_kernels_{isa.name}"
    built = folder / f"{name}.so"
    if built.is_file():
        try:
            return _import_built(name, built)
        except (ImportError, OSError):  # a link cut short (an interrupted first run): build it again
            built.unlink()
    from torch.utils.cpp_extension import load as build  # start-up: only a first build needs the compiler driver

    folder.mkdir(parents=True, exist_ok=True)
    print(f"exitspec: compiling the CPU kernels for {isa.name} (once per machine, ~40 s)...", file=sys.stderr,
          flush=True)
    return build(name=name, sources=[str(_csrc() / s) for s in (isa.gemm, isa.kquant, *SOURCES)],
                 extra_cflags=list(COMMON_CFLAGS + isa.cflags), extra_ldflags=["-fopenmp"],
                 build_directory=str(folder), verbose=False)


def load_isa(name: str) -> ModuleType | None:
    """The kernels built for instruction set `name`, building them on first use; None (see
    `unavailable_reason(name)`) where this CPU cannot run them or the build fails."""
    if name not in _state:
        isa = _isa(name)
        reason = _why_not(isa)
        mod = None
        if reason is None:
            try:
                mod = _build(isa)
            except Exception as err:  # a missing compiler or ninja, a failed build: fall back, say why
                reason = f"building them failed ({type(err).__name__}: {str(err).strip().splitlines()[-1][:300]})"
        _state[name] = (mod, reason)
    return _state[name][0]


def load() -> ModuleType | None:
    """The kernel module the runtime uses (`chosen_isa`), building it on first use; None (see
    `unavailable_reason`) if none can be used on this machine. `module.ISA` names its build."""
    if "" not in _state:
        name, reason = chosen_isa()
        mod = load_isa(name) if name else None
        _state[""] = (mod, reason if name is None else _state[name][1])
    return _state[""][0]


def unavailable_reason(name: str | None = None) -> str | None:
    """Why `load()` (or `load_isa(name)`) returned None; None when the kernels are in use."""
    if name is None:
        load()
        return _state[""][1]
    load_isa(name)
    return _state[name][1]
