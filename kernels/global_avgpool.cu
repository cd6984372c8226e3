// Global average pooling over H and W of an NHWC tensor: [N,H,W,C] -> [N,C], and its backward
// (each dy[n,c] spread evenly over the H*W positions of channel c). x/dx are fp32, fp16 or bf16,
// y/dy fp32 or the dtype of x; sums are accumulated in fp32.
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
constexpr int kChannelsPerBlock = 32;                      // blockDim.x
constexpr int kRowsPerBlock = kThreads / kChannelsPerBlock;  // blockDim.y

int grid_for(std::int64_t n) {
  const std::int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::clamp<std::int64_t>(blocks, 1, 4096));
}

// grid (N, ceil(C/32)); block (32, 8). Thread (tx, ty) sums channel c over positions
// ty, ty+8, ...; the block then reduces over ty.
template <class TX, class TY>
__global__ void avgpool_forward_kernel(const TX* __restrict__ x, TY* __restrict__ y,
                                       std::int64_t hw, std::int64_t C, float inv_hw) {
  __shared__ float partial[kRowsPerBlock][kChannelsPerBlock];
  const std::int64_t n = blockIdx.x;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.y) * kChannelsPerBlock + threadIdx.x;
  float acc = 0.0f;
  if (c < C) {
    const TX* base = x + n * hw * C + c;
    for (std::int64_t p = threadIdx.y; p < hw; p += kRowsPerBlock) acc += load_f(base[p * C]);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) s += partial[r][threadIdx.x];
    y[n * C + c] = store_f<TY>(s * inv_hw);
  }
}

template <class TY, class TX>
__global__ void avgpool_backward_kernel(const TY* __restrict__ dy, TX* __restrict__ dx,
                                        std::int64_t total, std::int64_t hw, std::int64_t C,
                                        float inv_hw) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const std::int64_t c = i % C;
    const std::int64_t n = i / (hw * C);
    dx[i] = store_f<TX>(load_f(dy[n * C + c]) * inv_hw);
  }
}

}  // namespace

void global_avgpool_forward(Context& ctx, const Tensor& x, Tensor& y) {
  const std::int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
  if (N == 0 || C == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const std::int64_t hw = H * W;
  const float inv_hw = hw > 0 ? 1.0f / static_cast<float>(hw) : 0.0f;
  const std::int64_t gx = (C + kChannelsPerBlock - 1) / kChannelsPerBlock;
  DSTRAIN_CHECK(gx <= 65535, "global_avgpool_forward: too many channels for one grid dimension");
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(gx));
  const dim3 block(kChannelsPerBlock, kRowsPerBlock);
  cudaStream_t s = st.cuda_stream();
  DSTRAIN_DISPATCH_ACT_DTYPE(x.dtype(), "global_avgpool_forward", {
    if (y.dtype() == DType::F32)
      avgpool_forward_kernel<T, float><<<grid, block, 0, s>>>(x.data_as<T>(), y.data_as<float>(), hw, C, inv_hw);
    else
      avgpool_forward_kernel<T, T><<<grid, block, 0, s>>>(x.data_as<T>(), y.data_as<T>(), hw, C, inv_hw);
  });
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

void global_avgpool_backward(Context& ctx, const Tensor& dy, Tensor& dx) {
  const std::int64_t total = dx.numel();
  if (total == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const std::int64_t H = dx.dim(1), W = dx.dim(2), C = dx.dim(3);
  const std::int64_t hw = H * W;
  const float inv_hw = 1.0f / static_cast<float>(hw);
  cudaStream_t s = st.cuda_stream();
  DSTRAIN_DISPATCH_ACT_DTYPE(dx.dtype(), "global_avgpool_backward", {
    if (dy.dtype() == DType::F32)
      avgpool_backward_kernel<float, T><<<grid_for(total), kThreads, 0, s>>>(dy.data_as<float>(), dx.data_as<T>(),
                                                                            total, hw, C, inv_hw);
    else
      avgpool_backward_kernel<T, T><<<grid_for(total), kThreads, 0, s>>>(dy.data_as<T>(), dx.data_as<T>(), total, hw,
                                                                        C, inv_hw);
  });
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

}  // namespace dstrain::kernels::cuda
