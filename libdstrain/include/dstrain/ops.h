// The ops of a training step, forward and backward. Each runs on the device of its tensors
// (CPU: Eigen; CUDA: cuDNN, cuBLASLt and dstrain's kernels) on the context's stream.
// Shapes follow tensor.h: activations NHWC, filters KRSC, linear weights [out, in].
// Outputs are overwritten, never accumulated into, and must already have the right shape,
// dtype and device (layers own and size them); a mismatch raises InvalidArgument.
//
// Dtypes: every op takes fp32. Convolution, BatchNorm, ReLU, max and average pooling and linear
// also take fp16 or bf16 activations (computed with fp32 accumulation; the CPU widens to fp32,
// runs the fp32 reference and rounds each output once):
//  - conv2d: x, w, y (dy, dx, dw) all of one dtype.
//  - batchnorm: x, y, dy, dx of one dtype; gamma, beta, running and saved statistics, dgamma,
//    dbeta fp32 always.
//  - relu, maxpool2x2: every tensor of one dtype.
//  - global_avgpool: y (dy) fp32 or x's (dx's) dtype.
//  - linear: x, w, dy, dx of one dtype; y and dw fp32 or that dtype; b, db fp32.
// softmax_cross_entropy and sgd_step are fp32 only. Any other combination raises InvalidArgument.
#pragma once
#include "dstrain/context.h"
#include "dstrain/tensor.h"

namespace dstrain::ops {

// Deterministic algorithms: when on, the CUDA convolutions use only the cuDNN algorithms that
// give bit-identical results run to run (slower for some shapes), as bit-exact resume from a
// checkpoint needs. Every other op is deterministic always. Off by default; the environment
// variable DSTRAIN_DETERMINISTIC=1 turns it on at start. Process-wide.
void set_deterministic(bool on);
bool deterministic();

struct Conv2dParams {
  int stride_h = 1, stride_w = 1;
  int pad_h = 0, pad_w = 0;
};
// [N,H,W,C] x [K,R,S,C] -> [N,Ho,Wo,K] with Ho = (H + 2*pad_h - R) / stride_h + 1.
Shape conv2d_output_shape(const Shape& x, const Shape& w, const Conv2dParams& p);
void conv2d_forward(Context& ctx, const Tensor& x, const Tensor& w, Tensor& y, const Conv2dParams& p);
void conv2d_backward_data(Context& ctx, const Tensor& dy, const Tensor& w, Tensor& dx,
                          const Conv2dParams& p);
void conv2d_backward_filter(Context& ctx, const Tensor& x, const Tensor& dy, Tensor& dw,
                            const Conv2dParams& p);
// Both gradients of one convolution: dw, and dx when it is not null. On the GPU the two run beside
// each other, dw on a second stream (DSTRAIN_SIDE_STREAM=0: one after the other).
void conv2d_backward(Context& ctx, const Tensor& x, const Tensor& dy, const Tensor& w, Tensor* dx, Tensor& dw,
                     const Conv2dParams& p);

struct BatchNormParams {
  float momentum = 0.1f;  // running = (1 - momentum) * running + momentum * batch
  float eps = 1e-5f;
};
// Per-channel statistics over N, H, W of an NHWC tensor (any rank >= 2: the last dim is C).
// Training: y = gamma * (x - mean) * invstd + beta with the biased batch variance; the running
// variance is updated with the unbiased one (n / (n - 1)), as PyTorch does. save_mean and
// save_invstd ([C], fp32) keep what backward needs.
void batchnorm_forward_train(Context& ctx, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                             Tensor& running_mean, Tensor& running_var, Tensor& y, Tensor& save_mean,
                             Tensor& save_invstd, const BatchNormParams& p);
void batchnorm_forward_eval(Context& ctx, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                            const Tensor& running_mean, const Tensor& running_var, Tensor& y,
                            const BatchNormParams& p);
void batchnorm_backward(Context& ctx, const Tensor& dy, const Tensor& x, const Tensor& gamma,
                        const Tensor& save_mean, const Tensor& save_invstd, Tensor& dx,
                        Tensor& dgamma, Tensor& dbeta);

// ---- Fused Conv2d + BatchNorm + ReLU (one layer of a ResNet-style network).
// x, w, conv_out, z, dz, dconv, dx and dw share one dtype (fp32, fp16 or bf16); gamma, beta, the
// running and saved statistics, dgamma and dbeta are fp32 [K]. conv_out, z, dz, dconv: the conv
// output's shape [N,Ho,Wo,K].
// Chained layers (training only): a fused layer may hand its raw conv_out to the next fused layer
// instead of z, and the next layer applies the first one's BatchNorm and ReLU itself, on the fly
// (in the convolution's operand prologue on the GPU where cuDNN fuses it), so that z is never
// stored. ChainedInput describes the layer that produced x: its gamma and beta, the batch mean
// and invstd of its training forward (fp32 [C]), and, for backward, where its dgamma and dbeta go.
// The activated input is a = relu(v), v = fma(x - mean, gamma * invstd, beta) (the formula of z).
struct ChainedInput {
  const Tensor* gamma = nullptr;
  const Tensor* beta = nullptr;
  const Tensor* save_mean = nullptr;
  const Tensor* save_invstd = nullptr;
  Tensor* dgamma = nullptr;  // backward outputs of the producing layer's BatchNorm
  Tensor* dbeta = nullptr;
};

struct ConvBnReluParams {
  Conv2dParams conv;
  BatchNormParams bn;
  // Training forward only: conv_out already holds conv2d(x, w), computed by the caller (an FP8
  // convolution, say); the op computes the statistics, running statistics and z from it.
  bool conv_out_given = false;
  // x is the raw conv_out of the fused layer described here (not null): the convolution reads
  // a = relu(bn(x)) instead of x. Backward then returns dx = dL/dx through that ReLU and
  // BatchNorm, and writes the producing layer's dgamma and dbeta.
  const ChainedInput* chained_input = nullptr;
  // The next layer takes conv_out chained: the forward leaves z unwritten (z may be empty), and
  // backward's dz is dL/dconv_out itself (the next layer went through this BN and ReLU).
  bool chained_output = false;
};
// Training forward. conv_out = conv2d(x, w) (stored in the dtype, kept for backward); per-channel
// batch statistics of conv_out (biased variance; the running variance gets the unbiased one, as
// batchnorm_forward_train); z = relu(v) with v = (conv_out - mean) * (gamma * invstd) + beta,
// computed in fp32 as fma(conv_out - mean, gamma * invstd, beta). save_mean / save_invstd keep the
// batch mean and 1/sqrt(var + eps).
void conv_bn_relu_forward_train(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& gamma,
                                const Tensor& beta, Tensor& running_mean, Tensor& running_var, Tensor& conv_out,
                                Tensor& z, Tensor& save_mean, Tensor& save_invstd, const ConvBnReluParams& p);
// Backward from dz = dL/dz. The ReLU mask is v > 0 with v recomputed exactly as in the forward
// (from conv_out, gamma, beta, save_mean, save_invstd), so z is not needed. g = dz where v > 0;
// dbeta = sum g; dgamma = sum g * xhat (xhat = (conv_out - mean) * invstd);
// dconv = gamma * invstd * (g - dbeta / M - xhat * dgamma / M) (M = N*Ho*Wo), written to dconv
// (scratch owned by the caller); then dw = conv2d_backward_filter(x, dconv) and, when dx is not
// null, dx = conv2d_backward_data(dconv, w).
void conv_bn_relu_backward(Context& ctx, const Tensor& dz, const Tensor& x, const Tensor& w, const Tensor& gamma,
                           const Tensor& beta, const Tensor& conv_out, const Tensor& save_mean,
                           const Tensor& save_invstd, Tensor& dconv, Tensor* dx, Tensor& dw, Tensor& dgamma,
                           Tensor& dbeta, const ConvBnReluParams& p);
// Inference fold of BatchNorm's running statistics: s_k = gamma_k / sqrt(running_var_k + eps);
// w_folded[k] = w[k] * s_k (w's shape and dtype, computed in fp32 and rounded once);
// bias[k] = beta_k - running_mean_k * s_k ([K], fp32 or w's dtype: the bias is rounded once).
void conv_bn_fold(Context& ctx, const Tensor& w, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                  const Tensor& running_var, Tensor& w_folded, Tensor& bias, const BatchNormParams& p);
// Inference forward: z = relu(conv2d(x, w) + bias), bias [K] in fp32 or x's dtype; one fused call
// on the GPU where cuDNN, cuBLASLt (1x1) or the implicit GEMM offers it for the shape. A 16-bit
// bias goes to cuBLASLt's epilogue as it is (an fp32 one is converted on every call there).
void conv_bias_relu_forward(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& z,
                            const Conv2dParams& p);

void relu_forward(Context& ctx, const Tensor& x, Tensor& y);
// dx = dy where y > 0, else 0.
void relu_backward(Context& ctx, const Tensor& dy, const Tensor& y, Tensor& dx);

// 2x2 window, stride 2, odd trailing row/column dropped. Backward sends each gradient to the
// first maximum of its window in row-major order.
void maxpool2x2_forward(Context& ctx, const Tensor& x, Tensor& y);
void maxpool2x2_backward(Context& ctx, const Tensor& dy, const Tensor& x, const Tensor& y, Tensor& dx);

// [N,H,W,C] -> [N,C] mean over H and W.
void global_avgpool_forward(Context& ctx, const Tensor& x, Tensor& y);
void global_avgpool_backward(Context& ctx, const Tensor& dy, Tensor& dx);

// y[N,O] = x[N,I] * w[O,I]^T + b[O] (b may be null).
void linear_forward(Context& ctx, const Tensor& x, const Tensor& w, const Tensor* b, Tensor& y);
// dx (may be null: not needed) = dy * w; dw = dy^T * x; db (may be null) = column sums of dy.
void linear_backward(Context& ctx, const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx,
                     Tensor& dw, Tensor* db);

// logits [N,K] fp32, labels [N] i32 in [0, K). Writes loss_sum[1] = sum_i -log softmax(x_i)[y_i]
// and correct[1] = number of rows whose argmax (first on ties) equals the label, both fp32.
// When dlogits is given: dlogits = (softmax(x) - onehot(y)) * grad_scale.
// A label outside [0, K) raises InvalidArgument on the CPU; on CUDA it makes loss_sum NaN.
void softmax_cross_entropy(Context& ctx, const Tensor& logits, const Tensor& labels, Tensor* dlogits,
                           float grad_scale, Tensor& loss_sum, Tensor& correct);

struct SgdParams {
  float lr = 0.1f;
  float momentum = 0.0f;
  float weight_decay = 0.0f;
  bool nesterov = false;
};
// PyTorch's SGD (dampening 0): g = grad + wd * p; buf = momentum * buf + g;
// g = nesterov ? g + momentum * buf : buf (or g when momentum is 0); p -= lr * g.
// momentum_buf starts at zero.
void sgd_step(Context& ctx, Tensor& param, const Tensor& grad, Tensor& momentum_buf, const SgdParams& p);

// dst = src (same shape and dtype; either may be on the host or the context's device), ordered
// on the context's stream. Host memory may be reused as soon as the call returns.
void copy(Context& ctx, const Tensor& src, Tensor& dst);

// dst = src converted elementwise between floating dtypes (same shape, same device).
void convert(Context& ctx, const Tensor& src, Tensor& dst);

}  // namespace dstrain::ops
