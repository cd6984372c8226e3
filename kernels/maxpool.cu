// 2x2 max pooling with stride 2 on NHWC fp32, fp16 or bf16 (odd trailing row/column dropped), and its
// backward: each dy goes to the first maximum of its window in row-major order
// ((0,0), (0,1), (1,0), (1,1)); every other dx element, the dropped ones included, is 0.
// Backward recomputes the window's argmax from x, so y is not read.
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

struct PoolDims {
  std::int64_t N, H, W, C, Ho, Wo;
};

// Index (0..3) of the first maximum of the window whose top-left element is at `p`.
template <class T>
__device__ __forceinline__ int first_max_in_window(const T* __restrict__ p, std::int64_t C,
                                                   std::int64_t row, float* max_out) {
  const float v0 = load_f(p[0]), v1 = load_f(p[C]), v2 = load_f(p[row]), v3 = load_f(p[row + C]);
  float m = v0;
  int k = 0;
  if (v1 > m) { m = v1; k = 1; }
  if (v2 > m) { m = v2; k = 2; }
  if (v3 > m) { m = v3; k = 3; }
  *max_out = m;
  return k;
}

template <class T>
__global__ void maxpool_forward_kernel(const T* __restrict__ x, T* __restrict__ y, PoolDims d,
                                       std::int64_t total) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t row = d.W * d.C;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const std::int64_t c = i % d.C;
    std::int64_t t = i / d.C;
    const std::int64_t wo = t % d.Wo;
    t /= d.Wo;
    const std::int64_t ho = t % d.Ho;
    const std::int64_t n = t / d.Ho;
    const T* p = x + ((n * d.H + 2 * ho) * d.W + 2 * wo) * d.C + c;
    float m;
    first_max_in_window(p, d.C, row, &m);
    y[i] = store_f<T>(m);  // exact: m is one of the inputs
  }
}

// One thread per dx element.
template <class T>
__global__ void maxpool_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                        T* __restrict__ dx, PoolDims d, std::int64_t total) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t row = d.W * d.C;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const std::int64_t c = i % d.C;
    std::int64_t t = i / d.C;
    const std::int64_t w = t % d.W;
    t /= d.W;
    const std::int64_t h = t % d.H;
    const std::int64_t n = t / d.H;
    const std::int64_t ho = h >> 1, wo = w >> 1;
    T g = store_f<T>(0.0f);
    if (ho < d.Ho && wo < d.Wo) {
      const T* p = x + ((n * d.H + 2 * ho) * d.W + 2 * wo) * d.C + c;
      float m;
      const int k = first_max_in_window(p, d.C, row, &m);
      const int mine = static_cast<int>((h & 1) * 2 + (w & 1));
      if (k == mine) g = dy[((n * d.Ho + ho) * d.Wo + wo) * d.C + c];
    }
    dx[i] = g;
  }
}

PoolDims dims_of(const Tensor& x) {
  PoolDims d;
  d.N = x.dim(0);
  d.H = x.dim(1);
  d.W = x.dim(2);
  d.C = x.dim(3);
  d.Ho = d.H / 2;
  d.Wo = d.W / 2;
  return d;
}

}  // namespace

void maxpool2x2_forward(Context& ctx, const Tensor& x, Tensor& y) {
  const PoolDims d = dims_of(x);
  const std::int64_t total = d.N * d.Ho * d.Wo * d.C;
  if (total == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  DSTRAIN_DISPATCH_ACT_DTYPE(x.dtype(), "maxpool2x2_forward", {
    maxpool_forward_kernel<T><<<grid_for(total), kThreads, 0, st.cuda_stream()>>>(x.data_as<T>(), y.data_as<T>(),
                                                                                  d, total);
  });
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

void maxpool2x2_backward(Context& ctx, const Tensor& dy, const Tensor& x, const Tensor& y, Tensor& dx) {
  (void)y;
  const PoolDims d = dims_of(x);
  const std::int64_t total = x.numel();
  if (total == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  DSTRAIN_DISPATCH_ACT_DTYPE(x.dtype(), "maxpool2x2_backward", {
    maxpool_backward_kernel<T><<<grid_for(total), kThreads, 0, st.cuda_stream()>>>(
        dy.data_as<T>(), x.data_as<T>(), dx.data_as<T>(), d, total);
  });
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

}  // namespace dstrain::kernels::cuda
