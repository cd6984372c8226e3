// Element types of the activation kernels: fp32, fp16 and bf16 storage, always computed in fp32
// (loads widen to float, stores round to nearest even). DSTRAIN_DISPATCH_ACT_DTYPE picks the
// storage type from a tensor's DType for a templated launch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "dstrain/dtype.h"
#include "dstrain/error.h"

namespace dstrain::kernels::cuda {

__device__ __forceinline__ float load_f(float v) { return v; }
__device__ __forceinline__ float load_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float load_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T store_f(float v);
template <> __device__ __forceinline__ float store_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

[[noreturn]] inline void unsupported_activation_dtype(DType dt, const char* op) {
  DSTRAIN_THROW(ErrorCode::InvalidArgument,
                std::string(op) + ": activations of dtype " + dtype_name(dt) + " are not supported");
}

}  // namespace dstrain::kernels::cuda

// Runs `body` (a lambda body using the type alias `T`) for the storage type of `dt`.
#define DSTRAIN_DISPATCH_ACT_DTYPE(dt, op, ...)                                  \
  do {                                                                           \
    switch (dt) {                                                                \
      case ::dstrain::DType::F32: { using T = float; __VA_ARGS__; break; }       \
      case ::dstrain::DType::F16: { using T = __half; __VA_ARGS__; break; }      \
      case ::dstrain::DType::BF16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
      default: ::dstrain::kernels::cuda::unsupported_activation_dtype(dt, op);  \
    }                                                                            \
  } while (0)
