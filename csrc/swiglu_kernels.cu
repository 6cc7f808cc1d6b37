// SwiGLU on CUDA: elementwise over [rows, d] output positions, fp32 math for every dtype. The
// backward recomputes sigmoid(a) from x, so only x is kept between forward and backward.
#include "mext_cuda_common.cuh"

namespace mext {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

int blocks_for(int64_t total) {
  const int64_t b = ceil_div(total, kThreads);
  return static_cast<int>(b < kMaxBlocks ? b : kMaxBlocks);
}

template <typename T>
__global__ void swiglu_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t total,
                                      int64_t d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += stride) {
    const int64_t r = i / d, j = i - r * d;
    const float a = to_float(x[2 * d * r + j]);
    const float b = to_float(x[2 * d * r + d + j]);
    y[i] = from_float<T>(a / (1.f + __expf(-a)) * b);
  }
}

template <typename T>
__global__ void swiglu_backward_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                       T* __restrict__ dx, int64_t total, int64_t d) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += stride) {
    const int64_t r = i / d, j = i - r * d;
    const int64_t ia = 2 * d * r + j, ib = ia + d;
    const float a = to_float(x[ia]), b = to_float(x[ib]), g = to_float(dy[i]);
    const float sig = 1.f / (1.f + __expf(-a));
    dx[ia] = from_float<T>(g * b * sig * (1.f + a * (1.f - sig)));
    dx[ib] = from_float<T>(g * a * sig);
  }
}

}  // namespace
}  // namespace mext

extern "C" cudaError_t mext_swiglu_forward(const void* x, void* y, mext_dtype dtype,
                                           int64_t rows, int64_t d, cudaStream_t stream) {
  if (rows < 0 || d < 0) return cudaErrorInvalidValue;
  const int64_t total = rows * d;
  if (total == 0) return cudaSuccess;
  MEXT_DISPATCH(dtype,
                mext::swiglu_forward_kernel<T><<<mext::blocks_for(total), mext::kThreads, 0,
                                                 stream>>>(static_cast<const T*>(x),
                                                           static_cast<T*>(y), total, d));
  return cudaGetLastError();
}

extern "C" cudaError_t mext_swiglu_backward(const void* x, const void* dy, void* dx,
                                            mext_dtype dtype, int64_t rows, int64_t d,
                                            cudaStream_t stream) {
  if (rows < 0 || d < 0) return cudaErrorInvalidValue;
  const int64_t total = rows * d;
  if (total == 0) return cudaSuccess;
  MEXT_DISPATCH(dtype, mext::swiglu_backward_kernel<T><<<mext::blocks_for(total),
                                                          mext::kThreads, 0, stream>>>(
                           static_cast<const T*>(x), static_cast<const T*>(dy),
                           static_cast<T*>(dx), total, d));
  return cudaGetLastError();
}
