// BatchNorm's per-channel arithmetic shared by the Conv+BN+ReLU passes (conv_bn_relu.cu) and the
// implicit GEMM that finishes the statistics itself (sm90/implicit_gemm_conv_kernels.cuh), so that
// every path derives bit-identical statistics and prologue constants from the same sums.
#pragma once
#include <cstdint>

#include "bn_relu_mask.h"

namespace dstrain::kernels::cuda::bn {

// Batch mean and variance from sum (y - shift) and sum (y - shift)^2 over M rows.
struct BatchStats {
  double mean, var;
};
__device__ __forceinline__ BatchStats batch_stats(double s1, double s2, double shift, std::int64_t M) {
  const double m = static_cast<double>(M);
  const double d = s1 / m;
  return {shift + d, fmax(s2 / m - d * d, 0.0)};
}

__device__ __forceinline__ double invstd_of(const BatchStats& b, float eps) {
  return 1.0 / sqrt(b.var + static_cast<double>(eps));
}

// save_mean, save_invstd and the running statistics (unbiased variance) of one channel.
__device__ __forceinline__ void write_batch_stats(const BatchStats& b, std::int64_t c, std::int64_t M, float eps,
                                                  float momentum, float* save_mean, float* save_invstd,
                                                  float* running_mean, float* running_var) {
  const double m = static_cast<double>(M);
  save_mean[c] = static_cast<float>(b.mean);
  save_invstd[c] = static_cast<float>(invstd_of(b, eps));
  const double unbiased = M > 1 ? b.var * m / (m - 1.0) : b.var;
  running_mean[c] = static_cast<float>((1.0 - momentum) * running_mean[c] + momentum * b.mean);
  running_var[c] = static_cast<float>((1.0 - momentum) * running_var[c] + momentum * unbiased);
}

// v = (y - mean) * (gamma * invstd) + beta as one fma (bn_relu_mask.h), the formula the CPU
// reference uses too, so that every path's ReLU mask (v > 0) agrees bit for bit; scale = gamma * invstd.
using kernels::bn::preactivation;
using kernels::bn::relu_threshold;
using kernels::bn::ReluThreshold;

// A chained input's BatchNorm + ReLU as relu(x * scale + shift): scale = gamma * invstd,
// shift = beta - mean * scale (one fused multiply-add), in fp32.
struct ScaleShift {
  float scale, shift;
};
__device__ __forceinline__ ScaleShift prologue_scale_shift(float gamma, float beta, float mean, float invstd) {
  const float s = gamma * invstd;
  return {s, fmaf(-mean, s, beta)};
}

}  // namespace dstrain::kernels::cuda::bn
