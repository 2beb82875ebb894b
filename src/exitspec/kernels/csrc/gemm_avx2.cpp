// Few-row matrix products over GGUF-style quantized weights: the AVX2 build (gemm_avx512.cpp is the
// AVX512-BF16 one; gemm.h the interface both implement).
//
// Why int8 activations: AVX2 has no bf16 dot product, and fp32 FMAs do 8 multiply-adds per
// instruction, so an 8-row step over the default model's 107 M decoder weights would be bound by
// FMA throughput at ~3x a 1-row step. vpmaddubsw multiplies 32 unsigned bytes by 32 signed bytes and
// adds adjacent pairs into 16-bit lanes: 32 multiply-adds per instruction, two instructions per cycle
// on Zen 3 and Intel cores since Skylake. So each row is quantized to int8 per group of 32 inputs
// (scale = max|x| / 127, the rule of GGUF's Q8_0, as llama.cpp does for its CPU products; ties round
// to even here, away from zero there), and a
// group's dot products are exact integers:
//     y[n] = sum_g  d[n,g] * xd[g] * (sum_k q[n,k] * xq[k])  +  low[n,g] * xd[g] * (sum_k xq[k])
// with the checkpoint's own fp16 scale d and low, the row's int8 codes xq and their scale xd. The only
// rounding is x -> int8 per group (a group's largest input keeps 8 bits, smaller ones proportionally
// fewer), the fp32 products of scales (d * xd, xd * sum xq) and fp32 accumulation.
//   * the low term sums the *rounded* inputs, not the exact ones: then the product is exactly that of
//     the weights w = d*q + low with the rounded row, and its error sum_k w[k] * (xq[k]*xd - x[k]) is
//     weighted by w, which is centred on zero. Pairing exact sums with rounded products leaves an
//     error weighted by d*q = w - low (0..15d, mean 7.5d): on the default model's real activations
//     that doubled the products' relative error (q_proj, layer 10: 1.7e-2 vs 0.9e-2) and multiplied the
//     next-token KL to the fp32 model ~5x.
//   * q4 codes are 0..15 (unsigned), so 8 vpmaddubsw results (8 x 2 x 15 x 127 = 30480) add up in
//     16-bit lanes without overflow: one vpmaddwd per group, not per instruction, widens them.
//   * q8 codes are signed: vpmaddubsw takes |w| and x carrying w's sign (vpsignb), and a pair can
//     reach 2 x 127 x 127, so every result is widened to 32 bits at once.
//   * every group's codes are unpacked once per tile of up to 4 rows (kMaxRows); a row's
//     result never depends on how many rows share the call or how outputs are split over threads
//     (outputs are split, never the reduction): lossless speculative decoding needs verification
//     (k rows) to reproduce vanilla decoding (1 row) bit for bit.
//
// Packed q4 layout, per block of 8 outputs o, per group of 32 inputs (160 bytes, contiguous so that
// a block streams through memory in order): 4 "quad pairs" p of 32 bytes,
//     byte 4o + i = q[o, 8p + i] | q[o, 8p + 4 + i] << 4      (i = 0..3)
// so a 4-bit mask gives the 4 consecutive inputs 8p..8p+3 of all 8 outputs in one register (a
// vpmaddubsw against those 4 inputs broadcast, then vpmaddwd, leaves output o in 32-bit lane o) and
// a shift gives inputs 8p+4..8p+7; then 8 fp16 scales, then 8 fp16 lows.
// Packed q8 layout (the tied LM head, GGUF Q8_0: w = d * q): per block of 8 and group, 8 quads of 32
// bytes, byte 4o + i = q[o, 4 qd + i], then 8 fp16 scales (272 bytes).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "gemm.h"

namespace exitspec {

const char* const kIsa = "avx2";
const char* const kNumerics = "q4 and q8 products from inputs quantized to int8 per group of 32 (scale max|x|/127)";

namespace {

constexpr int kB = 8;            // outputs per packed block: one ymm of int32 / fp32 lanes
constexpr int kQ4Bytes = 160;    // per block and group: 128 B of nibbles + 8 fp16 scales + 8 fp16 lows
constexpr int kQ8Bytes = 272;    // per block and group: 256 B of int8 codes + 8 fp16 scales
// Groups ahead that software prefetch asks for, per block stream. On the Zen 3 VM this was tuned on
// (2 cores, 12-20 GB/s from DRAM, varying run to run) no prefetch streamed ~11-12 GB/s for a 1-row
// product and 6-12 groups ahead 15-20 GB/s; within that range the noise hid any difference.
constexpr int kQ4Ahead = 8, kQ8Ahead = 4;

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Pin a value in a register at this point. GCC otherwise reassociates a group's chain of integer adds
// into a tree, computes all 64 products of a 4-row tile first and spills them to the stack (measured:
// the 4-row product ran ~2x slower).
inline void keep(__m256i& v) { asm("" : "+x"(v)); }

// Fetch group g + ahead of a block's stream; past the block's last group, the start of the block
// this stream reads next (`stride` blocks on), so the next tile starts warm. The address is formed
// as an integer: past the weight's last tile it lies beyond the buffer (a prefetch never faults,
// but a pointer there would be undefined behaviour).
inline void prefetch_ahead(const uint8_t* blk, int g, int G, int ahead, int stride, int bytes) {
  const int ga = g + ahead;
  const uintptr_t at = (uintptr_t)blk + (uintptr_t)(ga < G ? ga : stride * G + ga - G) * bytes;
  for (int off = 0; off < bytes; off += 64) _mm_prefetch((const char*)(at + off), _MM_HINT_T0);
}

inline void store_out(float* y, __m256 v, const float* bias, bool accumulate) {
  if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
  if (accumulate) v = _mm256_add_ps(_mm256_loadu_ps(y), v);
  _mm256_storeu_ps(y, v);
}

inline __m256 fp16x8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// M rows x NB consecutive blocks of 8 outputs starting at block nb0.
template <int M, int NB>
void q4_tile(const uint8_t* W, int nb0, const Q4Input& in, int m0, const float* bias, float* Y, int ldy,
             bool accumulate) {
  const int K = in.K, G = K / kGroup;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 tot[M][NB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) tot[m][b] = _mm256_setzero_ps();
  const uint8_t* blk[NB];
  for (int b = 0; b < NB; ++b) blk[b] = W + (size_t)(nb0 + b) * G * kQ4Bytes;
  for (int g = 0; g < G; ++g) {
    for (int b = 0; b < NB; ++b) prefetch_ahead(blk[b], g, G, kQ4Ahead, NB, kQ4Bytes);
    const int8_t* xg[M];
    for (int m = 0; m < M; ++m) xg[m] = in.xq.data() + (size_t)(m0 + m) * K + g * kGroup;
    __m256i acc[M][NB];  // 16-bit partial sums: lane 2o holds inputs (0,1) of each quad, 2o+1 (2,3)
    for (int m = 0; m < M; ++m)
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int qd = 0; qd < 8; ++qd) {  // quad qd = inputs 4qd..4qd+3: pair qd / 2, nibble qd % 2
      __m256i w[NB];
      for (int b = 0; b < NB; ++b) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(blk[b] + (size_t)g * kQ4Bytes + (qd / 2) * 32));
        w[b] = _mm256_and_si256(qd % 2 ? _mm256_srli_epi16(v, 4) : v, nib);
      }
      for (int m = 0; m < M; ++m) {
        const __m256i xv = _mm256_set1_epi32(load_i32(xg[m] + 4 * qd));
        for (int b = 0; b < NB; ++b) {
          acc[m][b] = _mm256_add_epi16(acc[m][b], _mm256_maddubs_epi16(w[b], xv));
          keep(acc[m][b]);
        }
      }
    }
    for (int b = 0; b < NB; ++b) {
      const uint8_t* sl = blk[b] + (size_t)g * kQ4Bytes + 128;
      const __m256 d = fp16x8(sl), low = fp16x8(sl + 16);
      for (int m = 0; m < M; ++m) {
        const size_t at = (size_t)(m0 + m) * G + g;
        const __m256 s = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[m][b], ones));
        tot[m][b] = _mm256_fmadd_ps(s, _mm256_mul_ps(d, _mm256_set1_ps(in.xd[at])), tot[m][b]);
        tot[m][b] = _mm256_fmadd_ps(low, _mm256_set1_ps(in.xs[at]), tot[m][b]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) {
      const int n = (nb0 + b) * kB;
      store_out(Y + (size_t)(m0 + m) * ldy + n, tot[m][b], bias ? bias + n : nullptr, accumulate);
    }
}

template <int M, int NB>
void q8_tile(const uint8_t* W, int nb0, const Q4Input& in, int m0, float* Y, int ldy) {
  const int K = in.K, G = K / kGroup;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 tot[M][NB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) tot[m][b] = _mm256_setzero_ps();
  const uint8_t* blk[NB];
  for (int b = 0; b < NB; ++b) blk[b] = W + (size_t)(nb0 + b) * G * kQ8Bytes;
  for (int g = 0; g < G; ++g) {
    for (int b = 0; b < NB; ++b) prefetch_ahead(blk[b], g, G, kQ8Ahead, NB, kQ8Bytes);
    const int8_t* xg[M];
    for (int m = 0; m < M; ++m) xg[m] = in.xq.data() + (size_t)(m0 + m) * K + g * kGroup;
    __m256i acc[M][NB];  // 32-bit sums, output o in lane o
    for (int m = 0; m < M; ++m)
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int qd = 0; qd < 8; ++qd) {
      __m256i w[NB], wa[NB];
      for (int b = 0; b < NB; ++b) {
        w[b] = _mm256_loadu_si256((const __m256i*)(blk[b] + (size_t)g * kQ8Bytes + qd * 32));
        wa[b] = _mm256_abs_epi8(w[b]);
      }
      for (int m = 0; m < M; ++m) {
        const __m256i xv = _mm256_set1_epi32(load_i32(xg[m] + 4 * qd));
        for (int b = 0; b < NB; ++b) {
          acc[m][b] = _mm256_add_epi32(
              acc[m][b], _mm256_madd_epi16(_mm256_maddubs_epi16(wa[b], _mm256_sign_epi8(xv, w[b])), ones));
          keep(acc[m][b]);
        }
      }
    }
    for (int b = 0; b < NB; ++b) {
      const __m256 d = fp16x8(blk[b] + (size_t)g * kQ8Bytes + 256);
      for (int m = 0; m < M; ++m)
        tot[m][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][b]),
                                    _mm256_mul_ps(d, _mm256_set1_ps(in.xd[(size_t)(m0 + m) * G + g])), tot[m][b]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) _mm256_storeu_ps(Y + (size_t)(m0 + m) * ldy + (nb0 + b) * kB, tot[m][b]);
}

// Rows 1..4 -> the tile instantiated for that count (the accumulators must be compile-time arrays to
// stay in registers).
template <template <int, int> class Tile, int NB, typename... Args>
void by_rows(int rows, Args&&... args) {
  switch (rows) {
    case 1: Tile<1, NB>::run(args...); break;
    case 2: Tile<2, NB>::run(args...); break;
    case 3: Tile<3, NB>::run(args...); break;
    default: Tile<4, NB>::run(args...); break;
  }
}
template <int M, int NB>
struct Q4Tile {
  template <typename... A>
  static void run(A&&... a) { q4_tile<M, NB>(a...); }
};
template <int M, int NB>
struct Q8Tile {
  template <typename... A>
  static void run(A&&... a) { q8_tile<M, NB>(a...); }
};

// At most 4 rows per tile: AVX2's 16 registers hold rows x blocks 16-bit sums, as many fp32 totals,
// the unpacked codes and a broadcast input; more rows spill (8 rows in one tile ran 2.5x slower than
// two tiles of 4, which read the codes a second time from L1).
constexpr int kMaxRows = 4;

// Split the output blocks over threads (never the reduction) and walk the rows in even tiles of at
// most kMaxRows; `tile(nb, blocks_in_tile, m0, rows)` computes one tile.
template <typename Fn>
void for_tiles(int nblocks, int per_tile, int M, const Fn& tile) {
  const int ntiles = (M + kMaxRows - 1) / kMaxRows;
  auto rows_of = [&](int t) { return M / ntiles + (t < M % ntiles); };
  auto all_rows = [&](int nb, int nbt) {
    for (int t = 0, m0 = 0; t < ntiles; m0 += rows_of(t), ++t) tile(nb, nbt, m0, rows_of(t));
  };
  const int items = nblocks / per_tile;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) all_rows((int)i * per_tile, per_tile);
  });
  for (int nb = items * per_tile; nb < nblocks; ++nb) all_rows(nb, 1);
}

// Blocks of 8 outputs per tile: more blocks reuse each broadcast input more, fewer leave registers
// for rows and fewer streams for the prefetchers; 4 blocks at 1-2 rows streamed no faster than 2.
constexpr int kBlocksPerTile = 2;

}  // namespace

int64_t q4_packed_bytes(int N, int K) { return (int64_t)(N / kB) * (K / kGroup) * kQ4Bytes; }
int64_t q8_packed_bytes(int N, int K) { return (int64_t)(N / kB) * (K / kGroup) * kQ8Bytes; }

void pack_q4(const uint8_t* q, const float* scale, const float* low, int N, int K, uint8_t* out) {
  const int G = K / kGroup;
  for (int nb = 0; nb < N / kB; ++nb)
    for (int g = 0; g < G; ++g) {
      uint8_t* dst = out + ((size_t)nb * G + g) * kQ4Bytes;
      for (int o = 0; o < kB; ++o) {
        const uint8_t* c = q + (size_t)(nb * kB + o) * K + g * kGroup;
        for (int p = 0; p < 4; ++p)
          for (int i = 0; i < 4; ++i) dst[p * 32 + 4 * o + i] = (uint8_t)(c[8 * p + i] | c[8 * p + 4 + i] << 4);
        const size_t at = (size_t)(nb * kB + o) * G + g;
        ((uint16_t*)(dst + 128))[o] = _cvtss_sh(scale[at], _MM_FROUND_TO_NEAREST_INT);
        ((uint16_t*)(dst + 144))[o] = _cvtss_sh(low[at], _MM_FROUND_TO_NEAREST_INT);
      }
    }
}

void pack_q8(const int8_t* q, const float* scale, int N, int K, uint8_t* out) {
  const int G = K / kGroup;
  for (int nb = 0; nb < N / kB; ++nb)
    for (int g = 0; g < G; ++g) {
      uint8_t* dst = out + ((size_t)nb * G + g) * kQ8Bytes;
      for (int o = 0; o < kB; ++o) {
        const int8_t* c = q + (size_t)(nb * kB + o) * K + g * kGroup;
        for (int qd = 0; qd < 8; ++qd)
          for (int i = 0; i < 4; ++i) dst[qd * 32 + 4 * o + i] = (uint8_t)c[4 * qd + i];
        ((uint16_t*)(dst + 256))[o] = _cvtss_sh(scale[(size_t)(nb * kB + o) * G + g], _MM_FROUND_TO_NEAREST_INT);
      }
    }
}

const Q4Input& Q4Input::set(const float* x, int rows, int cols) {
  M = rows, K = cols;
  const int G = K / kGroup;
  xq.resize((size_t)M * K);
  xd.resize((size_t)M * G);
  xs.resize((size_t)M * G);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int m = 0; m < M; ++m)
    for (int g = 0; g < G; ++g) {
      const float* src = x + (size_t)m * K + g * kGroup;
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(src + 8 * i);
      const __m256 amax8 = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                         _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
      a = _mm_max_ps(a, _mm_movehl_ps(a, a));
      const float amax = _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
      // A non-finite input makes the group's scale NaN, so it reaches the output as it would in fp32;
      // a group so small that 127 / amax overflows (max |x| < ~4e-37) is taken as zeros (q8_scale).
      const __m256 sum8 = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
      const Q8Scale s = q8_scale(amax, std::isfinite(hsum8(sum8)) && std::isfinite(amax));
      __m256i c[4];  // round to nearest even (the default MXCSR mode): |x * id| <= 127 by construction
      for (int i = 0; i < 4; ++i) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(s.id)));
      // The sum of the rounded inputs (see the top of this file for why not the exact ones): an exact
      // integer (|sum| <= 32 * 127), scaled once.
      const __m256i isum = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
      // packs interleave 128-bit lanes: 32 -> 16 -> 8 bits gives dword order 0 2 4 6 1 3 5 7; undo it
      const __m256i b16a = _mm256_packs_epi32(c[0], c[1]), b16b = _mm256_packs_epi32(c[2], c[3]);
      const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(b16a, b16b),
                                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256((__m256i*)(xq.data() + (size_t)m * K + g * kGroup), b8);
      xd[(size_t)m * G + g] = s.d;
      xs[(size_t)m * G + g] = s.d * hsum8(_mm256_cvtepi32_ps(isum));
    }
  return *this;
}

void q4_gemm(const uint8_t* W, int N, const Q4Input& in, const float* bias, float* Y, int ldy, bool accumulate) {
  for_tiles(N / kB, kBlocksPerTile, in.M, [&](int nb, int nbt, int m0, int rows) {
    if (nbt == kBlocksPerTile) by_rows<Q4Tile, kBlocksPerTile>(rows, W, nb, in, m0, bias, Y, ldy, accumulate);
    else by_rows<Q4Tile, 1>(rows, W, nb, in, m0, bias, Y, ldy, accumulate);
  });
}

void q8_gemm(const uint8_t* W, int N, const float* x, int M, int K, float* Y, int ldy) {
  Q4Input in;  // the same int8 rows the q4 product reads
  in.set(x, M, K);
  for_tiles(N / kB, kBlocksPerTile, M, [&](int nb, int nbt, int m0, int rows) {
    if (nbt == kBlocksPerTile) by_rows<Q8Tile, kBlocksPerTile>(rows, W, nb, in, m0, Y, ldy);
    else by_rows<Q8Tile, 1>(rows, W, nb, in, m0, Y, ldy);
  });
}

}  // namespace exitspec
