// Decode-time attention: each (query row, head) is one independent softmax over the cache slots
// 0..p (or the sliding window) of its batch row.
//
// Why not SDPA: for 1-8 query rows torch's flash-attention CPU kernel costs ~75 us per layer on the
// default model (setup and threading for a problem of ~300 x 64 per head), and gives a row low bits
// that depend on how many rows and slots the call covers (runtime/kv_cache.py's SLOT_ALIGN padding
// works around that). Here a row's arithmetic is a fixed sequence of its own, so it is bit-identical
// in a 1-row and a k-row call, and the causal rule "slots j <= p" needs no mask tensor: stale slots
// past a row's length are simply never read.
//
// The cache may hold fp16 keys and values (LayeredModel(kv_dtype=torch.float16)): they are converted
// to fp32 as they are loaded (vec.h), so a query over an fp16 cache gets, bit for bit, what it gets over
// an fp32 cache holding the same rounded values. Why: every step reads each cached key and value once
// per layer (46 KB per cached token in fp32 for the default model), which past a few hundred tokens
// outgrows the caches and becomes the part of a step that grows with the context.
//
// Token trees (speculative decoding, decoding/token_tree.py): a call may verify several candidate
// continuations at once, its new tokens being the nodes of a tree written to slots base..base+N-1 of
// their row; a node sees the slots before the root and its ancestors' slots (a 64-bit mask per query
// row, AttentionShape::tree). A node's ancestors do not sit in the slots that the same tokens hold when
// the row is decoded one token at a time (base + depth), and which lane of which 16-slot block a weight
// lands in decides how the softmax's sum is rounded; so a tree query's scores are moved to those
// sequence slots for its softmax and its weights moved back for the weighted sum, which adds them in
// slot order, i.e. depth order (to_sequence / to_tree below). Its result is then bit for bit what
// decoding the path one token at a time gives: greedy tree verification stays token-for-token equal to
// vanilla decoding, as linear verification is.
#include "attention.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec.h"

namespace exitspec {

namespace {

// One (batch row, head) pair: the T query rows of that batch row for that head share every key and
// value row they read, so a 16-slot block of keys is loaded from L2 once for all of them.
//
// Row invariance: a query's scores are computed over blocks of 16 slots aligned on absolute slot
// numbers (slots it cannot see are computed too, then given weight 0), summed by one fixed tree
// (vec.h hsum16x16), and its softmax and weighted sum run in slot order; so its result does not
// depend on which other queries share the call. Adding a zero-weight term leaves a sum unchanged
// bit for bit (the slots past a row's length hold finite stale values or zeros).
struct Query {
  const float* q;
  float* out;
  int64_t lo, hi;  // visible slots lo..hi (inclusive), in sequence order (a tree query: see to_sequence)
  int64_t end;     // the last slot it reads: hi, or a tree query's last visible tree slot
  int64_t base;    // a tree query: its root's slot
  uint64_t mask;   // a tree query: the tree slots base + i it sees (bit i); 0 = a plain causal query
};

// The lanes a..b-1 of the 16 slots j0..j0+15 that fall inside lo..hi.
struct Visible {
  int a, b;
  Visible(int64_t j0, int64_t lo, int64_t hi)
      : a((int)std::clamp<int64_t>(lo - j0, 0, 16)), b((int)std::clamp<int64_t>(hi - j0 + 1, 0, 16)) {}
};

// q . k for the 16 key rows of kblk: the scores of one query over one aligned block of slots, and
// the same for two queries at once (out[0], out[1]). A query's scores are the same bits either way:
// each is the same per-lane chain of products over the head dimension, then the same reduction.
#if EXITSPEC_AVX2
// AVX2 has 16 ymm registers, so per query a slot gets one ymm of partial sums (q . k folded to 8
// lanes, chunk by chunk in order) and 8 slots are reduced by one 8 x 8 transpose-and-add (hsum8x8).
// Two queries share every key chunk they load, 4 slots at a time (8 accumulators): the one-query
// form needs a load per FMA.
template <int DV, typename KV>
inline __m256 dots8(const float* q, const KV* k) {  // 8 slots, one query
  constexpr int D = DV * 16, C = D / 8;
  __m256 acc[8];
  for (int t = 0; t < 8; ++t) acc[t] = _mm256_mul_ps(_mm256_loadu_ps(q), vload8(k + t * D));
  for (int c = 1; c < C; ++c) {
    const __m256 qc = _mm256_loadu_ps(q + 8 * c);
    for (int t = 0; t < 8; ++t) acc[t] = _mm256_fmadd_ps(qc, vload8(k + t * D + 8 * c), acc[t]);
  }
  return hsum8x8(acc);
}
template <int DV, typename KV>
inline void dots8x2(const float* q0, const float* q1, const KV* k, __m256 out[2]) {  // 8 slots, two queries
  constexpr int D = DV * 16, C = D / 8;
  __m256 p0[8], p1[8];
  for (int t0 = 0; t0 < 8; t0 += 4) {
    __m256 a0[4], a1[4];
    {
      const __m256 x0 = _mm256_loadu_ps(q0), x1 = _mm256_loadu_ps(q1);
      for (int t = 0; t < 4; ++t) {
        const __m256 kv = vload8(k + (t0 + t) * D);
        a0[t] = _mm256_mul_ps(x0, kv), a1[t] = _mm256_mul_ps(x1, kv);
      }
    }
    for (int c = 1; c < C; ++c) {
      const __m256 x0 = _mm256_loadu_ps(q0 + 8 * c), x1 = _mm256_loadu_ps(q1 + 8 * c);
      for (int t = 0; t < 4; ++t) {
        const __m256 kv = vload8(k + (t0 + t) * D + 8 * c);
        a0[t] = _mm256_fmadd_ps(x0, kv, a0[t]), a1[t] = _mm256_fmadd_ps(x1, kv, a1[t]);
      }
    }
    for (int t = 0; t < 4; ++t) p0[t0 + t] = a0[t], p1[t0 + t] = a1[t];
  }
  out[0] = hsum8x8(p0), out[1] = hsum8x8(p1);
}
template <int DV, typename KV>
inline V16 scores16(const float* q, const KV* kblk) {
  return {dots8<DV>(q, kblk), dots8<DV>(q, kblk + 8 * DV * 16)};
}
template <int DV, typename KV>
inline void scores16(const float* q0, const float* q1, const KV* kblk, V16 out[2]) {
  __m256 lo[2], hi[2];
  dots8x2<DV>(q0, q1, kblk, lo);
  dots8x2<DV>(q0, q1, kblk + 8 * DV * 16, hi);
  out[0] = {lo[0], hi[0]}, out[1] = {lo[1], hi[1]};
}
#else
// AVX-512: one zmm of partial sums per slot, 16 slots, then one 16 x 16 transpose-and-add.
template <int DV, typename KV>
inline V16 scores16(const float* q, const KV* kblk) {
  constexpr int D = DV * 16;
  V16 qv[DV];
  for (int d = 0; d < DV; ++d) qv[d] = vload(q + 16 * d);
  V16 part[16];
  for (int t = 0; t < 16; ++t) {
    const KV* k = kblk + t * D;
    V16 acc = vmul(qv[0], vload(k));
    for (int d = 1; d < DV; ++d) acc = vfma(qv[d], vload(k + 16 * d), acc);
    part[t] = acc;
  }
  return hsum16x16(part);
}
template <int DV, typename KV>
inline void scores16(const float* q0, const float* q1, const KV* kblk, V16 out[2]) {
  out[0] = scores16<DV>(q0, kblk), out[1] = scores16<DV>(q1, kblk);
}
#endif

// The most of a row's DV chunks, dividing DV, that `live` accumulators hold.
constexpr int chunks_per_pass(int DV, int live) {
  int c = DV < live ? DV : live;
  while (DV % c) --c;
  return c;
}

// out[i] = inv[i] * sum_j w[i][j] v_j over `width` value rows, for n <= QB queries at once, CB of the
// D / 16 value chunks per pass over the rows (QB x CB accumulators). KV: the cache's element type
// (float, or Half: converted to fp32 as it is loaded, vec.h).
//
// Why chunks: with AVX2's 16 registers a whole 64-wide output is 8 of them, so a pass could serve one
// query only, loading every value row once per query (9 loads per 8 FMAs). Two queries x half the row
// (8 accumulators) load each value chunk once for both. A lane's sum runs over the rows in the same
// order whatever QB and CB are, so a query's output does not depend on which queries share its pass.
// Measured on Zen 3 with the pair scores above (interleaved runs of the default model): a step over 4-8
// new tokens after 1024-2048 cached ones 0.79-0.97x of the one-query forms' time, 1 new token unchanged.
template <int DV, int QB, int CB, typename KV>
void values_pass(int n, const float* const* w, float* const* out, const float* inv, const KV* vb, int64_t width) {
  if (n < QB) {  // fewer queries than the widest pass: the narrower instantiation, never dummy work
    constexpr int QH = QB / 2 >= 1 ? QB / 2 : 1;
    constexpr int CH = QH == 1 ? chunks_per_pass(DV, kLiveV16) : CB;  // one query: as many chunks as fit
    if constexpr (QB > 1) values_pass<DV, QH, CH, KV>(std::min(n, QB / 2), w, out, inv, vb, width);
    if constexpr (QB > 1)
      if (n > QB / 2) values_pass<DV, QH, CH, KV>(n - QB / 2, w + QB / 2, out + QB / 2, inv + QB / 2, vb, width);
    return;
  }
  constexpr int D = DV * 16;
  static_assert(DV % CB == 0, "value chunks per pass must divide D / 16");
  for (int c0 = 0; c0 < DV; c0 += CB) {
    V16 acc[QB][CB];
    for (int i = 0; i < QB; ++i)
      for (int v = 0; v < CB; ++v) acc[i][v] = vzero();
    for (int64_t j = 0; j < width; ++j) {
      const KV* vr = vb + j * D + 16 * c0;
      V16 vv[CB];
      for (int v = 0; v < CB; ++v) vv[v] = vload(vr + 16 * v);
      for (int i = 0; i < QB; ++i) {
        const V16 wt = vset1(w[i][j]);
        for (int v = 0; v < CB; ++v) acc[i][v] = vfma(wt, vv[v], acc[i][v]);
      }
    }
    for (int i = 0; i < QB; ++i)
      for (int v = 0; v < CB; ++v) vstore(out[i] + 16 * (c0 + v), vmul(acc[i][v], vset1(inv[i])));
  }
}

// A tree query's scores w (the group's row, slot a0 at w[0]) moved from its ancestors' slots base + i
// (bit i of mask, ascending: a parent precedes its children) to the slots base + depth they hold in
// the sequence. In place: the k-th ancestor sits at base + i with i >= k, and the later ancestors' slots
// lie past base + k, so nothing is overwritten before it is read.
inline void to_sequence(float* w, int64_t a0, int64_t base, uint64_t mask) {
  int64_t k = 0;
  for (uint64_t m = mask; m; m &= m - 1, ++k) {
    const int64_t from = base + __builtin_ctzll(m) - a0, to = base + k - a0;
    if (to >= 0) w[to] = w[from];  // to < 0: before the group's first block, outside a sliding window
  }
}

// The reverse for the softmax weights: the weight of sequence slot base + k goes back to the k-th
// ancestor's slot, and every other tree slot gets weight 0.
inline void to_tree(float* w, int64_t a0, int64_t base, uint64_t mask) {
  float kept[kMaxTreeNodes];
  int n = 0;
  for (uint64_t m = mask; m; m &= m - 1, ++n) kept[n] = base + n - a0 >= 0 ? w[base + n - a0] : 0.0f;
  const int64_t top = base + 63 - __builtin_clzll(mask) - a0;
  for (int64_t j = std::max<int64_t>(0, base - a0); j <= top; ++j) w[j] = 0.0f;
  n = 0;
  for (uint64_t m = mask; m; m &= m - 1, ++n)
    if (base + __builtin_ctzll(m) - a0 >= 0) w[base + __builtin_ctzll(m) - a0] = kept[n];
}

// DV = head_dim / 16, a compile-time constant so that every accumulator stays in a register.
template <int DV, typename KV>
void attend_group(const Query* qs, int nq, const KV* kb, const KV* vb, float scale, int64_t cache_len,
                  std::vector<float>& buf) {
  constexpr int D = DV * 16;
  int64_t lo = qs[0].lo, hi = qs[0].end;
  for (int i = 1; i < nq; ++i) lo = std::min(lo, qs[i].lo), hi = std::max(hi, qs[i].end);
  const int64_t a0 = lo & ~(int64_t)15, a1 = std::min(cache_len, (hi + 16) & ~(int64_t)15);  // aligned slots a0..a1-1
  const int64_t width = a1 - a0;
  buf.resize((size_t)nq * width);
  // --- scores of every query for every aligned slot, two queries at a time where there are two --
  for (int64_t j0 = a0; j0 < a1; j0 += 16) {
    const KV* kblk = kb + j0 * D;
    const V16 sc = vset1(scale);
    int i = 0;
    for (; i + 2 <= nq; i += 2) {
      V16 s2[2];
      scores16<DV>(qs[i].q, qs[i + 1].q, kblk, s2);
      vstore(&buf[(size_t)i * width + (j0 - a0)], vmul(s2[0], sc));
      vstore(&buf[(size_t)(i + 1) * width + (j0 - a0)], vmul(s2[1], sc));
    }
    if (i < nq) vstore(&buf[(size_t)i * width + (j0 - a0)], vmul(scores16<DV>(qs[i].q, kblk), sc));
  }
  // --- softmax over each query's visible slots; invisible slots get weight 0 ---------------------
  float inv[64];
  for (int i = 0; i < nq; ++i) {
    float* w = &buf[(size_t)i * width];
    if (qs[i].mask) to_sequence(w, a0, qs[i].base, qs[i].mask);
    V16 vmx = vset1(-INFINITY);
    for (int64_t j = 0; j < width; j += 16) {
      const Visible in(a0 + j, qs[i].lo, qs[i].hi);
      vmx = vmax_in(vmx, vload(w + j), in.a, in.b);
    }
    vmx = vset1(vmaxall(vmx));
    V16 total = vzero();
    for (int64_t j = 0; j < width; j += 16) {
      const Visible in(a0 + j, qs[i].lo, qs[i].hi);
      const V16 e = vkeep(vexp(vsub(vload(w + j), vmx)), in.a, in.b);
      vstore(w + j, e);
      total = vadd(total, e);
    }
    inv[i] = 1.0f / vsum(total);
    if (qs[i].mask) to_tree(w, a0, qs[i].base, qs[i].mask);
  }
  // --- weighted values: up to kLiveV16 accumulators (queries x D/16) per pass over the value rows --
  // Whole rows per pass where two or more queries fit the registers (AVX-512: 4 queries at D = 64),
  // else half a register file's worth of chunks for each of several queries (AVX2: 2 x 2).
  constexpr int CB = chunks_per_pass(DV, 2 * DV <= kLiveV16 ? DV : kLiveV16 / 2);
  constexpr int QB = kLiveV16 / CB >= 1 ? kLiveV16 / CB : 1;
  for (int i0 = 0; i0 < nq; i0 += QB) {
    const float* w[QB];
    float* out[QB];
    const int n = std::min(QB, nq - i0);
    for (int i = 0; i < n; ++i) w[i] = &buf[(size_t)(i0 + i) * width], out[i] = qs[i0 + i].out;
    values_pass<DV, QB, CB, KV>(n, w, out, inv + i0, vb + a0 * D, width);
  }
}

template <typename KV>
using GroupFn = void (*)(const Query*, int, const KV*, const KV*, float, int64_t, std::vector<float>&);

template <typename KV>
GroupFn<KV> group_fn(int D) {
  switch (D) {
    case 16: return attend_group<1, KV>;
    case 32: return attend_group<2, KV>;
    case 64: return attend_group<4, KV>;
    case 80: return attend_group<5, KV>;
    case 96: return attend_group<6, KV>;
    case 128: return attend_group<8, KV>;
    case 256: return attend_group<16, KV>;
    default: return nullptr;
  }
}

}  // namespace

bool attention_supports(int head_dim) { return group_fn<float>(head_dim) != nullptr; }

void check_tree(const int64_t* tree, const int64_t* pos, int64_t rows, int tokens, int64_t cache_len) {
  TORCH_CHECK(tokens >= 1 && tokens <= kMaxTreeNodes, "a token tree has at most ", kMaxTreeNodes,
              " nodes per row (one bit each in the attention kernel's 64-bit masks), got ", tokens,
              "; verify fewer nodes");
  TORCH_CHECK(rows % tokens == 0, "tree masks must be (batch, tokens)");
  for (int64_t b0 = 0; b0 < rows; b0 += tokens) {
    const int64_t base = pos[b0];
    TORCH_CHECK(base >= 0 && base + tokens <= cache_len, "tree slots ", base, "..", base + tokens - 1,
                " lie outside the KV cache (", cache_len, " slots)");
    for (int t = 0; t < tokens; ++t) {
      const uint64_t m = (uint64_t)tree[b0 + t], self = 1ull << t;
      TORCH_CHECK((m & 1) && (m >> t) == 1, "tree node ", t, " must see the root (bit 0) and itself (bit ", t,
                  ") and no later node (mask ", (int64_t)m, ")");
      if (t > 0) {
        const uint64_t up = m & ~self;  // its parent's ancestors and the parent, the highest of them
        TORCH_CHECK(up == (uint64_t)tree[b0 + 63 - __builtin_clzll(up)], "tree node ", t,
                    " must see exactly its parent's nodes and itself");
      }
      TORCH_CHECK(pos[b0 + t] == base + __builtin_popcountll(m) - 1, "tree node ", t,
                  " must sit at position root + depth (", base + __builtin_popcountll(m) - 1, "), got ", pos[b0 + t]);
    }
  }
}

template <typename KV>
void decode_attention(const float* q, const KV* kc, const KV* vc, const int64_t* pos, const AttentionShape& s,
                      float* out) {
  const int H = s.heads, D = s.head_dim, T = s.tokens, group = s.heads / s.kv_heads;
  const int B = s.rows / T;
  const int64_t L = s.cache_len;
  const GroupFn<KV> fn = group_fn<KV>(D);
  at::parallel_for(0, (int64_t)B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf;
    Query qs[64];
    for (int64_t it = i0; it < i1; ++it) {
      const int b = (int)(it / H), h = (int)(it % H), kvh = h / group;
      const size_t head = ((size_t)b * s.kv_heads + kvh) * L;
      for (int t0 = 0; t0 < T; t0 += 64) {  // more than 64 new tokens (a prefill): 64 at a time
        const int nq = std::min(64, T - t0);
        for (int t = 0; t < nq; ++t) {
          const int r = b * T + t0 + t;
          const int64_t p = pos[r];
          // A tree row (T <= 64, one pass): its root at pos[b * T], its mask over the T new tokens' slots.
          const uint64_t mask = s.tree ? (uint64_t)s.tree[r] : 0;
          const int64_t base = s.tree ? pos[b * T] : 0;
          qs[t] = Query{q + (size_t)r * s.q_stride + (size_t)h * D, out + ((size_t)r * H + h) * D,
                        s.window > 0 ? std::max<int64_t>(0, p - s.window + 1) : 0, p,
                        mask ? base + 63 - __builtin_clzll(mask) : p, base, mask};
        }
        fn(qs, nq, kc + head * D, vc + head * D, s.scale, L, buf);
      }
    }
  });
}

template void decode_attention<float>(const float*, const float*, const float*, const int64_t*,
                                      const AttentionShape&, float*);
template void decode_attention<Half>(const float*, const Half*, const Half*, const int64_t*, const AttentionShape&,
                                     float*);

}  // namespace exitspec
