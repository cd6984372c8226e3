// The convolution forward of our own on Hopper tensor cores (kernels/sm90/): an implicit GEMM with
// TMA operand loads and wgmma, optionally producing the per-channel sums and sums of squares of
// its output (BatchNorm's batch statistics) in its epilogue. It competes with cuDNN and cuBLASLt
// at the timed choices of conv2d.cu and conv_bn_relu.cu. Included only by CUDA translation units.
#pragma once
#include "cuda_state.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

namespace dstrain::kernels::cuda {

// True when the kernel can compute y = conv(x, w): a compute capability 9.0 device; fp16 or bf16
// x, w and y; stride 1; padding smaller than the filter; C and K multiples of 64; 16-byte aligned
// data; with_stats: K <= 1024; with_prologue: C <= 1024. Never in deterministic mode (the
// statistics use atomics, and a fixed choice of kernel keeps results repeatable).
bool implicit_gemm_forward_applies(int device, const Tensor& x, const Tensor& w, const Tensor& y,
                                   const ops::Conv2dParams& p, bool with_stats, bool with_prologue = false);

// BatchNorm's batch statistics of y over its rows, written by the kernel itself (dstrain/ops.h's
// formulas): save_mean, save_invstd, and the running statistics updated with `momentum`, [K] fp32
// each.
struct ImplicitGemmBatchStats {
  float eps = 0.0f, momentum = 0.0f;
  float* save_mean = nullptr;
  float* save_invstd = nullptr;
  float* running_mean = nullptr;
  float* running_var = nullptr;
};

// What the kernel does besides y = conv(x, w), in one of four combinations: nothing; the sums (or
// the batch statistics); the same with the prologue (a chained layer's training forward); bias +
// ReLU alone (inference).
struct ImplicitGemmExtras {
  // fp32 [2K], any contents: receives the column sums of y as stored, then their sums of squares.
  float* sums = nullptr;
  // Instead of `sums`: the kernel finishes the sums into the batch statistics in its last CTA (no
  // finalize kernel after it), from accumulators of the state that it leaves zeroed.
  const ImplicitGemmBatchStats* batch_stats = nullptr;
  // The convolution reads relu(x * scale + shift) of this input's BatchNorm (its gamma, beta, batch
  // mean and invstd): scale = gamma * invstd and shift = beta - mean * scale rounded to x's dtype,
  // one fused multiply-add in x's dtype; padding stays zero (a chained layer's prologue).
  const ops::ChainedInput* chained_input = nullptr;
  // fp32 [K], 8-byte aligned: y = relu(conv + bias) (the inference epilogue).
  const float* bias_relu = nullptr;
};

// y = conv(x, w) (NHWC, KRSC) with `extras`. The tile configuration is the fastest for the shape
// and extras, timed on first use (untimed during stream capture). Throws where it does not apply.
void implicit_gemm_forward(CudaState& st, const Tensor& x, const Tensor& w, Tensor& y, const ops::Conv2dParams& p,
                           const ImplicitGemmExtras& extras = {});

// dx = dgrad(dy, w) for a stride-1 convolution, as the forward kernel on the filters rotated by 180
// degrees with K and C swapped ([C, R, S, K], written into the workspace first) and padding
// R - 1 - pad. Applies where implicit_gemm_forward_applies holds for that forward convolution
// (K and C multiples of 64, and so on).
bool implicit_gemm_dgrad_applies(int device, const Tensor& dy, const Tensor& w, const Tensor& dx,
                                 const ops::Conv2dParams& p);
void implicit_gemm_dgrad(CudaState& st, const Tensor& dy, const Tensor& w, Tensor& dx, const ops::Conv2dParams& p);

}  // namespace dstrain::kernels::cuda
