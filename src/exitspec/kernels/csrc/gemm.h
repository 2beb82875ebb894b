// Few-row products with weights kept as a GGUF checkpoint stores them. One interface, two
// implementations, one per build: gemm_avx512.cpp (bf16 dot products) and gemm_avx2.cpp (int8 dot
// products); each packs the weights in the byte layout its inner loop reads and describes it.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "vec.h"

namespace exitspec {

constexpr int kGroup = 32;   // weights per quantization group along the input dimension
constexpr int kBlockN = 16;  // the interface takes output sizes that are multiples of this

// GGUF's Q8_0 rule for a group of activations whose largest magnitude is `amax`, one definition for
// both builds (their int8 codes must be the same): scale d = amax / 127, codes round(x * id) with
// id = 127 / amax. A group holding a NaN or an infinity (finite == false) gets a NaN scale, so it
// reaches the row's outputs as in fp32; one so small that 127 / amax overflows (max |x| < ~4e-37), or
// all zero, is taken as zeros.
struct Q8Scale {
  float d, id;
};
inline Q8Scale q8_scale(float amax, bool finite) {
  float d = finite ? amax / 127.0f : NAN, id = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
  if (!std::isfinite(id)) id = 0.0f, d = 0.0f;
  return {d, id};
}

// Which build this is ("avx512bf16" or "avx2"), and a sentence on how its products round.
extern const char* const kIsa;
extern const char* const kNumerics;

// Packed sizes in bytes, and the packers: q4 codes 0..15 (N, K) with (N, K / 32) fp16-exact scale and
// low (w = scale * q + low, GGUF Q4_0 / Q4_1); q8 codes (N, K) int8 with fp16-exact scales (w = scale
// * q, GGUF Q8_0).
int64_t q4_packed_bytes(int N, int K);
int64_t q8_packed_bytes(int N, int K);
void pack_q4(const uint8_t* q, const float* scale, const float* low, int N, int K, uint8_t* out);
void pack_q8(const int8_t* q, const float* scale, int N, int K, uint8_t* out);

// Activations prepared once for every q4 product that reads them (a row's preparation never depends
// on the other rows). AVX-512: the rows rounded to bf16 and, per group, the sum of those bf16 values.
// AVX2: the rows quantized to int8 per group of 32 (scale = max |x| / 127, GGUF's Q8_0 rule), the
// scales, and per group the sum of the rounded values (the term a group's low multiplies).
struct Q4Input {
  int M = 0, K = 0;
#if EXITSPEC_AVX512
  std::vector<uint16_t> xb;  // (M, K) bf16 bits
#else
  std::vector<int8_t> xq;    // (M, K)
  std::vector<float> xd;     // (M, K / 32) scales
#endif
  std::vector<float> xs;     // (M, K / 32)
  const Q4Input& set(const float* x, int rows, int cols);
};

// Y (M, N) [+]= x W^T (+ bias), W packed q4. ldy: row stride of Y.
void q4_gemm(const uint8_t* W, int N, const Q4Input& in, const float* bias, float* Y, int ldy, bool accumulate);

// Y (M, N) = x W^T, W packed q8, x fp32 (M, K).
void q8_gemm(const uint8_t* W, int N, const float* x, int M, int K, float* Y, int ldy);

}  // namespace exitspec
