// Global average pooling over H and W of an NHWC fp32 tensor: [N,H,W,C] -> [N,C], and its
// backward (each dy[n,c] spread evenly over the H*W positions of channel c).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_check.h"
#include "cuda_state.h"
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
__global__ void avgpool_forward_kernel(const float* __restrict__ x, float* __restrict__ y,
                                       std::int64_t hw, std::int64_t C, float inv_hw) {
  __shared__ float partial[kRowsPerBlock][kChannelsPerBlock];
  const std::int64_t n = blockIdx.x;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.y) * kChannelsPerBlock + threadIdx.x;
  float acc = 0.0f;
  if (c < C) {
    const float* base = x + n * hw * C + c;
    for (std::int64_t p = threadIdx.y; p < hw; p += kRowsPerBlock) acc += base[p * C];
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < kRowsPerBlock; ++r) s += partial[r][threadIdx.x];
    y[n * C + c] = s * inv_hw;
  }
}

__global__ void avgpool_backward_kernel(const float* __restrict__ dy, float* __restrict__ dx,
                                        std::int64_t total, std::int64_t hw, std::int64_t C,
                                        float inv_hw) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const std::int64_t c = i % C;
    const std::int64_t n = i / (hw * C);
    dx[i] = dy[n * C + c] * inv_hw;
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
  avgpool_forward_kernel<<<grid, block, 0, st.cuda_stream()>>>(x.data_as<float>(), y.data_as<float>(),
                                                               hw, C, inv_hw);
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
  avgpool_backward_kernel<<<grid_for(total), kThreads, 0, st.cuda_stream()>>>(
      dy.data_as<float>(), dx.data_as<float>(), total, hw, C, inv_hw);
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

}  // namespace dstrain::kernels::cuda
