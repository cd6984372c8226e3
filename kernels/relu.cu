// ReLU forward and backward on fp32, fp16 or bf16 tensors of any shape (elementwise; fp32 uses
// 16-byte vector loads when every pointer allows them). In-place use (y aliasing x, dx aliasing
// dy) is allowed.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_check.h"
#include "cuda_state.h"
#include "elem_types.cuh"
#include "ops_cuda.h"

namespace dstrain::kernels::cuda {

namespace {

constexpr int kThreads = 256;

int grid_for(std::int64_t n) {
  const std::int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::clamp<std::int64_t>(blocks, 1, 4096));
}


__device__ __forceinline__ float relu1(float v) { return v > 0.0f ? v : 0.0f; }
__device__ __forceinline__ float relu_grad1(float g, float y) { return y > 0.0f ? g : 0.0f; }

// Elements [0, 4*n4) as float4, then the tail [4*n4, n) one by one.
__global__ void relu_forward_kernel(const float* x, float* y, std::int64_t n, std::int64_t n4) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t tid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  float4* y4 = reinterpret_cast<float4*>(y);
  for (std::int64_t i = tid; i < n4; i += stride) {
    float4 v = x4[i];
    v.x = relu1(v.x);
    v.y = relu1(v.y);
    v.z = relu1(v.z);
    v.w = relu1(v.w);
    y4[i] = v;
  }
  for (std::int64_t i = 4 * n4 + tid; i < n; i += stride) y[i] = relu1(x[i]);
}

__global__ void relu_backward_kernel(const float* dy, const float* y, float* dx, std::int64_t n,
                                     std::int64_t n4) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t tid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const float4* dy4 = reinterpret_cast<const float4*>(dy);
  const float4* y4 = reinterpret_cast<const float4*>(y);
  float4* dx4 = reinterpret_cast<float4*>(dx);
  for (std::int64_t i = tid; i < n4; i += stride) {
    const float4 g = dy4[i];
    const float4 v = y4[i];
    float4 r;
    r.x = relu_grad1(g.x, v.x);
    r.y = relu_grad1(g.y, v.y);
    r.z = relu_grad1(g.z, v.z);
    r.w = relu_grad1(g.w, v.w);
    dx4[i] = r;
  }
  for (std::int64_t i = 4 * n4 + tid; i < n; i += stride) dx[i] = relu_grad1(dy[i], y[i]);
}

// fp16 / bf16: one element per thread and iteration, compared in fp32.
template <class T>
__global__ void relu_forward_lowp_kernel(const T* x, T* y, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = store_f<T>(relu1(load_f(x[i])));
}

template <class T>
__global__ void relu_backward_lowp_kernel(const T* dy, const T* y, T* dx, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dx[i] = store_f<T>(relu_grad1(load_f(dy[i]), load_f(y[i])));
}

}  // namespace

void relu_forward(Context& ctx, const Tensor& x, Tensor& y) {
  const std::int64_t n = x.numel();
  if (n == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  if (x.dtype() != DType::F32) {
    DSTRAIN_DISPATCH_ACT_DTYPE(x.dtype(), "relu_forward", {
      relu_forward_lowp_kernel<T><<<grid_for(n), kThreads, 0, st.cuda_stream()>>>(x.data_as<T>(), y.data_as<T>(), n);
    });
    DSTRAIN_CUDA_CHECK_LAUNCH();
    return;
  }
  const float* xp = x.data_as<float>();
  float* yp = y.data_as<float>();
  const std::int64_t n4 = (aligned16(xp) && aligned16(yp)) ? n / 4 : 0;
  relu_forward_kernel<<<grid_for(std::max<std::int64_t>(n4, n - 4 * n4)), kThreads, 0, st.cuda_stream()>>>(
      xp, yp, n, n4);
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

void relu_backward(Context& ctx, const Tensor& dy, const Tensor& y, Tensor& dx) {
  const std::int64_t n = dy.numel();
  if (n == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  if (dy.dtype() != DType::F32) {
    DSTRAIN_DISPATCH_ACT_DTYPE(dy.dtype(), "relu_backward", {
      relu_backward_lowp_kernel<T><<<grid_for(n), kThreads, 0, st.cuda_stream()>>>(dy.data_as<T>(), y.data_as<T>(),
                                                                                    dx.data_as<T>(), n);
    });
    DSTRAIN_CUDA_CHECK_LAUNCH();
    return;
  }
  const float* dyp = dy.data_as<float>();
  const float* yp = y.data_as<float>();
  float* dxp = dx.data_as<float>();
  const std::int64_t n4 = (aligned16(dyp) && aligned16(yp) && aligned16(dxp)) ? n / 4 : 0;
  relu_backward_kernel<<<grid_for(std::max<std::int64_t>(n4, n - 4 * n4)), kThreads, 0, st.cuda_stream()>>>(
      dyp, yp, dxp, n, n4);
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

}  // namespace dstrain::kernels::cuda
