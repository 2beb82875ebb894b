// Products over GGML Q4_K, Q5_0, Q6_K and Q8_0 weights (Q4_0 decoded as Q5_0 codes -8..7): the
// AVX512-BF16 build (kquant_avx2.cpp is the AVX2 one; kquant.h the interface). The same scheme as the
// q4 product (gemm_avx512.cpp):
//   * every code these formats store is a small integer (Q4_K 0..15, Q5_0 -16..15, Q6_K -32..31,
//     Q8_0 -128..127), exact in bf16, so x * code is exact in the fp32 products of vdpbf16ps with
//     the inputs rounded to bf16 (the build's one rounding of a product's input, as for q4);
//   * a group's (or Q6_K half-group's) dot products are then scaled by the block's exact fp32 scale:
//     d * sc for the K-quants (an fp16 d times a small integer: exact in fp32, the very value the
//     reference de-quantisation multiplies by), the fp16 d for Q5_0 / Q8_0; Q4_K's minimum enters as
//     -(dmin * m) times the group's sum of the rounded inputs, as the q4 product's low does;
//   * every group's codes are expanded once per call and used by all rows (up to 8 at a time), and a
//     row's result never depends on the other rows or on how outputs are split over threads.
// Codes become bf16 by table lookup (vpermw / vpermt2w on a 5- or 6-bit index built from the stored
// bit planes), except Q8_0's, which are converted (int8 -> fp32 -> bf16, exact).
//
// Packed layouts, per block of 16 outputs, one stream through memory per block (header per
// super-block of 256 inputs for the K-quants, then per group of 32 inputs):
//   nibbles (all but Q8_0): 8 quads of 4 inputs k0..k3, 32 bytes each: byte 2j = c[j,k0] | c[j,k2] << 4,
//     byte 2j+1 = c[j,k1] | c[j,k3] << 4, c the code's low 4 bits (gemm_avx512.cpp's q4 layout).
//   Q4_K: head d[16], dmin[16] (fp16); group: nibbles, sc[16], m[16] (u8)              288 B / group
//   Q5_0: group: nibbles, bit 4 of (code + 16) as 8 x 2 masks of 32 bits (bit 2j+t: input k_t of
//     quad qd for the first mask, k_{2+t} for the second), d[16] (fp16)                 352 B / group
//   Q6_K: head d[16]; group: nibbles of (code + 32), its bits 4-5 as 4 x 32 bytes (one per quad
//     pair a, b: byte 2j+t = h[j,a,k_t] | h[j,a,k_{2+t}] << 2 | h[j,b,k_t] << 4 | h[j,b,k_{2+t}] << 6),
//     sc[2][16] (int8, per half-group of 16 inputs)                                     416 B / group
//   Q8_0: group: per quad 2 x 32 bytes (byte 2j+t = q[j,k_t], then q[j,k_{2+t}]), d[16]  544 B / group
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "kquant.h"
#include "vec.h"

namespace exitspec {
namespace {

constexpr int kB = 16;                // outputs per packed block: one zmm of fp32 lanes
constexpr int kAheadBytes = 1664;     // software prefetch distance along each block's stream (~5 q4 groups)

inline uint16_t bf16_bits(int v) {  // exact for |v| <= 256
  const float f = (float)v;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

// 32 words: word i = bf16((i & mask) + offset).
inline __m512i table(int mask, int offset) {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) t[i] = bf16_bits((i & mask) + offset);
  return _mm512_load_si512(t);
}

inline __m512 fp16x16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline __m512 u8x16(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline __m512 i8x16(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline __m512i nibbles(const uint8_t* p) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
// bits 0-3 from a, the rest from b (a ternary-logic select)
inline __m512i low4_from(__m512i a, __m512i b) { return _mm512_ternarylogic_epi32(_mm512_set1_epi16(0x000F), a, b, 0xCA); }

// Writes the nibble quads of one group: u(j, k) the unsigned code of output j, input k (0..31).
template <typename U>
void put_nibbles(uint8_t* dst, const U& u) {
  for (int qd = 0; qd < 8; ++qd)
    for (int j = 0; j < kB; ++j) {
      const int k = 4 * qd;
      dst[qd * 32 + 2 * j] = (uint8_t)((u(j, k) & 15) | (u(j, k + 2) & 15) << 4);
      dst[qd * 32 + 2 * j + 1] = (uint8_t)((u(j, k + 1) & 15) | (u(j, k + 3) & 15) << 4);
    }
}

inline void put_fp16(uint8_t* dst, const RowFields* r, std::vector<uint16_t> RowFields::*field, int at) {
  for (int j = 0; j < kB; ++j) std::memcpy(dst + 2 * j, &(r[j].*field)[at], 2);
}

// One format per GGML type: layout sizes, the packer of a group, and the kernel's pieces (the head of a
// super-block, a quad's codes as bf16 pairs, a (half-)group's scale, the group's low).
struct Q4K {
  static constexpr int kSuper = 256, kHead = 64, kGroupBytes = 288, kSubs = 1;
  static constexpr bool kLow = true;
  const __m512i t = table(15, 0);  // bit 4 of an index is the next nibble's: the table repeats
  struct Head { __m512 d, negmin; };
  static void put_head(uint8_t* p, const RowFields* r, int s) {
    put_fp16(p, r, &RowFields::d, s);
    put_fp16(p + 32, r, &RowFields::dmin, s);
  }
  static void put_group(uint8_t* p, const RowFields* r, int g) {
    put_nibbles(p, [&](int j, int k) { return (int)r[j].code[g * 32 + k]; });
    for (int j = 0; j < kB; ++j) p[256 + j] = (uint8_t)r[j].sc[g], p[272 + j] = r[j].mn[g];
  }
  Head head(const uint8_t* p) const {
    return {fp16x16(p), _mm512_sub_ps(_mm512_setzero_ps(), fp16x16(p + 32))};
  }
  void unpack(const uint8_t* g, int qd, __m512i& w01, __m512i& w23) const {
    const __m512i v = nibbles(g + qd * 32);
    w01 = _mm512_permutexvar_epi16(v, t);
    w23 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), t);
  }
  __m512 scale(const Head& h, const uint8_t* g, int) const { return _mm512_mul_ps(h.d, u8x16(g + 256)); }
  __m512 low(const Head& h, const uint8_t* g) const { return _mm512_mul_ps(h.negmin, u8x16(g + 272)); }
};

struct Q50 {
  static constexpr int kSuper = 32, kHead = 0, kGroupBytes = 352, kSubs = 1;
  static constexpr bool kLow = false;
  const __m512i t = table(31, -16);
  struct Head {};
  static void put_head(uint8_t*, const RowFields*, int) {}
  static void put_group(uint8_t* p, const RowFields* r, int g) {
    auto u = [&](int j, int k) { return r[j].code[g * 32 + k] + 16; };
    put_nibbles(p, u);
    for (int qd = 0; qd < 8; ++qd) {
      uint32_t m01 = 0, m23 = 0;
      for (int j = 0; j < kB; ++j)
        for (int t2 = 0; t2 < 2; ++t2) {
          m01 |= (uint32_t)(u(j, 4 * qd + t2) >> 4 & 1) << (2 * j + t2);
          m23 |= (uint32_t)(u(j, 4 * qd + 2 + t2) >> 4 & 1) << (2 * j + t2);
        }
      std::memcpy(p + 256 + 8 * qd, &m01, 4);
      std::memcpy(p + 256 + 8 * qd + 4, &m23, 4);
    }
    put_fp16(p + 320, r, &RowFields::d, g);
  }
  Head head(const uint8_t*) const { return {}; }
  void unpack(const uint8_t* g, int qd, __m512i& w01, __m512i& w23) const {
    const __m512i v = nibbles(g + qd * 32), sixteen = _mm512_set1_epi16(16);
    __mmask32 m01, m23;
    std::memcpy(&m01, g + 256 + 8 * qd, 4);
    std::memcpy(&m23, g + 256 + 8 * qd + 4, 4);
    const __m512i i01 = _mm512_and_si512(v, _mm512_set1_epi16(0x000F)), i23 = _mm512_srli_epi16(v, 4);
    w01 = _mm512_permutexvar_epi16(_mm512_mask_add_epi16(i01, m01, i01, sixteen), t);
    w23 = _mm512_permutexvar_epi16(_mm512_mask_add_epi16(i23, m23, i23, sixteen), t);
  }
  __m512 scale(const Head&, const uint8_t* g, int) const { return fp16x16(g + 320); }
  __m512 low(const Head&, const uint8_t*) const { return _mm512_setzero_ps(); }
};

struct Q6K {
  static constexpr int kSuper = 256, kHead = 32, kGroupBytes = 416, kSubs = 2;
  static constexpr bool kLow = false;
  const __m512i lo = table(31, -32), hi = table(31, 0);  // indices 0..63 -> bf16(index - 32)
  struct Head { __m512 d; };
  static void put_head(uint8_t* p, const RowFields* r, int s) { put_fp16(p, r, &RowFields::d, s); }
  static void put_group(uint8_t* p, const RowFields* r, int g) {
    auto u = [&](int j, int k) { return r[j].code[g * 32 + k] + 32; };
    put_nibbles(p, u);
    for (int pr = 0; pr < 4; ++pr)
      for (int j = 0; j < kB; ++j)
        for (int t2 = 0; t2 < 2; ++t2) {
          const int a = 8 * pr, b = 8 * pr + 4;  // first inputs of quads 2pr and 2pr + 1
          p[256 + 32 * pr + 2 * j + t2] = (uint8_t)((u(j, a + t2) >> 4) | (u(j, a + 2 + t2) >> 4) << 2 |
                                                    (u(j, b + t2) >> 4) << 4 | (u(j, b + 2 + t2) >> 4) << 6);
        }
    for (int j = 0; j < kB; ++j) p[384 + j] = (uint8_t)r[j].sc[2 * g], p[400 + j] = (uint8_t)r[j].sc[2 * g + 1];
  }
  Head head(const uint8_t* p) const { return {fp16x16(p)}; }
  void unpack(const uint8_t* g, int qd, __m512i& w01, __m512i& w23) const {
    const __m512i v = nibbles(g + qd * 32), h = nibbles(g + 256 + 32 * (qd / 2)), v4 = _mm512_srli_epi16(v, 4);
    // bits 4-5 of each index from the pair's high parts (vpermt2w reads bits 0-5 only)
    const __m512i i01 = low4_from(v, qd % 2 ? h : _mm512_slli_epi16(h, 4));
    const __m512i i23 = low4_from(v4, qd % 2 ? _mm512_srli_epi16(h, 2) : _mm512_slli_epi16(h, 2));
    w01 = _mm512_permutex2var_epi16(lo, i01, hi);
    w23 = _mm512_permutex2var_epi16(lo, i23, hi);
  }
  __m512 scale(const Head& h, const uint8_t* g, int sub) const { return _mm512_mul_ps(h.d, i8x16(g + 384 + 16 * sub)); }
  __m512 low(const Head&, const uint8_t*) const { return _mm512_setzero_ps(); }
};

struct Q80 {
  static constexpr int kSuper = 32, kHead = 0, kGroupBytes = 544, kSubs = 1;
  static constexpr bool kLow = false;
  struct Head {};
  static void put_head(uint8_t*, const RowFields*, int) {}
  static void put_group(uint8_t* p, const RowFields* r, int g) {
    for (int qd = 0; qd < 8; ++qd)
      for (int j = 0; j < kB; ++j)
        for (int t2 = 0; t2 < 2; ++t2) {
          p[64 * qd + 2 * j + t2] = (uint8_t)r[j].code[g * 32 + 4 * qd + t2];
          p[64 * qd + 32 + 2 * j + t2] = (uint8_t)r[j].code[g * 32 + 4 * qd + 2 + t2];
        }
    put_fp16(p + 512, r, &RowFields::d, g);
  }
  Head head(const uint8_t*) const { return {}; }
  static __m512i pairs(const uint8_t* p) {  // 32 int8 -> 32 bf16, in order (exact: |q| <= 128)
    return (__m512i)_mm512_cvtne2ps_pbh(i8x16(p + 16), i8x16(p));
  }
  void unpack(const uint8_t* g, int qd, __m512i& w01, __m512i& w23) const {
    w01 = pairs(g + 64 * qd);
    w23 = pairs(g + 64 * qd + 32);
  }
  __m512 scale(const Head&, const uint8_t* g, int) const { return fp16x16(g + 512); }
  __m512 low(const Head&, const uint8_t*) const { return _mm512_setzero_ps(); }
};

template <class F>
constexpr size_t super_bytes() { return F::kHead + (size_t)(F::kSuper / kGroup) * F::kGroupBytes; }

// M rows (<= 8) x NB consecutive blocks of 16 outputs starting at block nb0.
template <class F, int M, int NB>
void tile(const F& f, const uint8_t* W, int nb0, const Q4Input& in, int m0, float* Y, int ldy) {
  constexpr int kGroups = F::kSuper / kGroup, kQuads = 8 / F::kSubs;
  const int K = in.K, G = K / kGroup, S = K / F::kSuper;
  const size_t block_bytes = (size_t)S * super_bytes<F>();
  __m512 tot[M][NB];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) tot[m][b] = _mm512_setzero_ps();
  const uint8_t* blk[NB];
  for (int b = 0; b < NB; ++b) blk[b] = W + (size_t)(nb0 + b) * block_bytes;
  for (int s = 0; s < S; ++s) {
    typename F::Head head[NB];
    for (int b = 0; b < NB; ++b) head[b] = f.head(blk[b] + s * super_bytes<F>());
    for (int gi = 0; gi < kGroups; ++gi) {
      const int g = s * kGroups + gi;
      const size_t at = s * super_bytes<F>() + F::kHead + (size_t)gi * F::kGroupBytes;
      const uint8_t* grp[NB];
      for (int b = 0; b < NB; ++b) {
        grp[b] = blk[b] + at;
        // Past a block's end, the start of the block this stream reads next (NB blocks on); formed as
        // an integer: beyond the weight's last tile the address lies outside the buffer.
        const size_t ahead = at + kAheadBytes;
        const uintptr_t p = (uintptr_t)blk[b] + (ahead < block_bytes ? ahead : NB * block_bytes + ahead - block_bytes);
        for (int off = 0; off < F::kGroupBytes + F::kHead; off += 64) _mm_prefetch((const char*)(p + off), _MM_HINT_T0);
      }
      const uint32_t* xg[M];  // bf16 pairs of this group's inputs
      for (int m = 0; m < M; ++m) xg[m] = (const uint32_t*)(in.xb.data() + (size_t)(m0 + m) * K + g * kGroup);
      for (int sub = 0; sub < F::kSubs; ++sub) {
        __m512 acc[M][NB];
        for (int m = 0; m < M; ++m)
          for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int qd = sub * kQuads; qd < (sub + 1) * kQuads; ++qd) {
          __m512i w01[NB], w23[NB];
          for (int b = 0; b < NB; ++b) f.unpack(grp[b], qd, w01[b], w23[b]);
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
          const __m512 sc = f.scale(head[b], grp[b], sub);
          for (int m = 0; m < M; ++m) tot[m][b] = _mm512_fmadd_ps(acc[m][b], sc, tot[m][b]);
        }
      }
      if constexpr (F::kLow)
        for (int b = 0; b < NB; ++b) {
          const __m512 low = f.low(head[b], grp[b]);
          for (int m = 0; m < M; ++m)
            tot[m][b] = _mm512_fmadd_ps(low, _mm512_set1_ps(in.xs[(size_t)(m0 + m) * G + g]), tot[m][b]);
        }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(Y + (size_t)(m0 + m) * ldy + (nb0 + b) * kB, tot[m][b]);
}

// Rows 1..6 take 4 blocks per tile, 7..8 two (the q4 product's measured choice: fewer rows leave the
// registers to more blocks); a count of blocks that is not a multiple runs one block at a time.
template <class F, int M>
void rows_tile(const F& f, const uint8_t* W, int nb, int nbt, const Q4Input& in, int m0, float* Y, int ldy) {
  constexpr int NB = M <= 6 ? 4 : 2;
  if (nbt % NB == 0)
    for (int i = 0; i < nbt; i += NB) tile<F, M, NB>(f, W, nb + i, in, m0, Y, ldy);
  else
    for (int i = 0; i < nbt; ++i) tile<F, M, 1>(f, W, nb + i, in, m0, Y, ldy);
}

template <class F>
void gemm(const uint8_t* W, int N, const Q4Input& in, float* Y, int ldy) {
  const F f;
  const int nblocks = N / kB, M = in.M;
  const int per_tile = std::min(M, 8) <= 6 ? 4 : 2;
  auto run = [&](int nb, int nbt) {
    for (int m0 = 0; m0 < M; m0 += 8) {
      switch (std::min(8, M - m0)) {
        case 1: rows_tile<F, 1>(f, W, nb, nbt, in, m0, Y, ldy); break;
        case 2: rows_tile<F, 2>(f, W, nb, nbt, in, m0, Y, ldy); break;
        case 3: rows_tile<F, 3>(f, W, nb, nbt, in, m0, Y, ldy); break;
        case 4: rows_tile<F, 4>(f, W, nb, nbt, in, m0, Y, ldy); break;
        case 5: rows_tile<F, 5>(f, W, nb, nbt, in, m0, Y, ldy); break;
        case 6: rows_tile<F, 6>(f, W, nb, nbt, in, m0, Y, ldy); break;
        case 7: rows_tile<F, 7>(f, W, nb, nbt, in, m0, Y, ldy); break;
        default: rows_tile<F, 8>(f, W, nb, nbt, in, m0, Y, ldy); break;
      }
    }
  };
  // Output blocks split over threads (never the reduction).
  const int items = nblocks / per_tile;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) run((int)i * per_tile, per_tile);
  });
  for (int nb = items * per_tile; nb < nblocks; ++nb) run(nb, 1);
}

template <class F>
void pack(const uint8_t* raw, int type, int N, int K, uint8_t* out) {
  const BlockFormat& fmt = *block_format(type);
  const size_t row_bytes = (size_t)(K / fmt.weights) * fmt.bytes;
  const int S = K / F::kSuper;
  at::parallel_for(0, N / kB, 1, [&](int64_t b0, int64_t b1) {
    RowFields r[kB];
    for (int64_t nb = b0; nb < b1; ++nb) {
      for (int j = 0; j < kB; ++j) r[j].decode(type, raw + (size_t)(nb * kB + j) * row_bytes, K);
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
