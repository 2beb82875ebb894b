// Small AVX-512 helpers shared by the kernels: bf16 rounding, exp, horizontal sums.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace exitspec {

// exp(x) of 16 floats: Cephes' expf (range reduction by ln 2 in two parts, degree-5 polynomial),
// relative error below 2e-7 on [-87, 88]; scalef does the 2^n scaling, underflowing to 0.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
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
  return _mm512_scalef_ps(_mm512_add_ps(p, _mm512_set1_ps(1.0f)), n);
}

// Round 16 floats to bf16 (round to nearest even, the AVX512-BF16 instruction) and back to float.
inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
inline __m512 from_bf16(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Sum of a row of n floats (n a multiple of 16), in a fixed order: the same bits for the same row
// whatever else the call computes.
inline float sum16n(const float* x, int n) {
  __m512 a = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) a = _mm512_add_ps(a, _mm512_loadu_ps(x + i));
  return _mm512_reduce_add_ps(a);
}

inline float dot16n(const float* x, const float* y, int n) {
  __m512 a = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), a);
  return _mm512_reduce_add_ps(a);
}

// out[i] = sum of the 16 lanes of v[i], for 16 vectors at once (a transpose-and-add tree: ~3 ops per
// vector instead of ~8 for a reduction each). Every vector's lanes are summed in the same order
// whatever its index, so a value does not depend on which slot of the 16 it came in.
inline __m512 hsum16x16(const __m512 v[16]) {
  __m512 x[8], z[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [sum a, sum b, sum c, sum d] of that lane
    const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
    z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // fold the four 128-bit lanes: lane j of the result holds the totals of vectors 4j..4j+3
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x88), _mm512_shuffle_f32x4(z[2], z[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

}  // namespace exitspec
