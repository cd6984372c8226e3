// Softmax cross-entropy over the rows of [N, K] fp32 logits with int32 labels: one warp per row.
// Each block writes its rows' sums to a partial slot and one warp adds the partials in block
// order, so the loss is bit-identical from run to run (no atomics). A label outside [0, K) makes its row's loss (hence loss_sum) NaN, and its
// dlogits row NaN, without any host synchronisation.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda_check.h"
#include "cuda_state.h"
#include "ops_cuda.h"

namespace dstrain::kernels::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__global__ void softmax_ce_kernel(const float* __restrict__ logits, const std::int32_t* __restrict__ labels,
                                  float* __restrict__ dlogits, float grad_scale, std::int64_t N,
                                  std::int64_t K, float* __restrict__ partials) {
  __shared__ float warp_loss[kWarps];
  __shared__ float warp_correct[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  float loss_acc = 0.0f, correct_acc = 0.0f;  // meaningful in lane 0

  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kWarps + warp; row < N;
       row += static_cast<std::int64_t>(gridDim.x) * kWarps) {
    const float* x = logits + row * K;

    // Argmax (first on ties) and max. Each lane scans its columns in increasing order.
    float best = -INFINITY;
    std::int64_t arg = LLONG_MAX;  // LLONG_MAX: this lane saw no column
    for (std::int64_t j = lane; j < K; j += 32) {
      const float v = x[j];
      if (arg == LLONG_MAX || v > best) {
        best = v;
        arg = j;
      }
    }
    for (int off = 16; off > 0; off /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, off);
      const long long oi = __shfl_xor_sync(0xffffffffu, static_cast<long long>(arg), off);
      if (oi != LLONG_MAX && (arg == LLONG_MAX || ov > best || (ov == best && oi < arg))) {
        best = ov;
        arg = oi;
      }
    }
    const float mx = best;

    float sum = 0.0f;
    for (std::int64_t j = lane; j < K; j += 32) sum += expf(x[j] - mx);
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float lse = mx + logf(sum);

    const std::int32_t label = labels[row];
    const bool valid = label >= 0 && static_cast<std::int64_t>(label) < K;
    if (lane == 0) {
      loss_acc += valid ? lse - x[label] : __int_as_float(0x7fc00000);  // NaN
      correct_acc += (valid && arg == label) ? 1.0f : 0.0f;
    }
    if (dlogits != nullptr) {
      float* d = dlogits + row * K;
      const float inv_sum = 1.0f / sum;
      for (std::int64_t j = lane; j < K; j += 32) {
        const float prob = expf(x[j] - mx) * inv_sum;
        const float target = j == label ? 1.0f : 0.0f;
        d[j] = valid ? (prob - target) * grad_scale : __int_as_float(0x7fc00000);
      }
    }
  }

  if (lane == 0) {
    warp_loss[warp] = loss_acc;
    warp_correct[warp] = correct_acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float l = 0.0f, c = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      l += warp_loss[w];
      c += warp_correct[w];
    }
    partials[2 * blockIdx.x] = l;
    partials[2 * blockIdx.x + 1] = c;
  }
}

// One warp: lane i adds partials i, i + 32, ... in order, then a fixed butterfly.
__global__ void sum_partials_kernel(const float* __restrict__ partials, int blocks, float* __restrict__ loss_sum,
                                    float* __restrict__ correct) {
  float l = 0.0f, c = 0.0f;
  for (int b = threadIdx.x; b < blocks; b += 32) {
    l += partials[2 * b];
    c += partials[2 * b + 1];
  }
  for (int off = 16; off > 0; off /= 2) {
    l += __shfl_xor_sync(0xffffffffu, l, off);
    c += __shfl_xor_sync(0xffffffffu, c, off);
  }
  if (threadIdx.x == 0) {
    *loss_sum = l;
    *correct = c;
  }
}

}  // namespace

void softmax_cross_entropy(Context& ctx, const Tensor& logits, const Tensor& labels, Tensor* dlogits,
                           float grad_scale, Tensor& loss_sum, Tensor& correct) {
  const std::int64_t N = logits.dim(0), K = logits.dim(1);
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  cudaStream_t s = st.cuda_stream();
  if (N == 0 || K == 0) {
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(loss_sum.data(), 0, sizeof(float), s));
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(correct.data(), 0, sizeof(float), s));
    return;
  }
  const std::int64_t blocks = std::clamp<std::int64_t>((N + kWarps - 1) / kWarps, 1, 1024);
  auto* partials = static_cast<float*>(st.ensure_workspace(static_cast<std::size_t>(blocks) * 2 * sizeof(float)));
  softmax_ce_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
      logits.data_as<float>(), labels.data_as<std::int32_t>(),
      dlogits != nullptr ? dlogits->data_as<float>() : nullptr, grad_scale, N, K, partials);
  DSTRAIN_CUDA_CHECK_LAUNCH();
  sum_partials_kernel<<<1, 32, 0, s>>>(partials, static_cast<int>(blocks), loss_sum.data_as<float>(),
                                       correct.data_as<float>());
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

}  // namespace dstrain::kernels::cuda
