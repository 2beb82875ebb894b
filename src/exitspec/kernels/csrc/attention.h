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
  // A token tree (decoding/token_tree.py), or nullptr for plain causal rows. tree[r]: the 64-bit
  // visibility mask of query row r over its batch row's new tokens (bit i: new token i, held in slot
  // base + i, base = pos of the row's token 0, the root). Row r then sees slots < base and the tree
  // slots of its mask, which are its ancestors and itself (pos[r] = base + depth). check_tree checks it.
  const int64_t* tree = nullptr;
};

// Most tree nodes per batch row: one bit each in a 64-bit mask.
constexpr int kMaxTreeNodes = 64;

// q (rows, heads, D) already rotated (row r at q + r * q_stride); kc, vc (B, kv_heads, cache_len, D) of one layer; pos (rows)
// the query positions: row r attends slots j <= pos[r] of its batch row (a tree row: see AttentionShape::tree).
// out (rows, heads, D).
// head_dim values the kernel is instantiated for (16, 32, 64, 80, 96, 128, 256).
bool attention_supports(int head_dim);

// Throws (TORCH_CHECK) unless tree (rows,) holds a valid token tree for `tokens` new tokens per batch
// row at positions pos whose slots base..base+tokens-1 fit `cache_len`: node 0 the root (mask 1),
// every node seeing itself and exactly its parent's ancestors (its parent: its highest other bit),
// pos = base + depth. A bad mask would read slots the row never wrote.
void check_tree(const int64_t* tree, const int64_t* pos, int64_t rows, int tokens, int64_t cache_len);

// KV: float or Half (an fp16 cache, read as fp32; instantiated for both in attention.cpp).
template <typename KV>
void decode_attention(const float* q, const KV* kc, const KV* vc, const int64_t* pos, const AttentionShape& s,
                      float* out);

}  // namespace exitspec
