// Few-row products over weights stored as GGML Q4_K, Q5_0, Q6_K or Q8_0 blocks (a llama.cpp
// "K-quant" GGUF such as Gemma 3 270M's Q4_K_M; Q4_0 too, packed as Q5_0), read from their own codes
// and scales. One interface,
// two implementations, one per build: kquant_avx512.cpp (bf16 dot products) and kquant_avx2.cpp
// (int8 dot products). The products' inputs are prepared exactly as for the q4 product (gemm.h's
// Q4Input: bf16 on AVX-512, int8 per group of 32 on AVX2), so every projection of a layer rounds its
// input the same way, whatever block type its weights are stored in.
#pragma once
#include <cstdint>

#include "gemm.h"
#include "ggml_blocks.h"

namespace exitspec {

// Packed size in bytes of an (N, K) weight of GGML type `type` (ggml_blocks.h) in this build's layout;
// N a multiple of 16, K of the type's block size.
int64_t kq_packed_bytes(int type, int N, int K);

// Pack N rows of blocks as the GGUF stores them (`raw`: N rows of K / weights-per-block blocks).
void kq_pack(int type, const uint8_t* raw, int N, int K, uint8_t* out);

// Y (M, N) with row stride ldy = x W^T, W packed by kq_pack, x prepared by Q4Input::set. A row's result
// depends on that row alone (outputs are split over threads, never the reduction).
void kq_gemm(int type, const uint8_t* W, int N, const Q4Input& in, float* Y, int ldy);

}  // namespace exitspec
