// Layers: explicit objects with forward, backward and parameters (no autograd engine).
// A layer owns its output and input-gradient buffers and returns references to them; they stay
// valid until the layer's next forward/backward. Sequential runs backward in reverse order and
// reports each layer's parameters as soon as their gradients are final.
//
// Precision: Conv2d and Linear take an amp::Policy (default fp32). Under fp16/bf16 they convert
// their input to the low type when it is not already, compute in it from a low-precision working
// copy of their fp32 weight (refreshed from the master at every forward, so it always follows the
// optimizer), write their weight gradient into the fp32 Parameter::grad, and return dL/dx in the
// dtype their input had. BatchNorm2d, ReLU, MaxPool2x2 and GlobalAvgPool keep the dtype of their
// input (BatchNorm's statistics and parameters are fp32 always). Linear's output (the logits) is
// fp32 in every policy.
//
// FP8 (amp::Policy::fp8_hybrid()): Linear runs its three GEMMs in FP8 from padded fp8 copies
// (every dimension rounded up to 16 with zeros): y = x w^T with x and w in E4M3, dx = dy w and
// dw = dy^T x with dy in E5M2, each tensor with its own amp::Fp8Meta (delayed scaling: the casts
// use the current scale and raise the step's amax). The training loop calls
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
  virtual std::string name() const = 0;
  // The first layer of a network has no use for dL/dx: skip computing it.
  void set_needs_input_grad(bool needed) { needs_input_grad_ = needed; }
  bool needs_input_grad() const { return needs_input_grad_; }

 protected:
  bool needs_input_grad_ = true;
};

// No bias by default (followed by BatchNorm in the reference model). Weight [out, k, k, in].
class Conv2d final : public Layer {
 public:
  Conv2d(Device device, int in_channels, int out_channels, int kernel, int stride, int padding, bool bias = false,
         amp::Policy policy = {});
  const Tensor& forward(Context& ctx, const Tensor& x, bool training) override;
  const Tensor& backward(Context& ctx, const Tensor& dy) override;
  std::vector<Parameter*> parameters() override;
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

std::int64_t parameter_count(Layer& model);
// FNV-1a over the bytes of every parameter (copied to the host): equal on all ranks exactly
// when their parameters are bit-identical (up to hash collisions). Buffers are left out: BatchNorm
// running statistics are per rank.
std::uint64_t parameter_hash(Layer& model);

}  // namespace dstrain::nn
