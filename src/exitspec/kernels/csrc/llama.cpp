// A Llama-family decoder stack (llama, qwen2, mistral) over q4 weights, one call for layers start..stop,
// and the Python bindings of every kernel.
//
// Why one call for many layers: a decode step of the default model is ~25 small torch ops per layer;
// at 1-8 rows each costs a few microseconds of dispatch, ~2.5 ms per step in all, as much as the
// products themselves. Here the glue between the products (RMSNorm, rotary embedding, the cache
// write, SiLU, residual adds) runs in C++ on the calling thread, and only the products and the
// attention fork over threads.
//
// The arithmetic is HF's (LlamaDecoderLayer: pre-norm, rotate-half RoPE, grouped-query attention,
// SiLU-gated MLP), with the weights' products done by q4_gemm; rows never interact except through
// the cache, so a row's result is the same in any batch and for any number of new tokens.
#include <torch/extension.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <vector>

#include "attention.h"
#include "gemm.h"
#include "stack.h"  // the glue shared with the Gemma 3 stack (gemma.cpp)
#include "vec.h"

namespace exitspec {
namespace {

// Scales and lows as the packers store them (fp16): refuse any value fp16 would change, since the
// products would then not be the checkpoint's.
void check_groups(const torch::Tensor& t, int64_t n, int64_t g, const char* what) {
  check_cpu_f32(t, what);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == g, what, " must be (out_features, in_features / 32)");
  TORCH_CHECK(torch::equal(t.to(torch::kFloat16).to(torch::kFloat32), t), what, " must be exact in fp16");
}

// A weight packed for q4_gemm in this build's layout (gemm_avx512.cpp / gemm_avx2.cpp).
struct Q4Weight {
  torch::Tensor packed;  // uint8
  torch::Tensor bias;    // (N,) float32 or undefined
  int n = 0, k = 0;

  // q (N, K) uint8 codes 0..15, scale and low (N, K / 32) float32: w = scale * q + low per group.
  Q4Weight(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& low,
           c10::optional<torch::Tensor> b) {
    TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == torch::kUInt8 && q.is_contiguous() && q.dim() == 2,
                "q4 codes must be a contiguous (out_features, in_features) uint8 CPU tensor");
    n = (int)q.size(0), k = (int)q.size(1);
    TORCH_CHECK(n % kBlockN == 0 && k % kGroup == 0, "q4 weight needs out % 16 == 0 and in % 32 == 0, got ", n,
                " x ", k);
    TORCH_CHECK(q.numel() == 0 || q.max().item<int>() <= 15, "q4 codes must be 0..15");
    check_groups(scale, n, k / kGroup, "q4 scale");
    check_groups(low, n, k / kGroup, "q4 low");
    packed = torch::empty({q4_packed_bytes(n, k)}, torch::kUInt8);
    pack_q4(q.data_ptr<uint8_t>(), scale.data_ptr<float>(), low.data_ptr<float>(), n, k, packed.data_ptr<uint8_t>());
    if (b && b->defined()) {
      check_cpu_f32(*b, "bias");
      TORCH_CHECK(b->numel() == n, "bias size mismatch");
      bias = *b;
    }
  }
  const float* bias_ptr() const { return bias.defined() ? bias.data_ptr<float>() : nullptr; }
};

// A GGUF Q8_0 weight (the tied LM head) packed for q8_gemm: q (N, K) int8, scale (N, K / 32).
struct Q8Weight {
  torch::Tensor packed;
  int n = 0, k = 0;

  Q8Weight(const torch::Tensor& q, const torch::Tensor& scale) {
    TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.dim() == 2,
                "q8 codes must be a contiguous (out_features, in_features) int8 CPU tensor");
    n = (int)q.size(0), k = (int)q.size(1);
    TORCH_CHECK(n % kBlockN == 0 && k % kGroup == 0, "q8 weight needs out % 16 == 0 and in % 32 == 0, got ", n,
                " x ", k);
    TORCH_CHECK(q.numel() == 0 || q.min().item<int>() >= -127, "q8 codes must be -127..127 (GGUF Q8_0)");
    check_groups(scale, n, k / kGroup, "q8 scale");
    packed = torch::empty({q8_packed_bytes(n, k)}, torch::kUInt8);
    pack_q8(q.data_ptr<int8_t>(), scale.data_ptr<float>(), n, k, packed.data_ptr<uint8_t>());
  }
};

struct LlamaLayer {
  Q4Weight qkv, o, gate_up, down;
  torch::Tensor ln1, ln2;
  float eps1, eps2;
  int window;
};

}  // namespace

class LlamaStack : public StackCalls<LlamaStack> {
 public:
  LlamaStack(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double scale)
      : C_((int)hidden), H_((int)heads), Hkv_((int)kv_heads), D_((int)head_dim), I_((int)intermediate),
        scale_((float)scale) {
    TORCH_CHECK(C_ > 0 && I_ > 0 && H_ > 0 && Hkv_ > 0 && C_ % 32 == 0 && I_ % 32 == 0 && attention_supports(D_) &&
                    H_ % Hkv_ == 0,
                "unsupported Llama shape for the fused stack");
  }

  void add_layer(const Q4Weight& qkv, const Q4Weight& o, const Q4Weight& gate_up, const Q4Weight& down,
                 torch::Tensor ln1, double eps1, torch::Tensor ln2, double eps2, int64_t window) {
    check_cpu_f32(ln1, "ln1");
    check_cpu_f32(ln2, "ln2");
    TORCH_CHECK(qkv.n == (H_ + 2 * Hkv_) * D_ && qkv.k == C_ && o.n == C_ && o.k == H_ * D_ &&
                    gate_up.n == 2 * I_ && gate_up.k == C_ && down.n == C_ && down.k == I_,
                "layer weights do not match the stack's shape");
    layers_.push_back(LlamaLayer{qkv, o, gate_up, down, ln1, ln2, (float)eps1, (float)eps2, (int)window});
  }

  int64_t num_layers() const { return (int64_t)layers_.size(); }

 private:
  friend class StackCalls<LlamaStack>;  // forward calls run

  // StackCalls::forward for a KV cache of KV elements; cos, sin (B, T, D).
  template <typename KV>
  torch::Tensor run(const torch::Tensor& h, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                    const torch::Tensor& positions, const torch::Tensor& cos, const torch::Tensor& sin, int64_t start,
                    int64_t stop, const std::vector<bool>& skip_mlp, const c10::optional<torch::Tensor>& tree) const {
    const int64_t slots =
        check_stack_call(h, cache_k, cache_v, positions, start, stop, skip_mlp, num_layers(), C_, Hkv_, D_);
    check_cpu_f32(cos, "cos");
    check_cpu_f32(sin, "sin");
    const int B = (int)h.size(0), T = (int)h.size(1), M = B * T;
    TORCH_CHECK(cos.numel() == (int64_t)M * D_ && sin.numel() == (int64_t)M * D_, "cos/sin must be (B, T, head_dim)");
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* masks = M ? tree_masks(tree, pos, B, T, slots) : nullptr;

    torch::Tensor out = h.clone();
    if (M == 0) return out;  // no rows: nothing to run (and attention divides by T)
    float* x = out.data_ptr<float>();
    const int Nqkv = (H_ + 2 * Hkv_) * D_;
    std::vector<float> normed((size_t)M * C_), qkv((size_t)M * Nqkv), att((size_t)M * H_ * D_),
        gu((size_t)M * 2 * I_), act((size_t)M * I_);
    Q4Input prep;  // the rows as each product reads them (gemm.h), reused by every product
    const float* cs = cos.data_ptr<float>();
    const float* sn = sin.data_ptr<float>();
    const int64_t layer_stride = (int64_t)B * Hkv_ * slots * D_;
    Laps laps;
    for (int64_t l = start; l < stop; ++l) {
      const LlamaLayer& L = layers_[l];
      KV* kc = static_cast<KV*>(cache_k.data_ptr()) + l * layer_stride;
      KV* vc = static_cast<KV*>(cache_v.data_ptr()) + l * layer_stride;
      // --- attention half: h += o(attend(rope(qkv(norm(h))))) ------------------------------------
      rms_norm_rows(x, L.ln1.data_ptr<float>(), L.eps1, M, C_, normed.data());
      prep.set(normed.data(), M, C_);
      laps.mark(kGlue);
      q4_gemm(L.qkv.packed.data_ptr<uint8_t>(), Nqkv, prep, L.qkv.bias_ptr(), qkv.data(), Nqkv, false);
      laps.mark(kProducts);
      for (int r = 0; r < M; ++r) {
        float* row = qkv.data() + (size_t)r * Nqkv;  // [q heads | k heads | v heads], each D
        for (int hh = 0; hh < H_ + Hkv_; ++hh) rope_head(row + hh * D_, cs + (size_t)r * D_, sn + (size_t)r * D_, D_);
        store_kv(kc, vc, row, r, T, pos, masks, H_, Hkv_, D_, slots);
      }
      laps.mark(kGlue);
      AttentionShape s{M, T, H_, Hkv_, D_, slots, scale_, L.window, Nqkv, masks};
      decode_attention<KV>(qkv.data(), kc, vc, pos, s, att.data());
      laps.mark(kAttention);
      prep.set(att.data(), M, H_ * D_);
      laps.mark(kGlue);
      q4_gemm(L.o.packed.data_ptr<uint8_t>(), C_, prep, L.o.bias_ptr(), x, C_, true);
      laps.mark(kProducts);
      if (!skip_mlp.empty() && skip_mlp[l]) continue;
      // --- MLP half: h += down(silu(gate(norm(h))) * up(norm(h))) -------------------------------
      rms_norm_rows(x, L.ln2.data_ptr<float>(), L.eps2, M, C_, normed.data());
      prep.set(normed.data(), M, C_);
      laps.mark(kGlue);
      q4_gemm(L.gate_up.packed.data_ptr<uint8_t>(), 2 * I_, prep, L.gate_up.bias_ptr(), gu.data(), 2 * I_, false);
      laps.mark(kProducts);
      for (int r = 0; r < M; ++r) {
        const float* g = gu.data() + (size_t)r * 2 * I_;
        const float* u = g + I_;
        float* a = act.data() + (size_t)r * I_;
        for (int i = 0; i < I_; i += 16) {
          const V16 gv = vload(g + i);
          const V16 sig = vdiv(vset1(1.0f), vadd(vset1(1.0f), vexp(vsub(vzero(), gv))));
          vstore(a + i, vmul(vmul(gv, sig), vload(u + i)));
        }
      }
      prep.set(act.data(), M, I_);
      laps.mark(kGlue);
      q4_gemm(L.down.packed.data_ptr<uint8_t>(), C_, prep, L.down.bias_ptr(), x, C_, true);
      laps.mark(kProducts);
    }
    add_times(laps);
    return out;
  }

  int C_, H_, Hkv_, D_, I_;
  float scale_;
  std::vector<LlamaLayer> layers_;
};

// --- single kernels, for the per-op runtime of other families and for tests -------------------
torch::Tensor q4_linear(const torch::Tensor& x, const Q4Weight& w) {
  check_cpu_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.k, "x must be (rows, in)");
  const int M = (int)x.size(0);
  auto y = torch::empty({M, w.n}, x.options());
  Q4Input prep;
  q4_gemm(w.packed.data_ptr<uint8_t>(), w.n, prep.set(x.data_ptr<float>(), M, w.k), w.bias_ptr(), y.data_ptr<float>(),
          w.n, false);
  return y;
}

torch::Tensor q8_linear(const torch::Tensor& x, const Q8Weight& w) {
  check_cpu_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.k, "x must be (rows, in)");
  const int M = (int)x.size(0);
  auto y = torch::empty({M, w.n}, x.options());
  q8_gemm(w.packed.data_ptr<uint8_t>(), w.n, x.data_ptr<float>(), M, w.k, y.data_ptr<float>(), w.n);
  return y;
}

// q (rows, H, D), caches (B, Hkv, slots, D), pos (rows), tree: (B, tokens) masks or None -> (rows, H, D)
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
                        const torch::Tensor& pos, int64_t tokens, double scale, int64_t window,
                        const c10::optional<torch::Tensor>& tree) {
  check_cpu_f32(q, "q");
  const bool half = fp16_caches(kc, vc);
  TORCH_CHECK(tokens > 0 && q.dim() == 3 && kc.dim() == 4 && vc.sizes() == kc.sizes() && q.size(2) == kc.size(3) &&
                  attention_supports((int)q.size(2)) && kc.size(1) > 0 && q.size(1) % kc.size(1) == 0 &&
                  q.size(0) == kc.size(0) * tokens,
              "attention shapes do not match");
  TORCH_CHECK(pos.device().is_cpu() && pos.scalar_type() == torch::kInt64 && pos.is_contiguous() &&
                  pos.numel() == q.size(0),
              "pos must be (rows,) int64 on the CPU");
  TORCH_CHECK(kc.size(2) % 16 == 0, "cache slots must be a multiple of 16");
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t r = 0; r < pos.numel(); ++r) TORCH_CHECK(p[r] >= 0 && p[r] < kc.size(2), "position outside the cache");
  auto out = torch::empty_like(q);
  const int64_t* masks = tree_masks(tree, p, kc.size(0), tokens, kc.size(2));
  AttentionShape s{(int)q.size(0), (int)tokens, (int)q.size(1), (int)kc.size(1), (int)q.size(2), kc.size(2),
                   (float)scale, (int)window, q.size(1) * q.size(2), masks};
  if (half)
    decode_attention(q.data_ptr<float>(), static_cast<const Half*>(kc.data_ptr()),
                     static_cast<const Half*>(vc.data_ptr()), p, s, out.data_ptr<float>());
  else
    decode_attention(q.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), p, s, out.data_ptr<float>());
  return out;
}

// The K-quant products' bindings (kquant_ops.cpp).
void bind_kquants(pybind11::module_& m);
// The fused Gemma 3 stack's bindings (gemma.cpp).
void bind_gemma(pybind11::module_& m);

}  // namespace exitspec

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace exitspec;
  namespace py = pybind11;
  m.doc() = "exitspec CPU kernels: q4/q8 and GGML K-quant few-row products, decode attention, fused Llama and Gemma 3 stacks";
  m.attr("ISA") = kIsa;
  m.attr("NUMERICS") = kNumerics;
  // Both builds (avx2, avx512bf16) bind C++ types of the same names. Without module_local, pybind11
  // registers each type in one process-wide table, so importing the second build fails with
  // 'generic_type: type "LlamaStack" is already registered!'. Local bindings keep each build's types
  // to its own module: a Q4Weight of one build is never passed to the other's functions anyway.
  py::class_<Q4Weight>(m, "Q4Weight", py::module_local())
      .def(py::init<const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, c10::optional<torch::Tensor>>(),
           py::arg("q"), py::arg("scale"), py::arg("low"), py::arg("bias") = py::none())
      .def_readonly("out_features", &Q4Weight::n)
      .def_readonly("in_features", &Q4Weight::k)
      .def_property_readonly("nbytes", [](const Q4Weight& w) { return w.packed.numel(); });
  py::class_<Q8Weight>(m, "Q8Weight", py::module_local())
      .def(py::init<const torch::Tensor&, const torch::Tensor&>(), py::arg("q"), py::arg("scale"))
      .def_readonly("out_features", &Q8Weight::n)
      .def_readonly("in_features", &Q8Weight::k)
      .def_property_readonly("nbytes", [](const Q8Weight& w) { return w.packed.numel(); });
  py::class_<LlamaStack>(m, "LlamaStack", py::module_local())
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double>())
      .def("add_layer", &LlamaStack::add_layer)
      .def("num_layers", &LlamaStack::num_layers)
      .def("take_times", &LlamaStack::take_times)
      .def("forward", &LlamaStack::forward, py::arg("h"), py::arg("cache_k"), py::arg("cache_v"), py::arg("positions"),
           py::arg("cos"), py::arg("sin"), py::arg("start"), py::arg("stop"), py::arg("skip_mlp"),
           py::arg("tree") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("q4_linear", &q4_linear, py::call_guard<py::gil_scoped_release>());
  m.def("q8_linear", &q8_linear, py::call_guard<py::gil_scoped_release>());
  m.def("attention", &attention, py::arg("q"), py::arg("kc"), py::arg("vc"), py::arg("pos"), py::arg("tokens"),
        py::arg("scale"), py::arg("window"), py::arg("tree") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("attention_supports", &attention_supports);
  bind_kquants(m);
  bind_gemma(m);
}
