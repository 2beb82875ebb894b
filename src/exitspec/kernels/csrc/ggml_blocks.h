// GGML's quantised block types as a GGUF file stores them, decoded one row at a time into plain
// fields (integer codes, the stored fp16 bits, the small integer sub-scales): what both builds'
// packers (kquant_avx512.cpp, kquant_avx2.cpp) and the exactness check (kquant_ops.cpp) read. Scalar
// code on purpose: it runs once per weight at load, and one decoder for every consumer means the
// check that a row reproduces the de-quantised values vouches for the fields the kernels are packed
// from. Layouts as ggml-quants.c and gguf-py's quants.py define them (derived from their docs and
// the reference de-quantisation, tests/test_kquants.py checks every type against gguf-py's):
//   Q4_0 (32 weights, 18 bytes): fp16 d, 16 bytes of nibbles (as Q5_0's); w = d * (q - 8). Decoded as
//        Q5_0 fields (codes -8..7), so the packers and kernels treat it as Q5_0.
//   Q5_0 (32 weights, 22 bytes): fp16 d, 32 high bits (u32, bit i for weight i), 16 bytes of low
//        nibbles (byte i: weight i in bits 0-3, weight i + 16 in bits 4-7); w = d * (q - 16).
//   Q8_0 (32 weights, 34 bytes): fp16 d, 32 int8 codes; w = d * q.
//   Q4_K (256 weights, 144 bytes): fp16 d, fp16 dmin, 12 bytes of 6-bit scale / min pairs for the
//        8 sub-blocks of 32, 128 bytes of nibbles (byte 32c + i: weight 64c + i in bits 0-3, weight
//        64c + 32 + i in bits 4-7); w = (d * sc[j]) * q - dmin * m[j] for sub-block j.
//   Q6_K (256 weights, 210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8
//        scales (one per 16 weights), fp16 d; w = (d * sc[e / 16]) * (q - 32).
// Every product in these formulas is exact in fp32 (an fp16 d has 11 significant bits, the factors
// at most 13 together), so the only rounding of the reference de-quantisation is Q4_K's final
// subtraction, and any evaluation order reproduces it.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace exitspec {

// GGML type ids (ggml.h's enum ggml_type, gguf-py's GGMLQuantizationType).
enum BlockType : int { kQ4_0 = 2, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };

struct BlockFormat {
  int weights;  // per block (along a row)
  int bytes;    // per block as stored
  int super;    // weights per scale header in the packed layouts: 256 for K-quants, 32 otherwise
  const char* name;
};

// The format of a type the kernels read; nullptr for any other.
inline const BlockFormat* block_format(int type) {
  static const BlockFormat q4_0{32, 18, 32, "Q4_0"}, q5_0{32, 22, 32, "Q5_0"}, q8_0{32, 34, 32, "Q8_0"}, q4_k{256, 144, 256, "Q4_K"},
      q6_k{256, 210, 256, "Q6_K"};
  switch (type) {
    case kQ4_0: return &q4_0;
    case kQ5_0: return &q5_0;
    case kQ8_0: return &q8_0;
    case kQ4_K: return &q4_k;
    case kQ6_K: return &q6_k;
    default: return nullptr;
  }
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// One row of K weights as fields. Codes are signed where the format subtracts an offset (Q4_0 q - 8,
// Q5_0 q - 16, Q6_K q - 32) and as stored otherwise (Q4_K 0..15, Q8_0 int8).
struct RowFields {
  std::vector<int8_t> code;    // (K)
  std::vector<uint16_t> d;     // fp16 bits: per 32 weights (Q4_0, Q5_0, Q8_0) or per 256 (Q4_K, Q6_K)
  std::vector<uint16_t> dmin;  // Q4_K: fp16 bits per 256
  std::vector<int8_t> sc;      // Q4_K: 0..63 per 32; Q6_K: int8 per 16
  std::vector<uint8_t> mn;     // Q4_K: 0..63 per 32

  void decode(int type, const uint8_t* row, int K) {
    const BlockFormat& f = *block_format(type);
    const int nb = K / f.weights;
    code.resize(K);
    d.resize(nb);
    dmin.resize(type == kQ4_K ? nb : 0);
    sc.resize(type == kQ4_K ? nb * 8 : type == kQ6_K ? nb * 16 : 0);
    mn.resize(type == kQ4_K ? nb * 8 : 0);
    for (int b = 0; b < nb; ++b) {
      const uint8_t* p = row + (size_t)b * f.bytes;
      int8_t* c = code.data() + (size_t)b * f.weights;
      if (type == kQ4_0) {
        std::memcpy(&d[b], p, 2);
        for (int i = 0; i < 32; ++i) c[i] = (int8_t)((i < 16 ? p[2 + i] & 0x0F : p[2 + i - 16] >> 4) - 8);
      } else if (type == kQ5_0) {
        std::memcpy(&d[b], p, 2);
        uint32_t hi;
        std::memcpy(&hi, p + 2, 4);
        for (int i = 0; i < 32; ++i) {
          const int lo = i < 16 ? p[6 + i] & 0x0F : p[6 + i - 16] >> 4;
          c[i] = (int8_t)((lo | ((hi >> i) & 1) << 4) - 16);
        }
      } else if (type == kQ8_0) {
        std::memcpy(&d[b], p, 2);
        std::memcpy(c, p + 2, 32);
      } else if (type == kQ4_K) {
        std::memcpy(&d[b], p, 2);
        std::memcpy(&dmin[b], p + 2, 2);
        const uint8_t* s = p + 4;  // 12 bytes: 6-bit scales and mins of the 8 sub-blocks
        for (int j = 0; j < 4; ++j) {
          sc[b * 8 + j] = (int8_t)(s[j] & 0x3F);
          mn[b * 8 + j] = (uint8_t)(s[4 + j] & 0x3F);
          sc[b * 8 + 4 + j] = (int8_t)((s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30));
          mn[b * 8 + 4 + j] = (uint8_t)((s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30));
        }
        const uint8_t* q = p + 16;
        for (int e = 0; e < 256; ++e) c[e] = (int8_t)((q[(e / 64) * 32 + e % 32] >> (4 * ((e / 32) % 2))) & 0x0F);
      } else {  // Q6_K: each half of 128 weights has 64 bytes of nibbles and 32 bytes of 2-bit parts
        const uint8_t *ql = p, *qh = p + 128;
        for (int e = 0; e < 256; ++e) {
          const int h = e / 128, r = e % 128;
          const int lo = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 0x0F;
          const int hi = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 0x03;
          c[e] = (int8_t)((lo | hi << 4) - 32);
        }
        std::memcpy(&sc[b * 16], p + 192, 16);
        std::memcpy(&d[b], p + 208, 2);
      }
    }
  }

  // Weight k, de-quantised as the reference does (see the top of this file).
  float value(int type, int k) const {
    if (type == kQ4_K)
      return half_to_float(d[k / 256]) * (float)sc[k / 32] * (float)code[k] -
             half_to_float(dmin[k / 256]) * (float)mn[k / 32];
    if (type == kQ6_K) return half_to_float(d[k / 256]) * (float)sc[k / 16] * (float)code[k];
    return half_to_float(d[k / 32]) * (float)code[k];
  }
};

}  // namespace exitspec
