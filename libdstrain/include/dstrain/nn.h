// Layers: explicit objects with forward, backward and parameters (no autograd engine).
// A layer owns its output and input-gradient buffers and returns references to them; they stay
// valid until the layer's next forward/backward. Sequential runs backward in reverse order and
// reports each layer's parameters as soon as their gradients are final.
//
// Precision: Conv2d and Linear take an amp::Policy (default fp32). Under fp16/bf16 they convert
// their input to the low type when it is not already, compute in it from a low-precision working
// copy of their fp32 weight, write their weight gradient into the fp32 Parameter::grad, and return
// dL/dx in the dtype their input had. BatchNorm2d, ReLU, MaxPool2x2 and GlobalAvgPool keep the
// dtype of their input (BatchNorm's statistics and parameters are fp32 always). Linear's output
// (the logits) is fp32 in every policy.
//
// Working copies: each layer allocates its copies when it is made and lists them in
// working_copies() (the convolutions' are bf16 under fp8_hybrid too). By default the layer converts its master into the copy at every forward, so
// the copy follows whatever changed the master. A training loop that keeps the copies current
// itself calls set_working_copies_external(true): the layer then computes with the copy as it is.
// The loop passes the copies to the optimizer (working_copy_per_parameter(model) as FusedSGD's or
// FusedAdamW's low_precision list), which writes them in the same pass as the fp32 update (a
// step skipped for an inf/NaN gradient writes neither), and calls refresh_working_copies once
// wherever masters change outside the optimizer: after init, after DataParallel's broadcast of
// rank 0's parameters, after a checkpoint restore.
//
// FP8 (amp::Policy::fp8_hybrid()): Linear runs its three GEMMs in FP8 from padded fp8 copies
// (every dimension rounded up to 16 with zeros): y = x w^T with x and w in E4M3, dx = dy w and
// dw = dy^T x with dy in E5M2, each tensor with its own amp::Fp8Meta (delayed scaling: the casts
// use the current scale and raise the step's amax). Linear has no working copy under FP8: its
// forward casts the fp32 master straight to E4M3, taking the weight's amax in that cast, whether
// or not the copies are external. The training loop calls
// amp::update_fp8_scales(ctx, model.fp8_metas(), &comm) once per step, after the optimizer.
// Evaluation forwards raise the amax of x and w too (a larger amax only lowers the next scale).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "dstrain/amp.h"
#include "dstrain/amp_policy.h"
#include "dstrain/context.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

namespace dstrain::nn {

struct Parameter {
  std::string name;
  Tensor value;
  Tensor grad;  // same shape; may be a view into a flat buffer (DataParallel)
  // How init_parameters fills it: uniform in +-1/sqrt(fan_in), ones or zeros.
  enum class Init { UniformFanIn, Ones, Zeros } init = Init::Zeros;
  std::int64_t fan_in = 1;
};

// A low-precision working copy (fp16 or bf16, the master's shape) a layer computes with.
struct WorkingCopy {
  Parameter* master;
  Tensor* low;
};

class Layer {
 public:
  virtual ~Layer() = default;
  // training selects batch statistics in BatchNorm; x must stay alive until backward.
  virtual const Tensor& forward(Context& ctx, const Tensor& x, bool training) = 0;
  // Writes the gradients of this layer's parameters and returns dL/dx (an empty tensor when
  // set_needs_input_grad(false)).
  virtual const Tensor& backward(Context& ctx, const Tensor& dy) = 0;
  virtual std::vector<Parameter*> parameters() { return {}; }
  // State that is not trained by gradients (BatchNorm running statistics).
  virtual std::vector<Tensor*> buffers() { return {}; }
  // FP8 scaling states the training loop updates once per step (see amp::update_fp8_scales).
  virtual std::vector<amp::Fp8Meta*> fp8_metas() { return {}; }
  // This layer's low-precision working copies (empty under fp32), allocated when it is made.
  virtual std::vector<WorkingCopy> working_copies() { return {}; }
  // external: something else (the optimizer) keeps the working copies equal to the masters
  // rounded, and forward uses them as they are; otherwise forward converts at every call.
  virtual void set_working_copies_external(bool external) { working_copies_external_ = external; }
  bool working_copies_external() const { return working_copies_external_; }
  virtual std::string name() const = 0;
  // The first layer of a network has no use for dL/dx: skip computing it.
  void set_needs_input_grad(bool needed) { needs_input_grad_ = needed; }
  bool needs_input_grad() const { return needs_input_grad_; }

 protected:
  bool needs_input_grad_ = true;
  bool working_copies_external_ = false;
};

// No bias by default (followed by BatchNorm in the reference model). Weight [out, k, k, in].
class Conv2d final : public Layer {
 public:
  Conv2d(Device device, int in_channels, int out_channels, int kernel, int stride, int padding, bool bias = false,
         amp::Policy policy = {});
  const Tensor& forward(Context& ctx, const Tensor& x, bool training) override;
  const Tensor& backward(Context& ctx, const Tensor& dy) override;
  std::vector<Parameter*> parameters() override;
  std::vector<WorkingCopy> working_copies() override;
  std::string name() const override;
  Parameter& weight() { return weight_; }
  DType compute_dtype() const { return dtype_; }

 private:
  int in_, out_, kernel_;
  ops::Conv2dParams params_;
  Parameter weight_;
  bool has_bias_;
  DType dtype_;
  const Tensor* x_ = nullptr;  // in dtype_ (the input itself or x_cast_)
  DType input_dtype_ = DType::F32;
  Tensor y_, dx_;
  Tensor x_cast_, dy_cast_, dx_input_;  // dtype conversions at the layer's edges
  Tensor w_low_, dw_low_;               // low-precision working weight and its gradient
};

class BatchNorm2d final : public Layer {
 public:
  BatchNorm2d(Device device, int channels, float momentum = 0.1f, float eps = 1e-5f);
  const Tensor& forward(Context& ctx, const Tensor& x, bool training) override;
  const Tensor& backward(Context& ctx, const Tensor& dy) override;
  std::vector<Parameter*> parameters() override { return {&gamma_, &beta_}; }
  std::vector<Tensor*> buffers() override { return {&running_mean_, &running_var_}; }
  std::string name() const override;

 private:
  int channels_;
  ops::BatchNormParams params_;
  Parameter gamma_, beta_;
  Tensor running_mean_, running_var_, save_mean_, save_invstd_;
  const Tensor* x_ = nullptr;
  Tensor y_, dx_;
};

// Conv2d (no bias) + BatchNorm2d + ReLU as one layer, through the fused ops. Training forward runs
// ops::conv_bn_relu_forward_train (keeping the conv output and batch statistics for backward);
// evaluation folds the running statistics into the weight and a bias (ops::conv_bn_fold, at every
// evaluation forward so it follows the parameters) and runs ops::conv_bias_relu_forward.
// Parameters: the filter [out, k, k, in], then BatchNorm's gamma and beta; buffers: the running
// mean and variance (initialised as BatchNorm2d's). Precision as Conv2d: under fp16/bf16 the
// input is converted to the low type when needed, the layer computes from its working copy of the
// filter, writes the filter gradient into the fp32 Parameter::grad and returns dL/dx in the input's
// dtype; BatchNorm's parameters and statistics stay fp32.
class ConvBnRelu final : public Layer {
 public:
  ConvBnRelu(Device device, int in_channels, int out_channels, int kernel, int stride, int padding,
             amp::Policy policy = {}, float momentum = 0.1f, float eps = 1e-5f);
  const Tensor& forward(Context& ctx, const Tensor& x, bool training) override;
  // Needs a training forward before it (an evaluation forward keeps no statistics).
  const Tensor& backward(Context& ctx, const Tensor& dy) override;
  std::vector<Parameter*> parameters() override { return {&weight_, &gamma_, &beta_}; }
  std::vector<Tensor*> buffers() override { return {&running_mean_, &running_var_}; }
  std::vector<WorkingCopy> working_copies() override;
  // Under fp8_hybrid: the delayed-scaling states of the FP8 convolution forward's x and w.
  std::vector<amp::Fp8Meta*> fp8_metas() override;
  std::string name() const override;
  Parameter& weight() { return weight_; }
  Parameter& gamma() { return gamma_; }
  Parameter& beta() { return beta_; }
  Tensor& running_mean() { return running_mean_; }
  Tensor& running_var() { return running_var_; }
  DType compute_dtype() const { return dtype_; }

  // Chains two fused layers that follow each other: in training the producer hands its raw
  // convolution output to the consumer, which applies the producer's BatchNorm and ReLU in its
  // own convolution's prologue and goes back through them in its dgrad (ops::ChainedInput), so
  // the activated tensor is never stored. Evaluation forwards are not chained. Returns false (and
  // chains nothing) when the consumer's input channels are not the producer's output channels,
  // the compute dtypes differ, either layer runs its convolution in FP8, or either is chained on
  // that side already.
  static bool chain(ConvBnRelu& producer, ConvBnRelu& consumer);
  bool chained_input() const { return producer_ != nullptr; }
  bool chained_output() const { return consumer_ != nullptr; }

 private:
  ConvBnRelu* producer_ = nullptr;
  ConvBnRelu* consumer_ = nullptr;
  ops::ChainedInput chained_;  // the producer's BatchNorm, for forward and backward
  int in_, out_, kernel_;
  ops::ConvBnReluParams params_;
  Parameter weight_, gamma_, beta_;
  DType dtype_;
  Tensor running_mean_, running_var_, save_mean_, save_invstd_;
  const Tensor* x_ = nullptr;  // in dtype_ (the input itself or x_cast_)
  bool last_forward_training_ = false;
  DType input_dtype_ = DType::F32;
  Tensor conv_out_, z_, dconv_, dx_;
  Tensor x_cast_, dz_cast_, dx_input_;  // dtype conversions at the layer's edges
  Tensor w_low_, dw_low_;               // low-precision working filter and its gradient
  Tensor w_folded_, folded_bias_;       // evaluation: BatchNorm folded into the filter
  // fp8_hybrid: the training forward's convolution in FP8 (x and the fp32 master cast to E4M3),
  // until cuDNN turns out to have no FP8 plan for the shape; the backward stays bf16.
  bool fp8_forward_ = false;
  std::unique_ptr<amp::Fp8Meta> x_meta_, w_meta_;
  Tensor x_fp8_, w_fp8_;
};

class ReLU final : public Layer {
 public:
  const Tensor& forward(Context& ctx, const Tensor& x, bool training) override;
  const Tensor& backward(Context& ctx, const Tensor& dy) override;
  std::string name() const override { return "ReLU"; }

 private:
  Tensor y_, dx_;
};

class MaxPool2x2 final : public Layer {
 public:
  const Tensor& forward(Context& ctx, const Tensor& x, bool training) override;
  const Tensor& backward(Context& ctx, const Tensor& dy) override;
  std::string name() const override { return "MaxPool2x2"; }

 private:
  const Tensor* x_ = nullptr;
  Tensor y_, dx_;
};

// [N,H,W,C] -> [N,C]
class GlobalAvgPool final : public Layer {
 public:
  const Tensor& forward(Context& ctx, const Tensor& x, bool training) override;
  const Tensor& backward(Context& ctx, const Tensor& dy) override;
  std::string name() const override { return "GlobalAvgPool"; }

 private:
  Shape x_shape_;
  Tensor y_, dx_;
};

class Linear final : public Layer {
 public:
  Linear(Device device, int in_features, int out_features, bool bias = true, amp::Policy policy = {});
  const Tensor& forward(Context& ctx, const Tensor& x, bool training) override;
  const Tensor& backward(Context& ctx, const Tensor& dy) override;
  std::vector<Parameter*> parameters() override;
  // The weight's copy under fp16/bf16; none under fp32 or FP8 (the bias stays fp32).
  std::vector<WorkingCopy> working_copies() override;
  std::string name() const override;
  Parameter& weight() { return weight_; }
  Parameter& bias() { return bias_; }
  DType compute_dtype() const { return dtype_; }
  bool fp8() const { return fp8_; }
  // The delayed-scaling states of x, w (E4M3) and dy (E5M2) under FP8; empty otherwise.
  std::vector<amp::Fp8Meta*> fp8_metas() override;

 private:
  const Tensor& forward_fp8(Context& ctx, const Tensor& x);
  const Tensor& backward_fp8(Context& ctx, const Tensor& dy);

  int in_, out_;
  Parameter weight_, bias_;
  bool has_bias_;
  bool fp8_;
  DType dtype_;  // the compute dtype (FP8: bf16, what inputs other than fp32/bf16 are cast to first)
  const Tensor* x_ = nullptr;  // in dtype_ (FP8: fp32 or bf16, as given)
  DType input_dtype_ = DType::F32;
  Tensor y_, dx_;  // y_ fp32
  Tensor x_cast_, dy_low_, dx_input_;
  Tensor w_low_;
  // FP8: scaling states, padded fp8 operands and the padded GEMM output.
  std::unique_ptr<amp::Fp8Meta> x_meta_, w_meta_, dy_meta_;
  Tensor x_fp8_, w_fp8_, x_t_fp8_, w_t_fp8_, dy_fp8_, dy_t_fp8_, gemm_out_;
};

class Sequential final : public Layer {
 public:
  Sequential() = default;
  Layer& add(std::unique_ptr<Layer> layer);
  template <class L, class... Args>
  L& emplace(Args&&... args) {
    return static_cast<L&>(add(std::make_unique<L>(std::forward<Args>(args)...)));
  }
  const Tensor& forward(Context& ctx, const Tensor& x, bool training) override;
  const Tensor& backward(Context& ctx, const Tensor& dy) override;
  // As backward, calling grad_ready(p) for each parameter once its gradient is written.
  const Tensor& backward(Context& ctx, const Tensor& dy, const std::function<void(Parameter&)>& grad_ready);
  std::vector<Parameter*> parameters() override;
  std::vector<Tensor*> buffers() override;
  std::vector<amp::Fp8Meta*> fp8_metas() override;
  std::vector<WorkingCopy> working_copies() override;
  // Sets every child layer too (a layer added afterwards keeps its own setting).
  void set_working_copies_external(bool external) override;
  std::string name() const override { return "Sequential"; }
  std::size_t size() const { return layers_.size(); }
  Layer& layer(std::size_t i) { return *layers_.at(i); }
  // One line per layer with its parameter count.
  std::string summary();

 private:
  std::vector<std::unique_ptr<Layer>> layers_;
};

// PyTorch's default initialisation: weights (and biases) uniform in +-1/sqrt(fan_in)
// (kaiming_uniform with a = sqrt(5)); BatchNorm gamma 1, beta 0 (its running statistics start at
// mean 0, variance 1 when the layer is made). Deterministic for a given seed; parameters on the GPU are drawn on the host and copied.
void init_parameters(Layer& model, std::uint64_t seed);

// Every working copy of the model = its master rounded to the copy's dtype (ops::convert), on
// the context's stream: once wherever masters change outside the optimizer.
void refresh_working_copies(Context& ctx, Layer& model);

// One entry per model.parameters() entry, in that order: the parameter's working copy, or null
// for one without (BatchNorm's, a bias, FP8 Linear's weight). The low_precision list of
// FusedSGD::step and FusedAdamW::step for the model's parameters.
std::vector<Tensor*> working_copy_per_parameter(Layer& model);

std::int64_t parameter_count(Layer& model);
// FNV-1a over the bytes of every parameter (copied to the host): equal on all ranks exactly
// when their parameters are bit-identical (up to hash collisions). Buffers are left out: BatchNorm
// running statistics are per rank.
std::uint64_t parameter_hash(Layer& model);

}  // namespace dstrain::nn
