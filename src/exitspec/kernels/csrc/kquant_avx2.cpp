// Products over GGML Q4_K, Q5_0, Q6_K and Q8_0 weights (Q4_0 decoded as Q5_0 codes -8..7): the AVX2
// build (kquant_avx512.cpp is the AVX512-BF16 one; kquant.h the interface). The q4 product's scheme
// (gemm_avx2.cpp, whose top says why int8 inputs): each row is quantised to int8 per group of 32
// (Q4Input), and a group's dot products are exact integers from vpmaddubsw (unsigned bytes x signed
// bytes, adjacent pairs summed into 16-bit lanes), widened by vpmaddwd and scaled in fp32:
//     y[n] += (d_w * xd) * (sum_k c[n,k] * xq[k])  [+  low[n] * xd * sum_k xq[k]]
// with d_w the block's exact fp32 scale (d * sc for the K-quants, d for Q5_0 / Q8_0) and low the
// K-quant minimum -(dmin * m) or Q5_0's offset -16 d, multiplying the sum of the *rounded* inputs
// (gemm_avx2.cpp says why that sum and not the exact one).
//   * unsigned codes (Q4_K 0..15, Q5_0's stored 0..31) go straight into vpmaddubsw; signed ones
//     (Q6_K q - 32, Q8_0) as |c| against the inputs carrying c's sign (vpsignb).
//   * 16-bit lanes hold a pair sum of at most 2 x 128 x 127 (Q8_0), 2 x 31 x 127 (Q5_0), 2 x 32 x 127
//     (Q6_K) or 2 x 15 x 127 (Q4_K), so they are widened after 1, 4, 4 and 8 quads of inputs
//     respectively (32512 at most, below 32767), never saturating.
//   * a group's codes are unpacked once per tile of up to 4 rows, and a row's result never depends on
//     the other rows or on how outputs are split over threads.
//
// Packed layouts, per block of 8 outputs o, one stream through memory per block (header per super-block
// of 256 inputs for the K-quants, then per group of 32 inputs):
//   nibbles (all but Q8_0): 4 quad pairs p of 32 bytes, byte 4o + i = c[o, 8p+i] | c[o, 8p+4+i] << 4
//     (gemm_avx2.cpp's q4 layout: a mask gives quad 2p, a shift quad 2p + 1, 4 inputs of 8 outputs)
//   Q4_K: head d[8], dmin[8] (fp16); group: nibbles, sc[8], m[8] (u8)                   144 B / group
//   Q5_0: group: nibbles, 32 bytes of bit 4 (byte 4o+i, bit qd: input 4qd + i), d[8]      176 B / group
//   Q6_K: head d[8]; group: nibbles of (code + 32), its bits 4-5 in 2 x 32 bytes (byte 4o+i, bits
//     2q..2q+1: input 4q + i, quads 0-3 then 4-7), sc[2][8] (int8, per 16 inputs)          208 B / group
//   Q8_0: group: per quad 32 bytes, byte 4o+i = q[o, 4qd+i], then d[8] (gemm_avx2.cpp's q8 layout) 272 B
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "kquant.h"
#include "vec.h"

namespace exitspec {
namespace {

constexpr int kB = 8;              // outputs per packed block: one ymm of int32 / fp32 lanes
constexpr int kAheadBytes = 1280;  // software prefetch distance along each block's stream (~8 q4 groups)
constexpr int kMaxRows = 4;        // rows per tile (gemm_avx2.cpp: more spill AVX2's 16 registers)

inline __m256 fp16x8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline __m256 u8x8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
inline __m256 i8x8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
// Quad qd's 4-bit codes of the nibble layout, one per byte.
inline __m256i nibble_quad(const uint8_t* g, int qd) {
  const __m256i v = load32(g + (qd / 2) * 32);
  return _mm256_and_si256(qd % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
}
// Shift each 16-bit lane left by s (right by -s): the kernels move bits within a byte with it, never by
// more than 4 left or 3 right, so no bit that matters crosses into the neighbouring byte.
inline __m256i shift16(__m256i v, int s) { return s >= 0 ? _mm256_slli_epi16(v, s) : _mm256_srli_epi16(v, -s); }
inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void keep(__m256i& v) { asm("" : "+x"(v)); }  // pin in a register (see gemm_avx2.cpp)

template <typename U>
void put_nibbles(uint8_t* dst, const U& u) {
  for (int p = 0; p < 4; ++p)
    for (int o = 0; o < kB; ++o)
      for (int i = 0; i < 4; ++i) dst[p * 32 + 4 * o + i] = (uint8_t)((u(o, 8 * p + i) & 15) | (u(o, 8 * p + 4 + i) & 15) << 4);
}

inline void put_fp16(uint8_t* dst, const RowFields* r, std::vector<uint16_t> RowFields::*field, int at) {
  for (int o = 0; o < kB; ++o) std::memcpy(dst + 2 * o, &(r[o].*field)[at], 2);
}

// One format per GGML type: layout sizes, the packer of a group, and the kernel's pieces (the head of a
// super-block, quad qd's codes, a (half-)group's scale, the group's low). kChunk: quads summed in 16-bit
// lanes before widening; kSubs: scales per group.
struct Q4K {
  static constexpr int kSuper = 256, kHead = 32, kGroupBytes = 144, kSubs = 1, kChunk = 8;
  static constexpr bool kSigned = false, kLow = true;
  struct Head { __m256 d, negmin; };
  static void put_head(uint8_t* p, const RowFields* r, int s) {
    put_fp16(p, r, &RowFields::d, s);
    put_fp16(p + 16, r, &RowFields::dmin, s);
  }
  static void put_group(uint8_t* p, const RowFields* r, int g) {
    put_nibbles(p, [&](int o, int k) { return (int)r[o].code[g * 32 + k]; });
    for (int o = 0; o < kB; ++o) p[128 + o] = (uint8_t)r[o].sc[g], p[136 + o] = r[o].mn[g];
  }
  static Head head(const uint8_t* p) { return {fp16x8(p), _mm256_sub_ps(_mm256_setzero_ps(), fp16x8(p + 16))}; }
  static __m256i unpack(const uint8_t* g, int qd) { return nibble_quad(g, qd); }
  static __m256 scale(const Head& h, const uint8_t* g, int) { return _mm256_mul_ps(h.d, u8x8(g + 128)); }
  static __m256 low(const Head& h, const uint8_t* g) { return _mm256_mul_ps(h.negmin, u8x8(g + 136)); }
};

struct Q50 {
  static constexpr int kSuper = 32, kHead = 0, kGroupBytes = 176, kSubs = 1, kChunk = 4;
  static constexpr bool kSigned = false, kLow = true;
  struct Head {};
  static void put_head(uint8_t*, const RowFields*, int) {}
  static void put_group(uint8_t* p, const RowFields* r, int g) {
    auto u = [&](int o, int k) { return r[o].code[g * 32 + k] + 16; };
    put_nibbles(p, u);
    for (int o = 0; o < kB; ++o)
      for (int i = 0; i < 4; ++i) {
        int bits = 0;
        for (int qd = 0; qd < 8; ++qd) bits |= (u(o, 4 * qd + i) >> 4 & 1) << qd;
        p[128 + 4 * o + i] = (uint8_t)bits;
      }
    put_fp16(p + 160, r, &RowFields::d, g);
  }
  static Head head(const uint8_t*) { return {}; }
  static __m256i unpack(const uint8_t* g, int qd) {
    const __m256i hi = _mm256_and_si256(shift16(load32(g + 128), 4 - qd), _mm256_set1_epi8(0x10));
    return _mm256_or_si256(nibble_quad(g, qd), hi);
  }
  static __m256 scale(const Head&, const uint8_t* g, int) { return fp16x8(g + 160); }
  static __m256 low(const Head&, const uint8_t* g) { return _mm256_mul_ps(fp16x8(g + 160), _mm256_set1_ps(-16.0f)); }
};

struct Q6K {
  static constexpr int kSuper = 256, kHead = 16, kGroupBytes = 208, kSubs = 2, kChunk = 4;
  static constexpr bool kSigned = true, kLow = false;
  struct Head { __m256 d; };
  static void put_head(uint8_t* p, const RowFields* r, int s) { put_fp16(p, r, &RowFields::d, s); }
  static void put_group(uint8_t* p, const RowFields* r, int g) {
    auto u = [&](int o, int k) { return r[o].code[g * 32 + k] + 32; };
    put_nibbles(p, u);
    for (int half = 0; half < 2; ++half)
      for (int o = 0; o < kB; ++o)
        for (int i = 0; i < 4; ++i) {
          int bits = 0;
          for (int q = 0; q < 4; ++q) bits |= (u(o, 4 * (4 * half + q) + i) >> 4) << (2 * q);
          p[128 + 32 * half + 4 * o + i] = (uint8_t)bits;
        }
    for (int o = 0; o < kB; ++o) p[192 + o] = (uint8_t)r[o].sc[2 * g], p[200 + o] = (uint8_t)r[o].sc[2 * g + 1];
  }
  static Head head(const uint8_t* p) { return {fp16x8(p)}; }
  static __m256i unpack(const uint8_t* g, int qd) {
    const __m256i h = load32(g + 128 + 32 * (qd / 4));
    const __m256i hi = _mm256_and_si256(shift16(h, 4 - 2 * (qd % 4)), _mm256_set1_epi8(0x30));
    return _mm256_sub_epi8(_mm256_or_si256(nibble_quad(g, qd), hi), _mm256_set1_epi8(32));
  }
  static __m256 scale(const Head& h, const uint8_t* g, int sub) { return _mm256_mul_ps(h.d, i8x8(g + 192 + 8 * sub)); }
  static __m256 low(const Head&, const uint8_t*) { return _mm256_setzero_ps(); }
};

struct Q80 {
  static constexpr int kSuper = 32, kHead = 0, kGroupBytes = 272, kSubs = 1, kChunk = 1;
  static constexpr bool kSigned = true, kLow = false;
  struct Head {};
  static void put_head(uint8_t*, const RowFields*, int) {}
  static void put_group(uint8_t* p, const RowFields* r, int g) {
    for (int qd = 0; qd < 8; ++qd)
      for (int o = 0; o < kB; ++o)
        for (int i = 0; i < 4; ++i) p[32 * qd + 4 * o + i] = (uint8_t)r[o].code[g * 32 + 4 * qd + i];
    put_fp16(p + 256, r, &RowFields::d, g);
  }
  static Head head(const uint8_t*) { return {}; }
  static __m256i unpack(const uint8_t* g, int qd) { return load32(g + 32 * qd); }
  static __m256 scale(const Head&, const uint8_t* g, int) { return fp16x8(g + 256); }
  static __m256 low(const Head&, const uint8_t*) { return _mm256_setzero_ps(); }
};

template <class F>
constexpr size_t super_bytes() { return F::kHead + (size_t)(F::kSuper / kGroup) * F::kGroupBytes; }

// M rows (<= 4) x NB consecutive blocks of 8 outputs starting at block nb0.
template <class F, int M, int NB>
void tile(const uint8_t* W, int nb0, const Q4Input& in, int m0, float* Y, int ldy) {
  constexpr int kGroups = F::kSuper / kGroup, kQuads = 8 / F::kSubs;
  const int K = in.K, G = K / kGroup, S = K / F::kSuper;
  const size_t block_bytes = (size_t)S * super_bytes<F>();
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 tot[M][NB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) tot[m][b] = _mm256_setzero_ps();
  const uint8_t* blk[NB];
  for (int b = 0; b < NB; ++b) blk[b] = W + (size_t)(nb0 + b) * block_bytes;
  for (int s = 0; s < S; ++s) {
    typename F::Head head[NB];
    for (int b = 0; b < NB; ++b) head[b] = F::head(blk[b] + s * super_bytes<F>());
    for (int gi = 0; gi < kGroups; ++gi) {
      const int g = s * kGroups + gi;
      const size_t at = s * super_bytes<F>() + F::kHead + (size_t)gi * F::kGroupBytes;
      const uint8_t* grp[NB];
      for (int b = 0; b < NB; ++b) {
        grp[b] = blk[b] + at;
        // Past a block's end, the start of the block this stream reads next (NB blocks on), formed as
        // an integer: beyond the weight's last tile the address lies outside the buffer.
        const size_t ahead = at + kAheadBytes;
        const uintptr_t p = (uintptr_t)blk[b] + (ahead < block_bytes ? ahead : NB * block_bytes + ahead - block_bytes);
        for (int off = 0; off < F::kGroupBytes + F::kHead; off += 64) _mm_prefetch((const char*)(p + off), _MM_HINT_T0);
      }
      const int8_t* xg[M];
      for (int m = 0; m < M; ++m) xg[m] = in.xq.data() + (size_t)(m0 + m) * K + g * kGroup;
      for (int sub = 0; sub < F::kSubs; ++sub) {
        __m256 sc[NB];
        for (int b = 0; b < NB; ++b) sc[b] = F::scale(head[b], grp[b], sub);
        for (int c0 = sub * kQuads; c0 < (sub + 1) * kQuads; c0 += (F::kChunk == 1 ? kQuads : F::kChunk)) {
          __m256i acc[M][NB];  // 16-bit pair sums, or (kChunk 1) 32-bit sums: output o in lane o
          for (int m = 0; m < M; ++m)
            for (int b = 0; b < NB; ++b) acc[m][b] = _mm256_setzero_si256();
#pragma GCC unroll 8
          for (int qd = c0; qd < c0 + (F::kChunk == 1 ? kQuads : F::kChunk); ++qd) {
            __m256i w[NB], wa[NB];
            for (int b = 0; b < NB; ++b) {
              w[b] = F::unpack(grp[b], qd);
              wa[b] = F::kSigned ? _mm256_abs_epi8(w[b]) : w[b];
            }
            for (int m = 0; m < M; ++m) {
              const __m256i xv = _mm256_set1_epi32(load_i32(xg[m] + 4 * qd));
              for (int b = 0; b < NB; ++b) {
                const __m256i p = _mm256_maddubs_epi16(wa[b], F::kSigned ? _mm256_sign_epi8(xv, w[b]) : xv);
                acc[m][b] = F::kChunk == 1 ? _mm256_add_epi32(acc[m][b], _mm256_madd_epi16(p, ones))
                                           : _mm256_add_epi16(acc[m][b], p);
                keep(acc[m][b]);
              }
            }
          }
          for (int m = 0; m < M; ++m)
            for (int b = 0; b < NB; ++b) {
              const __m256i wide = F::kChunk == 1 ? acc[m][b] : _mm256_madd_epi16(acc[m][b], ones);
              const __m256 sx = _mm256_mul_ps(sc[b], _mm256_set1_ps(in.xd[(size_t)(m0 + m) * G + g]));
              tot[m][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), sx, tot[m][b]);
            }
        }
      }
      if constexpr (F::kLow)
        for (int b = 0; b < NB; ++b) {
          const __m256 low = F::low(head[b], grp[b]);
          for (int m = 0; m < M; ++m)
            tot[m][b] = _mm256_fmadd_ps(low, _mm256_set1_ps(in.xs[(size_t)(m0 + m) * G + g]), tot[m][b]);
        }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) _mm256_storeu_ps(Y + (size_t)(m0 + m) * ldy + (nb0 + b) * kB, tot[m][b]);
}

template <class F, int NB>
void rows_tile(int rows, const uint8_t* W, int nb, const Q4Input& in, int m0, float* Y, int ldy) {
  switch (rows) {
    case 1: tile<F, 1, NB>(W, nb, in, m0, Y, ldy); break;
    case 2: tile<F, 2, NB>(W, nb, in, m0, Y, ldy); break;
    case 3: tile<F, 3, NB>(W, nb, in, m0, Y, ldy); break;
    default: tile<F, 4, NB>(W, nb, in, m0, Y, ldy); break;
  }
}

// Output blocks in pairs split over threads (never the reduction); rows in even tiles of at most 4.
template <class F>
void gemm(const uint8_t* W, int N, const Q4Input& in, float* Y, int ldy) {
  const int nblocks = N / kB, M = in.M, ntiles = (M + kMaxRows - 1) / kMaxRows;
  auto run = [&](int nb, int nbt) {
    for (int t = 0, m0 = 0; t < ntiles; ++t) {
      const int rows = M / ntiles + (t < M % ntiles);
      if (nbt == 2) rows_tile<F, 2>(rows, W, nb, in, m0, Y, ldy);
      else rows_tile<F, 1>(rows, W, nb, in, m0, Y, ldy);
      m0 += rows;
    }
  };
  const int items = nblocks / 2;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) run((int)i * 2, 2);
  });
  for (int nb = items * 2; nb < nblocks; ++nb) run(nb, 1);
}

template <class F>
void pack(const uint8_t* raw, int type, int N, int K, uint8_t* out) {
  const BlockFormat& fmt = *block_format(type);
  const size_t row_bytes = (size_t)(K / fmt.weights) * fmt.bytes;
  const int S = K / F::kSuper;
  at::parallel_for(0, N / kB, 1, [&](int64_t b0, int64_t b1) {
    RowFields r[kB];
    for (int64_t nb = b0; nb < b1; ++nb) {
      for (int o = 0; o < kB; ++o) r[o].decode(type, raw + (size_t)(nb * kB + o) * row_bytes, K);
      for (int s = 0; s < S; ++s) {
        uint8_t* sp = out + ((size_t)nb * S + s) * super_bytes<F>();
        F::put_head(sp, r, s);
        for (int gi = 0; gi < F::kSuper / kGroup; ++gi)
          F::put_group(sp + F::kHead + (size_t)gi * F::kGroupBytes, r, s * (F::kSuper / kGroup) + gi);
      }
    }
  });
}

template <typename Fn>
auto by_type(int type, Fn&& fn) {
  switch (type) {
    case kQ4_K: return fn(Q4K{});
    case kQ4_0:  // decoded as Q5_0 fields (ggml_blocks.h)
    case kQ5_0: return fn(Q50{});
    case kQ6_K: return fn(Q6K{});
    default: return fn(Q80{});
  }
}

}  // namespace

int64_t kq_packed_bytes(int type, int N, int K) {
  return by_type(type, [&](auto f) {
    using F = decltype(f);
    return (int64_t)(N / kB) * (K / F::kSuper) * (int64_t)super_bytes<F>();
  });
}

void kq_pack(int type, const uint8_t* raw, int N, int K, uint8_t* out) {
  by_type(type, [&](auto f) { pack<decltype(f)>(raw, type, N, K, out); });
}

void kq_gemm(int type, const uint8_t* W, int N, const Q4Input& in, float* Y, int ldy) {
  by_type(type, [&](auto f) { gemm<decltype(f)>(W, N, in, Y, ldy); });
}

}  // namespace exitspec
