// Fused linear cross-entropy on CPU. Token blocks run in order; the vocab chunks of a block are
// shared out over threads, each thread owning one [block_rows, chunk_cols] tile buffer and its
// partial results, so memory stays O(threads * tile) instead of O(n * v).
#include <ATen/Parallel.h>

#include <limits>
#include <mutex>

#include "fused_ce_common.h"
#include "ops_cpu.h"

namespace mext {
namespace {

// fp32 accumulation for fp32/bf16/fp16 inputs; fp64 inputs keep fp64 (reference checks).
at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out[i] += logits[i, target[i] - c0] for the rows whose target falls in this chunk.
void add_target_logit(const at::Tensor& logits, const at::Tensor& target, int64_t c0,
                      at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "add_target_logit", [&] {
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const int64_t* tp = target.const_data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t rows = logits.size(0), cols = logits.size(1);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t j = tp[i] - c0;
      if (j >= 0 && j < cols) op[i] += lp[i * cols + j];
    }
  });
}

// grad[i, target[i] - c0] -= scale[i]: the one-hot part of (softmax - onehot) * scale.
void sub_onehot(at::Tensor& grad, const at::Tensor& target, int64_t c0,
                const at::Tensor& scale) {
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "sub_onehot", [&] {
    scalar_t* gp = grad.data_ptr<scalar_t>();
    const int64_t* tp = target.const_data_ptr<int64_t>();
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    const int64_t rows = grad.size(0), cols = grad.size(1);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t j = tp[i] - c0;
      if (j >= 0 && j < cols) gp[i * cols + j] -= sp[i];
    }
  });
}

}  // namespace

std::vector<at::Tensor> ce_forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                   const at::Tensor& target_in, int64_t block_rows,
                                   int64_t chunk_cols) {
  check_ce_args(hidden_in, weight_in, target_in, block_rows, chunk_cols);
  // Detached: autograd happens in Python; the worker threads must not record (or reject) ops.
  const auto hidden = hidden_in.detach().contiguous();
  const auto weight = weight_in.detach().contiguous();
  const auto target = target_in.contiguous();
  const int64_t n = hidden.size(0), v = weight.size(0);
  const auto opts = hidden.options().dtype(acc_type(hidden));
  const double neg_inf = -std::numeric_limits<double>::infinity();
  auto lse = at::full({n}, neg_inf, opts);
  auto target_logit = at::zeros({n}, opts);
  std::mutex merge;

  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    const auto hb = hidden.narrow(0, r0, rows).to(opts.dtype());
    const auto tb = target.narrow(0, r0, rows);
    auto lse_b = lse.narrow(0, r0, rows);
    auto tl_b = target_logit.narrow(0, r0, rows);
    at::parallel_for(0, ceil_div(v, chunk_cols), 1, [&](int64_t k0, int64_t k1) {
      at::AutoDispatchBelowADInplaceOrView no_autograd;
      auto buf = at::empty({rows * chunk_cols}, opts);
      auto part_lse = at::full({rows}, neg_inf, opts);
      auto part_tl = at::zeros({rows}, opts);
      auto row_max = at::empty({rows}, opts);
      auto row_sum = at::empty({rows}, opts);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t c0 = k * chunk_cols, cols = std::min(chunk_cols, v - c0);
        auto logits = tile_logits(buf, hb, weight.narrow(0, c0, cols).to(opts.dtype()));
        add_target_logit(logits, tb, c0, part_tl);
        at::amax_out(row_max, logits, {1});
        logits.sub_(row_max.unsqueeze(1)).exp_();
        at::sum_out(row_sum, logits, {1});
        part_lse = at::logaddexp(part_lse, row_sum.log_().add_(row_max));
      }
      std::lock_guard<std::mutex> lock(merge);
      lse_b.copy_(at::logaddexp(lse_b, part_lse));
      tl_b.add_(part_tl);
    });
  }
  return {lse, target_logit};
}

std::vector<at::Tensor> ce_backward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                    const at::Tensor& target_in, const at::Tensor& lse_in,
                                    const at::Tensor& grad_scale_in, int64_t block_rows,
                                    int64_t chunk_cols) {
  check_ce_args(hidden_in, weight_in, target_in, block_rows, chunk_cols);
  const int64_t n = hidden_in.size(0), h = hidden_in.size(1), v = weight_in.size(0);
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == n && grad_scale_in.dim() == 1 &&
                  grad_scale_in.size(0) == n,
              "lse and grad_scale must be [", n, "]; got ", lse_in.sizes(), " and ",
              grad_scale_in.sizes());
  // Detached: autograd happens in Python; the worker threads must not record (or reject) ops.
  const auto hidden = hidden_in.detach().contiguous();
  const auto weight = weight_in.detach().contiguous();
  const auto target = target_in.contiguous();
  const auto opts = hidden.options().dtype(acc_type(hidden));
  const auto lse = lse_in.detach().to(opts.dtype()).contiguous();
  const auto scale = grad_scale_in.detach().to(opts.dtype()).contiguous();
  auto d_hidden = at::zeros({n, h}, opts);
  auto d_weight = at::zeros({v, h}, opts);
  std::mutex merge;

  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    const auto hb = hidden.narrow(0, r0, rows).to(opts.dtype());
    const auto tb = target.narrow(0, r0, rows);
    const auto lse_b = lse.narrow(0, r0, rows).unsqueeze(1);
    const auto scale_b = scale.narrow(0, r0, rows);
    auto dh_b = d_hidden.narrow(0, r0, rows);
    at::parallel_for(0, ceil_div(v, chunk_cols), 1, [&](int64_t k0, int64_t k1) {
      at::AutoDispatchBelowADInplaceOrView no_autograd;
      auto buf = at::empty({rows * chunk_cols}, opts);
      auto dh_part = at::zeros({rows, h}, opts);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t c0 = k * chunk_cols, cols = std::min(chunk_cols, v - c0);
        const auto wc = weight.narrow(0, c0, cols).to(opts.dtype());
        auto grad = tile_logits(buf, hb, wc);
        grad.sub_(lse_b).exp_().mul_(scale_b.unsqueeze(1));
        sub_onehot(grad, tb, c0, scale_b);
        d_weight.narrow(0, c0, cols).addmm_(grad.t(), hb);
        dh_part.addmm_(grad, wc);
      }
      std::lock_guard<std::mutex> lock(merge);
      dh_b.add_(dh_part);
    });
  }
  return {d_hidden, d_weight.to(weight.scalar_type())};
}

}  // namespace mext
