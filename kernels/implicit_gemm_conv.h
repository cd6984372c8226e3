// The convolution forward of our own on Hopper tensor cores (kernels/sm90/): an implicit GEMM with
// TMA operand loads and wgmma, optionally producing the per-channel sums and sums of squares of
// its output (BatchNorm's batch statistics) in its epilogue; and from the same parts the backward
// data and the backward filter. It competes with cuDNN and cuBLASLt
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

// The dgrad of a layer whose input is chained: x is the producing layer's raw output (the layer's
// input, dx's shape and dtype) and `in` its BatchNorm. Besides dx = dL/da (a = relu(v), the
// activation the layer read), the kernel writes the producer's in->dbeta = sum g and in->dgamma =
// invstd * sum g (x - mean), g = dx where v > 0 (ops.h's formula for v), finished in its last CTA
// from the state's zeroed accumulators.
struct DgradThroughBatchNorm {
  const Tensor* x = nullptr;
  const ops::ChainedInput* in = nullptr;
};

// What the kernel does besides y = conv(x, w), in one of five combinations: nothing; the sums (or
// the batch statistics); the same with the prologue (a chained layer's training forward); bias +
// ReLU alone (inference); the BatchNorm backward's weight terms alone (a chained layer's dgrad).
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
  // y is dL/da of a chained input: the producer's dbeta and dgamma, finished in the kernel
  // (implicit_gemm_dgrad; x here is through->x).
  const DgradThroughBatchNorm* through = nullptr;
};

// y = conv(x, w) (NHWC, KRSC) with `extras`. The tile configuration is the fastest for the shape
// and extras, timed on first use (untimed during stream capture). Throws where it does not apply.
void implicit_gemm_forward(CudaState& st, const Tensor& x, const Tensor& w, Tensor& y, const ops::Conv2dParams& p,
                           const ImplicitGemmExtras& extras = {});

// dx = dgrad(dy, w) for a stride-1 convolution, as the forward kernel on the filters rotated by 180
// degrees with K and C swapped ([C, R, S, K], written into the workspace first) and padding
// R - 1 - pad. Applies where implicit_gemm_forward_applies holds for that forward convolution
// (K and C multiples of 64, and so on); with `through`, where also C <= 1024 and x is 16-byte
// aligned with dx's shape and dtype.
bool implicit_gemm_dgrad_applies(int device, const Tensor& dy, const Tensor& w, const Tensor& dx,
                                 const ops::Conv2dParams& p, const DgradThroughBatchNorm* through = nullptr);
void implicit_gemm_dgrad(CudaState& st, const Tensor& dy, const Tensor& w, Tensor& dx, const ops::Conv2dParams& p,
                         const DgradThroughBatchNorm* through = nullptr);

// dw = wgrad(x, dy) for a stride-1 convolution (dw [K, R, S, C] in x's dtype), where
// implicit_gemm_forward_applies holds for the forward convolution of x with dw into dy. With `in`
// (its gamma, beta, save_mean and save_invstd, fp32 [C]), x is a chained input: the kernel reads
// relu(x * scale + shift) of its BatchNorm as the forward's prologue does, zero on padding. Uses
// the state's workspace (fp32 [K R S C]); the tile is timed on first use (untimed during capture).
bool implicit_gemm_wgrad_applies(int device, const Tensor& x, const Tensor& dy, const Tensor& dw,
                                 const ops::Conv2dParams& p, const ops::ChainedInput* in = nullptr);
void implicit_gemm_wgrad(CudaState& st, const Tensor& x, const Tensor& dy, Tensor& dw, const ops::Conv2dParams& p,
                         const ops::ChainedInput* in = nullptr);

}  // namespace dstrain::kernels::cuda
