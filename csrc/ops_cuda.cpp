// Torch glue for the CUDA kernels: module megatron_ext.ops._C_cuda (built only when torch has
// CUDA). Matmuls are cuBLAS calls through ATen on tiles of [block_rows, chunk_cols] logits;
// the softmax statistics and the gradient formation are the C-ABI kernels of mext_cuda.h.
// Logits tiles are in the input dtype (bf16 logits, as megatron's own loss has them); every
// sum over tiles (log-sum-exp, target logit, d_hidden, d_weight) is fp32.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <limits>

#include "fused_ce_common.h"
#include "mext_cuda.h"

namespace {

mext_dtype to_mext(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return MEXT_F32;
    case at::kHalf:
      return MEXT_F16;
    case at::kBFloat16:
      return MEXT_BF16;
    default:
      TORCH_CHECK(false, "the CUDA kernels take fp32, fp16 or bf16; got ", t,
                  "; use set_backend('torch') for other dtypes");
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void check_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                int64_t block_rows, int64_t chunk_cols) {
  TORCH_CHECK(hidden.is_cuda() && weight.device() == hidden.device() &&
                  target.device() == hidden.device(),
              "hidden, weight and target must be on one CUDA device; got ", hidden.device(),
              ", ", weight.device(), ", ", target.device());
  mext::check_ce_args(hidden, weight, target, block_rows, chunk_cols);
}

using mext::tile_logits;  // cuBLAS through ATen on CUDA tensors

// acc (fp32) += a @ b, summed in fp32 over every call. fp32 inputs: addmm_. bf16/fp16 inputs:
// cuBLAS multiplies on tensor cores with an fp32 accumulator, and mm's out_dtype overload
// (torch >= 2.8) writes that product in fp32: straight into acc for its first contribution,
// else into `scratch` and then added. A plain at::mm would round each tile product to bf16
// before the sum (8 chunks at V=128K: ~2^-8 relative error per chunk in d_hidden).
// cublasGemmEx with an fp32 C and beta=1 would save the add, but needs cuBLAS linked
// directly (at::cuda::blas is torch-internal, not part of the extension API).
void add_matmul(at::Tensor acc, const at::Tensor& a, const at::Tensor& b, bool first,
                const at::Tensor& scratch) {
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);
  } else if (first) {
    at::mm_out(acc, a, b, at::kFloat);
  } else {
    auto product = scratch.narrow(0, 0, acc.numel()).view(acc.sizes());
    at::mm_out(product, a, b, at::kFloat);
    acc.add_(product);
  }
}

std::vector<at::Tensor> ce_forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                   const at::Tensor& target_in, int64_t block_rows,
                                   int64_t chunk_cols) {
  check_args(hidden_in, weight_in, target_in, block_rows, chunk_cols);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const auto hidden = hidden_in.detach().contiguous();
  const auto weight = weight_in.detach().contiguous();
  const auto target = target_in.contiguous();
  const auto dtype = to_mext(hidden.scalar_type());
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  auto lse = at::full({n}, -std::numeric_limits<float>::infinity(), f32);
  auto target_logit = at::zeros({n}, f32);
  if (n == 0 || v == 0) return {lse, target_logit};
  auto buf = at::empty({std::min(block_rows, n) * std::min(chunk_cols, v)}, hidden.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    const auto hb = hidden.narrow(0, r0, rows);
    for (int64_t c0 = 0; c0 < v; c0 += chunk_cols) {
      const int64_t cols = std::min(chunk_cols, v - c0);
      const auto logits = tile_logits(buf, hb, weight.narrow(0, c0, cols));
      check_launch(mext_ce_chunk_stats(logits.data_ptr(), dtype, rows, cols, cols,
                                       target.data_ptr<int64_t>() + r0, c0,
                                       lse.data_ptr<float>() + r0,
                                       target_logit.data_ptr<float>() + r0, stream),
                   "mext_ce_chunk_stats");
    }
  }
  return {lse, target_logit};
}

std::vector<at::Tensor> ce_backward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                    const at::Tensor& target_in, const at::Tensor& lse_in,
                                    const at::Tensor& grad_scale_in, int64_t block_rows,
                                    int64_t chunk_cols) {
  check_args(hidden_in, weight_in, target_in, block_rows, chunk_cols);
  const int64_t n = hidden_in.size(0), h = hidden_in.size(1), v = weight_in.size(0);
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == n && grad_scale_in.dim() == 1 &&
                  grad_scale_in.size(0) == n,
              "lse and grad_scale must be [", n, "]; got ", lse_in.sizes(), " and ",
              grad_scale_in.sizes());
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const auto hidden = hidden_in.detach().contiguous();
  const auto weight = weight_in.detach().contiguous();
  const auto target = target_in.contiguous();
  const auto lse = lse_in.detach().to(at::kFloat).contiguous();
  const auto scale = grad_scale_in.detach().to(at::kFloat).contiguous();
  const auto dtype = to_mext(hidden.scalar_type());
  const auto f32 = hidden.options().dtype(at::kFloat);
  auto d_hidden = at::zeros({n, h}, f32);
  auto d_weight = at::zeros({v, h}, f32);
  if (n == 0 || v == 0) return {d_hidden, d_weight.to(weight.scalar_type())};
  const int64_t tile_rows = std::min(block_rows, n), tile_cols = std::min(chunk_cols, v);
  auto buf = at::empty({tile_rows * tile_cols}, hidden.options());
  // fp32 products of the later contributions to a d_hidden block (one per vocab chunk) and to
  // a d_weight chunk (one per row block); fp32 inputs accumulate in place and need none.
  const int64_t later = std::max(v > chunk_cols ? tile_rows : 0, n > block_rows ? tile_cols : 0);
  const auto scratch = at::empty({hidden.scalar_type() == at::kFloat ? 0 : later * h}, f32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    const auto hb = hidden.narrow(0, r0, rows);
    for (int64_t c0 = 0; c0 < v; c0 += chunk_cols) {
      const int64_t cols = std::min(chunk_cols, v - c0);
      const auto wc = weight.narrow(0, c0, cols);
      const auto grad = tile_logits(buf, hb, wc);
      check_launch(mext_ce_chunk_grad(grad.data_ptr(), dtype, rows, cols, cols,
                                      target.data_ptr<int64_t>() + r0, c0,
                                      lse.data_ptr<float>() + r0, scale.data_ptr<float>() + r0,
                                      stream),
                   "mext_ce_chunk_grad");
      add_matmul(d_hidden.narrow(0, r0, rows), grad, wc, c0 == 0, scratch);
      add_matmul(d_weight.narrow(0, c0, cols), grad.t(), hb, r0 == 0, scratch);
    }
  }
  return {d_hidden, d_weight.to(weight.scalar_type())};
}

int64_t half_width(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1 && x.size(-1) % 2 == 0,
              "swiglu needs a CUDA tensor with an even last dimension [..., 2*d]; got ",
              x.device(), " ", x.sizes());
  return x.size(-1) / 2;
}

at::Tensor swiglu_forward(const at::Tensor& x_in) {
  const int64_t d = half_width(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = d;
  auto y = at::empty(sizes, x.options());
  if (y.numel() == 0) return y;
  check_launch(mext_swiglu_forward(x.data_ptr(), y.data_ptr(), to_mext(x.scalar_type()),
                                   y.numel() / d, d, c10::cuda::getCurrentCUDAStream()),
               "mext_swiglu_forward");
  return y;
}

at::Tensor swiglu_backward(const at::Tensor& x_in, const at::Tensor& dy_in) {
  const int64_t d = half_width(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto dy = dy_in.contiguous();
  TORCH_CHECK(dy.numel() * 2 == x.numel() && dy.scalar_type() == x.scalar_type() &&
                  dy.device() == x.device(),
              "swiglu grad must match the output (half of x ", x.sizes(), ", ", x.scalar_type(),
              "); got ", dy.sizes(), ", ", dy.scalar_type());
  auto dx = at::empty_like(x);
  if (dy.numel() == 0) return dx;
  check_launch(mext_swiglu_backward(x.data_ptr(), dy.data_ptr(), dx.data_ptr(),
                                    to_mext(x.scalar_type()), dy.numel() / d, d,
                                    c10::cuda::getCurrentCUDAStream()),
               "mext_swiglu_backward");
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels for megatron_ext.ops (fused linear cross-entropy, SwiGLU)";
  m.def("ce_forward", &ce_forward, py::arg("hidden"), py::arg("weight"), py::arg("target"),
        py::arg("block_rows"), py::arg("chunk_cols"));
  m.def("ce_backward", &ce_backward, py::arg("hidden"), py::arg("weight"), py::arg("target"),
        py::arg("lse"), py::arg("grad_scale"), py::arg("block_rows"), py::arg("chunk_cols"));
  m.def("swiglu_forward", &swiglu_forward, py::arg("x"));
  m.def("swiglu_backward", &swiglu_backward, py::arg("x"), py::arg("dy"));
}
