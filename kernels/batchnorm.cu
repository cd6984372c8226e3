// Batch normalisation over the last dimension (C) of a contiguous tensor: the tensor is
// viewed as a [M, C] matrix (M = numel / C rows) and every per-channel statistic is a column
// reduction of it. x, y, dy and dx are fp32, fp16 or bf16 (one dtype); every statistic,
// parameter and accumulator is fp32.
//
// Reductions are two-level and deterministic: a 2-D grid of (channels x row chunks) blocks
// writes one partial sum per (row chunk, channel) into the context's workspace, then one block
// per channel adds its partials in a fixed order. The variance is two-pass (sum of squared
// deviations from the already computed mean), which stays accurate when |mean| >> std.
// Elementwise passes use the same 2-D layout, so each thread keeps its channel's constants in
// registers.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_check.h"
#include "cuda_state.h"
#include "elem_types.cuh"
#include "ops_cuda.h"

namespace dstrain::kernels::cuda {

namespace {

constexpr int kThreads = 256;          // threads per block, bx * by
constexpr int kMaxReduceChunks = 1024;  // row chunks of a reduction (partials per channel)
constexpr int kFinalThreads = 256;

struct Layout {
  std::int64_t M = 0, C = 0;
  int bx = 1, by = kThreads;  // block: bx channels x by rows (both powers of two)
  int gx = 1;                 // channel blocks
};

Layout make_layout(const Tensor& x) {
  Layout l;
  l.C = x.dim(-1);
  l.M = l.C > 0 ? x.numel() / l.C : 0;
  int bx = 1;
  while (bx < 32 && bx < l.C) bx *= 2;
  l.bx = bx;
  l.by = kThreads / bx;
  const std::int64_t gx = (l.C + bx - 1) / bx;
  DSTRAIN_CHECK(gx <= 0x7fffffff, "batchnorm: too many channels");
  l.gx = static_cast<int>(gx);
  return l;
}

// Row chunks for a grid that should hold about `target_blocks` blocks.
int row_chunks(const Layout& l, int target_blocks, int max_chunks) {
  const std::int64_t needed = (l.M + l.by - 1) / l.by;
  const std::int64_t want = std::max<std::int64_t>(1, target_blocks / std::max(1, l.gx));
  return static_cast<int>(std::clamp<std::int64_t>(std::min(needed, want), 1, max_chunks));
}

enum class Reduce { Sum, SqDev, Backward };

// Block (bx, by), grid (gx, chunks). Thread (tx, ty) of block (bxi, byi) handles channel
// c = bxi*bx + tx and rows byi*by + ty + k*chunks*by. Writes partial1[byi*C + c] (and partial2
// for Backward): Sum: sum x; SqDev: sum (x - mean)^2; Backward: sum dy, sum dy * (x - mean).
template <Reduce kMode, class T>
__global__ void column_partials_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                       const float* __restrict__ mean, std::int64_t M, std::int64_t C,
                                       float* __restrict__ partial1, float* __restrict__ partial2) {
  __shared__ float s1[kThreads];
  __shared__ float s2[kMode == Reduce::Backward ? kThreads : 1];
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * bx + tx;
  const std::int64_t row_step = static_cast<std::int64_t>(gridDim.y) * by;
  float a1 = 0.0f, a2 = 0.0f;
  if (c < C) {
    const float mu = kMode == Reduce::Sum ? 0.0f : mean[c];
    for (std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * by + ty; r < M; r += row_step) {
      const std::int64_t i = r * C + c;
      if (kMode == Reduce::Sum) {
        a1 += load_f(x[i]);
      } else if (kMode == Reduce::SqDev) {
        const float d = load_f(x[i]) - mu;
        a1 += d * d;
      } else {
        const float g = load_f(dy[i]);
        a1 += g;
        a2 += g * (load_f(x[i]) - mu);
      }
    }
  }
  const int t = ty * bx + tx;
  s1[t] = a1;
  if (kMode == Reduce::Backward) s2[t] = a2;
  __syncthreads();
  for (int s = by / 2; s > 0; s /= 2) {
    if (ty < s) {
      s1[t] += s1[t + s * bx];
      if (kMode == Reduce::Backward) s2[t] += s2[t + s * bx];
    }
    __syncthreads();
  }
  if (ty == 0 && c < C) {
    partial1[static_cast<std::int64_t>(blockIdx.y) * C + c] = s1[tx];
    if (kMode == Reduce::Backward) partial2[static_cast<std::int64_t>(blockIdx.y) * C + c] = s2[tx];
  }
}

// Sum of partial[j*C + c] over j < chunks, in a fixed order; valid in thread 0.
__device__ float block_sum_partials(const float* __restrict__ partial, int chunks, std::int64_t C,
                                    std::int64_t c) {
  __shared__ float warp_sums[kFinalThreads / 32];
  float v = 0.0f;
  for (int j = threadIdx.x; j < chunks; j += blockDim.x) v += partial[static_cast<std::int64_t>(j) * C + c];
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0)
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += warp_sums[w];
  return total;
}

// One block per channel: mean = sum / M.
__global__ void finalize_mean_kernel(const float* __restrict__ partial, int chunks, std::int64_t M,
                                     std::int64_t C, float* __restrict__ save_mean) {
  const std::int64_t c = blockIdx.x;
  const float s = block_sum_partials(partial, chunks, C, c);
  if (threadIdx.x == 0) save_mean[c] = s / static_cast<float>(M);
}

// One block per channel: biased var -> invstd; running stats with the unbiased variance.
__global__ void finalize_var_kernel(const float* __restrict__ partial, int chunks, std::int64_t M,
                                    std::int64_t C, float eps, float momentum,
                                    const float* __restrict__ save_mean, float* __restrict__ save_invstd,
                                    float* __restrict__ running_mean, float* __restrict__ running_var) {
  const std::int64_t c = blockIdx.x;
  const float ss = block_sum_partials(partial, chunks, C, c);
  if (threadIdx.x == 0) {
    const float var = ss / static_cast<float>(M);
    save_invstd[c] = 1.0f / sqrtf(var + eps);
    const float unbiased = M > 1 ? ss / static_cast<float>(M - 1) : var;
    running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * save_mean[c];
    running_var[c] = (1.0f - momentum) * running_var[c] + momentum * unbiased;
  }
}

// One block per channel: dbeta = sum dy; dgamma = invstd * sum dy * (x - mean).
__global__ void finalize_backward_kernel(const float* __restrict__ partial1,
                                         const float* __restrict__ partial2, int chunks, std::int64_t C,
                                         const float* __restrict__ save_invstd, float* __restrict__ dgamma,
                                         float* __restrict__ dbeta) {
  const std::int64_t c = blockIdx.x;
  const float s1 = block_sum_partials(partial1, chunks, C, c);
  const float s2 = block_sum_partials(partial2, chunks, C, c);
  if (threadIdx.x == 0) {
    dbeta[c] = s1;
    dgamma[c] = s2 * save_invstd[c];
  }
}

// y = (x - mean) * invstd * gamma + beta. With running stats (eval), invstd = 1/sqrt(var + eps).
template <bool kFromVar, class T>
__global__ void normalize_kernel(const T* x, const float* __restrict__ mean,
                                 const float* __restrict__ invstd_or_var, const float* __restrict__ gamma,
                                 const float* __restrict__ beta, float eps, std::int64_t M, std::int64_t C,
                                 T* y) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * bx + tx;
  if (c >= C) return;
  const float mu = mean[c];
  const float invstd = kFromVar ? 1.0f / sqrtf(invstd_or_var[c] + eps) : invstd_or_var[c];
  const float scale = gamma[c] * invstd;
  const float shift = beta[c];
  const std::int64_t row_step = static_cast<std::int64_t>(gridDim.y) * by;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * by + ty; r < M; r += row_step) {
    const std::int64_t i = r * C + c;
    y[i] = store_f<T>((load_f(x[i]) - mu) * scale + shift);
  }
}

// dx = gamma * invstd / M * (M * dy - dbeta - xhat * dgamma), xhat = (x - mean) * invstd.
template <class T>
__global__ void backward_dx_kernel(const T* dy, const T* x, const float* __restrict__ gamma,
                                   const float* __restrict__ mean, const float* __restrict__ invstd,
                                   const float* __restrict__ dgamma, const float* __restrict__ dbeta,
                                   std::int64_t M, std::int64_t C, T* dx) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * bx + tx;
  if (c >= C) return;
  const float mu = mean[c];
  const float is = invstd[c];
  const float m = static_cast<float>(M);
  const float k = gamma[c] * is / m;
  const float db = dbeta[c];
  const float dg = dgamma[c];
  const std::int64_t row_step = static_cast<std::int64_t>(gridDim.y) * by;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * by + ty; r < M; r += row_step) {
    const std::int64_t i = r * C + c;
    const float xhat = (load_f(x[i]) - mu) * is;
    dx[i] = store_f<T>(k * (m * load_f(dy[i]) - db - xhat * dg));
  }
}

struct Partials {
  float* p1;
  float* p2;
  int chunks;
};

Partials reserve_partials(CudaState& st, const Layout& l, int chunks, int arrays) {
  const std::size_t per = static_cast<std::size_t>(chunks) * static_cast<std::size_t>(l.C);
  // Each array starts on a 256-byte boundary.
  const std::size_t per_bytes = (per * sizeof(float) + 255) / 256 * 256;
  char* base = static_cast<char*>(st.ensure_workspace(per_bytes * static_cast<std::size_t>(arrays)));
  Partials p;
  p.p1 = reinterpret_cast<float*>(base);
  p.p2 = arrays > 1 ? reinterpret_cast<float*>(base + per_bytes) : nullptr;
  p.chunks = chunks;
  return p;
}

void check_final_grid(const Layout& l) {
  DSTRAIN_CHECK(l.C <= 0x7fffffff, "batchnorm: too many channels for one grid");
}

dim3 block_of(const Layout& l) { return dim3(static_cast<unsigned>(l.bx), static_cast<unsigned>(l.by)); }

// Elementwise grids: about 4096 blocks in all, capped by the rows and by gridDim.y's limit.
dim3 elementwise_grid(const Layout& l) {
  return dim3(static_cast<unsigned>(l.gx), static_cast<unsigned>(row_chunks(l, 4096, 65535)));
}

}  // namespace

void batchnorm_forward_train(Context& ctx, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                             Tensor& running_mean, Tensor& running_var, Tensor& y, Tensor& save_mean,
                             Tensor& save_invstd, const ops::BatchNormParams& p) {
  const Layout l = make_layout(x);
  if (l.C == 0) return;
  check_final_grid(l);
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  cudaStream_t s = st.cuda_stream();
  const int chunks = row_chunks(l, 1024, kMaxReduceChunks);
  const Partials part = reserve_partials(st, l, chunks, 1);
  const dim3 grid(static_cast<unsigned>(l.gx), static_cast<unsigned>(chunks));
  float* mean = save_mean.data_as<float>();
  float* invstd = save_invstd.data_as<float>();
  DSTRAIN_DISPATCH_ACT_DTYPE(x.dtype(), "batchnorm_forward_train", {
    const T* xp = x.data_as<T>();
    column_partials_kernel<Reduce::Sum, T><<<grid, block_of(l), 0, s>>>(xp, nullptr, nullptr, l.M, l.C, part.p1,
                                                                         nullptr);
    DSTRAIN_CUDA_CHECK_LAUNCH();
    finalize_mean_kernel<<<static_cast<unsigned>(l.C), kFinalThreads, 0, s>>>(part.p1, chunks, l.M, l.C, mean);
    DSTRAIN_CUDA_CHECK_LAUNCH();
    column_partials_kernel<Reduce::SqDev, T><<<grid, block_of(l), 0, s>>>(xp, nullptr, mean, l.M, l.C, part.p1,
                                                                           nullptr);
    DSTRAIN_CUDA_CHECK_LAUNCH();
    finalize_var_kernel<<<static_cast<unsigned>(l.C), kFinalThreads, 0, s>>>(
        part.p1, chunks, l.M, l.C, p.eps, p.momentum, mean, invstd, running_mean.data_as<float>(),
        running_var.data_as<float>());
    DSTRAIN_CUDA_CHECK_LAUNCH();
    if (l.M == 0) return;
    normalize_kernel<false, T><<<elementwise_grid(l), block_of(l), 0, s>>>(
        xp, mean, invstd, gamma.data_as<float>(), beta.data_as<float>(), p.eps, l.M, l.C, y.data_as<T>());
    DSTRAIN_CUDA_CHECK_LAUNCH();
  });
}

void batchnorm_forward_eval(Context& ctx, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                            const Tensor& running_mean, const Tensor& running_var, Tensor& y,
                            const ops::BatchNormParams& p) {
  const Layout l = make_layout(x);
  if (l.C == 0 || l.M == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  DSTRAIN_DISPATCH_ACT_DTYPE(x.dtype(), "batchnorm_forward_eval", {
    normalize_kernel<true, T><<<elementwise_grid(l), block_of(l), 0, st.cuda_stream()>>>(
        x.data_as<T>(), running_mean.data_as<float>(), running_var.data_as<float>(), gamma.data_as<float>(),
        beta.data_as<float>(), p.eps, l.M, l.C, y.data_as<T>());
  });
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

void batchnorm_backward(Context& ctx, const Tensor& dy, const Tensor& x, const Tensor& gamma,
                        const Tensor& save_mean, const Tensor& save_invstd, Tensor& dx, Tensor& dgamma,
                        Tensor& dbeta) {
  const Layout l = make_layout(x);
  if (l.C == 0) return;
  check_final_grid(l);
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  cudaStream_t s = st.cuda_stream();
  const int chunks = row_chunks(l, 1024, kMaxReduceChunks);
  const Partials part = reserve_partials(st, l, chunks, 2);
  const dim3 grid(static_cast<unsigned>(l.gx), static_cast<unsigned>(chunks));
  const float* mean = save_mean.data_as<float>();
  const float* invstd = save_invstd.data_as<float>();
  DSTRAIN_DISPATCH_ACT_DTYPE(x.dtype(), "batchnorm_backward", {
    column_partials_kernel<Reduce::Backward, T><<<grid, block_of(l), 0, s>>>(
        x.data_as<T>(), dy.data_as<T>(), mean, l.M, l.C, part.p1, part.p2);
    DSTRAIN_CUDA_CHECK_LAUNCH();
    finalize_backward_kernel<<<static_cast<unsigned>(l.C), kFinalThreads, 0, s>>>(
        part.p1, part.p2, chunks, l.C, invstd, dgamma.data_as<float>(), dbeta.data_as<float>());
    DSTRAIN_CUDA_CHECK_LAUNCH();
    if (l.M == 0) return;
    backward_dx_kernel<T><<<elementwise_grid(l), block_of(l), 0, s>>>(
        dy.data_as<T>(), x.data_as<T>(), gamma.data_as<float>(), mean, invstd, dgamma.data_as<float>(),
        dbeta.data_as<float>(), l.M, l.C, dx.data_as<T>());
    DSTRAIN_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace dstrain::kernels::cuda
