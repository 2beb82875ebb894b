// A projection whose weight is one or more GGUF tensors stored as Q4_K, Q5_0, Q6_K or Q8_0 blocks,
// stacked along the outputs (a fused q|k|v may mix types: Gemma 3 270M keeps some v_proj in Q8_0
// beside Q5_0 q/k), packed once for this build's K-quant kernels (kquant.h). Shared by its torch
// bindings (kquant_ops.cpp) and the fused Gemma 3 stack (gemma.cpp), which runs it on inputs it has
// prepared once for several products (`run`).
#pragma once
#include <torch/extension.h>

#include <string>
#include <utility>
#include <vector>

#include "kquant.h"

namespace exitspec {

// The format of a GGML type the kernels read, or a clear refusal.
inline const BlockFormat& format_of(int64_t type) {
  const BlockFormat* f = block_format((int)type);
  TORCH_CHECK(f != nullptr, "GGML block type ", type, " is not one the kernels read (Q4_0, Q4_K, Q5_0, Q6_K, Q8_0)");
  return *f;
}

// `raw`: (out_features, bytes per row) as the GGUF stores the tensor.
inline void check_raw(const torch::Tensor& raw, const BlockFormat& f, int64_t k) {
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == torch::kUInt8 && raw.is_contiguous() && raw.dim() == 2,
              f.name, " blocks must be a contiguous (out_features, bytes per row) uint8 CPU tensor");
  TORCH_CHECK(k > 0 && k % f.weights == 0, f.name, " rows need in_features a multiple of ", f.weights, ", got ", k);
  TORCH_CHECK(raw.size(1) == k / f.weights * f.bytes, f.name, " rows of ", k, " weights take ",
              k / f.weights * f.bytes, " bytes, got ", raw.size(1));
}


struct QuantMatrix {
  struct Part {
    torch::Tensor packed;  // uint8, this build's layout (kquant_avx512.cpp / kquant_avx2.cpp)
    int type, n;
  };
  std::vector<Part> parts;
  int n = 0, k = 0;

  // parts: (GGML type, raw blocks (n_i, bytes per row)), stacked along the outputs in this order.
  QuantMatrix(int64_t in_features, const std::vector<std::pair<int64_t, torch::Tensor>>& blocks) {
    TORCH_CHECK(!blocks.empty(), "a quantised projection needs at least one tensor");
    k = (int)in_features;
    for (const auto& [type, raw] : blocks) {
      const BlockFormat& f = format_of(type);
      check_raw(raw, f, in_features);
      const int rows = (int)raw.size(0);
      TORCH_CHECK(rows % kBlockN == 0, f.name, " weight needs out_features % 16 == 0, got ", rows);
      Part p{torch::empty({kq_packed_bytes((int)type, rows, k)}, torch::kUInt8), (int)type, rows};
      kq_pack((int)type, raw.data_ptr<uint8_t>(), rows, k, p.packed.data_ptr<uint8_t>());
      parts.push_back(std::move(p));
      n += rows;
    }
  }

  // Y (M, out_features), row stride ldy, = x W^T for x prepared once (gemm.h's Q4Input, in_features
  // columns): each part writes its own columns.
  void run(const Q4Input& prep, float* Y, int ldy) const {
    int col = 0;
    for (const Part& p : parts) {
      kq_gemm(p.type, p.packed.data_ptr<uint8_t>(), p.n, prep, Y + col, ldy);
      col += p.n;
    }
  }

  // x (M, in_features) float32 -> (M, out_features)
  torch::Tensor forward(const torch::Tensor& x) const {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 &&
                    x.size(1) == k,
                "x must be a contiguous (rows, in_features) float32 CPU tensor");
    const int M = (int)x.size(0);
    auto y = torch::empty({M, n}, x.options());
    Q4Input prep;
    prep.set(x.data_ptr<float>(), M, k);
    run(prep, y.data_ptr<float>(), n);
    return y;
  }

  int64_t nbytes() const {
    int64_t total = 0;
    for (const Part& p : parts) total += p.packed.numel();
    return total;
  }

  std::vector<std::string> types() const {
    std::vector<std::string> names;
    for (const Part& p : parts) names.emplace_back(block_format(p.type)->name);
    return names;
  }
};

}  // namespace exitspec
