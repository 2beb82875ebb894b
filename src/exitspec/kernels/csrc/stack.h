// The glue every fused layer stack shares (llama.cpp's Llama stack, gemma.cpp's Gemma 3 stack): input
// checks (token-tree masks included), the RMSNorm of rows, rotate-half RoPE of one head, the KV cache's
// element type and slot writes (a token tree's nodes included), the stopwatch that splits a call's time
// into products, attention and glue, and StackCalls, the base of both stack classes (forward's dispatch
// on the cache type, take_times). One copy, so a fix in the norm or the cache write reaches every stack.
// Plain C++ over vec.h's V16: one source for both builds (AVX-512 and AVX2).
#pragma once
#include <torch/extension.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention.h"
#include "vec.h"

namespace exitspec {

inline void check_cpu_f32(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), what,
              " must be a contiguous float32 CPU tensor");
}

// y = w * x / sqrt(mean(x^2) + eps) per row of C floats (C a multiple of 16); y may be x (a row is read
// whole, for its sum of squares, before any of it is written).
inline void rms_norm_rows(const float* x, const float* w, float eps, int M, int C, float* y) {
  for (int m = 0; m < M; ++m) {
    const float* xr = x + (size_t)m * C;
    float* yr = y + (size_t)m * C;
    const V16 r = vset1(1.0f / std::sqrt(dot16n(xr, xr, C) / C + eps));
    for (int c = 0; c < C; c += 16) vstore(yr + c, vmul(vload(w + c), vmul(vload(xr + c), r)));
  }
}

// HF's rotate-half RoPE of one head vector in place: x * cos + rotate_half(x) * sin (D <= 256).
inline void rope_head(float* x, const float* cs, const float* sn, int D) {
  const int half = D / 2;
  float tmp[256];
  std::memcpy(tmp, x, sizeof(float) * D);
  for (int d = 0; d < half; ++d) x[d] = tmp[d] * cs[d] + (-tmp[d + half]) * sn[d];
  for (int d = half; d < D; ++d) x[d] = tmp[d] * cs[d] + tmp[d - half] * sn[d];
}

// The KV cache of a fused stack: fp32, or fp16 (half the bytes that attention reads per cached token,
// the cost that grows with the context; values rounded to nearest even as they are written, read back
// to fp32 by the attention kernel). Both caches of a call have the same type: fp16_caches checks them
// (for the stacks and the single attention kernel alike) and says whether they hold fp16.
inline bool fp16_caches(const torch::Tensor& k, const torch::Tensor& v) {
  auto check = [](const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kFloat16) &&
                    t.is_contiguous(),
                what, " must be a contiguous float32 or float16 CPU tensor");
  };
  check(k, "k cache");
  check(v, "v cache");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v caches must have the same dtype");
  return k.scalar_type() == torch::kFloat16;
}

// x (D floats, D a multiple of 16) into a cache slot.
inline void write_slot(float* dst, const float* x, int D) { std::memcpy(dst, x, sizeof(float) * D); }
inline void write_slot(Half* dst, const float* x, int D) {
  for (int d = 0; d < D; d += 16) vstore(dst + d, vload(x + d));
}

// Row r's keys and values (its q|k|v product row, [H q heads | Hkv k heads | Hkv v heads] of D floats)
// into its cache slot of every kv head of its batch row b = r / T: its position, or, for a token tree's
// node t = r - b * T (masks given), the tree's slot root + t (attention.h: a node sits at root + depth,
// but its slot is its index, so siblings never share one).
template <typename KV>
inline void store_kv(KV* kc, KV* vc, const float* row, int r, int T, const int64_t* pos, const int64_t* masks, int H,
                     int Hkv, int D, int64_t slots) {
  const int b = r / T;
  const int64_t at = masks ? pos[b * T] + (r - b * T) : pos[r];
  for (int kh = 0; kh < Hkv; ++kh) {
    const size_t slot = (((size_t)b * Hkv + kh) * slots + at) * D;
    write_slot(kc + slot, row + (H + kh) * D, D);
    write_slot(vc + slot, row + (H + Hkv + kh) * D, D);
  }
}

// The parts take_times() splits a call's time into, and a stopwatch that charges each interval
// since the previous mark to the part named at its end.
enum Part { kProducts = 0, kAttention = 1, kGlue = 2 };
struct Laps {
  using Clock = std::chrono::steady_clock;
  Clock::time_point last = Clock::now();
  int64_t ns[3] = {0, 0, 0};
  void mark(Part p) {
    const Clock::time_point now = Clock::now();
    ns[p] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - last).count();
    last = now;
  }
};

// What a stack class shares beyond the functions here (CRTP: `class S : public StackCalls<S>`, which
// defines `template <typename KV> torch::Tensor run(...) const` with forward's arguments): forward,
// which picks run's cache element type, and the stopwatch totals that take_times() hands out.
template <typename Stack>
class StackCalls {
 public:
  // Where the calls' time went since the last take_times(), in ms: (weight products, attention over
  // the cache, the rest: norms, RoPE, cache writes, activations, input quantization). What `exitspec
  // info` and bench-runtime split a step's layers by. A clock read costs ~20 ns, ~10 per layer: always on.
  std::array<double, 3> take_times() {
    std::array<double, 3> ms;
    for (int i = 0; i < 3; ++i) ms[i] = times_ns_[i].exchange(0) * 1e-6;
    return ms;
  }

  // h (B, T, C) entering layer `start` -> hidden states leaving layer stop-1 (a new tensor); cos, sin:
  // the stack's RoPE tables for the call's positions. `tree`: (B, T) masks when the new tokens are a
  // token tree (attention.h): token t then writes slot positions[b, 0] + t, not its position (root +
  // depth), and a sliding-window layer counts its window in positions, the slots the path will hold.
  torch::Tensor forward(const torch::Tensor& h, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                        const torch::Tensor& positions, const torch::Tensor& cos, const torch::Tensor& sin,
                        int64_t start, int64_t stop, const std::vector<bool>& skip_mlp,
                        const c10::optional<torch::Tensor>& tree) const {
    const Stack& s = static_cast<const Stack&>(*this);
    if (fp16_caches(cache_k, cache_v))
      return s.template run<Half>(h, cache_k, cache_v, positions, cos, sin, start, stop, skip_mlp, tree);
    return s.template run<float>(h, cache_k, cache_v, positions, cos, sin, start, stop, skip_mlp, tree);
  }

 protected:
  void add_times(const Laps& laps) const {
    for (int i = 0; i < 3; ++i) times_ns_[i] += laps.ns[i];
  }

 private:
  mutable std::array<std::atomic<int64_t>, 3> times_ns_{};  // by Part; atomic: the server may run two calls at once
};

// The checks a stack's forward makes on its call (shapes of h, the caches and the positions; every
// position inside the cache; layers start..stop inside the stack, a skip_mlp entry for each). Returns
// the cache's slots per (b, kv head).
inline int64_t check_stack_call(const torch::Tensor& h, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                                const torch::Tensor& positions, int64_t start, int64_t stop,
                                const std::vector<bool>& skip_mlp, int64_t layers, int C, int Hkv, int D) {
  check_cpu_f32(h, "h");
  TORCH_CHECK(0 <= start && start <= stop && stop <= layers, "layer range outside the stack");
  TORCH_CHECK(skip_mlp.empty() || (int64_t)skip_mlp.size() >= stop, "skip_mlp must have an entry per layer");
  TORCH_CHECK(positions.device().is_cpu() && positions.scalar_type() == torch::kInt64 && positions.is_contiguous() &&
                  positions.dim() == 2,
              "positions must be (B, T) int64 on the CPU");
  TORCH_CHECK(h.dim() == 3 && h.size(2) == C, "h must be (B, T, hidden)");
  const int64_t B = h.size(0);
  TORCH_CHECK(cache_k.dim() == 5 && cache_k.size(0) == layers && cache_k.size(1) == B && cache_k.size(2) == Hkv &&
                  cache_k.size(4) == D && cache_v.sizes() == cache_k.sizes(),
              "cache must be (layers, B, kv_heads, slots, head_dim)");
  TORCH_CHECK(positions.size(0) == B && positions.size(1) == h.size(1), "positions must match h");
  const int64_t slots = cache_k.size(3);
  TORCH_CHECK(slots % 16 == 0, "cache slots must be a multiple of 16 (runtime/kv_cache.py SLOT_ALIGN)");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < positions.numel(); ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < slots, "position outside the KV cache");
  return slots;
}

// Optional tree masks (B, T) int64 of a call whose new tokens are a token tree (attention.h): checked
// against the positions, nullptr when there are none.
inline const int64_t* tree_masks(const c10::optional<torch::Tensor>& tree, const int64_t* pos, int64_t B, int64_t T,
                                 int64_t slots) {
  if (!tree || !tree->defined()) return nullptr;
  TORCH_CHECK(tree->device().is_cpu() && tree->scalar_type() == torch::kInt64 && tree->is_contiguous() &&
                  tree->dim() == 2 && tree->size(0) == B && tree->size(1) == T,
              "tree masks must be (batch, new tokens) int64 on the CPU");
  check_tree(tree->data_ptr<int64_t>(), pos, B * T, (int)T, slots);
  return tree->data_ptr<int64_t>();
}

}  // namespace exitspec
