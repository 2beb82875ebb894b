// Few-row matrix products over GGUF-style quantized weights, for decode steps of 1..~16 rows: the
// AVX512-BF16 build (gemm_avx2.cpp is the AVX2 one; gemm.h the interface both implement).
//
// Why our own kernel: torch's int4 CPU kernel (_weight_int4pack_mm_for_cpu) dequantizes the weights
// again for every block of 4 rows (so 8 rows cost 2x 4 rows), rounds the per-group scale and zero
// point to bf16 (~2^-9 relative error per group), and pays ~10 us per call in dispatch. Here:
//   * every group's weights are expanded once per call and used by all rows (up to 8 at a time);
//   * the 4-bit codes q (0..15) are exact in bf16, so x * q is exact in the fp32 products of
//     AVX512-BF16's vdpbf16ps; each group's sum is then scaled by the checkpoint's own fp16 scale and
//     low: y = sum_g scale_g * (x_g . q_g) + low_g * sum(x_g). The only rounding of the weights'
//     arithmetic is x -> bf16 (as in torch's kernel) and fp32 accumulation;
//   * a row's result never depends on how many rows share the call or how the outputs are split
//     over threads (outputs are split, never the reduction), which lossless speculative decoding
//     needs: verification (k rows) must reproduce vanilla decoding (1 row) bit for bit.
//
// Packed q4 layout, per block of 16 outputs, per group of 32 inputs (320 bytes, contiguous so that
// one block streams through memory in order):
//   8 "quads" of 4 inputs k0..k3, 32 bytes each: byte 2j = q[j,k0] | q[j,k2] << 4,
//                                               byte 2j+1 = q[j,k1] | q[j,k3] << 4
//   (zero-extending the 32 bytes to 32 words puts (q[j,k0], q[j,k1]) in dword lane j, a vdpbf16ps
//   pair; a 4-bit shift gives (q[j,k2], q[j,k3])), then 16 fp16 scales, then 16 fp16 lows.
//
// The q8 LM head (GGUF Q8_0: w = d * q, q int8) is a third of a small model's step bytes (178 MB of
// Gemma 3 270M's 247), so it must run at the read roofline. Widening the codes to fp32 for fp32 FMAs
// costs 3 instructions per 16 weights per row: 1 row read ~75% of the streaming rate on 2 Zen cores,
// 8 rows ~45% (compute-bound). So by default the head quantizes its input rows to int8 per group of 32
// exactly as the AVX2 build does (scale xd = max|x| / 127, codes round-half-even(x * 127 / max|x|)) and
// multiplies with AVX512-VNNI's vpdpbusd: 64 byte products per instruction, 1 instruction per 64
// weights per row. vpdpbusd takes unsigned x signed bytes; the weights are stored offset by 128 (u =
// q + 128, 1..255) and the row's int8 codes xq, broadcast 4 at a time, are the signed operand, so
//     sum_k u[k] * xq[k] = sum_k q[k] * xq[k] + 128 * sum_k xq[k]
// and a group's accumulator starts at -128 * sum_k xq[k] (per row and group, computed once with the
// codes): the group's dot product is the exact integer the AVX2 build computes, then scaled the same
// way (fp32: tot += float(dot) * (d * xd), groups in order), so both builds give the head the same
// numerics (and, finite inputs, the same bits). |dot| <= 32 * 255 * 127: no overflow in 32 bits.
// EXITSPEC_Q8_HEAD=fp32 (read once, at load) keeps the former head instead: fp32 inputs, int8 codes
// widened to fp32, fp32 FMAs; the packing follows the same switch.
// Packed q8 layout, per block of 16 outputs and group of 32 inputs (544 bytes, in stream order):
//   int8 head: 8 quads of 4 inputs, 64 bytes each: byte 4j + i = q[j, 4qd + i] + 128 (a dword per
//              output, as vpdpbusd reads it), then 16 fp16 scales;
//   fp32 head: 32 inputs x 16 bytes (q[j,k] for j = 0..15), then 16 fp16 scales.
#include "gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "vec.h"

namespace exitspec {

const char* const kIsa = "avx512bf16";
namespace {
// EXITSPEC_Q8_HEAD=fp32: the fp32 q8 head (see the top of this file); anything else: the int8 head.
bool q8_head_fp32() {
  static const bool fp32 = [] {
    const char* v = std::getenv("EXITSPEC_Q8_HEAD");
    return v != nullptr && std::strcmp(v, "fp32") == 0;
  }();
  return fp32;
}
}  // namespace

const char* const kNumerics =
    q8_head_fp32() ? "q4 products from bf16-rounded inputs, q8 LM head in fp32 (EXITSPEC_Q8_HEAD=fp32)"
                   : "q4 products from bf16-rounded inputs, q8 LM head from inputs quantized to int8 per group of "
                     "32 (scale max|x|/127)";

constexpr int kQ4GroupBytes = 320;  // 16 outputs x 32 inputs: 256 B of nibbles + 16 fp16 scales + 16 fp16 lows
constexpr int kQ8GroupBytes = 544;  // 16 outputs x 32 inputs: 512 B of int8 + 16 fp16 scales

int64_t q4_packed_bytes(int N, int K) { return (int64_t)(N / kBlockN) * (K / kGroup) * kQ4GroupBytes; }
int64_t q8_packed_bytes(int N, int K) { return (int64_t)(N / kBlockN) * (K / kGroup) * kQ8GroupBytes; }

void pack_q4(const uint8_t* q, const float* scale, const float* low, int N, int K, uint8_t* out) {
  const int G = K / kGroup;
  for (int nb = 0; nb < N / kBlockN; ++nb)
    for (int g = 0; g < G; ++g) {
      uint8_t* dst = out + ((size_t)nb * G + g) * kQ4GroupBytes;
      for (int qd = 0; qd < 8; ++qd)
        for (int j = 0; j < kBlockN; ++j) {
          const uint8_t* c = q + (size_t)(nb * kBlockN + j) * K + g * kGroup + 4 * qd;
          dst[qd * 32 + 2 * j] = (uint8_t)(c[0] | c[2] << 4);
          dst[qd * 32 + 2 * j + 1] = (uint8_t)(c[1] | c[3] << 4);
        }
      uint16_t* sl = (uint16_t*)(dst + 256);
      for (int j = 0; j < kBlockN; ++j) {
        const size_t at = (size_t)(nb * kBlockN + j) * G + g;
        sl[j] = _cvtss_sh(scale[at], _MM_FROUND_TO_NEAREST_INT);
        sl[kBlockN + j] = _cvtss_sh(low[at], _MM_FROUND_TO_NEAREST_INT);
      }
    }
}

void pack_q8(const int8_t* q, const float* scale, int N, int K, uint8_t* out) {
  const int G = K / kGroup;
  const bool fp32 = q8_head_fp32();
  for (int nb = 0; nb < N / kBlockN; ++nb)
    for (int g = 0; g < G; ++g) {
      uint8_t* dst = out + ((size_t)nb * G + g) * kQ8GroupBytes;
      for (int k = 0; k < kGroup; ++k)
        for (int j = 0; j < kBlockN; ++j) {
          const int8_t c = q[(size_t)(nb * kBlockN + j) * K + g * kGroup + k];
          if (fp32) dst[k * 16 + j] = (uint8_t)c;
          else dst[(k / 4) * 64 + 4 * j + k % 4] = (uint8_t)(c + 128);
        }
      uint16_t* sc = (uint16_t*)(dst + 512);
      for (int j = 0; j < kBlockN; ++j) sc[j] = _cvtss_sh(scale[(size_t)(nb * kBlockN + j) * G + g], _MM_FROUND_TO_NEAREST_INT);
    }
}

// Round 16 floats to bf16 (round to nearest even, the AVX512-BF16 instruction) and back to float.
static inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
static inline __m512 from_bf16(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

const Q4Input& Q4Input::set(const float* x, int rows, int cols) {
  M = rows, K = cols;
  const int G = K / kGroup;
  xb.resize((size_t)M * K);
  xs.resize((size_t)M * G);
  for (int m = 0; m < M; ++m) {
    for (int g = 0; g < G; ++g) {
      const float* src = x + (size_t)m * K + g * kGroup;
      uint16_t* dst = xb.data() + (size_t)m * K + g * kGroup;
      __m256i b0 = to_bf16(_mm512_loadu_ps(src)), b1 = to_bf16(_mm512_loadu_ps(src + 16));
      _mm256_storeu_si256((__m256i*)dst, b0);
      _mm256_storeu_si256((__m256i*)(dst + 16), b1);
      xs[(size_t)m * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(from_bf16(b0), from_bf16(b1)));
    }
  }
  return *this;
}

namespace {

// bf16 of 0..15, indexed by the low 5 bits of a word (the table repeats: bit 4 is the next nibble).
inline __m512i nibble_table() {
  return _mm512_set_epi16(0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0,
                          0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120,
                          0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
}

// Software prefetch of the group `ahead` groups further along each block's stream: the hardware
// prefetchers alone left a 1-row product at ~25 GB/s of the ~39 this 2-core machine streams; with
// this it reaches ~36 (Zen 5, 30 layers of the default model's shapes, cold caches).
constexpr int kQ4Ahead = 5, kQ8Ahead = 3;

// `blk` + `offset` bytes, formed as an integer: past a weight's last tile the address lies beyond the
// buffer (a prefetch never faults, but a pointer there would be undefined behaviour).
inline void prefetch_bytes(const uint8_t* blk, size_t offset, int bytes) {
  const uintptr_t at = (uintptr_t)blk + offset;
  for (int off = 0; off < bytes; off += 64) _mm_prefetch((const char*)(at + off), _MM_HINT_T0);
}

inline void store_out(float* y, __m512 v, const float* bias, bool accumulate) {
  if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
  if (accumulate) v = _mm512_add_ps(_mm512_loadu_ps(y), v);
  _mm512_storeu_ps(y, v);
}

// M rows (<= 8) x NB consecutive blocks of 16 outputs starting at block nb0.
template <int M, int NB>
void q4_tile(const uint8_t* W, int nb0, const Q4Input& in, int m0, const float* bias, float* Y, int ldy,
             bool accumulate) {
  const int K = in.K, G = K / kGroup;
  const __m512i table = nibble_table();
  __m512 tot[M][NB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) tot[m][b] = _mm512_setzero_ps();
  const uint8_t* blk[NB];
  for (int b = 0; b < NB; ++b) blk[b] = W + (size_t)(nb0 + b) * G * kQ4GroupBytes;
  for (int g = 0; g < G; ++g) {
    __m512 acc[M][NB];
    for (int m = 0; m < M; ++m)
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
    // Past a block's last group, fetch the start of the block this stream reads next (NB blocks on):
    // the next tile then starts warm (1-row product 1.86 -> 1.49 ms over the default model's layers).
    for (int b = 0; b < NB; ++b) {
      const int ga = g + kQ4Ahead;
      prefetch_bytes(blk[b], (size_t)(ga < G ? ga : NB * G + ga - G) * kQ4GroupBytes, kQ4GroupBytes);
    }
    const uint32_t* xg[M];  // bf16 pairs of this group's inputs
    for (int m = 0; m < M; ++m) xg[m] = (const uint32_t*)(in.xb.data() + (size_t)(m0 + m) * K + g * kGroup);
#pragma GCC unroll 8
    for (int qd = 0; qd < 8; ++qd) {
      __m512i w01[NB], w23[NB];
      for (int b = 0; b < NB; ++b) {
        const __m512i v =
            _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(blk[b] + g * kQ4GroupBytes + qd * 32)));
        w01[b] = _mm512_permutexvar_epi16(v, table);
        w23[b] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
      }
      for (int m = 0; m < M; ++m) {
        const __m512bh x01 = (__m512bh)_mm512_set1_epi32(xg[m][2 * qd]);
        const __m512bh x23 = (__m512bh)_mm512_set1_epi32(xg[m][2 * qd + 1]);
        for (int b = 0; b < NB; ++b) {
          acc[m][b] = _mm512_dpbf16_ps(acc[m][b], (__m512bh)w01[b], x01);
          acc[m][b] = _mm512_dpbf16_ps(acc[m][b], (__m512bh)w23[b], x23);
        }
      }
    }
    for (int b = 0; b < NB; ++b) {
      const uint8_t* sl = blk[b] + g * kQ4GroupBytes + 256;
      const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sl));
      const __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sl + 32)));
      for (int m = 0; m < M; ++m) {
        tot[m][b] = _mm512_fmadd_ps(acc[m][b], scale, tot[m][b]);
        tot[m][b] = _mm512_fmadd_ps(low, _mm512_set1_ps(in.xs[(size_t)(m0 + m) * G + g]), tot[m][b]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) {
      const int n = (nb0 + b) * kBlockN;
      store_out(Y + (size_t)(m0 + m) * ldy + n, tot[m][b], bias ? bias + n : nullptr, accumulate);
    }
}

template <int NB>
void q4_rows(const uint8_t* W, int nb0, const Q4Input& in, int m0, int rows, const float* bias, float* Y, int ldy,
             bool acc) {
  switch (rows) {
    case 1: q4_tile<1, NB>(W, nb0, in, m0, bias, Y, ldy, acc); break;
    case 2: q4_tile<2, NB>(W, nb0, in, m0, bias, Y, ldy, acc); break;
    case 3: q4_tile<3, NB>(W, nb0, in, m0, bias, Y, ldy, acc); break;
    case 4: q4_tile<4, NB>(W, nb0, in, m0, bias, Y, ldy, acc); break;
    case 5: q4_tile<5, NB>(W, nb0, in, m0, bias, Y, ldy, acc); break;
    case 6: q4_tile<6, NB>(W, nb0, in, m0, bias, Y, ldy, acc); break;
    case 7: q4_tile<7, NB>(W, nb0, in, m0, bias, Y, ldy, acc); break;
    default: q4_tile<8, NB>(W, nb0, in, m0, bias, Y, ldy, acc); break;
  }
}

// Blocks of outputs per tile: more blocks reuse each broadcast input more, fewer rows leave the
// registers for them (measured on Zen 5, 2048 x 576, one thread: NB=4 best up to 6 rows, 2 above).
inline int q4_blocks_per_tile(int M) { return M <= 6 ? 4 : 2; }

// The fp32 head (EXITSPEC_Q8_HEAD=fp32): M rows x NB blocks of 16 outputs starting at block nb0.
template <int M, int NB>
void q8_tile_fp32(const uint8_t* W, int nb0, const float* x, int K, int m0, float* Y, int ldy) {
  const int G = K / kGroup;
  __m512 tot[M][NB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) tot[m][b] = _mm512_setzero_ps();
  const uint8_t* blk[NB];
  for (int b = 0; b < NB; ++b) blk[b] = W + (size_t)(nb0 + b) * G * kQ8GroupBytes;
  for (int g = 0; g < G; ++g) {
    __m512 acc[M][NB];
    for (int m = 0; m < M; ++m)
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
    for (int b = 0; b < NB; ++b) {
      const int ga = g + kQ8Ahead;
      prefetch_bytes(blk[b], (size_t)(ga < G ? ga : NB * G + ga - G) * kQ8GroupBytes, kQ8GroupBytes);
    }
#pragma GCC unroll 8
    for (int k = 0; k < kGroup; ++k) {
      __m512 w[NB];
      for (int b = 0; b < NB; ++b)
        w[b] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk[b] + g * kQ8GroupBytes + k * 16))));
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_set1_ps(x[(size_t)(m0 + m) * K + g * kGroup + k]);
        for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_fmadd_ps(w[b], xv, acc[m][b]);
      }
    }
    for (int b = 0; b < NB; ++b) {
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk[b] + g * kQ8GroupBytes + 512)));
      for (int m = 0; m < M; ++m) tot[m][b] = _mm512_fmadd_ps(acc[m][b], d, tot[m][b]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(Y + (size_t)(m0 + m) * ldy + (nb0 + b) * kBlockN, tot[m][b]);
}

// Rows quantized to int8 per group of 32 for the int8 head: codes, scales and the offset's correction.
struct Q8Rows {
  int M = 0, K = 0;
  std::vector<int8_t> xq;   // (M, K)
  std::vector<float> xd;    // (M, K / 32) scales
  std::vector<int32_t> xc;  // (M, K / 32): -128 * the group's sum of codes, a group accumulator's start

  // GGUF's Q8_0 rule, with the AVX2 build's arithmetic (gemm_avx2.cpp Q4Input::set) so that both
  // builds read the same codes: d = amax / 127, codes = round-half-even(x * (127 / amax)). A group
  // holding a NaN or an infinity gets a NaN scale (it reaches the row's outputs as in fp32); one so
  // small that 127 / amax overflows (max |x| < ~4e-37) is taken as zeros.
  void set(const float* x, int rows, int cols) {
    M = rows, K = cols;
    const int G = K / kGroup;
    xq.resize((size_t)M * K);
    xd.resize((size_t)M * G);
    xc.resize((size_t)M * G);
    for (int m = 0; m < M; ++m)
      for (int g = 0; g < G; ++g) {
        const float* src = x + (size_t)m * K + g * kGroup;
        const __m512 v0 = _mm512_loadu_ps(src), v1 = _mm512_loadu_ps(src + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        // x - x is 0 for a finite x and NaN for a NaN or an infinity
        const bool finite = _mm512_cmp_ps_mask(_mm512_sub_ps(v0, v0), _mm512_setzero_ps(), _CMP_EQ_OQ) == 0xFFFF &&
                            _mm512_cmp_ps_mask(_mm512_sub_ps(v1, v1), _mm512_setzero_ps(), _CMP_EQ_OQ) == 0xFFFF;
        const Q8Scale s = q8_scale(amax, finite);
        // round to nearest even (the default MXCSR mode); |x * id| <= 127 by construction
        const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(s.id)));
        const __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(s.id)));
        int8_t* dst = xq.data() + (size_t)m * K + g * kGroup;
        _mm_storeu_si128((__m128i*)dst, _mm512_cvtsepi32_epi8(c0));
        _mm_storeu_si128((__m128i*)(dst + 16), _mm512_cvtsepi32_epi8(c1));
        xd[(size_t)m * G + g] = s.d;
        xc[(size_t)m * G + g] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
      }
  }
};

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The int8 head: M rows x NB blocks of 16 outputs starting at block nb0 (see the top of this file).
// q8_gemm runs it one block at a time (NB = 1): a thread's blocks are then one sequential stream,
// which the hardware prefetchers follow without help. Measured on a loaded Zen machine, one thread:
// 1 and 4 rows streamed as fast as a plain sum of the same bytes with NB = 1 and no software
// prefetch, 1.1-1.3x slower with NB = 2 or 4 or with prefetching 3 groups ahead.
template <int M, int NB>
void q8_tile(const uint8_t* W, int nb0, const Q8Rows& in, int m0, float* Y, int ldy) {
  const int K = in.K, G = K / kGroup;
  __m512 tot[M][NB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) tot[m][b] = _mm512_setzero_ps();
  const uint8_t* blk[NB];
  for (int b = 0; b < NB; ++b) blk[b] = W + (size_t)(nb0 + b) * G * kQ8GroupBytes;
  for (int g = 0; g < G; ++g) {
    const int8_t* xg[M];
    __m512i acc[M][NB];  // int32, output j in lane j; starts at the offset's correction
    for (int m = 0; m < M; ++m) {
      xg[m] = in.xq.data() + (size_t)(m0 + m) * K + g * kGroup;
      const __m512i c = _mm512_set1_epi32(in.xc[(size_t)(m0 + m) * G + g]);
      for (int b = 0; b < NB; ++b) acc[m][b] = c;
    }
#pragma GCC unroll 8
    for (int qd = 0; qd < 8; ++qd) {
      __m512i w[NB];
      for (int b = 0; b < NB; ++b) w[b] = _mm512_loadu_si512(blk[b] + (size_t)g * kQ8GroupBytes + qd * 64);
      for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_set1_epi32(load_i32(xg[m] + 4 * qd));
        for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbusd_epi32(acc[m][b], w[b], xv);
      }
    }
    for (int b = 0; b < NB; ++b) {
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk[b] + (size_t)g * kQ8GroupBytes + 512)));
      for (int m = 0; m < M; ++m)
        tot[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][b]),
                                    _mm512_mul_ps(d, _mm512_set1_ps(in.xd[(size_t)(m0 + m) * G + g])), tot[m][b]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(Y + (size_t)(m0 + m) * ldy + (nb0 + b) * kBlockN, tot[m][b]);
}

// Rows 1..8 -> the tile instantiated for that count (the accumulators must be compile-time arrays to
// stay in registers); 5..8 rows one block at a time (more would not fit the registers), so the codes
// are loaded once for all rows.
template <template <int, int> class Tile, int NB, typename... Args>
void by_rows(int rows, Args&&... args) {
  switch (rows) {
    case 1: Tile<1, NB>::run(args...); break;
    case 2: Tile<2, NB>::run(args...); break;
    case 3: Tile<3, NB>::run(args...); break;
    case 4: Tile<4, NB>::run(args...); break;
    case 5: Tile<5, 1>::run(args...); break;
    case 6: Tile<6, 1>::run(args...); break;
    case 7: Tile<7, 1>::run(args...); break;
    default: Tile<8, 1>::run(args...); break;
  }
}
template <int M, int NB>
struct Q8Tile {
  template <typename... A>
  static void run(A&&... a) { q8_tile<M, NB>(a...); }
};
template <int M, int NB>
struct Q8TileFp32 {
  template <typename... A>
  static void run(A&&... a) { q8_tile_fp32<M, NB>(a...); }
};

// Split the output blocks over threads (never the reduction) and walk all rows in tiles of
// `max_rows`; `tile(nb, nblocks_in_tile, m0, rows)` computes one tile.
template <typename Tile>
void for_tiles(int nblocks, int per_tile, int M, int max_rows, const Tile& tile) {
  const int items = nblocks / per_tile;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int m0 = 0; m0 < M; m0 += max_rows) tile((int)i * per_tile, per_tile, m0, std::min(max_rows, M - m0));
  });
  for (int nb = items * per_tile; nb < nblocks; ++nb)
    for (int m0 = 0; m0 < M; m0 += max_rows) tile(nb, 1, m0, std::min(max_rows, M - m0));
}

}  // namespace

void q4_gemm(const uint8_t* W, int N, const Q4Input& in, const float* bias, float* Y, int ldy, bool accumulate) {
  const int nblocks = N / kBlockN;
  const int per_tile = q4_blocks_per_tile(std::min(in.M, 8));
  for_tiles(nblocks, per_tile, in.M, 8, [&](int nb, int nbt, int m0, int rows) {
    if (nbt == 4) q4_rows<4>(W, nb, in, m0, rows, bias, Y, ldy, accumulate);
    else if (nbt == 2) q4_rows<2>(W, nb, in, m0, rows, bias, Y, ldy, accumulate);
    else q4_rows<1>(W, nb, in, m0, rows, bias, Y, ldy, accumulate);
  });
}

void q8_gemm(const uint8_t* W, int N, const float* x, int M, int K, float* Y, int ldy) {
  const int nblocks = N / kBlockN;
  if (q8_head_fp32()) {
    // 5..8 rows: one block per tile (8 + 8 accumulators), so the int8 codes are widened once for all rows.
    const int per_tile = M <= 2 ? 4 : M <= 4 ? 2 : 1;
    for_tiles(nblocks, per_tile, M, 8, [&](int nb, int nbt, int m0, int rows) {
      if (nbt == 4) by_rows<Q8TileFp32, 4>(rows, W, nb, x, K, m0, Y, ldy);
      else if (nbt == 2) by_rows<Q8TileFp32, 2>(rows, W, nb, x, K, m0, Y, ldy);
      else by_rows<Q8TileFp32, 1>(rows, W, nb, x, K, m0, Y, ldy);
    });
    return;
  }
  Q8Rows in;
  in.set(x, M, K);
  for_tiles(nblocks, 1, M, 8, [&](int nb, int, int m0, int rows) { by_rows<Q8Tile, 1>(rows, W, nb, in, m0, Y, ldy); });
}

}  // namespace exitspec
