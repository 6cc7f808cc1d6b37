/* C ABI of the torch-free CUDA kernels: raw pointers, sizes and a stream, no torch headers
 * (the CPU torch wheel's headers do not compile under nvcc). Each call returns the launch's
 * cudaError_t. Logits chunks are row-major [rows, cols] with row stride ld (elements);
 * statistics are fp32 whatever the logits dtype. */
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { MEXT_F32 = 0, MEXT_F16 = 1, MEXT_BF16 = 2 } mext_dtype;

/* Folds one logits chunk into running per-row statistics (online log-sum-exp):
 * lse[r] = logaddexp(lse[r], logsumexp(logits[r, :])), and target_logit[r] += logits[r, j]
 * when j = target[r] - col0 lies in [0, cols). Start with lse = -inf, target_logit = 0. */
cudaError_t mext_ce_chunk_stats(const void* logits, mext_dtype dtype, int64_t rows,
                                int64_t cols, int64_t ld, const int64_t* target, int64_t col0,
                                float* lse, float* target_logit, cudaStream_t stream);

/* In place, dloss/dlogits for the chunk:
 * logits[r, c] = (exp(logits[r, c] - lse[r]) - (c + col0 == target[r])) * grad_scale[r]. */
cudaError_t mext_ce_chunk_grad(void* logits, mext_dtype dtype, int64_t rows, int64_t cols,
                               int64_t ld, const int64_t* target, int64_t col0,
                               const float* lse, const float* grad_scale, cudaStream_t stream);

/* y[r, j] = silu(x[r, j]) * x[r, d + j] for x [rows, 2d], y [rows, d]. */
cudaError_t mext_swiglu_forward(const void* x, void* y, mext_dtype dtype, int64_t rows,
                                int64_t d, cudaStream_t stream);

/* dx [rows, 2d] from x [rows, 2d] and dy [rows, d], recomputing sigmoid and silu. */
cudaError_t mext_swiglu_backward(const void* x, const void* dy, void* dx, mext_dtype dtype,
                                 int64_t rows, int64_t d, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
