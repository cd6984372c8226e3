// Fused Conv2d + BatchNorm + ReLU on NHWC tensors (see dstrain/ops.h for the math).
//
// Forward (training): the convolution and the per-channel sum and sum of squares of its output,
// either in one cuDNN graph (GenStats in the convolution's epilogue, fp16/bf16, conv_graphs.h)
// or as the convolution and one statistics pass, whichever was faster when the shape was first
// seen (fp32, deterministic mode and unaligned tensors always take the second). Then one pass
// that derives the batch mean, invstd and running statistics and applies BN + ReLU (a finalize
// kernel first where the statistics come as per-chunk partials). A layer whose output is chained
// applies nothing: the finalize kernel alone, or none where the implicit GEMM finishes the
// statistics in its last CTA.
// Backward: one pass reduces dbeta and dgamma over (dz, conv_out) with the ReLU mask recomputed
// from conv_out, one pass writes dconv, then dgrad and wgrad, on one stream or with wgrad on the
// side stream beside dgrad (timed per shape, conv_graphs.h: run_gradients).
// Inference: a cuDNN graph conv -> +bias -> ReLU (one kernel) for fp16/bf16, cuBLASLt's RELU_BIAS
// epilogue for 1x1, or our implicit GEMM, whichever was fastest; otherwise the convolution and one
// bias+ReLU pass. The bias may be fp32 or in the activations' dtype (what the fold writes).
// Chained layers (ops::ConvBnReluParams): the consumer's forward applies the producer's BN + ReLU
// in the convolution's prologue (cuDNN graph with GenStats, timed on first use against
// materialising the activation); its wgrad reads the same prologue; its dgrad carries dReLU and
// BatchNorm's backward weight terms in the epilogue (cuDNN's graph, or our implicit GEMM, which
// also finishes dgamma and dbeta), and one pass then writes dL/dx. The
// producer skips its apply pass and its backward reduction.
//
// The passes share one 2-D launch layout: a thread owns V consecutive channels (one 16-byte
// vector when the channel count and pointers allow it, else V = 1) and strides over rows, so
// per-channel constants stay in registers; it loads four rows before using any (memory-level
// parallelism), and the grid is one wave of resident blocks. On sm_90 they are launched overlapped
// with the kernel before them (overlapped_launch.cuh). Reductions write one partial per
// (row chunk, channel), added in a fixed order by the finalize kernels: results are deterministic
// on a given device.
#include <cuda_runtime.h>
#include <cudnn.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "bn_stats.cuh"
#include "cuda_check.h"
#include "cuda_state.h"
#include "conv_graphs.h"
#include "elem_types.cuh"
#include "implicit_gemm_conv.h"
#include "ops_cuda.h"
#include "overlapped_launch.cuh"

namespace dstrain::kernels::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxChunks = 1024;
constexpr int kRowsPerThread = 8;

// ---- vector access: V elements of T, 16 bytes when V > 1.
template <class T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = load_f(p[0]);
  } else {
    static_assert(V * sizeof(T) == 16, "16-byte vectors");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = load_f(e[j]);
  }
}

template <class T, int V>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[V]) {
  if constexpr (V == 1) {
    p[0] = store_f<T>(in[0]);
  } else {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) e[j] = store_f<T>(in[j]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// A vector's raw bits, so that a batch of loads sits in registers before any is converted.
template <class T, int V>
struct RawVec {
  std::conditional_t<(V > 1), uint4, T> bits;
};
template <class T, int V>
__device__ __forceinline__ RawVec<T, V> load_raw(const T* p) {
  if constexpr (V == 1)
    return {p[0]};
  else
    return {*reinterpret_cast<const uint4*>(p)};
}
template <class T, int V>
__device__ __forceinline__ void unpack(const RawVec<T, V>& raw, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = load_f(raw.bits);
  } else {
    const T* e = reinterpret_cast<const T*>(&raw.bits);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = load_f(e[j]);
  }
}

// This thread's rows r = first, first + step, ... < M, in batches of kBatch: every load of a
// batch is issued before its first use or store, so each thread keeps kBatch 16-byte loads per
// tensor in flight (the passes are bound by memory latency otherwise), and a pass may write the
// tensor it reads.
constexpr int kBatch = 4;
template <class Load, class Use>
__device__ __forceinline__ void for_rows(std::int64_t M, Load load, Use use) {
  const std::int64_t step = static_cast<std::int64_t>(gridDim.y) * blockDim.y;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += kBatch * step) {
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (r + u * step < M) load(u, r + u * step);
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (r + u * step < M) use(u, r + u * step);
  }
}

// A pass kernel on the state's stream, overlapped with the previous kernel's tail where the device
// allows it (overlapped_launch.cuh); each pass kernel starts with wait_then_release_next_kernel().
template <class... Params, class... Args>
void launch_pass(const CudaState& st, void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
  DSTRAIN_CUDA_CHECK(launch_overlapped(overlap_launches(st.device), st.cuda_stream(), kernel, grid, block, 0, args...));
}

using bn::preactivation;

struct Layout {
  std::int64_t M = 0, K = 0;
  int V = 1;
  int bx = 1, by = kThreads;
  int gx = 1, gy = 1;
};

// Blocks per multiprocessor that every pass kernel fits (__launch_bounds__ says so to the compiler).
constexpr int kPassBlocksPerSm = 2;

// The grid is at most one wave of resident blocks on `device` (no tail of half-empty waves), each
// thread striding over rows.
Layout make_layout(std::int64_t M, std::int64_t K, int V, int device) {
  Layout l;
  l.M = M;
  l.K = K;
  l.V = V;
  const std::int64_t groups = K / V;
  int bx = 1;
  while (bx < 32 && bx < groups) bx *= 2;
  l.bx = bx;
  l.by = kThreads / bx;
  const std::int64_t gx = (groups + bx - 1) / bx;
  DSTRAIN_CHECK(gx <= 65535, "conv_bn_relu: too many channels");
  l.gx = static_cast<int>(gx);
  // At least kRowsPerThread rows per thread: fewer, fuller blocks, and partials a small fraction
  // of the data (one row per thread would write as many partial sums as it reads values).
  const std::int64_t needed = (M + static_cast<std::int64_t>(l.by) * kRowsPerThread - 1) /
                              (static_cast<std::int64_t>(l.by) * kRowsPerThread);
  const std::int64_t want = std::max<std::int64_t>(1, kPassBlocksPerSm * sm_count(device) / l.gx);
  l.gy = static_cast<int>(std::clamp<std::int64_t>(std::min(needed, want), 1, kMaxChunks));
  return l;
}

// Block-wide sum over ty of V accumulators per thread; thread ty == 0 holds the result.
template <int V>
__device__ __forceinline__ void reduce_rows(float (&acc)[V], float* smem) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int t = ty * bx + tx;
#pragma unroll
  for (int j = 0; j < V; ++j) smem[j * kThreads + t] = acc[j];
  __syncthreads();
  for (int s = by / 2; s > 0; s /= 2) {
    if (ty < s) {
#pragma unroll
      for (int j = 0; j < V; ++j) smem[j * kThreads + t] += smem[j * kThreads + t + s * bx];
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = smem[j * kThreads + t];
  __syncthreads();
}

// Block sums over ty of both accumulators, written as this block's (row chunk) partials.
template <int V>
__device__ __forceinline__ void store_partials(float (&a1)[V], float (&a2)[V], float* smem, bool active,
                                               std::int64_t c0, std::int64_t K, float* __restrict__ p1,
                                               float* __restrict__ p2) {
  reduce_rows<V>(a1, smem);
  reduce_rows<V>(a2, smem);
  if (active && threadIdx.y == 0) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      p1[static_cast<std::int64_t>(blockIdx.y) * K + c0 + j] = a1[j];
      p2[static_cast<std::int64_t>(blockIdx.y) * K + c0 + j] = a2[j];
    }
  }
}

// Forward statistics without GenStats: per chunk, sum (y - s) and sum (y - s)^2 with s = row 0's
// value of the channel (a sample of the channel keeps the variance free of cancellation).
template <class T, int V>
__global__ void __launch_bounds__(kThreads, kPassBlocksPerSm)
    stats_partials_kernel(const T* __restrict__ y, std::int64_t M, std::int64_t K, float* __restrict__ p1,
                          float* __restrict__ p2) {
  wait_then_release_next_kernel();
  __shared__ float smem[V * kThreads];
  const std::int64_t c0 = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool active = c0 < K;
  float a1[V], a2[V], shift[V];
#pragma unroll
  for (int j = 0; j < V; ++j) a1[j] = a2[j] = shift[j] = 0.0f;
  if (active) {
    load_vec<T, V>(y + c0, shift);
    RawVec<T, V> yr[kBatch];
    for_rows(
        M, [&](int u, std::int64_t r) { yr[u] = load_raw<T, V>(y + r * K + c0); },
        [&](int u, std::int64_t) {
          float v[V];
          unpack(yr[u], v);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float d = v[j] - shift[j];
            a1[j] += d;
            a2[j] = fmaf(d, d, a2[j]);
          }
        });
  }
  store_partials<V>(a1, a2, smem, active, c0, K, p1, p2);
}

// The finalize kernels: a warp per channel (block: 32 lanes x kChannelsPerBlock channels). Lane l
// adds chunks l, l+32, ... in order, then a fixed shuffle tree adds the lanes: deterministic.
constexpr int kChannelsPerBlock = 8;

__device__ __forceinline__ void sum_chunks(const float* __restrict__ p1, const float* __restrict__ p2, int chunks,
                                           std::int64_t K, std::int64_t c, double& s1, double& s2) {
  s1 = 0.0;
  s2 = 0.0;
  for (int j = threadIdx.x; j < chunks; j += 32) {
    s1 += p1[static_cast<std::int64_t>(j) * K + c];
    s2 += p2[static_cast<std::int64_t>(j) * K + c];
  }
  for (int off = 16; off > 0; off /= 2) {
    s1 += __shfl_down_sync(0xffffffffu, s1, off);
    s2 += __shfl_down_sync(0xffffffffu, s2, off);
  }
}

using bn::batch_stats;
using bn::BatchStats;
using bn::invstd_of;
using bn::write_batch_stats;

dim3 finalize_grid(std::int64_t K) {
  return dim3(static_cast<unsigned>((K + kChannelsPerBlock - 1) / kChannelsPerBlock));
}
dim3 finalize_block() { return dim3(32, kChannelsPerBlock); }

// One warp per channel. sum1 / sum2: `chunks` partials of sum (y - s) and sum (y - s)^2 with
// s = shift_src[c] (the row-0 value, read as T) or 0 when shift_src is null.
template <class T>
__global__ void finalize_forward_kernel(const float* __restrict__ p1, const float* __restrict__ p2, int chunks,
                                        const T* __restrict__ shift_src, std::int64_t M, std::int64_t K, float eps,
                                        float momentum, float* __restrict__ save_mean,
                                        float* __restrict__ save_invstd, float* __restrict__ running_mean,
                                        float* __restrict__ running_var) {
  wait_then_release_next_kernel();
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= K) return;  // the whole warp: c depends on threadIdx.y only
  double s1, s2;
  sum_chunks(p1, p2, chunks, K, c, s1, s2);
  if (threadIdx.x != 0) return;
  const double shift = shift_src != nullptr ? static_cast<double>(load_f(shift_src[c])) : 0.0;
  write_batch_stats(batch_stats(s1, s2, shift, M), c, M, eps, momentum, save_mean, save_invstd, running_mean,
                    running_var);
}

template <int V>
struct ChannelConsts {
  float mean[V], scale[V], beta[V], invstd[V];
};

template <int V>
__device__ __forceinline__ void load_consts(ChannelConsts<V>& k, std::int64_t c0, const float* __restrict__ mean,
                                            const float* __restrict__ invstd, const float* __restrict__ gamma,
                                            const float* __restrict__ beta) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    k.mean[j] = mean[c0 + j];
    k.invstd[j] = invstd[c0 + j];
    k.scale[j] = gamma[c0 + j] * k.invstd[j];
    k.beta[j] = beta[c0 + j];
  }
}

// z = relu(bn(y)) over this thread's rows of channels c0 .. c0 + V.
template <class T, int V>
__device__ __forceinline__ void apply_bn_relu_rows(const T* __restrict__ y, std::int64_t M, std::int64_t K,
                                                   std::int64_t c0, const ChannelConsts<V>& k, T* __restrict__ z) {
  RawVec<T, V> yr[kBatch];
  for_rows(
      M, [&](int u, std::int64_t r) { yr[u] = load_raw<T, V>(y + r * K + c0); },
      [&](int u, std::int64_t r) {
        float v[V];
        unpack(yr[u], v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = fmaxf(preactivation(v[j], k.mean[j], k.scale[j], k.beta[j]), 0.0f);
        store_vec<T, V>(z + r * K + c0, v);
      });
}

// z = relu(bn(y)).
template <class T, int V>
__global__ void __launch_bounds__(kThreads, kPassBlocksPerSm)
    apply_forward_kernel(const T* __restrict__ y, std::int64_t M, std::int64_t K, const float* __restrict__ mean,
                         const float* __restrict__ invstd, const float* __restrict__ gamma,
                         const float* __restrict__ beta, T* __restrict__ z) {
  wait_then_release_next_kernel();
  const std::int64_t c0 = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= K) return;
  ChannelConsts<V> k;
  load_consts<V>(k, c0, mean, invstd, gamma, beta);
  apply_bn_relu_rows<T, V>(y, M, K, c0, k, z);
}

// Backward partials: sum g and sum g * (y - mean), g = dz where bn(y) > 0.
template <class T, int V>
__global__ void __launch_bounds__(kThreads, kPassBlocksPerSm) backward_partials_kernel(
    const T* __restrict__ dz, const T* __restrict__ y, std::int64_t M, std::int64_t K, const float* __restrict__ mean,
    const float* __restrict__ invstd, const float* __restrict__ gamma, const float* __restrict__ beta,
    float* __restrict__ p1, float* __restrict__ p2) {
  wait_then_release_next_kernel();
  __shared__ float smem[V * kThreads];
  const std::int64_t c0 = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool active = c0 < K;
  float a1[V], a2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) a1[j] = a2[j] = 0.0f;
  if (active) {
    ChannelConsts<V> k;
    load_consts<V>(k, c0, mean, invstd, gamma, beta);
    RawVec<T, V> yr[kBatch], gr[kBatch];
    for_rows(
        M,
        [&](int u, std::int64_t r) {
          yr[u] = load_raw<T, V>(y + r * K + c0);
          gr[u] = load_raw<T, V>(dz + r * K + c0);
        },
        [&](int u, std::int64_t) {
          float yv[V], g[V];
          unpack(yr[u], yv);
          unpack(gr[u], g);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float gm = preactivation(yv[j], k.mean[j], k.scale[j], k.beta[j]) > 0.0f ? g[j] : 0.0f;
            a1[j] += gm;
            a2[j] = fmaf(gm, yv[j] - k.mean[j], a2[j]);
          }
        });
  }
  store_partials<V>(a1, a2, smem, active, c0, K, p1, p2);
}

// dbeta = sum g; dgamma = invstd * sum g (y - mean).
__global__ void finalize_backward_kernel(const float* __restrict__ p1, const float* __restrict__ p2, int chunks,
                                         std::int64_t K, const float* __restrict__ invstd,
                                         float* __restrict__ dgamma, float* __restrict__ dbeta) {
  wait_then_release_next_kernel();
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (c >= K) return;
  double s1, s2;
  sum_chunks(p1, p2, chunks, K, c, s1, s2);
  if (threadIdx.x != 0) return;
  dbeta[c] = static_cast<float>(s1);
  dgamma[c] = static_cast<float>(s2 * static_cast<double>(invstd[c]));
}

// dconv = scale * (g - dbeta / M - xhat * dgamma / M).
// dz may be dconv itself (each element is read before it is written, by the same thread).
template <class T, int V>
__global__ void __launch_bounds__(kThreads, kPassBlocksPerSm) apply_backward_kernel(
    const T* dz, const T* __restrict__ y, std::int64_t M, std::int64_t K, const float* __restrict__ mean,
    const float* __restrict__ invstd, const float* __restrict__ gamma, const float* __restrict__ beta,
    const float* __restrict__ dgamma, const float* __restrict__ dbeta, T* dconv) {
  wait_then_release_next_kernel();
  const std::int64_t c0 = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= K) return;
  ChannelConsts<V> k;
  load_consts<V>(k, c0, mean, invstd, gamma, beta);
  const float inv_m = 1.0f / static_cast<float>(M);
  float db[V], dgx[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    db[j] = dbeta[c0 + j] * inv_m;
    dgx[j] = dgamma[c0 + j] * inv_m * k.invstd[j];
  }
  RawVec<T, V> yr[kBatch], gr[kBatch];
  for_rows(
      M,
      [&](int u, std::int64_t r) {
        yr[u] = load_raw<T, V>(y + r * K + c0);
        gr[u] = load_raw<T, V>(dz + r * K + c0);
      },
      [&](int u, std::int64_t r) {
        float yv[V], g[V];
        unpack(yr[u], yv);
        unpack(gr[u], g);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = yv[j] - k.mean[j];
          const float gm = preactivation(yv[j], k.mean[j], k.scale[j], k.beta[j]) > 0.0f ? g[j] : 0.0f;
          g[j] = k.scale[j] * (gm - db[j] - d * dgx[j]);
        }
        store_vec<T, V>(dconv + r * K + c0, g);
      });
}

// The forward's finalize and apply in one pass, for statistics that arrive as one sum and one sum
// of squares per channel (cuDNN's GenStats, the implicit GEMM's epilogue): every thread derives the
// mean and invstd of its own channels (the finalize kernel's arithmetic, so the same values), the
// threads of block row 0 also write save_mean, save_invstd and the running statistics, and all
// apply z = relu(bn(y)).
template <class T, int V>
__global__ void __launch_bounds__(kThreads, kPassBlocksPerSm) finalize_apply_forward_kernel(
    const float* __restrict__ sum, const float* __restrict__ sqsum, const T* __restrict__ y, std::int64_t M,
    std::int64_t K, float eps, float momentum, const float* __restrict__ gamma, const float* __restrict__ beta,
    float* __restrict__ save_mean, float* __restrict__ save_invstd, float* __restrict__ running_mean,
    float* __restrict__ running_var, T* __restrict__ z) {
  wait_then_release_next_kernel();
  const std::int64_t c0 = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= K) return;
  ChannelConsts<V> k;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const BatchStats b = batch_stats(sum[c0 + j], sqsum[c0 + j], 0.0, M);
    k.mean[j] = static_cast<float>(b.mean);
    k.invstd[j] = static_cast<float>(invstd_of(b, eps));
    k.scale[j] = gamma[c0 + j] * k.invstd[j];
    k.beta[j] = beta[c0 + j];
    if (blockIdx.y == 0 && threadIdx.y == 0)
      write_batch_stats(b, c0 + j, M, eps, momentum, save_mean, save_invstd, running_mean, running_var);
  }
  apply_bn_relu_rows<T, V>(y, M, K, c0, k, z);
}

// z = relu(z + bias) in place (inference without the fused graph).
template <class T, int V>
__global__ void __launch_bounds__(kThreads, kPassBlocksPerSm)
    bias_relu_kernel(T* __restrict__ z, std::int64_t M, std::int64_t K, const float* __restrict__ bias) {
  wait_then_release_next_kernel();
  const std::int64_t c0 = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= K) return;
  float b[V];
#pragma unroll
  for (int j = 0; j < V; ++j) b[j] = bias[c0 + j];
  RawVec<T, V> zr[kBatch];
  for_rows(
      M, [&](int u, std::int64_t r) { zr[u] = load_raw<T, V>(z + r * K + c0); },
      [&](int u, std::int64_t r) {
        float v[V];
        unpack(zr[u], v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = fmaxf(v[j] + b[j], 0.0f);
        store_vec<T, V>(z + r * K + c0, v);
      });
}

// The prologue constants of a chained input: scale = gamma * invstd, shift = beta - mean * scale,
// in fp32 and in the activations' dtype (cuDNN's fused prologue reads one or the other).
template <class T>
__global__ void prologue_consts_kernel(std::int64_t C, const float* __restrict__ gamma, const float* __restrict__ beta,
                                       const float* __restrict__ mean, const float* __restrict__ invstd,
                                       float* __restrict__ scale_f, float* __restrict__ shift_f,
                                       T* __restrict__ scale_t, T* __restrict__ shift_t) {
  wait_then_release_next_kernel();
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const bn::ScaleShift k = bn::prologue_scale_shift(gamma[c], beta[c], mean[c], invstd[c]);
  scale_f[c] = k.scale;
  shift_f[c] = k.shift;
  scale_t[c] = store_f<T>(k.scale);
  shift_t[c] = store_f<T>(k.shift);
}

// s_k = gamma_k / sqrt(var_k + eps); w_folded = w * s_k; bias_k = beta_k - mean_k * s_k.
template <class T, class B>
__global__ void fold_kernel(const T* __restrict__ w, std::int64_t K, std::int64_t per_k,
                            const float* __restrict__ gamma, const float* __restrict__ beta,
                            const float* __restrict__ mean, const float* __restrict__ var, float eps,
                            T* __restrict__ w_folded, B* __restrict__ bias) {
  const std::int64_t n = K * per_k;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t k = i / per_k;
    const float s = gamma[k] / sqrtf(var[k] + eps);
    w_folded[i] = store_f<T>(load_f(w[i]) * s);
    if (i % per_k == 0) bias[k] = store_f<B>(beta[k] - mean[k] * s);
  }
}


// 16-byte vectors when every tensor is aligned and the channel count is a multiple of the width.
template <class T>
int vector_width(std::int64_t K, std::initializer_list<const void*> ptrs) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  if (K % V != 0) return 1;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  return V;
}

template <class T, class Fn>
void with_width(int V, Fn fn) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  if (V == kVec)
    fn(std::integral_constant<int, kVec>{});
  else
    fn(std::integral_constant<int, 1>{});
}

dim3 block_of(const Layout& l) { return dim3(static_cast<unsigned>(l.bx), static_cast<unsigned>(l.by)); }
dim3 grid_of(const Layout& l) { return dim3(static_cast<unsigned>(l.gx), static_cast<unsigned>(l.gy)); }

std::size_t round_up(std::size_t v) { return (v + 255) & ~std::size_t(255); }

}  // namespace

namespace {

// Partial sums for finalize_forward_kernel, or none where the convolution wrote the batch
// statistics itself (finished).
template <class T>
struct Partials {
  float* p1 = nullptr;
  float* p2 = nullptr;
  int chunks = 1;
  const T* shift = nullptr;
  bool finished = false;
};

// Where a training forward's batch statistics go: the caller's, or a timed way's scratch.
struct StatsOut {
  float* save_mean;
  float* save_invstd;
  float* running_mean;
  float* running_var;
};

// A chained input's BatchNorm + ReLU: the producing layer's statistics and parameters, and the
// fused prologue graph's scale type when one is used.
struct Prologue {
  const ops::ChainedInput* in = nullptr;
  PrologueScaleType scale_type = PrologueScaleType::Activation;
};

// The prologue graph for `kind`, trying the scale types in order; null when cuDNN has none.
cudnn_graph::TunedPlan* prologue_plan(CudaState& st, ConvGraph kind, const Tensor& x, const Tensor& w,
                                      const Tensor& y, const ops::Conv2dParams& p, PrologueScaleType* type) {
  for (PrologueScaleType t : {PrologueScaleType::Activation, PrologueScaleType::Float}) {
    cudnn_graph::TunedPlan* plan = conv_graph_plan(st, kind, x, w, y, p, {x.data(), w.data(), y.data()}, t);
    if (plan != nullptr) {
      *type = t;
      return plan;
    }
  }
  return nullptr;
}

// Writes the prologue's scale and shift into `at` (4 arrays of `stride` bytes: fp32 scale and
// shift, then T scale and shift) and returns the pair the graph reads.
template <class T>
std::array<void*, 2> prologue_consts(const CudaState& st, const Prologue& pro, std::int64_t C, char* at,
                                     std::size_t stride) {
  float* scale_f = reinterpret_cast<float*>(at);
  float* shift_f = reinterpret_cast<float*>(at + stride);
  T* scale_t = reinterpret_cast<T*>(at + 2 * stride);
  T* shift_t = reinterpret_cast<T*>(at + 3 * stride);
  launch_pass(st, prologue_consts_kernel<T>, static_cast<unsigned>((C + 255) / 256), 256, C,
              pro.in->gamma->data_as<float>(), pro.in->beta->data_as<float>(), pro.in->save_mean->data_as<float>(),
              pro.in->save_invstd->data_as<float>(), scale_f, shift_f, scale_t, shift_t);
  if (pro.scale_type == PrologueScaleType::Float) return {scale_f, shift_f};
  return {scale_t, shift_t};
}

// a = relu(bn(x)) of a chained input, into the activation scratch (the separate-kernel path).
template <class T>
Tensor materialise_activation(CudaState& st, const Tensor& x, const ops::ChainedInput& in) {
  const std::int64_t C = x.dim(3);
  const std::int64_t M = x.numel() / std::max<std::int64_t>(C, 1);
  void* a = st.ensure_activations(x.nbytes());
  const int V = vector_width<T>(C, {x.data(), a});
  const Layout l = make_layout(M, C, V, st.device);
  with_width<T>(V, [&](auto v) {
    launch_pass(st, apply_forward_kernel<T, decltype(v)::value>, grid_of(l), block_of(l),
                static_cast<const T*>(x.data()), M, C, in.save_mean->data_as<float>(), in.save_invstd->data_as<float>(),
                in.gamma->data_as<float>(), in.beta->data_as<float>(), static_cast<T*>(a));
  });
  return Tensor::wrap(a, x.shape(), x.dtype(), x.device());
}

// The GenStats graph (with the chained input's prologue when `pro` is set).
template <class T>
Partials<T> stats_with_genstats(CudaState& st, cudnn_graph::TunedPlan& plan, const Tensor& x, const Tensor& w,
                                Tensor& conv_out, const Prologue* pro) {
  cudaStream_t stream = st.cuda_stream();
  const std::int64_t K = conv_out.dim(3);
  const std::int64_t C = x.dim(3);
  const std::size_t ws = round_up(static_cast<std::size_t>(plan.workspace_bytes()));
  const std::size_t sums = round_up(sizeof(float) * static_cast<std::size_t>(K));
  const std::size_t consts = round_up(sizeof(float) * static_cast<std::size_t>(C));
  char* base = static_cast<char*>(st.ensure_workspace(ws + 2 * sums + (pro != nullptr ? 4 * consts : 0)));
  Partials<T> r;
  r.p1 = reinterpret_cast<float*>(base + ws);
  r.p2 = reinterpret_cast<float*>(base + ws + sums);
  std::vector<std::int64_t> uids{kUidX, kUidW, kUidY, kUidSum, kUidSqSum};
  std::vector<void*> ptrs{const_cast<void*>(x.data()), const_cast<void*>(w.data()), conv_out.data(), r.p1, r.p2};
  if (pro != nullptr) {
    const std::array<void*, 2> sb = prologue_consts<T>(st, *pro, C, base + ws + 2 * sums, consts);
    uids.insert(uids.end(), {kUidInScale, kUidInShift});
    ptrs.insert(ptrs.end(), {sb[0], sb[1]});
  }
  void* ws_ptr = plan.workspace_bytes() > 0 ? base : nullptr;
  plan.tune(st.cudnn, stream, uids, ptrs, ws_ptr);  // before zeroing: GenStats may accumulate
  DSTRAIN_CUDA_CHECK(cudaMemsetAsync(r.p1, 0, 2 * sums, stream));
  plan.execute(st.cudnn, stream, uids, ptrs, ws_ptr);
  return r;
}

// The implicit GEMM with the column sums and sums of squares in its epilogue (as GenStats), and
// `prologue`'s BatchNorm + ReLU in its operand path when given (the constants derived in the
// kernel). With a chained output there is nothing to apply after it: the kernel finishes the
// statistics into `out` itself.
template <class T>
Partials<T> stats_with_implicit_gemm(CudaState& st, const Tensor& x, const Tensor& w, Tensor& conv_out,
                                     const ops::ConvBnReluParams& p, const ops::ChainedInput* prologue,
                                     const StatsOut& out) {
  Partials<T> r;
  ImplicitGemmExtras extras;
  extras.chained_input = prologue;
  ImplicitGemmBatchStats stats;
  if (p.chained_output) {
    stats = {p.bn.eps, p.bn.momentum, out.save_mean, out.save_invstd, out.running_mean, out.running_var};
    extras.batch_stats = &stats;
    r.finished = true;
  } else {
    const std::int64_t K = conv_out.dim(3);
    r.p1 = static_cast<float*>(st.ensure_workspace(2 * sizeof(float) * static_cast<std::size_t>(K)));
    r.p2 = r.p1 + K;  // the kernel's layout: sums, then sums of squares
    extras.sums = r.p1;
  }
  implicit_gemm_forward(st, x, w, conv_out, p.conv, extras);
  return r;
}

template <class T>
Partials<T> stats_with_pass(Context& ctx, CudaState& st, const Tensor& x, const Tensor& w, Tensor& conv_out,
                            const ops::Conv2dParams& p, bool conv_out_given, const ops::ChainedInput* in) {
  cudaStream_t stream = st.cuda_stream();
  const std::int64_t K = conv_out.dim(3);
  const std::int64_t M = conv_out.numel() / K;
  if (!conv_out_given) {
    if (in != nullptr) {
      const Tensor a = materialise_activation<T>(st, x, *in);
      cuda::conv2d_forward(ctx, a, w, conv_out, p);
    } else {
      cuda::conv2d_forward(ctx, x, w, conv_out, p);
    }
  }
  const T* y = static_cast<const T*>(conv_out.data());
  const int V = vector_width<T>(K, {conv_out.data()});
  const Layout l = make_layout(M, K, V, st.device);
  const std::size_t part = round_up(sizeof(float) * static_cast<std::size_t>(l.gy) * K);
  char* base = static_cast<char*>(st.ensure_workspace(2 * part));  // after the convolution: may reallocate
  Partials<T> r;
  r.p1 = reinterpret_cast<float*>(base);
  r.p2 = reinterpret_cast<float*>(base + part);
  r.chunks = l.gy;
  r.shift = y;
  with_width<T>(V, [&](auto v) {
    launch_pass(st, stats_partials_kernel<T, decltype(v)::value>, grid_of(l), block_of(l), y, M, K, r.p1, r.p2);
  });
  return r;
}

template <class T>
void forward_train_impl(Context& ctx, CudaState& st, const Tensor& x, const Tensor& w, const Tensor& gamma,
                        const Tensor& beta, Tensor& running_mean, Tensor& running_var, Tensor& conv_out, Tensor& z,
                        Tensor& save_mean, Tensor& save_invstd, const ops::ConvBnReluParams& p) {
  cudaStream_t stream = st.cuda_stream();
  const std::int64_t K = conv_out.dim(3);
  const std::int64_t M = conv_out.numel() / K;
  Prologue pro;
  pro.in = p.chained_input;
  const Prologue* prologue = pro.in != nullptr ? &pro : nullptr;
  cudnn_graph::TunedPlan* plan = nullptr;
  if (prologue != nullptr)
    plan = prologue_plan(st, ConvGraph::ForwardBnReluGenStats, x, w, conv_out, p.conv, &pro.scale_type);
  else if (!p.conv_out_given)
    plan = conv_graph_plan(st, ConvGraph::ForwardGenStats, x, w, conv_out, p.conv,
                           {x.data(), w.data(), conv_out.data()});
  // The ways to the statistics: cuDNN's GenStats graph (with a chained input's prologue), the
  // separate kernels (the convolution and a statistics pass; a chained input materialised first),
  // and where it applies our implicit GEMM (the prologue in its operand path, the statistics in
  // its epilogue), and for a chained input the implicit GEMM on the materialised activation (one
  // pass over x can cost less than the prologue inside the GEMM). With one way there is nothing
  // to time.
  const bool chained = prologue != nullptr;
  // After the statistics: the batch statistics (save_mean, save_invstd, running) and, unless the
  // next layer applies them in its prologue, z = relu(bn(y)); one pass when the statistics come
  // as one sum per channel, else the finalize kernel and the apply pass.
  auto finish = [&](const Partials<T>& part, const StatsOut& out) {
    if (part.finished) return;
    const int V = vector_width<T>(K, {conv_out.data(), z.data()});  // z.data() null with a chained output
    const Layout l = make_layout(M, K, V, st.device);
    if (!p.chained_output && part.chunks == 1 && part.shift == nullptr) {
      with_width<T>(V, [&](auto v) {
        launch_pass(st, finalize_apply_forward_kernel<T, decltype(v)::value>, grid_of(l), block_of(l), part.p1, part.p2,
                    static_cast<const T*>(conv_out.data()), M, K, p.bn.eps, p.bn.momentum, gamma.data_as<float>(),
                    beta.data_as<float>(), out.save_mean, out.save_invstd, out.running_mean, out.running_var,
                    static_cast<T*>(z.data()));
      });
      return;
    }
    launch_pass(st, finalize_forward_kernel<T>, finalize_grid(K), finalize_block(), part.p1, part.p2, part.chunks,
                part.shift, M, K, p.bn.eps, p.bn.momentum, out.save_mean, out.save_invstd, out.running_mean,
                out.running_var);
    if (p.chained_output) return;  // the next layer applies BN + ReLU in its own prologue
    with_width<T>(V, [&](auto v) {
      launch_pass(st, apply_forward_kernel<T, decltype(v)::value>, grid_of(l), block_of(l),
                  static_cast<const T*>(conv_out.data()), M, K, out.save_mean, out.save_invstd, gamma.data_as<float>(),
                  beta.data_as<float>(), static_cast<T*>(z.data()));
    });
  };
  // The ways are timed whole, statistics and what follows them, into scratch statistics (the
  // running statistics must be updated once, by the real call).
  Tensor scratch;
  auto scratch_out = [&] {
    if (scratch.numel() == 0) scratch = Tensor::zeros({4, K}, DType::F32, x.device());
    float* f = scratch.data_as<float>();
    return StatsOut{f, f + K, f + 2 * K, f + 3 * K};
  };
  std::vector<std::function<Partials<T>(const StatsOut&)>> runs;
  std::vector<Way> ways;
  auto timed = [&](std::size_t run) {
    const StatsOut out = scratch_out();
    finish(runs[run](out), out);
  };
  if (plan != nullptr) {
    runs.push_back([&](const StatsOut&) { return stats_with_genstats<T>(st, *plan, x, w, conv_out, prologue); });
    ways.push_back({chained ? "prologue graph" : "GenStats graph", [&, i = runs.size() - 1] { timed(i); }});
  }
  const std::size_t by_pass = runs.size();
  runs.push_back([&](const StatsOut&) {
    return stats_with_pass<T>(ctx, st, x, w, conv_out, p.conv, p.conv_out_given, pro.in);
  });
  ways.push_back({chained ? "separate kernels" : "conv + pass", [&] {
                    const StatsOut out = scratch_out();
                    finish(stats_with_pass<T>(ctx, st, x, w, conv_out, p.conv, false, pro.in), out);
                  }});
  if (!p.conv_out_given && implicit_gemm_forward_applies(st.device, x, w, conv_out, p.conv, true, chained)) {
    runs.push_back(
        [&](const StatsOut& out) { return stats_with_implicit_gemm<T>(st, x, w, conv_out, p, pro.in, out); });
    ways.push_back({"implicit GEMM", [&, i = runs.size() - 1] { timed(i); }});
  }
  if (chained && !p.conv_out_given && implicit_gemm_forward_applies(st.device, x, w, conv_out, p.conv, true, false)) {
    runs.push_back([&](const StatsOut& out) {
      const Tensor a = materialise_activation<T>(st, x, *pro.in);
      return stats_with_implicit_gemm<T>(st, a, w, conv_out, p, nullptr, out);
    });
    ways.push_back({"activation + implicit GEMM", [&, i = runs.size() - 1] { timed(i); }});
  }
  std::size_t way = by_pass;
  if (plan != nullptr && conv_graphs_forced())
    way = 0;
  else if (ways.size() > 1)
    way = fastest_way(st, chained ? Site::ChainedForwardStats : Site::ForwardStats, x, w, p.conv, ways);
  const StatsOut out{save_mean.data_as<float>(), save_invstd.data_as<float>(), running_mean.data_as<float>(),
                     running_var.data_as<float>()};
  finish(runs[way](out), out);
}

// Backward through relu(bn(y)): dgamma, dbeta and out = dL/dy from dz = dL/drelu (out may be dz).
// Three kernels: partials, finalize, apply. (One cooperative kernel with grid-wide barriers in
// place of the launches, holding the rows in registers where they fit, was measured no faster and
// up to 9% slower: RESULTS.md.)
template <class T>
void bn_relu_backward_passes(CudaState& st, const T* dz, const T* y, std::int64_t M, std::int64_t K,
                             const float* mean, const float* invstd, const float* gamma, const float* beta,
                             float* dgamma, float* dbeta, T* out) {
  cudaStream_t stream = st.cuda_stream();
  if (M == 0) {
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(dgamma, 0, sizeof(float) * static_cast<std::size_t>(K), stream));
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(dbeta, 0, sizeof(float) * static_cast<std::size_t>(K), stream));
    return;
  }
  const int V = vector_width<T>(K, {dz, y, out});
  const Layout l = make_layout(M, K, V, st.device);
  const std::size_t part = round_up(sizeof(float) * static_cast<std::size_t>(l.gy) * K);
  char* base = static_cast<char*>(st.ensure_workspace(2 * part));
  float* p1 = reinterpret_cast<float*>(base);
  float* p2 = reinterpret_cast<float*>(base + part);
  with_width<T>(V, [&](auto v) {
    launch_pass(st, backward_partials_kernel<T, decltype(v)::value>, grid_of(l), block_of(l), dz, y, M, K, mean, invstd,
                gamma, beta, p1, p2);
  });
  launch_pass(st, finalize_backward_kernel, finalize_grid(K), finalize_block(), p1, p2, l.gy, K, invstd, dgamma, dbeta);
  with_width<T>(V, [&](auto v) {
    launch_pass(st, apply_backward_kernel<T, decltype(v)::value>, grid_of(l), block_of(l), dz, y, M, K, mean, invstd,
                gamma, beta, dgamma, dbeta, out);
  });
}

// dw and dx of a layer whose input is chained: wgrad reads a = relu(bn(x)) (cuDNN's fused
// prologue, our implicit GEMM's, or the materialised activation); dgrad goes on through the
// producing layer's ReLU and BatchNorm (fused dReLU + BN backward weights in dgrad's epilogue, or
// the separate passes), then one pass writes dx = dL/dx.
template <class T>
void chained_backward_impl(Context& ctx, CudaState& st, const Tensor& dconv, const Tensor& x, const Tensor& w,
                           Tensor& dw, Tensor& dx, const ops::ChainedInput& in, const ops::Conv2dParams& p) {
  cudaStream_t stream = st.cuda_stream();
  const std::int64_t C = x.dim(3);
  const std::int64_t M_in = x.numel() / std::max<std::int64_t>(C, 1);
  Prologue pro;
  pro.in = &in;
  // dw on `s`: the main state or the side one (its own stream and scratch) beside dx; they share
  // only inputs.
  auto wgrad = [&](CudaState& s) {
    cudnn_graph::TunedPlan* wgrad_plan =
        prologue_plan(s, ConvGraph::BackwardFilterBnRelu, x, dw, dconv, p, &pro.scale_type);
    auto wgrad_fused = [&] {
      const std::size_t ws = round_up(static_cast<std::size_t>(wgrad_plan->workspace_bytes()));
      const std::size_t consts = round_up(sizeof(float) * static_cast<std::size_t>(C));
      char* base = static_cast<char*>(s.ensure_workspace(ws + 4 * consts));
      const std::array<void*, 2> sb = prologue_consts<T>(s, pro, C, base + ws, consts);
      wgrad_plan->execute(s.cudnn, s.cuda_stream(), {kUidX, kUidW, kUidY, kUidInScale, kUidInShift},
                          {const_cast<void*>(x.data()), dw.data(), const_cast<void*>(dconv.data()), sb[0], sb[1]},
                          wgrad_plan->workspace_bytes() > 0 ? base : nullptr);
    };
    auto wgrad_separate = [&] {
      const Tensor a = materialise_activation<T>(s, x, in);
      conv2d_backward_filter_on(s, a, dconv, dw, p);
    };
    // Our implicit GEMM reads relu(bn(x)) through its own prologue.
    auto wgrad_own = [&] { implicit_gemm_wgrad(s, x, dconv, dw, p, &in); };
    std::vector<Way> ways;
    if (wgrad_plan != nullptr) ways.push_back({"prologue graph", wgrad_fused});
    if (wgrad_plan == nullptr || !conv_graphs_forced()) {
      ways.push_back({"separate kernels", wgrad_separate});
      if (implicit_gemm_wgrad_applies(s.device, x, dconv, dw, p, &in)) ways.push_back({"implicit GEMM", wgrad_own});
    }
    ways[ways.size() == 1 ? 0 : fastest_way(s, Site::ChainedWgrad, x, dw, p, ways)].run();
  };
  const T* xp = static_cast<const T*>(x.data());
  T* dxp = static_cast<T*>(dx.data());
  const float* mean = in.save_mean->data_as<float>();
  const float* invstd = in.save_invstd->data_as<float>();
  const float* gamma = in.gamma->data_as<float>();
  const float* beta = in.beta->data_as<float>();
  float* dgamma = in.dgamma->data_as<float>();
  float* dbeta = in.dbeta->data_as<float>();
  cudnn_graph::TunedPlan* dgrad_plan =
      M_in == 0 ? nullptr
                : conv_graph_plan(st, ConvGraph::BackwardDataDreluBnBwd, dx, w, dconv, p,
                                  {dx.data(), w.data(), dconv.data(), x.data(), mean, invstd, gamma, beta, dgamma,
                                   dbeta});
  auto dgrad_separate = [&] {
    cuda::conv2d_backward_data(ctx, dconv, w, dx, p);
    bn_relu_backward_passes<T>(st, dxp, xp, M_in, C, mean, invstd, gamma, beta, dgamma, dbeta, dxp);
  };
  // dx holds g = dL/da (masked by the ReLU or not: the pass masks it again) and dgamma, dbeta are
  // written: dL/dx = gamma * invstd * (g - dbeta / M - xhat * dgamma / M).
  auto apply_dx = [&] {
    const int V = vector_width<T>(C, {xp, dxp});
    const Layout l = make_layout(M_in, C, V, st.device);
    with_width<T>(V, [&](auto v) {
      launch_pass(st, apply_backward_kernel<T, decltype(v)::value>, grid_of(l), block_of(l), dxp, xp, M_in, C, mean,
                  invstd, gamma, beta, dgamma, dbeta, dxp);
    });
  };
  // Our implicit GEMM with dgamma and dbeta from its epilogue, then the pass. Its accumulators
  // cannot be made during a capture: there it needs a run before.
  const DgradThroughBatchNorm through{&x, &in};
  const bool through_applies = M_in > 0 && implicit_gemm_dgrad_applies(st.device, dconv, w, dx, p, &through) &&
                               st.zeroed_accumulators_available();
  auto dgrad_through = [&] {
    implicit_gemm_dgrad(st, dconv, w, dx, p, &through);
    apply_dx();
  };
  auto dgrad_fused = [&] {
    const std::size_t ws = round_up(static_cast<std::size_t>(dgrad_plan->workspace_bytes()));
    const std::size_t eq = round_up(sizeof(float) * static_cast<std::size_t>(C));
    char* base = static_cast<char*>(st.ensure_workspace(ws + 3 * eq));
    const std::vector<std::int64_t> uids{kUidX,        kUidW,       kUidY,      kUidInX,      kUidInMean,
                                         kUidInInvstd, kUidInGamma, kUidInBeta, kUidInDgamma, kUidInDbeta,
                                         kUidEqDy,     kUidEqX,     kUidEqBias};
    const std::vector<void*> ptrs{dx.data(), const_cast<void*>(w.data()), const_cast<void*>(dconv.data()),
                                  const_cast<T*>(xp), const_cast<float*>(mean), const_cast<float*>(invstd),
                                  const_cast<float*>(gamma), const_cast<float*>(beta), dgamma, dbeta,
                                  base + ws, base + ws + eq, base + ws + 2 * eq};
    void* ws_ptr = dgrad_plan->workspace_bytes() > 0 ? base : nullptr;
    dgrad_plan->tune(st.cudnn, stream, uids, ptrs, ws_ptr);  // before zeroing: the reductions may accumulate
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(dgamma, 0, sizeof(float) * static_cast<std::size_t>(C), stream));
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(dbeta, 0, sizeof(float) * static_cast<std::size_t>(C), stream));
    dgrad_plan->execute(st.cudnn, stream, uids, ptrs, ws_ptr);
    apply_dx();
  };
  // The dgrad way is chosen together with the streams (run_gradients).
  std::vector<Way> dgrad_ways;
  if (dgrad_plan != nullptr) dgrad_ways.push_back({"epilogue graph", dgrad_fused});
  if (dgrad_plan == nullptr || !conv_graphs_forced()) {
    dgrad_ways.push_back({"separate kernels", dgrad_separate});
    if (through_applies) dgrad_ways.push_back({"implicit GEMM with the BatchNorm backward", dgrad_through});
  }
  run_gradients(st, Site::ChainedGradients, x, w, p, wgrad, dgrad_ways);
}

}  // namespace

void conv_bn_relu_forward_train(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& gamma,
                                const Tensor& beta, Tensor& running_mean, Tensor& running_var, Tensor& conv_out,
                                Tensor& z, Tensor& save_mean, Tensor& save_invstd, const ops::ConvBnReluParams& p) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  if (conv_out.dim(3) == 0) return;
  DSTRAIN_DISPATCH_ACT_DTYPE(x.dtype(), "conv_bn_relu_forward_train", {
    forward_train_impl<T>(ctx, st, x, w, gamma, beta, running_mean, running_var, conv_out, z, save_mean, save_invstd,
                          p);
  });
}

void conv_bn_relu_backward(Context& ctx, const Tensor& dz, const Tensor& x, const Tensor& w, const Tensor& gamma,
                           const Tensor& beta, const Tensor& conv_out, const Tensor& save_mean,
                           const Tensor& save_invstd, Tensor& dconv, Tensor* dx, Tensor& dw, Tensor& dgamma,
                           Tensor& dbeta, const ops::ConvBnReluParams& p) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const std::int64_t K = conv_out.dim(3);
  const std::int64_t M = conv_out.numel() / std::max<std::int64_t>(K, 1);
  // With a chained output, dz is dL/dconv_out already (the next layer went through this BN).
  const Tensor& grad_conv = p.chained_output ? dz : dconv;
  DSTRAIN_DISPATCH_ACT_DTYPE(x.dtype(), "conv_bn_relu_backward", {
    if (!p.chained_output && K > 0)
      bn_relu_backward_passes<T>(st, static_cast<const T*>(dz.data()), static_cast<const T*>(conv_out.data()), M, K,
                                 save_mean.data_as<float>(), save_invstd.data_as<float>(), gamma.data_as<float>(),
                                 beta.data_as<float>(), dgamma.data_as<float>(), dbeta.data_as<float>(),
                                 static_cast<T*>(dconv.data()));
    if (p.chained_input != nullptr) {
      chained_backward_impl<T>(ctx, st, grad_conv, x, w, dw, *dx, *p.chained_input, p.conv);
    } else {  // dw and dx share only inputs: on one stream or on two
      run_gradients(
          st, Site::LayerGradients, x, w, p.conv,
          [&](CudaState& s) { conv2d_backward_filter_on(s, x, grad_conv, dw, p.conv); },
          [&] {
            if (dx != nullptr) cuda::conv2d_backward_data(ctx, grad_conv, w, *dx, p.conv);
          });
    }
  });
}

void conv_bn_fold(Context& ctx, const Tensor& w, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                  const Tensor& running_var, Tensor& w_folded, Tensor& bias, const ops::BatchNormParams& p) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const std::int64_t K = w.dim(0);
  if (K == 0) return;
  const std::int64_t per_k = w.numel() / K;
  if (per_k == 0) {  // no filter taps: the bias alone
    DSTRAIN_THROW(ErrorCode::InvalidArgument, "conv_bn_fold: the filter " + shape_str(w.shape()) + " is empty");
  }
  const std::int64_t n = w.numel();
  const int blocks = static_cast<int>(std::min<std::int64_t>((n + 255) / 256, 4096));
  DSTRAIN_DISPATCH_ACT_DTYPE(w.dtype(), "conv_bn_fold", {
    auto launch = [&](auto* b) {
      fold_kernel<<<blocks, 256, 0, st.cuda_stream()>>>(
          static_cast<const T*>(w.data()), K, per_k, gamma.data_as<float>(), beta.data_as<float>(),
          running_mean.data_as<float>(), running_var.data_as<float>(), p.eps, static_cast<T*>(w_folded.data()), b);
    };
    if (bias.dtype() == DType::F32)
      launch(bias.data_as<float>());
    else
      launch(static_cast<T*>(bias.data()));  // the activations' dtype (checked by the op)
  });
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

void conv_bias_relu_forward(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& z,
                            const ops::Conv2dParams& p) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const std::int64_t K = z.dim(3);
  const std::int64_t M = z.numel() / std::max<std::int64_t>(K, 1);
  if (z.numel() == 0) return;
  // The implicit GEMM and the separate pass take the bias in fp32 (cuDNN's graph too where it has
  // no plan for a 16-bit one): a bias in the activations' dtype is widened into the activation
  // scratch for them. cuBLASLt takes it as it is.
  auto bias_f32 = [&]() -> Tensor {
    if (bias.dtype() == DType::F32)
      return Tensor::wrap(const_cast<void*>(bias.data()), bias.shape(), DType::F32, bias.device());
    Tensor wide = Tensor::wrap(st.ensure_activations(sizeof(float) * static_cast<std::size_t>(K)), bias.shape(),
                               DType::F32, bias.device());
    cuda::convert(ctx, bias, wide);
    return wide;
  };
  auto with_cudnn = [&] {
    // The graph with the bias as given where cuDNN offers it, else with the bias widened.
    Tensor b = Tensor::wrap(const_cast<void*>(bias.data()), bias.shape(), bias.dtype(), bias.device());
    cudnn_graph::TunedPlan* plan = nullptr;
    if (bias.dtype() != DType::F32)
      plan = conv_graph_plan(st, ConvGraph::ForwardBiasRelu, x, w, z, p, {x.data(), w.data(), z.data(), b.data()},
                             PrologueScaleType::Activation);
    if (plan == nullptr) {
      b = bias_f32();
      plan = conv_graph_plan(st, ConvGraph::ForwardBiasRelu, x, w, z, p, {x.data(), w.data(), z.data(), b.data()},
                             PrologueScaleType::Float);
    }
    if (plan != nullptr) {
      void* ws = plan->workspace_bytes() > 0
                     ? st.ensure_workspace(static_cast<std::size_t>(plan->workspace_bytes()))
                     : nullptr;
      plan->execute(st.cudnn, st.cuda_stream(), {kUidX, kUidW, kUidBias, kUidY},
                    {const_cast<void*>(x.data()), const_cast<void*>(w.data()), b.data(), z.data()}, ws);
      return;
    }
    cuda::conv2d_forward(ctx, x, w, z, p);
    DSTRAIN_DISPATCH_ACT_DTYPE(z.dtype(), "conv_bias_relu_forward", {
      const int V = vector_width<T>(K, {z.data()});
      const Layout l = make_layout(M, K, V, st.device);
      with_width<T>(V, [&](auto v) {
        launch_pass(st, bias_relu_kernel<T, decltype(v)::value>, grid_of(l), block_of(l), static_cast<T*>(z.data()), M,
                    K, b.data_as<float>());
      });
    });
  };
  // 1x1: a cuBLASLt GEMM with bias + ReLU in its epilogue, or cuDNN, or our implicit GEMM with the
  // same epilogue, whichever was fastest (cuBLASLt falls back to cuDNN where it does not apply);
  // other shapes: cuDNN or the implicit GEMM.
  const bool own = implicit_gemm_forward_applies(st.device, x, w, z, p, false);
  auto with_own = [&] {
    const Tensor b32 = bias_f32();
    ImplicitGemmExtras extras;
    extras.bias_relu = b32.data_as<float>();
    implicit_gemm_forward(st, x, w, z, p, extras);
  };
  if (pointwise_conv_applies(x, w, p) && !ops::deterministic()) {
    auto with_lt = [&] {
      if (!pointwise_conv_gemm(st, x, w, &bias, z)) with_cudnn();
    };
    std::vector<Way> ways{{"cuBLASLt", with_lt}, {"cuDNN", with_cudnn}};
    if (own) ways.push_back({"implicit GEMM", with_own});
    ways[fastest_way(st, Site::PointwiseBiasRelu, x, w, p, ways)].run();
    return;
  }
  run_cudnn_or_own(st, Site::ForwardBiasRelu, x, w, p, own, with_cudnn, with_own);
}

}  // namespace dstrain::kernels::cuda
