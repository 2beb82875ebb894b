// Few-row products with weights kept as a GGUF checkpoint stores them (see gemm.cpp).
#pragma once
#include <cstdint>

namespace exitspec {

constexpr int kGroup = 32;       // weights per quantization group along the input dimension
constexpr int kBlockN = 16;      // outputs per packed block (one zmm of fp32 results)
constexpr int kQ4GroupBytes = 320;  // 16 outputs x 32 inputs: 256 B of nibbles + 16 fp16 scales + 16 fp16 lows
constexpr int kQ8GroupBytes = 544;  // 16 outputs x 32 inputs: 512 B of int8 + 16 fp16 scales

// Activations prepared for the q4 product: bf16 copies of the rows and, per row and group, the sum
// of the bf16 values (the term the group's low / zero point multiplies).
struct Q4Input {
  const uint16_t* xb;  // (M, K) bf16 bits
  const float* xs;     // (M, K / 32)
  int M, K;
};

// x (M, K) fp32 -> xb, xs as above (row by row; a row's results never depend on the others).
void q4_prepare(const float* x, int M, int K, uint16_t* xb, float* xs);

// Y (M, N) [+]= x W^T (+ bias), W packed q4 (N / 16 blocks of K / 32 groups). ldy: row stride of Y.
void q4_gemm(const uint8_t* W, int N, const Q4Input& in, const float* bias, float* Y, int ldy, bool accumulate);

// Y (M, N) = x W^T, W packed q8 (int8 with one fp16 scale per 32, GGUF Q8_0), x fp32.
void q8_gemm(const uint8_t* W, int N, const float* x, int M, int K, float* Y, int ldy);

}  // namespace exitspec
