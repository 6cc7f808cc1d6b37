// Shared by the .cu files: dtype conversion to/from fp32 and dispatch on mext_dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mext_cuda.h"

namespace mext {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mext

// Runs the statement with T bound to the C++ type of `dtype`; unknown dtypes return an error.
#define MEXT_DISPATCH(dtype, ...)                     \
  switch (dtype) {                                    \
    case MEXT_F32: {                                  \
      using T = float;                                \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    case MEXT_F16: {                                  \
      using T = __half;                               \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    case MEXT_BF16: {                                 \
      using T = __nv_bfloat16;                        \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    default:                                          \
      return cudaErrorInvalidValue;                   \
  }
