// Fused parts of linear cross-entropy on CUDA: online log-sum-exp and target gather over one
// logits chunk, and the in-place softmax-minus-onehot gradient. The matmuls around them are
// cuBLAS calls made by the torch glue (ops_cuda.cpp); one block handles one row of the chunk.
#include <math.h>

#include "mext_cuda_common.cuh"

namespace mext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// (m, s) <- the log-sum-exp pair of the union of two sets, s being sum(exp(x - m)).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;
  s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
  m = mx;
}

template <typename T>
__global__ void chunk_stats_kernel(const T* __restrict__ logits, int64_t cols, int64_t ld,
                                   const int64_t* __restrict__ target, int64_t col0,
                                   float* __restrict__ lse, float* __restrict__ target_logit) {
  const int64_t r = blockIdx.x;
  const T* row = logits + r * ld;
  float m = -INFINITY, s = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
    const float x = to_float(row[c]);
    if (x > m) {
      s = s * __expf(m - x) + 1.f;
      m = x;
    } else if (m != -INFINITY) {
      s += __expf(x - m);
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
  }
  __shared__ float warp_m[kWarps], warp_s[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kWarps; ++w) merge(m, s, warp_m[w], warp_s[w]);
  const float chunk = m + logf(s);
  const float prev = lse[r];
  const float mx = fmaxf(prev, chunk);
  lse[r] = mx == -INFINITY ? mx : mx + log1pf(expf(-fabsf(prev - chunk)));
  const int64_t j = target[r] - col0;
  if (j >= 0 && j < cols) target_logit[r] += to_float(row[j]);
}

template <typename T>
__global__ void chunk_grad_kernel(T* __restrict__ logits, int64_t cols, int64_t ld,
                                  const int64_t* __restrict__ target, int64_t col0,
                                  const float* __restrict__ lse,
                                  const float* __restrict__ grad_scale) {
  const int64_t r = blockIdx.x;
  T* row = logits + r * ld;
  const float l = lse[r], g = grad_scale[r];
  const int64_t j = target[r] - col0;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
    const float p = __expf(to_float(row[c]) - l);
    row[c] = from_float<T>((c == j ? p - 1.f : p) * g);
  }
}

bool bad_shape(int64_t rows, int64_t cols, int64_t ld) {
  return rows < 0 || cols < 0 || ld < cols || rows > 2147483647LL;
}

}  // namespace
}  // namespace mext

extern "C" cudaError_t mext_ce_chunk_stats(const void* logits, mext_dtype dtype, int64_t rows,
                                           int64_t cols, int64_t ld, const int64_t* target,
                                           int64_t col0, float* lse, float* target_logit,
                                           cudaStream_t stream) {
  if (mext::bad_shape(rows, cols, ld)) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  MEXT_DISPATCH(dtype, mext::chunk_stats_kernel<T><<<rows, mext::kThreads, 0, stream>>>(
                           static_cast<const T*>(logits), cols, ld, target, col0, lse,
                           target_logit));
  return cudaGetLastError();
}

extern "C" cudaError_t mext_ce_chunk_grad(void* logits, mext_dtype dtype, int64_t rows,
                                          int64_t cols, int64_t ld, const int64_t* target,
                                          int64_t col0, const float* lse,
                                          const float* grad_scale, cudaStream_t stream) {
  if (mext::bad_shape(rows, cols, ld)) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  MEXT_DISPATCH(dtype, mext::chunk_grad_kernel<T><<<rows, mext::kThreads, 0, stream>>>(
                           static_cast<T*>(logits), cols, ld, target, col0, lse, grad_scale));
  return cudaGetLastError();
}
