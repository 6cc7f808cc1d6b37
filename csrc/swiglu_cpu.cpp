// SwiGLU on CPU: one pass over x per direction; the backward recomputes sigmoid(a) from x so
// autograd keeps only x alive between forward and backward.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "ops_cpu.h"

namespace mext {
namespace {

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0,
              "swiglu needs an even last dimension [..., 2*d] to split into gate and value; "
              "got shape ", x.sizes());
}

// Rows per task so that each task touches about GRAIN_SIZE elements.
int64_t grain(int64_t d) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / (2 * d + 1)); }

}  // namespace

at::Tensor swiglu_forward(const at::Tensor& x_in) {
  check_x(x_in);
  const auto x = x_in.contiguous();
  const int64_t d = x.size(-1) / 2;
  auto sizes = x.sizes().vec();
  sizes.back() = d;
  auto y = at::empty(sizes, x.options());
  if (d == 0 || x.numel() == 0) return y;
  const int64_t rows = x.numel() / (2 * d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "swiglu_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* a = xp + r * 2 * d;
        const scalar_t* b = a + d;
        scalar_t* out = yp + r * d;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t av = static_cast<acc_t>(a[j]);
          out[j] = static_cast<scalar_t>(av / (acc_t(1) + std::exp(-av)) *
                                         static_cast<acc_t>(b[j]));
        }
      }
    });
  });
  return y;
}

at::Tensor swiglu_backward(const at::Tensor& x_in, const at::Tensor& dy_in) {
  check_x(x_in);
  const auto x = x_in.contiguous();
  const int64_t d = x.size(-1) / 2;
  auto y_sizes = x.sizes().vec();
  y_sizes.back() = d;
  TORCH_CHECK(dy_in.sizes() == at::IntArrayRef(y_sizes) &&
                  dy_in.scalar_type() == x.scalar_type(),
              "swiglu grad must match the output: shape ", at::IntArrayRef(y_sizes), " dtype ",
              x.scalar_type(), "; got ", dy_in.sizes(), " ", dy_in.scalar_type());
  const auto dy = dy_in.contiguous();
  auto dx = at::empty_like(x);
  if (d == 0 || x.numel() == 0) return dx;
  const int64_t rows = x.numel() / (2 * d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "swiglu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* a = xp + r * 2 * d;
        const scalar_t* b = a + d;
        const scalar_t* g = gp + r * d;
        scalar_t* da = dxp + r * 2 * d;
        scalar_t* db = da + d;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t av = static_cast<acc_t>(a[j]);
          const acc_t gv = static_cast<acc_t>(g[j]);
          const acc_t sig = acc_t(1) / (acc_t(1) + std::exp(-av));
          da[j] = static_cast<scalar_t>(gv * static_cast<acc_t>(b[j]) * sig *
                                        (acc_t(1) + av * (acc_t(1) - sig)));
          db[j] = static_cast<scalar_t>(gv * av * sig);
        }
      }
    });
  });
  return dx;
}

}  // namespace mext
