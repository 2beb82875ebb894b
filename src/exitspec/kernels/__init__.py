"""exitspec's own CPU kernels (csrc/): few-row products over a GGUF checkpoint's q4/q8 weights, decode
attention, and a fused Llama-family layer stack.

They are C++ with AVX512-BF16 intrinsics, compiled on first use with the machine's C++ compiler
through torch's extension builder (~40 s once) and cached under the exitspec cache folder, keyed by
the sources, the flags and the torch version. Where they cannot run (no AVX512-BF16, no compiler,
`EXITSPEC_KERNELS=0`), `load()` returns None with the reason in `unavailable_reason()`, and the
runtime keeps torch's own kernels: slower, never wrong.
"""

from exitspec.kernels.build import load, unavailable_reason

__all__ = ["load", "unavailable_reason"]
