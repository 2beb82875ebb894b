// A Gemma 3 decoder stack (gemma3_text) over GGUF K-quant projections, one call for layers start..stop.
//
// Why one call: a Gemma 3 layer run from Python is ~40 small torch ops (four sandwich norms, q/k norms,
// two RoPE tables, GELU, residuals, casts) around four products; at one row each costs a few
// microseconds of dispatch, as much per step as Gemma 3 270M's 68 MB of projections take to stream.
// Here that glue runs in C++ on the calling thread (as the Llama stack's does, llama.cpp; the shared
// pieces are stack.h's), and only the products and the attention fork over threads.
//
// The arithmetic is HF's Gemma3DecoderLayer, as models/gemma3.py runs it per op:
//   x = rms(h) * (1 + w_in);  q, k, v = qkv(x);  q = rope(rms(q) * (1 + w_q)), k likewise per head;
//   h += rms(o(attend(q, k, v))) * (1 + w_post_attn)         (sliding window or global, per layer;
//                                                             scale query_pre_attn_scalar ** -0.5)
//   x = rms(h) * (1 + w_pre_ff);  h += rms(down(gelu_tanh(gate(x)) * up(x))) * (1 + w_post_ff)
// The norms' (1 + w) are computed once in fp32 by the adapter and passed in. Each layer picks its RoPE
// table (local and global layers have their own bases): cos / sin come stacked, (kinds, B, T, D).
// The projections are QuantMatrix (kquant_matrix.h): the GGUF's own blocks, a fused q|k|v or gate|up
// mixing block types; their inputs are prepared once per product (gemm.h's Q4Input) and rounded as the
// per-op path rounds them, so the two differ only in the glue's float rounding. Rows never interact
// except through the cache: a row's result is the same in any batch and for any number of new tokens.
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

#include "attention.h"
#include "kquant_matrix.h"
#include "stack.h"
#include "vec.h"

namespace exitspec {
namespace {

// x += rms(y) * w per row of C floats: a Gemma sandwich norm on a sublayer's output, then the residual.
void add_normed_rows(float* x, const float* y, const float* w, float eps, int M, int C) {
  for (int m = 0; m < M; ++m) {
    const float* yr = y + (size_t)m * C;
    float* xr = x + (size_t)m * C;
    const V16 r = vset1(1.0f / std::sqrt(dot16n(yr, yr, C) / C + eps));
    for (int c = 0; c < C; c += 16) vstore(xr + c, vadd(vload(xr + c), vmul(vload(w + c), vmul(vload(yr + c), r))));
  }
}

// a = gelu_tanh(g) * u over I floats (I a multiple of 16). HF's gelu (tanh approximation),
// 0.5 g (1 + tanh(s)) with s = sqrt(2 / pi) (g + 0.044715 g^3), is g * sigmoid(2 s) exactly:
// one exp per value (vexp clamps its argument, so a large |s| gives g or 0, never a NaN).
void gelu_tanh_gate(const float* g, const float* u, float* a, int I) {
  const V16 one = vset1(1.0f), c1 = vset1(-2.0f * 0.7978845608028654f), c3 = vset1(0.044715f);
  for (int i = 0; i < I; i += 16) {
    const V16 gv = vload(g + i);
    const V16 s2 = vmul(c1, vfma(vmul(c3, gv), vmul(gv, gv), gv));  // -2 s
    vstore(a + i, vmul(vdiv(gv, vadd(one, vexp(s2))), vload(u + i)));
  }
}

struct GemmaLayer {
  QuantMatrix qkv, o, gate_up, down;
  // (1 + weight) in fp32: (C,) for the four norms around attention and MLP, (D,) for q and k.
  torch::Tensor ln_in, ln_post_attn, ln_pre_ff, ln_post_ff, q_norm, k_norm;
  float eps;
  int window;  // sliding window, 0 for a global layer
  int rope;    // which stacked RoPE table
};

}  // namespace

class GemmaStack : public StackCalls<GemmaStack> {
 public:
  GemmaStack(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double scale)
      : C_((int)hidden), H_((int)heads), Hkv_((int)kv_heads), D_((int)head_dim), I_((int)intermediate),
        scale_((float)scale) {
    TORCH_CHECK(C_ > 0 && I_ > 0 && H_ > 0 && Hkv_ > 0 && C_ % 32 == 0 && I_ % 32 == 0 && attention_supports(D_) &&
                    H_ % Hkv_ == 0,
                "unsupported Gemma 3 shape for the fused stack (hidden and intermediate sizes must be multiples of "
                "32, the head dim one the attention kernel takes, heads a multiple of kv heads)");
  }

  void add_layer(const QuantMatrix& qkv, const QuantMatrix& o, const QuantMatrix& gate_up, const QuantMatrix& down,
                 torch::Tensor ln_in, torch::Tensor ln_post_attn, torch::Tensor ln_pre_ff, torch::Tensor ln_post_ff,
                 torch::Tensor q_norm, torch::Tensor k_norm, double eps, int64_t window, int64_t rope) {
    for (const auto& [t, n, what] : {std::tuple{&ln_in, C_, "ln_in"}, std::tuple{&ln_post_attn, C_, "ln_post_attn"},
                                     std::tuple{&ln_pre_ff, C_, "ln_pre_ff"}, std::tuple{&ln_post_ff, C_, "ln_post_ff"},
                                     std::tuple{&q_norm, D_, "q_norm"}, std::tuple{&k_norm, D_, "k_norm"}}) {
      check_cpu_f32(*t, what);
      TORCH_CHECK(t->numel() == n, what, " must have ", n, " values (1 + the norm's weight), got ", t->numel());
    }
    TORCH_CHECK(qkv.n == (H_ + 2 * Hkv_) * D_ && qkv.k == C_ && o.n == C_ && o.k == H_ * D_ &&
                    gate_up.n == 2 * I_ && gate_up.k == C_ && down.n == C_ && down.k == I_,
                "layer weights do not match the stack's shape");
    TORCH_CHECK(window >= 0 && rope >= 0, "window and rope index must be >= 0");
    layers_.push_back(GemmaLayer{qkv, o, gate_up, down, ln_in, ln_post_attn, ln_pre_ff, ln_post_ff, q_norm, k_norm,
                                 (float)eps, (int)window, (int)rope});
  }

  int64_t num_layers() const { return (int64_t)layers_.size(); }

 private:
  friend class StackCalls<GemmaStack>;  // forward calls run

  // StackCalls::forward for a KV cache of KV elements; cos, sin (kinds, B, T, D): one RoPE table per
  // attention kind, each layer reads its own.
  template <typename KV>
  torch::Tensor run(const torch::Tensor& h, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                    const torch::Tensor& positions, const torch::Tensor& cos, const torch::Tensor& sin, int64_t start,
                    int64_t stop, const std::vector<bool>& skip_mlp, const c10::optional<torch::Tensor>& tree) const {
    const int64_t slots =
        check_stack_call(h, cache_k, cache_v, positions, start, stop, skip_mlp, num_layers(), C_, Hkv_, D_);
    check_cpu_f32(cos, "cos");
    check_cpu_f32(sin, "sin");
    const int B = (int)h.size(0), T = (int)h.size(1), M = B * T;
    const int64_t kinds = cos.dim() == 4 ? cos.size(0) : 0;
    TORCH_CHECK(kinds > 0 && cos.numel() == kinds * M * D_ && sin.sizes() == cos.sizes(),
                "cos/sin must be (rope kinds, B, T, head_dim)");
    for (int64_t l = start; l < stop; ++l)
      TORCH_CHECK(layers_[l].rope < kinds, "layer ", l, " reads RoPE table ", layers_[l].rope, " of ", kinds);

    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* masks = M ? tree_masks(tree, pos, B, T, slots) : nullptr;

    torch::Tensor out = h.clone();
    if (M == 0) return out;  // no rows: nothing to run (and attention divides by T)
    float* x = out.data_ptr<float>();
    const int Nqkv = (H_ + 2 * Hkv_) * D_;
    std::vector<float> normed((size_t)M * std::max(C_, I_)), qkv((size_t)M * Nqkv), att((size_t)M * H_ * D_),
        gu((size_t)M * 2 * I_), sub((size_t)M * C_);
    Q4Input prep;  // a product's rows as its kernel reads them (gemm.h), reused by every product
    const int64_t layer_stride = (int64_t)B * Hkv_ * slots * D_;
    Laps laps;
    for (int64_t l = start; l < stop; ++l) {
      const GemmaLayer& L = layers_[l];
      KV* kc = static_cast<KV*>(cache_k.data_ptr()) + l * layer_stride;
      KV* vc = static_cast<KV*>(cache_v.data_ptr()) + l * layer_stride;
      const float* cs = cos.data_ptr<float>() + (size_t)L.rope * M * D_;
      const float* sn = sin.data_ptr<float>() + (size_t)L.rope * M * D_;
      // --- attention half: h += post_norm(o(attend(rope(qk_norm(qkv(norm(h))))))) ------------------
      rms_norm_rows(x, L.ln_in.data_ptr<float>(), L.eps, M, C_, normed.data());
      prep.set(normed.data(), M, C_);
      laps.mark(kGlue);
      L.qkv.run(prep, qkv.data(), Nqkv);
      laps.mark(kProducts);
      for (int r = 0; r < M; ++r) {
        float* row = qkv.data() + (size_t)r * Nqkv;  // [q heads | k heads | v heads], each D
        rms_norm_rows(row, L.q_norm.data_ptr<float>(), L.eps, H_, D_, row);  // in place, per head
        rms_norm_rows(row + H_ * D_, L.k_norm.data_ptr<float>(), L.eps, Hkv_, D_, row + H_ * D_);
        for (int hh = 0; hh < H_ + Hkv_; ++hh) rope_head(row + hh * D_, cs + (size_t)r * D_, sn + (size_t)r * D_, D_);
        store_kv(kc, vc, row, r, T, pos, masks, H_, Hkv_, D_, slots);
      }
      laps.mark(kGlue);
      // A tree query's sliding window counts the positions its path would occupy (attention.cpp).
      AttentionShape s{M, T, H_, Hkv_, D_, slots, scale_, L.window, Nqkv, masks};
      decode_attention<KV>(qkv.data(), kc, vc, pos, s, att.data());
      laps.mark(kAttention);
      prep.set(att.data(), M, H_ * D_);
      laps.mark(kGlue);
      L.o.run(prep, sub.data(), C_);
      laps.mark(kProducts);
      add_normed_rows(x, sub.data(), L.ln_post_attn.data_ptr<float>(), L.eps, M, C_);
      if (!skip_mlp.empty() && skip_mlp[l]) {
        laps.mark(kGlue);
        continue;
      }
      // --- MLP half: h += post_norm(down(gelu_tanh(gate(norm(h))) * up(norm(h)))) -----------------
      rms_norm_rows(x, L.ln_pre_ff.data_ptr<float>(), L.eps, M, C_, normed.data());
      prep.set(normed.data(), M, C_);
      laps.mark(kGlue);
      L.gate_up.run(prep, gu.data(), 2 * I_);
      laps.mark(kProducts);
      for (int r = 0; r < M; ++r) {
        const float* g = gu.data() + (size_t)r * 2 * I_;
        gelu_tanh_gate(g, g + I_, normed.data() + (size_t)r * I_, I_);
      }
      prep.set(normed.data(), M, I_);
      laps.mark(kGlue);
      L.down.run(prep, sub.data(), C_);
      laps.mark(kProducts);
      add_normed_rows(x, sub.data(), L.ln_post_ff.data_ptr<float>(), L.eps, M, C_);
      laps.mark(kGlue);
    }
    add_times(laps);
    return out;
  }

  int C_, H_, Hkv_, D_, I_;
  float scale_;
  std::vector<GemmaLayer> layers_;
};

void bind_gemma(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<GemmaStack>(m, "GemmaStack", py::module_local())
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double>(), py::arg("hidden"), py::arg("heads"),
           py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"), py::arg("scale"))
      .def("add_layer", &GemmaStack::add_layer, py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"),
           py::arg("ln_in"), py::arg("ln_post_attn"), py::arg("ln_pre_ff"), py::arg("ln_post_ff"), py::arg("q_norm"),
           py::arg("k_norm"), py::arg("eps"), py::arg("window"), py::arg("rope"))
      .def("num_layers", &GemmaStack::num_layers)
      .def("take_times", &GemmaStack::take_times)
      .def("forward", &GemmaStack::forward, py::arg("h"), py::arg("cache_k"), py::arg("cache_v"), py::arg("positions"),
           py::arg("cos"), py::arg("sin"), py::arg("start"), py::arg("stop"), py::arg("skip_mlp"),
           py::arg("tree") = py::none(), py::call_guard<py::gil_scoped_release>());
}

}  // namespace exitspec
