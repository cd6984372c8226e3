#include "dstrain/nn.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "dstrain/error.h"

namespace dstrain::nn {

namespace {
Parameter make_parameter(std::string name, const Shape& shape, Device device, Parameter::Init init,
                         std::int64_t fan_in) {
  Parameter p;
  p.name = std::move(name);
  p.value = Tensor::zeros(shape, DType::F32, device);
  p.grad = Tensor::zeros(shape, DType::F32, device);
  p.init = init;
  p.fan_in = fan_in;
  return p;
}

// Sizes `t` like `shape` on the context's device (reusing its memory when possible).
Tensor& ensure(Tensor& t, const Shape& shape, const Context& ctx, DType dtype = DType::F32) {
  if (t.shape() != shape || t.device() != ctx.device() || t.dtype() != dtype) t.resize(shape, dtype, ctx.device());
  return t;
}

// `t` itself when it already has `dtype`, else `t` converted into `scratch`.
const Tensor& as_dtype(Context& ctx, const Tensor& t, DType dtype, Tensor& scratch) {
  if (t.dtype() == dtype) return t;
  ops::convert(ctx, t, ensure(scratch, t.shape(), ctx, dtype));
  return scratch;
}

// The low-precision copy a layer computes with (empty under fp32), made with the layer so that it
// exists before the first forward.
Tensor make_working_copy(const Parameter& master, DType dtype) {
  if (dtype == DType::F32) return Tensor();
  return Tensor::zeros(master.value.shape(), dtype, master.value.device());
}

// The weight a layer computes with: the master itself under fp32; the working copy as it is when
// the optimizer keeps it current (external); else the master converted into it now.
const Tensor& working_weight(Context& ctx, const Parameter& master, DType dtype, Tensor& low, bool external) {
  if (dtype == DType::F32) return master.value;
  if (external) return low;
  return as_dtype(ctx, master.value, dtype, low);
}

const Tensor& require_input(const Tensor* x, const std::string& layer) {
  if (!x) DSTRAIN_THROW(ErrorCode::InvalidArgument, layer + ": backward called before forward");
  return *x;
}
}  // namespace

Conv2d::Conv2d(Device device, int in_channels, int out_channels, int kernel, int stride, int padding, bool bias,
               amp::Policy policy)
    : in_(in_channels), out_(out_channels), kernel_(kernel), has_bias_(bias),
      dtype_(policy.compute_dtype(amp::OpKind::Conv)) {
  DSTRAIN_CHECK(in_channels > 0 && out_channels > 0 && kernel > 0 && stride > 0 && padding >= 0,
                "Conv2d needs positive channels, kernel and stride");
  DSTRAIN_CHECK(!bias, "Conv2d with bias is not supported yet; follow it with BatchNorm2d");
  params_.stride_h = params_.stride_w = stride;
  params_.pad_h = params_.pad_w = padding;
  weight_ = make_parameter(name() + ".weight", {out_, kernel_, kernel_, in_}, device, Parameter::Init::UniformFanIn,
                           static_cast<std::int64_t>(kernel) * kernel * in_channels);
  w_low_ = make_working_copy(weight_, dtype_);
}

std::string Conv2d::name() const {
  std::ostringstream out;
  out << "Conv2d(" << in_ << "->" << out_ << ", " << kernel_ << "x" << kernel_ << ", stride " << params_.stride_h
      << ", pad " << params_.pad_h << ")";
  return out.str();
}

std::vector<Parameter*> Conv2d::parameters() { return {&weight_}; }

std::vector<WorkingCopy> Conv2d::working_copies() {
  if (dtype_ == DType::F32) return {};
  return {{&weight_, &w_low_}};
}

const Tensor& Conv2d::forward(Context& ctx, const Tensor& x, bool) {
  input_dtype_ = x.dtype();
  x_ = &as_dtype(ctx, x, dtype_, x_cast_);
  const Tensor& w = working_weight(ctx, weight_, dtype_, w_low_, working_copies_external_);
  ensure(y_, ops::conv2d_output_shape(x.shape(), weight_.value.shape(), params_), ctx, dtype_);
  ops::conv2d_forward(ctx, *x_, w, y_, params_);
  return y_;
}

const Tensor& Conv2d::backward(Context& ctx, const Tensor& dy) {
  const Tensor& x = require_input(x_, name());
  const Tensor& g = as_dtype(ctx, dy, dtype_, dy_cast_);
  Tensor& dw = dtype_ == DType::F32 ? weight_.grad : ensure(dw_low_, weight_.value.shape(), ctx, dtype_);
  Tensor* dx = needs_input_grad_ ? &ensure(dx_, x.shape(), ctx, dtype_) : nullptr;
  ops::conv2d_backward(ctx, x, g, dtype_ == DType::F32 ? weight_.value : w_low_, dx, dw, params_);
  if (dtype_ != DType::F32) ops::convert(ctx, dw_low_, weight_.grad);
  if (!needs_input_grad_) {
    dx_ = Tensor();
    return dx_;
  }
  if (input_dtype_ == dtype_) return dx_;
  ops::convert(ctx, dx_, ensure(dx_input_, x.shape(), ctx, input_dtype_));
  return dx_input_;
}

BatchNorm2d::BatchNorm2d(Device device, int channels, float momentum, float eps) : channels_(channels) {
  DSTRAIN_CHECK(channels > 0, "BatchNorm2d needs a positive channel count");
  params_.momentum = momentum;
  params_.eps = eps;
  gamma_ = make_parameter(name() + ".weight", {channels}, device, Parameter::Init::Ones, 1);
  beta_ = make_parameter(name() + ".bias", {channels}, device, Parameter::Init::Zeros, 1);
  running_mean_ = Tensor::zeros({channels}, DType::F32, device);
  running_var_ = Tensor::from_vector({channels}, std::vector<float>(static_cast<std::size_t>(channels), 1.0f)).to(device);
  save_mean_ = Tensor::zeros({channels}, DType::F32, device);
  save_invstd_ = Tensor::zeros({channels}, DType::F32, device);
}

std::string BatchNorm2d::name() const { return "BatchNorm2d(" + std::to_string(channels_) + ")"; }

const Tensor& BatchNorm2d::forward(Context& ctx, const Tensor& x, bool training) {
  x_ = &x;
  ensure(y_, x.shape(), ctx, x.dtype());
  if (training)
    ops::batchnorm_forward_train(ctx, x, gamma_.value, beta_.value, running_mean_, running_var_, y_, save_mean_,
                                 save_invstd_, params_);
  else
    ops::batchnorm_forward_eval(ctx, x, gamma_.value, beta_.value, running_mean_, running_var_, y_, params_);
  return y_;
}

const Tensor& BatchNorm2d::backward(Context& ctx, const Tensor& dy) {
  const Tensor& x = require_input(x_, name());
  ensure(dx_, x.shape(), ctx, x.dtype());
  ops::batchnorm_backward(ctx, dy, x, gamma_.value, save_mean_, save_invstd_, dx_, gamma_.grad, beta_.grad);
  return dx_;
}

ConvBnRelu::ConvBnRelu(Device device, int in_channels, int out_channels, int kernel, int stride, int padding,
                       amp::Policy policy, float momentum, float eps)
    : in_(in_channels), out_(out_channels), kernel_(kernel), dtype_(policy.compute_dtype(amp::OpKind::Conv)) {
  DSTRAIN_CHECK(in_channels > 0 && out_channels > 0 && kernel > 0 && stride > 0 && padding >= 0,
                "ConvBnRelu needs positive channels, kernel and stride");
  params_.conv.stride_h = params_.conv.stride_w = stride;
  params_.conv.pad_h = params_.conv.pad_w = padding;
  params_.bn.momentum = momentum;
  params_.bn.eps = eps;
  weight_ = make_parameter(name() + ".weight", {out_, kernel_, kernel_, in_}, device, Parameter::Init::UniformFanIn,
                           static_cast<std::int64_t>(kernel) * kernel * in_channels);
  gamma_ = make_parameter(name() + ".bn.weight", {out_}, device, Parameter::Init::Ones, 1);
  beta_ = make_parameter(name() + ".bn.bias", {out_}, device, Parameter::Init::Zeros, 1);
  running_mean_ = Tensor::zeros({out_}, DType::F32, device);
  running_var_ = Tensor::from_vector({out_}, std::vector<float>(static_cast<std::size_t>(out_), 1.0f)).to(device);
  save_mean_ = Tensor::zeros({out_}, DType::F32, device);
  save_invstd_ = Tensor::zeros({out_}, DType::F32, device);
  w_low_ = make_working_copy(weight_, dtype_);
  if (policy.fp8_conv_forward()) {
    fp8_forward_ = true;
    x_meta_ = std::make_unique<amp::Fp8Meta>(device);  // E4M3
    w_meta_ = std::make_unique<amp::Fp8Meta>(device);
  }
}

std::vector<amp::Fp8Meta*> ConvBnRelu::fp8_metas() {
  if (!x_meta_) return {};
  return {x_meta_.get(), w_meta_.get()};
}

std::string ConvBnRelu::name() const {
  std::ostringstream out;
  out << "ConvBnRelu(" << in_ << "->" << out_ << ", " << kernel_ << "x" << kernel_ << ", stride "
      << params_.conv.stride_h << ", pad " << params_.conv.pad_h << ")";
  return out.str();
}

std::vector<WorkingCopy> ConvBnRelu::working_copies() {
  if (dtype_ == DType::F32) return {};
  return {{&weight_, &w_low_}};
}

bool ConvBnRelu::chain(ConvBnRelu& producer, ConvBnRelu& consumer) {
  if (&producer == &consumer || producer.consumer_ != nullptr || consumer.producer_ != nullptr) return false;
  if (producer.out_ != consumer.in_ || producer.dtype_ != consumer.dtype_) return false;
  if (producer.x_meta_ || consumer.x_meta_) return false;  // FP8 convolutions take an FP8 input
  producer.consumer_ = &consumer;
  consumer.producer_ = &producer;
  consumer.chained_.gamma = &producer.gamma_.value;
  consumer.chained_.beta = &producer.beta_.value;
  consumer.chained_.save_mean = &producer.save_mean_;
  consumer.chained_.save_invstd = &producer.save_invstd_;
  consumer.chained_.dgamma = &producer.gamma_.grad;
  consumer.chained_.dbeta = &producer.beta_.grad;
  consumer.needs_input_grad_ = true;  // the producer's BatchNorm gradients come from it
  return true;
}

const Tensor& ConvBnRelu::forward(Context& ctx, const Tensor& x, bool training) {
  if (training && producer_ != nullptr) {
    // The producer's raw output, in this layer's dtype: anything else would skip its BN + ReLU.
    DSTRAIN_CHECK(x.data() == producer_->conv_out_.data() && producer_->last_forward_training_,
                  name() + ": chained after " + producer_->name() +
                      ", a training forward takes that layer's training output and nothing else");
  }
  input_dtype_ = x.dtype();
  x_ = &as_dtype(ctx, x, dtype_, x_cast_);
  const Tensor& w = working_weight(ctx, weight_, dtype_, w_low_, working_copies_external_);
  const Shape out = ops::conv2d_output_shape(x.shape(), weight_.value.shape(), params_.conv);
  last_forward_training_ = training;
  if (training) {
    ensure(conv_out_, out, ctx, dtype_);
    ops::ConvBnReluParams p = params_;
    p.chained_input = producer_ != nullptr ? &chained_ : nullptr;
    p.chained_output = consumer_ != nullptr;
    if (p.chained_output) z_ = Tensor();  // never written: the consumer applies BN + ReLU
    else ensure(z_, out, ctx, dtype_);
    if (fp8_forward_) {
      amp::cast_to_fp8(ctx, *x_, ensure(x_fp8_, x_->shape(), ctx, DType::F8E4M3), *x_meta_);
      amp::cast_to_fp8(ctx, weight_.value, ensure(w_fp8_, weight_.value.shape(), ctx, DType::F8E4M3), *w_meta_);
      p.conv_out_given = amp::conv2d_forward_fp8(ctx, x_fp8_, w_fp8_, x_meta_->scale_inv(), w_meta_->scale_inv(),
                                                 conv_out_, params_.conv);
      fp8_forward_ = p.conv_out_given;  // no FP8 plan for this shape: bf16 from now on
    }
    ops::conv_bn_relu_forward_train(ctx, *x_, w, gamma_.value, beta_.value, running_mean_, running_var_, conv_out_,
                                    z_, save_mean_, save_invstd_, p);
    return p.chained_output ? conv_out_ : z_;
  }
  ensure(z_, out, ctx, dtype_);
  ops::conv_bn_fold(ctx, w, gamma_.value, beta_.value, running_mean_, running_var_,
                    ensure(w_folded_, w.shape(), ctx, dtype_), ensure(folded_bias_, {out_}, ctx, dtype_), params_.bn);
  ops::conv_bias_relu_forward(ctx, *x_, w_folded_, folded_bias_, z_, params_.conv);
  return z_;
}

const Tensor& ConvBnRelu::backward(Context& ctx, const Tensor& dy) {
  const Tensor& x = require_input(x_, name());
  DSTRAIN_CHECK(last_forward_training_, name() + ": backward needs a training forward before it");
  const Tensor& dz = as_dtype(ctx, dy, dtype_, dz_cast_);
  const Tensor& w = dtype_ == DType::F32 ? weight_.value : w_low_;
  Tensor& dw = dtype_ == DType::F32 ? weight_.grad : ensure(dw_low_, weight_.value.shape(), ctx, dtype_);
  Tensor* dx = nullptr;
  if (needs_input_grad_ || producer_ != nullptr) dx = &ensure(dx_, x.shape(), ctx, dtype_);
  else dx_ = Tensor();
  ops::ConvBnReluParams p = params_;
  p.chained_input = producer_ != nullptr ? &chained_ : nullptr;
  p.chained_output = consumer_ != nullptr;  // dz is dL/dconv_out: the consumer wrote dgamma and dbeta
  Tensor& dconv = p.chained_output ? dconv_ : ensure(dconv_, conv_out_.shape(), ctx, dtype_);
  ops::conv_bn_relu_backward(ctx, dz, x, w, gamma_.value, beta_.value, conv_out_, save_mean_, save_invstd_, dconv,
                             dx, dw, gamma_.grad, beta_.grad, p);
  if (dtype_ != DType::F32) ops::convert(ctx, dw_low_, weight_.grad);
  if (dx == nullptr || input_dtype_ == dtype_) return dx_;
  ops::convert(ctx, dx_, ensure(dx_input_, x.shape(), ctx, input_dtype_));
  return dx_input_;
}

const Tensor& ReLU::forward(Context& ctx, const Tensor& x, bool) {
  ensure(y_, x.shape(), ctx, x.dtype());
  ops::relu_forward(ctx, x, y_);
  return y_;
}

const Tensor& ReLU::backward(Context& ctx, const Tensor& dy) {
  ensure(dx_, y_.shape(), ctx, y_.dtype());
  ops::relu_backward(ctx, dy, y_, dx_);
  return dx_;
}

const Tensor& MaxPool2x2::forward(Context& ctx, const Tensor& x, bool) {
  x_ = &x;
  DSTRAIN_CHECK(x.ndim() == 4, "MaxPool2x2 takes [N,H,W,C], got " + shape_str(x.shape()));
  ensure(y_, {x.dim(0), x.dim(1) / 2, x.dim(2) / 2, x.dim(3)}, ctx, x.dtype());
  ops::maxpool2x2_forward(ctx, x, y_);
  return y_;
}

const Tensor& MaxPool2x2::backward(Context& ctx, const Tensor& dy) {
  const Tensor& x = require_input(x_, name());
  ensure(dx_, x.shape(), ctx, x.dtype());
  ops::maxpool2x2_backward(ctx, dy, x, y_, dx_);
  return dx_;
}

const Tensor& GlobalAvgPool::forward(Context& ctx, const Tensor& x, bool) {
  DSTRAIN_CHECK(x.ndim() == 4, "GlobalAvgPool takes [N,H,W,C], got " + shape_str(x.shape()));
  x_shape_ = x.shape();
  ensure(y_, {x.dim(0), x.dim(3)}, ctx, x.dtype());
  ops::global_avgpool_forward(ctx, x, y_);
  return y_;
}

const Tensor& GlobalAvgPool::backward(Context& ctx, const Tensor& dy) {
  DSTRAIN_CHECK(!x_shape_.empty(), "GlobalAvgPool: backward called before forward");
  ensure(dx_, x_shape_, ctx, y_.dtype());
  ops::global_avgpool_backward(ctx, dy, dx_);
  return dx_;
}

Linear::Linear(Device device, int in_features, int out_features, bool bias, amp::Policy policy)
    : in_(in_features), out_(out_features), has_bias_(bias), fp8_(policy.fp8_linear()),
      dtype_(fp8_ ? policy.activation_dtype() : policy.compute_dtype(amp::OpKind::Linear)) {
  DSTRAIN_CHECK(in_features > 0 && out_features > 0, "Linear needs positive feature counts");
  weight_ = make_parameter(name() + ".weight", {out_, in_}, device, Parameter::Init::UniformFanIn, in_);
  if (has_bias_) bias_ = make_parameter(name() + ".bias", {out_}, device, Parameter::Init::UniformFanIn, in_);
  // FP8 casts the master itself at forward: no working copy.
  if (!fp8_) w_low_ = make_working_copy(weight_, dtype_);
  if (fp8_) {
    amp::Fp8MetaOptions forward_options;  // E4M3
    amp::Fp8MetaOptions gradient_options;
    gradient_options.format = DType::F8E5M2;
    x_meta_ = std::make_unique<amp::Fp8Meta>(device, forward_options);
    w_meta_ = std::make_unique<amp::Fp8Meta>(device, forward_options);
    dy_meta_ = std::make_unique<amp::Fp8Meta>(device, gradient_options);
  }
}

std::vector<amp::Fp8Meta*> Linear::fp8_metas() {
  if (!fp8_) return {};
  return {x_meta_.get(), w_meta_.get(), dy_meta_.get()};
}

std::string Linear::name() const { return "Linear(" + std::to_string(in_) + "->" + std::to_string(out_) + ")"; }

std::vector<Parameter*> Linear::parameters() {
  if (has_bias_) return {&weight_, &bias_};
  return {&weight_};
}

std::vector<WorkingCopy> Linear::working_copies() {
  if (fp8_ || dtype_ == DType::F32) return {};
  return {{&weight_, &w_low_}};
}

const Tensor& Linear::forward(Context& ctx, const Tensor& x, bool) {
  DSTRAIN_CHECK(x.ndim() == 2, "Linear takes [N,features], got " + shape_str(x.shape()));
  input_dtype_ = x.dtype();
  if (fp8_) return forward_fp8(ctx, x);
  x_ = &as_dtype(ctx, x, dtype_, x_cast_);
  const Tensor& w = working_weight(ctx, weight_, dtype_, w_low_, working_copies_external_);
  ensure(y_, {x.dim(0), out_}, ctx);  // fp32 logits in every policy
  ops::linear_forward(ctx, *x_, w, has_bias_ ? &bias_.value : nullptr, y_);
  return y_;
}

const Tensor& Linear::backward(Context& ctx, const Tensor& dy) {
  if (fp8_) return backward_fp8(ctx, dy);
  const Tensor& x = require_input(x_, name());
  const Tensor& g = as_dtype(ctx, dy, dtype_, dy_low_);
  Tensor* dx = nullptr;
  if (needs_input_grad_) dx = &ensure(dx_, x.shape(), ctx, dtype_);
  else dx_ = Tensor();
  // The weight gradient goes straight into the fp32 master gradient (fp32 GEMM output).
  ops::linear_backward(ctx, g, x, dtype_ == DType::F32 ? weight_.value : w_low_, dx, weight_.grad,
                       has_bias_ ? &bias_.grad : nullptr);
  if (dx == nullptr || input_dtype_ == dtype_) return dx_;
  ops::convert(ctx, dx_, ensure(dx_input_, x.shape(), ctx, input_dtype_));
  return dx_input_;
}

// The padded operands: n rows of x and dy rounded up to np, in_ to kp, out_ to op.
const Tensor& Linear::forward_fp8(Context& ctx, const Tensor& x) {
  DSTRAIN_CHECK(x.dim(1) == in_, name() + " takes " + std::to_string(in_) + " features, got " + shape_str(x.shape()));
  // The fp8 casts read fp32 or bf16 directly; any other input goes through the activation dtype.
  x_ = (x.dtype() == DType::F32 || x.dtype() == DType::BF16) ? &x : &as_dtype(ctx, x, dtype_, x_cast_);
  const std::int64_t n = x.dim(0);
  const std::int64_t np = amp::fp8_padded_size(n), kp = amp::fp8_padded_size(in_), op = amp::fp8_padded_size(out_);
  amp::cast_to_fp8_padded(ctx, *x_, ensure(x_fp8_, {np, kp}, ctx, DType::F8E4M3), *x_meta_, amp::Fp8Layout::AsIs);
  amp::cast_to_fp8_padded(ctx, weight_.value, ensure(w_fp8_, {op, kp}, ctx, DType::F8E4M3), *w_meta_,
                          amp::Fp8Layout::AsIs);
  amp::GemmOptions gemm;
  gemm.a_scale_inv = &x_meta_->scale_inv();
  gemm.b_scale_inv = &w_meta_->scale_inv();
  amp::gemm_nt(ctx, x_fp8_, w_fp8_, ensure(gemm_out_, {np, op}, ctx), gemm);
  amp::crop_padded(ctx, gemm_out_, ensure(y_, {n, out_}, ctx), has_bias_ ? &bias_.value : nullptr);
  return y_;
}

const Tensor& Linear::backward_fp8(Context& ctx, const Tensor& dy) {
  const Tensor& x = require_input(x_, name());
  const std::int64_t n = x.dim(0);
  check_shape(dy, {n, out_}, (name() + " dy").c_str());
  // fp32 for the bias gradient's column sums (the logits' gradient is fp32 already).
  const Tensor& g = as_dtype(ctx, dy, DType::F32, dy_low_);
  const std::int64_t np = amp::fp8_padded_size(n), kp = amp::fp8_padded_size(in_), op = amp::fp8_padded_size(out_);

  // dw[out, in] = dy^T x: both operands K-contiguous over the batch, so transposed copies.
  amp::cast_to_fp8_padded(ctx, g, ensure(dy_t_fp8_, {op, np}, ctx, DType::F8E5M2), *dy_meta_,
                          amp::Fp8Layout::Transposed);
  amp::cast_to_fp8_padded(ctx, x, ensure(x_t_fp8_, {kp, np}, ctx, DType::F8E4M3), *x_meta_,
                          amp::Fp8Layout::Transposed);
  amp::GemmOptions wgrad;
  wgrad.a_scale_inv = &dy_meta_->scale_inv();
  wgrad.b_scale_inv = &x_meta_->scale_inv();
  amp::gemm_nt(ctx, dy_t_fp8_, x_t_fp8_, ensure(gemm_out_, {op, kp}, ctx), wgrad);
  amp::crop_padded(ctx, gemm_out_, weight_.grad);
  if (has_bias_) amp::column_sums(ctx, g, bias_.grad);

  if (!needs_input_grad_) {
    dx_ = Tensor();
    return dx_;
  }
  // dx[n, in] = dy w: K runs over out_, so w goes in transposed.
  amp::cast_to_fp8_padded(ctx, g, ensure(dy_fp8_, {np, op}, ctx, DType::F8E5M2), *dy_meta_, amp::Fp8Layout::AsIs);
  amp::cast_to_fp8_padded(ctx, weight_.value, ensure(w_t_fp8_, {kp, op}, ctx, DType::F8E4M3), *w_meta_,
                          amp::Fp8Layout::Transposed);
  amp::GemmOptions dgrad;
  dgrad.a_scale_inv = &dy_meta_->scale_inv();
  dgrad.b_scale_inv = &w_meta_->scale_inv();
  amp::gemm_nt(ctx, dy_fp8_, w_t_fp8_, ensure(gemm_out_, {np, kp}, ctx), dgrad);
  amp::crop_padded(ctx, gemm_out_, ensure(dx_, x.shape(), ctx, x.dtype()));
  if (input_dtype_ == x.dtype()) return dx_;
  ops::convert(ctx, dx_, ensure(dx_input_, x.shape(), ctx, input_dtype_));
  return dx_input_;
}

Layer& Sequential::add(std::unique_ptr<Layer> layer) {
  DSTRAIN_CHECK(layer != nullptr, "Sequential::add of a null layer");
  layers_.push_back(std::move(layer));
  return *layers_.back();
}

const Tensor& Sequential::forward(Context& ctx, const Tensor& x, bool training) {
  DSTRAIN_CHECK(!layers_.empty(), "forward through an empty Sequential");
  const Tensor* h = &x;
  for (auto& layer : layers_) h = &layer->forward(ctx, *h, training);
  return *h;
}

const Tensor& Sequential::backward(Context& ctx, const Tensor& dy) { return backward(ctx, dy, nullptr); }

const Tensor& Sequential::backward(Context& ctx, const Tensor& dy,
                                   const std::function<void(Parameter&)>& grad_ready) {
  DSTRAIN_CHECK(!layers_.empty(), "backward through an empty Sequential");
  // Layers whose input gradient nobody reads skip it: only the first layer's goes to the caller.
  layers_.front()->set_needs_input_grad(needs_input_grad_);
  const Tensor* g = &dy;
  for (auto it = layers_.rbegin(); it != layers_.rend(); ++it) {
    g = &(*it)->backward(ctx, *g);
    if (grad_ready)
      for (Parameter* p : (*it)->parameters()) grad_ready(*p);
  }
  return *g;
}

std::vector<Parameter*> Sequential::parameters() {
  std::vector<Parameter*> all;
  for (auto& layer : layers_)
    for (Parameter* p : layer->parameters()) all.push_back(p);
  return all;
}

std::vector<Tensor*> Sequential::buffers() {
  std::vector<Tensor*> all;
  for (auto& layer : layers_)
    for (Tensor* b : layer->buffers()) all.push_back(b);
  return all;
}

std::vector<amp::Fp8Meta*> Sequential::fp8_metas() {
  std::vector<amp::Fp8Meta*> all;
  for (auto& layer : layers_)
    for (amp::Fp8Meta* m : layer->fp8_metas()) all.push_back(m);
  return all;
}

std::vector<WorkingCopy> Sequential::working_copies() {
  std::vector<WorkingCopy> all;
  for (auto& layer : layers_)
    for (const WorkingCopy& c : layer->working_copies()) all.push_back(c);
  return all;
}

void Sequential::set_working_copies_external(bool external) {
  working_copies_external_ = external;
  for (auto& layer : layers_) layer->set_working_copies_external(external);
}

std::string Sequential::summary() {
  std::ostringstream out;
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    std::int64_t n = 0;
    for (Parameter* p : layers_[i]->parameters()) n += p->value.numel();
    out << "  " << i << ": " << layers_[i]->name();
    if (n) out << "  (" << n << " parameters)";
    out << '\n';
  }
  return out.str();
}

void init_parameters(Layer& model, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (Parameter* p : model.parameters()) {
    std::vector<float> values(static_cast<std::size_t>(p->value.numel()));
    switch (p->init) {
      case Parameter::Init::UniformFanIn: {
        const double bound = 1.0 / std::sqrt(static_cast<double>(p->fan_in));
        for (float& v : values) {
          // 53 random bits -> [0, 1): the same on every platform, unlike std::uniform_real_distribution.
          const double u = static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0);
          v = static_cast<float>((2.0 * u - 1.0) * bound);
        }
        break;
      }
      case Parameter::Init::Ones: std::fill(values.begin(), values.end(), 1.0f); break;
      case Parameter::Init::Zeros: std::fill(values.begin(), values.end(), 0.0f); break;
    }
    p->value.copy_from(Tensor::from_vector(p->value.shape(), values));
    p->grad.zero();
  }
}

void refresh_working_copies(Context& ctx, Layer& model) {
  for (const WorkingCopy& c : model.working_copies()) ops::convert(ctx, c.master->value, *c.low);
}

std::vector<Tensor*> working_copy_per_parameter(Layer& model) {
  const std::vector<Parameter*> params = model.parameters();
  std::vector<Tensor*> copies(params.size(), nullptr);
  for (const WorkingCopy& c : model.working_copies()) {
    const auto it = std::find(params.begin(), params.end(), c.master);
    DSTRAIN_CHECK(it != params.end(), "working copy of " + c.master->name + ", not a parameter of this model");
    copies[static_cast<std::size_t>(it - params.begin())] = c.low;
  }
  return copies;
}

std::int64_t parameter_count(Layer& model) {
  std::int64_t n = 0;
  for (Parameter* p : model.parameters()) n += p->value.numel();
  return n;
}

std::uint64_t parameter_hash(Layer& model) {
  std::uint64_t h = 1469598103934665603ull;
  auto mix = [&h](const Tensor& t) {
    const Tensor host = t.to(Device::cpu());
    const auto* bytes = static_cast<const unsigned char*>(host.data());
    for (std::size_t i = 0; i < host.nbytes(); ++i) {
      h ^= bytes[i];
      h *= 1099511628211ull;
    }
  };
  for (Parameter* p : model.parameters()) mix(p->value);
  return h;
}

}  // namespace dstrain::nn
