// CPU kernels behind megatron_ext.ops (ATen + at::parallel_for). Shared by the bindings.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace mext {

// Per-token statistics of hidden @ weight^T, walked in [block_rows, chunk_cols] tiles:
// {lse, target_logit}, both [n] in fp32 (fp64 for fp64 inputs). target_logit is 0 for rows
// whose target (a local vocab index) lies outside [0, v).
std::vector<at::Tensor> ce_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                   const at::Tensor& target, int64_t block_rows,
                                   int64_t chunk_cols);

// Gradients {d_hidden, d_weight} of sum_i grad_scale[i] * (lse[i] - logit[i, target[i]]),
// recomputing each tile's logits. Accumulation is fp32 (fp64 for fp64 inputs); d_hidden stays
// in that type so a tensor-parallel all-reduce can sum it before the cast, d_weight comes back
// in weight's dtype.
std::vector<at::Tensor> ce_backward(const at::Tensor& hidden, const at::Tensor& weight,
                                    const at::Tensor& target, const at::Tensor& lse,
                                    const at::Tensor& grad_scale, int64_t block_rows,
                                    int64_t chunk_cols);

// silu(a) * b with a, b the two halves of the last dimension.
at::Tensor swiglu_forward(const at::Tensor& x);

// d/dx of swiglu given dy; recomputes sigmoid(a) and silu(a) from x.
at::Tensor swiglu_backward(const at::Tensor& x, const at::Tensor& dy);

}  // namespace mext
