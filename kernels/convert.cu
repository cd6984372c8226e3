// Elementwise conversion between the floating dtypes F32, F16, BF16, F8E4M3 and F8E5M2.
// Every value goes through fp32 (exact for every source format), then is rounded once to the
// destination with round-to-nearest-even, with dtype.h's overflow rules: fp16, bf16 and e5m2
// overflow to +-inf (__NV_NOSAT for e5m2); e4m3 saturates to +-448 (__NV_SATFINITE), inf too.
// NaN stays NaN. Same-dtype "conversions" are a plain device copy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda_check.h"
#include "cuda_state.h"
#include "ops_cuda.h"

namespace dstrain::kernels::cuda {

namespace {

constexpr int kThreads = 256;

int grid_for(std::int64_t n) {
  const std::int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::clamp<std::int64_t>(blocks, 1, 4096));
}

template <DType D> struct Storage;
template <> struct Storage<DType::F32> { using type = float; };
template <> struct Storage<DType::F16> { using type = __half_raw; };
template <> struct Storage<DType::BF16> { using type = __nv_bfloat16_raw; };
template <> struct Storage<DType::F8E4M3> { using type = __nv_fp8_storage_t; };
template <> struct Storage<DType::F8E5M2> { using type = __nv_fp8_storage_t; };

template <DType D>
__device__ __forceinline__ float to_float(typename Storage<D>::type v) {
  if constexpr (D == DType::F32) {
    return v;
  } else if constexpr (D == DType::F16) {
    return __half2float(__half(v));
  } else if constexpr (D == DType::BF16) {
    return __bfloat162float(__nv_bfloat16(v));
  } else if constexpr (D == DType::F8E4M3) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(v, __NV_E4M3)));
  } else {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(v, __NV_E5M2)));
  }
}

template <DType D>
__device__ __forceinline__ typename Storage<D>::type from_float(float f) {
  if constexpr (D == DType::F32) {
    return f;
  } else if constexpr (D == DType::F16) {
    return static_cast<__half_raw>(__float2half_rn(f));
  } else if constexpr (D == DType::BF16) {
    return static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(f));
  } else if constexpr (D == DType::F8E4M3) {
    return __nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3);
  } else {
    return __nv_cvt_float_to_fp8(f, __NV_NOSAT, __NV_E5M2);
  }
}

template <DType S, DType D>
__global__ void convert_kernel(const typename Storage<S>::type* __restrict__ src,
                               typename Storage<D>::type* __restrict__ dst, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dst[i] = from_float<D>(to_float<S>(src[i]));
}

template <DType S, DType D>
void launch(const void* src, void* dst, std::int64_t n, cudaStream_t s) {
  convert_kernel<S, D><<<grid_for(n), kThreads, 0, s>>>(static_cast<const typename Storage<S>::type*>(src),
                                                        static_cast<typename Storage<D>::type*>(dst), n);
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

[[noreturn]] void unsupported(DType a, DType b) {
  DSTRAIN_THROW(ErrorCode::Unsupported,
                std::string("convert: ") + dtype_name(a) + " -> " + dtype_name(b) + " is not a floating conversion");
}

template <DType S>
void dispatch_dst(const void* src, void* dst, DType d, std::int64_t n, cudaStream_t s) {
  switch (d) {
    case DType::F32: return launch<S, DType::F32>(src, dst, n, s);
    case DType::F16: return launch<S, DType::F16>(src, dst, n, s);
    case DType::BF16: return launch<S, DType::BF16>(src, dst, n, s);
    case DType::F8E4M3: return launch<S, DType::F8E4M3>(src, dst, n, s);
    case DType::F8E5M2: return launch<S, DType::F8E5M2>(src, dst, n, s);
    default: unsupported(S, d);
  }
}

}  // namespace

void convert(Context& ctx, const Tensor& src, Tensor& dst) {
  const std::int64_t n = src.numel();
  if (n == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  cudaStream_t s = st.cuda_stream();
  if (src.dtype() == dst.dtype()) {
    if (src.data() != dst.data())
      DSTRAIN_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), src.nbytes(), cudaMemcpyDeviceToDevice, s));
    return;
  }
  // Elementwise kernels read element i before writing it, but a partial overlap of two buffers
  // of different element sizes would still race between threads: refuse it.
  const auto* sb = static_cast<const unsigned char*>(src.data());
  const auto* db = static_cast<const unsigned char*>(dst.data());
  DSTRAIN_CHECK(sb + src.nbytes() <= db || db + dst.nbytes() <= sb,
                "convert: source and destination overlap");
  const void* sp = src.data();
  void* dp = dst.data();
  switch (src.dtype()) {
    case DType::F32: return dispatch_dst<DType::F32>(sp, dp, dst.dtype(), n, s);
    case DType::F16: return dispatch_dst<DType::F16>(sp, dp, dst.dtype(), n, s);
    case DType::BF16: return dispatch_dst<DType::BF16>(sp, dp, dst.dtype(), n, s);
    case DType::F8E4M3: return dispatch_dst<DType::F8E4M3>(sp, dp, dst.dtype(), n, s);
    case DType::F8E5M2: return dispatch_dst<DType::F8E5M2>(sp, dp, dst.dtype(), n, s);
    default: unsupported(src.dtype(), dst.dtype());
  }
}

}  // namespace dstrain::kernels::cuda
