// The torch side of the K-quant products (kquant.h): the bindings of a projection stored as GGUF
// blocks (QuantMatrix, kquant_matrix.h: one or more tensors of Q4_K, Q5_0, Q6_K or Q8_0 blocks, packed
// once, with its input prepared once for all parts); the de-quantiser that checks a GGUF tensor against
// the model's dense weights; and their bindings (bind_kquants, called from the module definition in
// llama.cpp).
#include <torch/extension.h>

#include <string>
#include <utility>
#include <vector>

#include "kquant_matrix.h"

namespace exitspec {

// The (out_features, in_features) fp32 values of raw blocks, through the very decoder the packers read
// (ggml_blocks.h): what the runtime compares with the model's dense weights before it packs them.
torch::Tensor dequantize_blocks(int64_t type, const torch::Tensor& raw, int64_t in_features) {
  const BlockFormat& f = format_of(type);
  check_raw(raw, f, in_features);
  const int64_t rows = raw.size(0), row_bytes = raw.size(1);
  auto out = torch::empty({rows, in_features}, torch::kFloat32);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    RowFields fields;
    for (int64_t r = r0; r < r1; ++r) {
      fields.decode((int)type, src + r * row_bytes, (int)in_features);
      for (int64_t c = 0; c < in_features; ++c) dst[r * in_features + c] = fields.value((int)type, (int)c);
    }
  });
  return out;
}

void bind_kquants(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<QuantMatrix>(m, "QuantMatrix", py::module_local())
      .def(py::init<int64_t, const std::vector<std::pair<int64_t, torch::Tensor>>&>(), py::arg("in_features"),
           py::arg("blocks"))
      .def_readonly("out_features", &QuantMatrix::n)
      .def_readonly("in_features", &QuantMatrix::k)
      .def_property_readonly("nbytes", &QuantMatrix::nbytes)
      .def_property_readonly("types", &QuantMatrix::types)
      .def("forward", &QuantMatrix::forward, py::call_guard<py::gil_scoped_release>());
  m.def("dequantize_blocks", &dequantize_blocks, py::arg("type"), py::arg("blocks"), py::arg("in_features"),
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace exitspec
