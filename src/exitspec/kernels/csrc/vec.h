// A 16-float vector for the kernels that do not depend on the instruction set (attention, the Llama
// stack's glue): one zmm register where the build targets AVX-512, a pair of ymm registers where it
// targets AVX2. One source for both, so a fix in the attention or the norms reaches every machine.
// The products (gemm_avx512.cpp, gemm_avx2.cpp) are written per instruction set instead: their inner
// loops are what the two differ in.
//
// Every function computes a lane's result in one fixed order, whatever the lane's neighbours hold:
// the row invariance the kernels promise rests on that.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define EXITSPEC_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EXITSPEC_AVX2 1
#else
#error "exitspec kernels are built for AVX512-BF16 or AVX2 + FMA + F16C (see kernels/build.py)"
#endif

namespace exitspec {

// An IEEE fp16 value as stored (the KV cache's elements when it is kept in half precision); vload /
// vstore convert 16 of them to / from fp32 (F16C; round to nearest even), so the kernels read an fp16
// cache with the same arithmetic as an fp32 one, only from half the bytes.
struct Half {
  uint16_t bits;
};

#if EXITSPEC_AVX512
// 16 floats in one register; AVX-512 has 32 of them, so the kernels may keep ~16 accumulators live.
struct V16 {
  __m512 v;
};
constexpr int kLiveV16 = 16;
inline V16 vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline V16 vload(const Half* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))}; }
inline void vstore(Half* p, V16 a) { _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT)); }
inline V16 vset1(float x) { return {_mm512_set1_ps(x)}; }
inline V16 vzero() { return {_mm512_setzero_ps()}; }
inline V16 vadd(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V16 vsub(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V16 vmul(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 vdiv(V16 a, V16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V16 vfma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a * b + c
inline float vsum(V16 a) { return _mm512_reduce_add_ps(a.v); }
inline float vmaxall(V16 a) { return _mm512_reduce_max_ps(a.v); }

inline __mmask16 lanes(int a, int b) { return (__mmask16)(((1u << b) - 1) & ~((1u << a) - 1)); }
// Lanes a..b-1 of x, zero elsewhere.
inline V16 vkeep(V16 x, int a, int b) { return {_mm512_maskz_mov_ps(lanes(a, b), x.v)}; }
// max(acc, x) in lanes a..b-1, acc elsewhere.
inline V16 vmax_in(V16 acc, V16 x, int a, int b) { return {_mm512_mask_max_ps(acc.v, lanes(a, b), acc.v, x.v)}; }

// exp(x): Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial), relative error
// below 2e-7 on [-87, 88]; scalef does the 2^n scaling.
inline V16 vexp(V16 a) {
  __m512 x = _mm512_min_ps(_mm512_max_ps(a.v, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  return {_mm512_scalef_ps(_mm512_add_ps(p, _mm512_set1_ps(1.0f)), n)};
}

// out lane i = sum of the 16 lanes of v[i] (a transpose-and-add tree: ~3 ops per vector instead of
// ~8 for a reduction each). Every vector's lanes are summed in the same order whatever its index,
// so a value does not depend on which slot of the 16 it came in.
inline V16 hsum16x16(const V16 v[16]) {
  __m512 x[8], z[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i].v, v[2 * i + 1].v),
                         _mm512_unpackhi_ps(v[2 * i].v, v[2 * i + 1].v));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [sum a, sum b, sum c, sum d] of that lane
    const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
    z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // fold the four 128-bit lanes: lane j of the result holds the totals of vectors 4j..4j+3
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x88), _mm512_shuffle_f32x4(z[2], z[3], 0xDD));
  return {_mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD))};
}

#else  // EXITSPEC_AVX2
// 16 floats in two registers (lanes 0-7, 8-15); AVX2 has 16 ymm registers, so ~4 accumulators.
struct V16 {
  __m256 lo, hi;
};
constexpr int kLiveV16 = 4;
inline V16 vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, V16 a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
inline V16 vload(const Half* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p + 1))};
}
inline void vstore(Half* p, V16 a) {
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(a.lo, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128((__m128i*)p + 1, _mm256_cvtps_ph(a.hi, _MM_FROUND_TO_NEAREST_INT));
}
// 8 floats, or 8 fp16 values converted, into one ymm.
inline __m256 vload8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 vload8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline V16 vset1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V16 vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 vadd(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V16 vsub(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V16 vmul(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 vdiv(V16 a, V16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline V16 vfma(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }

inline float hsum8(__m256 a) {  // fixed tree: halves, then quarters, then pairs
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vsum(V16 a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
inline float vmaxall(V16 a) {
  __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// All-ones in lanes a..b-1 (lane indices compared as integers), as float masks for and / blend.
inline V16 lanes(int a, int b) {
  const __m256i i0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), i1 = _mm256_add_epi32(i0, _mm256_set1_epi32(8));
  const __m256i va = _mm256_set1_epi32(a - 1), vb = _mm256_set1_epi32(b);
  auto in = [&](__m256i i) {
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(i, va), _mm256_cmpgt_epi32(vb, i)));
  };
  return {in(i0), in(i1)};
}
inline V16 vkeep(V16 x, int a, int b) {
  const V16 m = lanes(a, b);
  return {_mm256_and_ps(x.lo, m.lo), _mm256_and_ps(x.hi, m.hi)};
}
inline V16 vmax_in(V16 acc, V16 x, int a, int b) {
  const V16 m = lanes(a, b);
  return {_mm256_blendv_ps(acc.lo, _mm256_max_ps(acc.lo, x.lo), m.lo),
          _mm256_blendv_ps(acc.hi, _mm256_max_ps(acc.hi, x.hi), m.hi)};
}

// exp(x), the same Cephes polynomial as the AVX-512 build; 2^n is built in the exponent bits (the
// clamp keeps n in -126..127, so the result is a normal float or the product underflows to ~0).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(_mm256_add_ps(p, _mm256_set1_ps(1.0f)), _mm256_castsi256_ps(e));
}
inline V16 vexp(V16 a) { return {exp8(a.lo), exp8(a.hi)}; }

// out lane i = sum of the 16 lanes of v[i]: lo + hi first, then an 8 x 8 transpose-and-add tree per
// half of the outputs; the same order for every vector (see the AVX-512 version).
inline __m256 hsum8x8(const __m256 s[8]) {
  __m256 x[4], z[2];
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    x[i] = _mm256_add_ps(_mm256_unpacklo_ps(s[2 * i], s[2 * i + 1]), _mm256_unpackhi_ps(s[2 * i], s[2 * i + 1]));
  for (int i = 0; i < 2; ++i) {  // per 128-bit lane: [sum a, sum b, sum c, sum d] of that lane
    const __m256d a = _mm256_castps_pd(x[2 * i]), b = _mm256_castps_pd(x[2 * i + 1]);
    z[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  }
  // fold the two 128-bit lanes: lanes 0-3 hold vectors 0-3, lanes 4-7 vectors 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(z[0], z[1], 0x20), _mm256_permute2f128_ps(z[0], z[1], 0x31));
}
inline V16 hsum16x16(const V16 v[16]) {
  __m256 s[16];
  for (int i = 0; i < 16; ++i) s[i] = _mm256_add_ps(v[i].lo, v[i].hi);
  return {hsum8x8(s), hsum8x8(s + 8)};
}
#endif

// Sum of a row of n floats (n a multiple of 16), in a fixed order: the same bits for the same row
// whatever else the call computes.
inline float sum16n(const float* x, int n) {
  V16 a = vzero();
  for (int i = 0; i < n; i += 16) a = vadd(a, vload(x + i));
  return vsum(a);
}

inline float dot16n(const float* x, const float* y, int n) {
  V16 a = vzero();
  for (int i = 0; i < n; i += 16) a = vfma(vload(x + i), vload(y + i), a);
  return vsum(a);
}

}  // namespace exitspec
