#pragma once
#include <cstdint>

#include "vec.h"

namespace exitspec {

// Causal attention of a few new query rows over a position-indexed KV cache (runtime/kv_cache.py).
struct AttentionShape {
  int rows;        // query rows, one per (batch row b, new token t), b-major
  int tokens;      // new tokens per batch row (rows = B * tokens)
  int heads, kv_heads, head_dim;
  int64_t cache_len;  // slots per (b, kv head) in the cache
  float scale;
  int window;      // sliding window (a query at p sees slots > p - window), 0 = none
  int64_t q_stride;  // floats between consecutive query rows (heads * head_dim when packed)
};

// q (rows, heads, D) already rotated (row r at q + r * q_stride); kc, vc (B, kv_heads, cache_len, D) of one layer; pos (rows)
// the query positions: row r attends slots j <= pos[r] of its batch row. out (rows, heads, D).
// head_dim values the kernel is instantiated for (16, 32, 64, 80, 96, 128, 256).
bool attention_supports(int head_dim);

// KV: float or Half (an fp16 cache, read as fp32; instantiated for both in attention.cpp).
template <typename KV>
void decode_attention(const float* q, const KV* kc, const KV* vc, const int64_t* pos, const AttentionShape& s,
                      float* out);

}  // namespace exitspec
