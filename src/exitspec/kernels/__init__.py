"""exitspec's own CPU kernels (csrc/): few-row products over a GGUF checkpoint's q4/q8 weights, decode
attention, and a fused Llama-family layer stack.

They are C++ with SIMD intrinsics in two builds, compiled on first use with the machine's C++
compiler through torch's extension builder (slow, so once each) and cached under the exitspec cache
folder, keyed by the sources, the flags and the torch version:
  * avx512bf16 (AVX-512 with BF16 and VNNI, e.g. Zen 4/5, Sapphire Rapids): products' inputs rounded
    to bf16, vdpbf16ps dot products; the q8 LM head's inputs quantized to int8 per group of 32 as on
    AVX2, vpdpbusd dot products (csrc/gemm_avx512.cpp);
  * avx2 (AVX2 + FMA + F16C, any x86-64 of the last decade): inputs rounded to int8 per group of 32
    (llama.cpp's q8_0 scheme), vpmaddubsw dot products (csrc/gemm_avx2.cpp).
The rest (attention, norms, RoPE, the fused Llama stack) is one source over csrc/vec.h, a 16-float
vector type mapped to one zmm or two ymm registers. The best build the CPU runs is used;
`EXITSPEC_KERNELS` names another or turns them off (`0`). Where none can run (no AVX2, no compiler),
`load()` returns None with the reason in `unavailable_reason()`, and the runtime keeps torch's own
kernels: slower, never wrong.
"""

from exitspec.kernels.build import chosen_isa, load, supported_isas, unavailable_reason

__all__ = ["chosen_isa", "load", "supported_isas", "unavailable_reason"]
