// Python bindings of the CPU kernels: module megatron_ext.ops._C.
#include <torch/extension.h>

#include "ops_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels for megatron_ext.ops (fused linear cross-entropy, SwiGLU)";
  m.def("ce_forward", &mext::ce_forward, py::arg("hidden"), py::arg("weight"),
        py::arg("target"), py::arg("block_rows"), py::arg("chunk_cols"));
  m.def("ce_backward", &mext::ce_backward, py::arg("hidden"), py::arg("weight"),
        py::arg("target"), py::arg("lse"), py::arg("grad_scale"), py::arg("block_rows"),
        py::arg("chunk_cols"));
  m.def("swiglu_forward", &mext::swiglu_forward, py::arg("x"));
  m.def("swiglu_backward", &mext::swiglu_backward, py::arg("x"), py::arg("dy"));
}
