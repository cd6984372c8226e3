// Argument checks shared by both backends, then dispatch on the context's device.
#include "dstrain/ops.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <cstring>

#include "dstrain/error.h"
#include "kernels/cuda_api.h"
#include "libdstrain/src/dispatch.h"
#include "kernels/ops_cpu.h"
#include "kernels/cpu/widen.h"
#ifdef DSTRAIN_HAVE_CUDA
#include "kernels/ops_cuda.h"
#endif

namespace dstrain::ops {

namespace {
std::atomic<bool>& deterministic_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("DSTRAIN_DETERMINISTIC");
    return env != nullptr && std::string(env) == "1";
  }()};
  return flag;
}
}  // namespace

void set_deterministic(bool on) { deterministic_flag().store(on); }
bool deterministic() { return deterministic_flag().load(); }

namespace {

void check_on(const Context& ctx, const Tensor& t, const char* what) {
  if (t.device() != ctx.device())
    DSTRAIN_THROW(ErrorCode::InvalidArgument, std::string(what) + " is on " + t.device().str() +
                                                  " but the context runs on " + ctx.device().str());
  if (t.numel() > 0 && t.data() == nullptr)
    DSTRAIN_THROW(ErrorCode::InvalidArgument, std::string(what) + " has no storage");
}

void check_f32(const Context& ctx, const Tensor& t, const char* what) {
  check_on(ctx, t, what);
  check_dtype(t, DType::F32, what);
}

bool is_activation_dtype(DType dt) { return dt == DType::F32 || dt == DType::F16 || dt == DType::BF16; }

// An activation: fp32, fp16 or bf16.
void check_act(const Context& ctx, const Tensor& t, const char* what) {
  check_on(ctx, t, what);
  if (!is_activation_dtype(t.dtype()))
    DSTRAIN_THROW(ErrorCode::InvalidArgument, std::string(what) + " has dtype " + dtype_name(t.dtype()) +
                                                  ", expected fp32, fp16 or bf16");
}

// Same dtype as `ref` (the op's activation dtype).
void check_like(const Context& ctx, const Tensor& t, const Tensor& ref, const char* what) {
  check_on(ctx, t, what);
  check_dtype(t, ref.dtype(), what);
}

// `ref`'s dtype, or fp32 (outputs that may stay in full precision: logits, pooled features,
// master-weight gradients).
void check_like_or_f32(const Context& ctx, const Tensor& t, const Tensor& ref, const char* what) {
  check_on(ctx, t, what);
  if (t.dtype() != DType::F32 && t.dtype() != ref.dtype())
    DSTRAIN_THROW(ErrorCode::InvalidArgument, std::string(what) + " has dtype " + dtype_name(t.dtype()) +
                                                  ", expected fp32 or " + dtype_name(ref.dtype()));
}

// ---- CPU path of fp16 / bf16: widen to fp32, run the fp32 reference, round the outputs once.

bool any_low(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t != nullptr && t->dtype() != DType::F32) return true;
  return false;
}

using kernels::cpu::f32_output;  // the output narrow_into() rounds into t
using kernels::cpu::widened;

void narrow_into(const Tensor& f, Tensor& t) {
  if (t.dtype() == DType::F32) return;  // written in place
  convert_host(f.data(), DType::F32, t.data(), t.dtype(), static_cast<std::size_t>(t.numel()));
}

void check_rank(const Tensor& t, int rank, const char* what) {
  if (t.ndim() != rank)
    DSTRAIN_THROW(ErrorCode::InvalidArgument, std::string(what) + " must have " + std::to_string(rank) +
                                                  " dimensions, has shape " + shape_str(t.shape()));
}

std::int64_t channels(const Tensor& x, const char* what) {
  if (x.ndim() < 2)
    DSTRAIN_THROW(ErrorCode::InvalidArgument, std::string(what) + " needs at least 2 dimensions, has shape " +
                                                  shape_str(x.shape()));
  return x.dim(-1);
}


}  // namespace


Shape conv2d_output_shape(const Shape& x, const Shape& w, const Conv2dParams& p) {
  DSTRAIN_CHECK(x.size() == 4 && w.size() == 4,
                "conv2d needs x [N,H,W,C] and w [K,R,S,C], got " + shape_str(x) + " and " + shape_str(w));
  DSTRAIN_CHECK(x[3] == w[3], "conv2d input has " + std::to_string(x[3]) + " channels, filter expects " +
                                  std::to_string(w[3]));
  DSTRAIN_CHECK(p.stride_h > 0 && p.stride_w > 0 && p.pad_h >= 0 && p.pad_w >= 0,
                "conv2d strides must be positive and paddings non-negative");
  const std::int64_t ho = (x[1] + 2 * p.pad_h - w[1]) / p.stride_h + 1;
  const std::int64_t wo = (x[2] + 2 * p.pad_w - w[2]) / p.stride_w + 1;
  DSTRAIN_CHECK(x[1] + 2 * p.pad_h >= w[1] && x[2] + 2 * p.pad_w >= w[2],
                "conv2d filter " + shape_str(w) + " is larger than the padded input " + shape_str(x));
  return {x[0], ho, wo, w[0]};
}

void conv2d_forward(Context& ctx, const Tensor& x, const Tensor& w, Tensor& y, const Conv2dParams& p) {
  check_act(ctx, x, "conv2d x");
  check_like(ctx, w, x, "conv2d w");
  check_like(ctx, y, x, "conv2d y");
  check_shape(y, conv2d_output_shape(x.shape(), w.shape(), p), "conv2d y");
  if (!ctx.is_cuda() && any_low({&x})) {
    Tensor yf = f32_output(y);
    kernels::cpu::conv2d_forward(ctx, widened(x), widened(w), yf, p);
    narrow_into(yf, y);
    return;
  }
  DSTRAIN_DISPATCH(conv2d_forward, x, w, y, p);
}

void conv2d_backward_data(Context& ctx, const Tensor& dy, const Tensor& w, Tensor& dx, const Conv2dParams& p) {
  check_act(ctx, dy, "conv2d dy");
  check_like(ctx, w, dy, "conv2d w");
  check_like(ctx, dx, dy, "conv2d dx");
  check_shape(dy, conv2d_output_shape(dx.shape(), w.shape(), p), "conv2d dy");
  if (!ctx.is_cuda() && any_low({&dy})) {
    Tensor dxf = f32_output(dx);
    kernels::cpu::conv2d_backward_data(ctx, widened(dy), widened(w), dxf, p);
    narrow_into(dxf, dx);
    return;
  }
  DSTRAIN_DISPATCH(conv2d_backward_data, dy, w, dx, p);
}

void conv2d_backward_filter(Context& ctx, const Tensor& x, const Tensor& dy, Tensor& dw, const Conv2dParams& p) {
  check_act(ctx, x, "conv2d x");
  check_like(ctx, dy, x, "conv2d dy");
  check_like(ctx, dw, x, "conv2d dw");
  check_shape(dy, conv2d_output_shape(x.shape(), dw.shape(), p), "conv2d dy");
  if (!ctx.is_cuda() && any_low({&x})) {
    Tensor dwf = f32_output(dw);
    kernels::cpu::conv2d_backward_filter(ctx, widened(x), widened(dy), dwf, p);
    narrow_into(dwf, dw);
    return;
  }
  DSTRAIN_DISPATCH(conv2d_backward_filter, x, dy, dw, p);
}

void conv2d_backward(Context& ctx, const Tensor& x, const Tensor& dy, const Tensor& w, Tensor* dx, Tensor& dw,
                     const Conv2dParams& p) {
  if (!ctx.is_cuda()) {  // the two ops in turn (they widen 16-bit tensors on the CPU)
    conv2d_backward_filter(ctx, x, dy, dw, p);
    if (dx != nullptr) conv2d_backward_data(ctx, dy, w, *dx, p);
    return;
  }
  check_act(ctx, x, "conv2d x");
  check_like(ctx, dy, x, "conv2d dy");
  check_like(ctx, dw, x, "conv2d dw");
  check_like(ctx, w, x, "conv2d w");
  check_shape(dw, w.shape(), "conv2d dw");
  check_shape(dy, conv2d_output_shape(x.shape(), w.shape(), p), "conv2d dy");
  if (dx != nullptr) {
    check_like(ctx, *dx, x, "conv2d dx");
    check_shape(*dx, x.shape(), "conv2d dx");
  }
  DSTRAIN_DISPATCH(conv2d_backward, x, dy, w, dx, dw, p);
}

namespace {
void check_channel_vector(const Context& ctx, const Tensor& t, std::int64_t c, const char* what) {
  check_f32(ctx, t, what);
  check_shape(t, {c}, what);
}
// A folded bias: [c] in fp32 or in the activations' dtype `act`, on the context's device.
void check_bias_vector(const Context& ctx, const Tensor& t, std::int64_t c, DType act, const char* what) {
  if (t.dtype() == act && act != DType::F32) {
    check_act(ctx, t, what);
    check_shape(t, {c}, what);
    return;
  }
  check_channel_vector(ctx, t, c, what);
}
}  // namespace

void batchnorm_forward_train(Context& ctx, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                             Tensor& running_mean, Tensor& running_var, Tensor& y, Tensor& save_mean,
                             Tensor& save_invstd, const BatchNormParams& p) {
  check_act(ctx, x, "batchnorm x");
  const std::int64_t c = channels(x, "batchnorm x");
  DSTRAIN_CHECK(x.numel() / std::max<std::int64_t>(c, 1) > 1,
                "batchnorm in training needs more than one value per channel, x has shape " + shape_str(x.shape()));
  check_channel_vector(ctx, gamma, c, "batchnorm gamma");
  check_channel_vector(ctx, beta, c, "batchnorm beta");
  check_channel_vector(ctx, running_mean, c, "batchnorm running_mean");
  check_channel_vector(ctx, running_var, c, "batchnorm running_var");
  check_channel_vector(ctx, save_mean, c, "batchnorm save_mean");
  check_channel_vector(ctx, save_invstd, c, "batchnorm save_invstd");
  check_like(ctx, y, x, "batchnorm y");
  check_shape(y, x.shape(), "batchnorm y");
  DSTRAIN_CHECK(p.eps > 0.0f && p.momentum >= 0.0f && p.momentum <= 1.0f, "batchnorm eps > 0, momentum in [0,1]");
  if (!ctx.is_cuda() && any_low({&x})) {
    Tensor yf = f32_output(y);
    kernels::cpu::batchnorm_forward_train(ctx, widened(x), gamma, beta, running_mean, running_var, yf, save_mean,
                                          save_invstd, p);
    narrow_into(yf, y);
    return;
  }
  DSTRAIN_DISPATCH(batchnorm_forward_train, x, gamma, beta, running_mean, running_var, y, save_mean, save_invstd, p);
}

void batchnorm_forward_eval(Context& ctx, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                            const Tensor& running_mean, const Tensor& running_var, Tensor& y,
                            const BatchNormParams& p) {
  check_act(ctx, x, "batchnorm x");
  const std::int64_t c = channels(x, "batchnorm x");
  check_channel_vector(ctx, gamma, c, "batchnorm gamma");
  check_channel_vector(ctx, beta, c, "batchnorm beta");
  check_channel_vector(ctx, running_mean, c, "batchnorm running_mean");
  check_channel_vector(ctx, running_var, c, "batchnorm running_var");
  check_like(ctx, y, x, "batchnorm y");
  check_shape(y, x.shape(), "batchnorm y");
  DSTRAIN_CHECK(p.eps > 0.0f, "batchnorm eps must be positive");
  if (!ctx.is_cuda() && any_low({&x})) {
    Tensor yf = f32_output(y);
    kernels::cpu::batchnorm_forward_eval(ctx, widened(x), gamma, beta, running_mean, running_var, yf, p);
    narrow_into(yf, y);
    return;
  }
  DSTRAIN_DISPATCH(batchnorm_forward_eval, x, gamma, beta, running_mean, running_var, y, p);
}

void batchnorm_backward(Context& ctx, const Tensor& dy, const Tensor& x, const Tensor& gamma,
                        const Tensor& save_mean, const Tensor& save_invstd, Tensor& dx, Tensor& dgamma,
                        Tensor& dbeta) {
  check_act(ctx, x, "batchnorm x");
  const std::int64_t c = channels(x, "batchnorm x");
  check_like(ctx, dy, x, "batchnorm dy");
  check_shape(dy, x.shape(), "batchnorm dy");
  check_like(ctx, dx, x, "batchnorm dx");
  check_shape(dx, x.shape(), "batchnorm dx");
  check_channel_vector(ctx, gamma, c, "batchnorm gamma");
  check_channel_vector(ctx, save_mean, c, "batchnorm save_mean");
  check_channel_vector(ctx, save_invstd, c, "batchnorm save_invstd");
  check_channel_vector(ctx, dgamma, c, "batchnorm dgamma");
  check_channel_vector(ctx, dbeta, c, "batchnorm dbeta");
  if (!ctx.is_cuda() && any_low({&x})) {
    Tensor dxf = f32_output(dx);
    kernels::cpu::batchnorm_backward(ctx, widened(dy), widened(x), gamma, save_mean, save_invstd, dxf, dgamma, dbeta);
    narrow_into(dxf, dx);
    return;
  }
  DSTRAIN_DISPATCH(batchnorm_backward, dy, x, gamma, save_mean, save_invstd, dx, dgamma, dbeta);
}

namespace {
// Shapes shared by the fused Conv+BN+ReLU ops: x [N,H,W,C], w [K,R,S,C], per-channel vectors [K].
Shape check_conv_bn(Context& ctx, const Tensor& x, const Tensor& w, const ConvBnReluParams& p, const char* op) {
  check_act(ctx, x, "conv_bn_relu x");
  check_like(ctx, w, x, "conv_bn_relu w");
  const Shape out = conv2d_output_shape(x.shape(), w.shape(), p.conv);
  DSTRAIN_CHECK(p.bn.eps > 0.0f && p.bn.momentum >= 0.0f && p.bn.momentum <= 1.0f,
                std::string(op) + ": eps must be positive and momentum in [0, 1]");
  if (p.chained_input != nullptr) {
    const ChainedInput& in = *p.chained_input;
    const std::int64_t c = x.dim(3);
    DSTRAIN_CHECK(in.gamma && in.beta && in.save_mean && in.save_invstd,
                  std::string(op) + ": a chained input needs the producing layer's gamma, beta, mean and invstd");
    DSTRAIN_CHECK(!p.conv_out_given, std::string(op) + ": a chained input cannot come with a given conv_out");
    check_channel_vector(ctx, *in.gamma, c, "conv_bn_relu chained_input gamma");
    check_channel_vector(ctx, *in.beta, c, "conv_bn_relu chained_input beta");
    check_channel_vector(ctx, *in.save_mean, c, "conv_bn_relu chained_input save_mean");
    check_channel_vector(ctx, *in.save_invstd, c, "conv_bn_relu chained_input save_invstd");
  }
  return out;
}
}  // namespace

void conv_bn_relu_forward_train(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& gamma,
                                const Tensor& beta, Tensor& running_mean, Tensor& running_var, Tensor& conv_out,
                                Tensor& z, Tensor& save_mean, Tensor& save_invstd, const ConvBnReluParams& p) {
  const Shape out = check_conv_bn(ctx, x, w, p, "conv_bn_relu_forward_train");
  const std::int64_t k = out[3];
  DSTRAIN_CHECK(out[0] * out[1] * out[2] > 1, "conv_bn_relu in training needs more than one value per channel, "
                                              "the convolution's output has shape " + shape_str(out));
  check_like(ctx, conv_out, x, "conv_bn_relu conv_out");
  check_shape(conv_out, out, "conv_bn_relu conv_out");
  if (!p.chained_output) {
    check_like(ctx, z, x, "conv_bn_relu z");
    check_shape(z, out, "conv_bn_relu z");
  }
  check_channel_vector(ctx, gamma, k, "conv_bn_relu gamma");
  check_channel_vector(ctx, beta, k, "conv_bn_relu beta");
  check_channel_vector(ctx, running_mean, k, "conv_bn_relu running_mean");
  check_channel_vector(ctx, running_var, k, "conv_bn_relu running_var");
  check_channel_vector(ctx, save_mean, k, "conv_bn_relu save_mean");
  check_channel_vector(ctx, save_invstd, k, "conv_bn_relu save_invstd");
  DSTRAIN_DISPATCH(conv_bn_relu_forward_train, x, w, gamma, beta, running_mean, running_var, conv_out, z, save_mean,
                   save_invstd, p);
}

void conv_bn_relu_backward(Context& ctx, const Tensor& dz, const Tensor& x, const Tensor& w, const Tensor& gamma,
                           const Tensor& beta, const Tensor& conv_out, const Tensor& save_mean,
                           const Tensor& save_invstd, Tensor& dconv, Tensor* dx, Tensor& dw, Tensor& dgamma,
                           Tensor& dbeta, const ConvBnReluParams& p) {
  const Shape out = check_conv_bn(ctx, x, w, p, "conv_bn_relu_backward");
  const std::int64_t k = out[3];
  check_like(ctx, dz, x, "conv_bn_relu dz");
  check_shape(dz, out, "conv_bn_relu dz");
  check_like(ctx, conv_out, x, "conv_bn_relu conv_out");
  check_shape(conv_out, out, "conv_bn_relu conv_out");
  if (!p.chained_output) {
    check_like(ctx, dconv, x, "conv_bn_relu dconv");
    check_shape(dconv, out, "conv_bn_relu dconv");
  }
  if (p.chained_input != nullptr) {
    const std::int64_t c = x.dim(3);
    DSTRAIN_CHECK(dx != nullptr && p.chained_input->dgamma != nullptr && p.chained_input->dbeta != nullptr,
                  "conv_bn_relu_backward: a chained input needs dx and the producing layer's dgamma and dbeta");
    check_channel_vector(ctx, *p.chained_input->dgamma, c, "conv_bn_relu chained_input dgamma");
    check_channel_vector(ctx, *p.chained_input->dbeta, c, "conv_bn_relu chained_input dbeta");
  }
  check_like(ctx, dw, x, "conv_bn_relu dw");
  check_shape(dw, w.shape(), "conv_bn_relu dw");
  if (dx != nullptr) {
    check_like(ctx, *dx, x, "conv_bn_relu dx");
    check_shape(*dx, x.shape(), "conv_bn_relu dx");
  }
  check_channel_vector(ctx, gamma, k, "conv_bn_relu gamma");
  check_channel_vector(ctx, beta, k, "conv_bn_relu beta");
  check_channel_vector(ctx, save_mean, k, "conv_bn_relu save_mean");
  check_channel_vector(ctx, save_invstd, k, "conv_bn_relu save_invstd");
  check_channel_vector(ctx, dgamma, k, "conv_bn_relu dgamma");
  check_channel_vector(ctx, dbeta, k, "conv_bn_relu dbeta");
  DSTRAIN_DISPATCH(conv_bn_relu_backward, dz, x, w, gamma, beta, conv_out, save_mean, save_invstd, dconv, dx, dw,
                   dgamma, dbeta, p);
}

void conv_bn_fold(Context& ctx, const Tensor& w, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                  const Tensor& running_var, Tensor& w_folded, Tensor& bias, const BatchNormParams& p) {
  check_act(ctx, w, "conv_bn_fold w");
  check_rank(w, 4, "conv_bn_fold w");
  const std::int64_t k = w.dim(0);
  check_like(ctx, w_folded, w, "conv_bn_fold w_folded");
  check_shape(w_folded, w.shape(), "conv_bn_fold w_folded");
  check_channel_vector(ctx, gamma, k, "conv_bn_fold gamma");
  check_channel_vector(ctx, beta, k, "conv_bn_fold beta");
  check_channel_vector(ctx, running_mean, k, "conv_bn_fold running_mean");
  check_channel_vector(ctx, running_var, k, "conv_bn_fold running_var");
  check_bias_vector(ctx, bias, k, w.dtype(), "conv_bn_fold bias");
  DSTRAIN_CHECK(p.eps > 0.0f, "conv_bn_fold eps must be positive");
  DSTRAIN_DISPATCH(conv_bn_fold, w, gamma, beta, running_mean, running_var, w_folded, bias, p);
}

void conv_bias_relu_forward(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& z,
                            const Conv2dParams& p) {
  check_act(ctx, x, "conv_bias_relu x");
  check_like(ctx, w, x, "conv_bias_relu w");
  const Shape out = conv2d_output_shape(x.shape(), w.shape(), p);
  check_like(ctx, z, x, "conv_bias_relu z");
  check_shape(z, out, "conv_bias_relu z");
  check_bias_vector(ctx, bias, out[3], x.dtype(), "conv_bias_relu bias");
  DSTRAIN_DISPATCH(conv_bias_relu_forward, x, w, bias, z, p);
}

void relu_forward(Context& ctx, const Tensor& x, Tensor& y) {
  check_act(ctx, x, "relu x");
  check_like(ctx, y, x, "relu y");
  check_shape(y, x.shape(), "relu y");
  if (!ctx.is_cuda() && any_low({&x})) {
    Tensor yf = f32_output(y);
    kernels::cpu::relu_forward(ctx, widened(x), yf);
    narrow_into(yf, y);
    return;
  }
  DSTRAIN_DISPATCH(relu_forward, x, y);
}

void relu_backward(Context& ctx, const Tensor& dy, const Tensor& y, Tensor& dx) {
  check_act(ctx, dy, "relu dy");
  check_like(ctx, y, dy, "relu y");
  check_like(ctx, dx, dy, "relu dx");
  check_shape(dy, y.shape(), "relu dy");
  check_shape(dx, y.shape(), "relu dx");
  if (!ctx.is_cuda() && any_low({&dy})) {
    Tensor dxf = f32_output(dx);
    kernels::cpu::relu_backward(ctx, widened(dy), widened(y), dxf);
    narrow_into(dxf, dx);
    return;
  }
  DSTRAIN_DISPATCH(relu_backward, dy, y, dx);
}

namespace {
Shape pooled_shape(const Tensor& x) {
  check_rank(x, 4, "maxpool x");
  return {x.dim(0), x.dim(1) / 2, x.dim(2) / 2, x.dim(3)};
}
}  // namespace

void maxpool2x2_forward(Context& ctx, const Tensor& x, Tensor& y) {
  check_act(ctx, x, "maxpool x");
  check_like(ctx, y, x, "maxpool y");
  check_shape(y, pooled_shape(x), "maxpool y");
  if (!ctx.is_cuda() && any_low({&x})) {
    Tensor yf = f32_output(y);
    kernels::cpu::maxpool2x2_forward(ctx, widened(x), yf);
    narrow_into(yf, y);
    return;
  }
  DSTRAIN_DISPATCH(maxpool2x2_forward, x, y);
}

void maxpool2x2_backward(Context& ctx, const Tensor& dy, const Tensor& x, const Tensor& y, Tensor& dx) {
  check_act(ctx, x, "maxpool x");
  check_like(ctx, y, x, "maxpool y");
  check_like(ctx, dy, x, "maxpool dy");
  check_like(ctx, dx, x, "maxpool dx");
  check_shape(y, pooled_shape(x), "maxpool y");
  check_shape(dy, y.shape(), "maxpool dy");
  check_shape(dx, x.shape(), "maxpool dx");
  if (!ctx.is_cuda() && any_low({&x})) {
    Tensor dxf = f32_output(dx);
    kernels::cpu::maxpool2x2_backward(ctx, widened(dy), widened(x), widened(y), dxf);
    narrow_into(dxf, dx);
    return;
  }
  DSTRAIN_DISPATCH(maxpool2x2_backward, dy, x, y, dx);
}

void global_avgpool_forward(Context& ctx, const Tensor& x, Tensor& y) {
  check_act(ctx, x, "avgpool x");
  check_rank(x, 4, "avgpool x");
  check_like_or_f32(ctx, y, x, "avgpool y");
  check_shape(y, {x.dim(0), x.dim(3)}, "avgpool y");
  if (!ctx.is_cuda() && any_low({&x, &y})) {
    Tensor yf = f32_output(y);
    kernels::cpu::global_avgpool_forward(ctx, widened(x), yf);
    narrow_into(yf, y);
    return;
  }
  DSTRAIN_DISPATCH(global_avgpool_forward, x, y);
}

void global_avgpool_backward(Context& ctx, const Tensor& dy, Tensor& dx) {
  check_act(ctx, dx, "avgpool dx");
  check_rank(dx, 4, "avgpool dx");
  check_like_or_f32(ctx, dy, dx, "avgpool dy");
  check_shape(dy, {dx.dim(0), dx.dim(3)}, "avgpool dy");
  if (!ctx.is_cuda() && any_low({&dx, &dy})) {
    Tensor dxf = f32_output(dx);
    kernels::cpu::global_avgpool_backward(ctx, widened(dy), dxf);
    narrow_into(dxf, dx);
    return;
  }
  DSTRAIN_DISPATCH(global_avgpool_backward, dy, dx);
}

void linear_forward(Context& ctx, const Tensor& x, const Tensor& w, const Tensor* b, Tensor& y) {
  check_act(ctx, x, "linear x");
  check_like(ctx, w, x, "linear w");
  check_like_or_f32(ctx, y, x, "linear y");
  check_rank(x, 2, "linear x");
  check_rank(w, 2, "linear w");
  DSTRAIN_CHECK(x.dim(1) == w.dim(1), "linear x " + shape_str(x.shape()) + " does not match w " + shape_str(w.shape()));
  if (b) {
    check_f32(ctx, *b, "linear b");
    check_shape(*b, {w.dim(0)}, "linear b");
  }
  check_shape(y, {x.dim(0), w.dim(0)}, "linear y");
  if (!ctx.is_cuda() && any_low({&x, &y})) {
    Tensor yf = f32_output(y);
    kernels::cpu::linear_forward(ctx, widened(x), widened(w), b, yf);
    narrow_into(yf, y);
    return;
  }
  DSTRAIN_DISPATCH(linear_forward, x, w, b, y);
}

void linear_backward(Context& ctx, const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx, Tensor& dw,
                     Tensor* db) {
  check_act(ctx, x, "linear x");
  check_like(ctx, w, x, "linear w");
  check_like(ctx, dy, x, "linear dy");
  check_rank(x, 2, "linear x");
  check_rank(w, 2, "linear w");
  DSTRAIN_CHECK(x.dim(1) == w.dim(1), "linear x " + shape_str(x.shape()) + " does not match w " + shape_str(w.shape()));
  check_shape(dy, {x.dim(0), w.dim(0)}, "linear dy");
  check_like_or_f32(ctx, dw, x, "linear dw");
  check_shape(dw, w.shape(), "linear dw");
  if (dx) {
    check_like(ctx, *dx, x, "linear dx");
    check_shape(*dx, x.shape(), "linear dx");
  }
  if (db) {
    check_f32(ctx, *db, "linear db");
    check_shape(*db, {w.dim(0)}, "linear db");
  }
  if (!ctx.is_cuda() && any_low({&x})) {
    Tensor dwf = f32_output(dw);
    Tensor dxf = dx ? f32_output(*dx) : Tensor();
    kernels::cpu::linear_backward(ctx, widened(dy), widened(x), widened(w), dx ? &dxf : nullptr, dwf, db);
    narrow_into(dwf, dw);
    if (dx) narrow_into(dxf, *dx);
    return;
  }
  DSTRAIN_DISPATCH(linear_backward, dy, x, w, dx, dw, db);
}

void softmax_cross_entropy(Context& ctx, const Tensor& logits, const Tensor& labels, Tensor* dlogits,
                           float grad_scale, Tensor& loss_sum, Tensor& correct) {
  check_f32(ctx, logits, "cross-entropy logits");
  check_rank(logits, 2, "cross-entropy logits");
  check_on(ctx, labels, "cross-entropy labels");
  check_dtype(labels, DType::I32, "cross-entropy labels");
  check_shape(labels, {logits.dim(0)}, "cross-entropy labels");
  if (dlogits) {
    check_f32(ctx, *dlogits, "cross-entropy dlogits");
    check_shape(*dlogits, logits.shape(), "cross-entropy dlogits");
  }
  check_f32(ctx, loss_sum, "cross-entropy loss_sum");
  check_shape(loss_sum, {1}, "cross-entropy loss_sum");
  check_f32(ctx, correct, "cross-entropy correct");
  check_shape(correct, {1}, "cross-entropy correct");
  DSTRAIN_DISPATCH(softmax_cross_entropy, logits, labels, dlogits, grad_scale, loss_sum, correct);
}

void sgd_step(Context& ctx, Tensor& param, const Tensor& grad, Tensor& momentum_buf, const SgdParams& p) {
  check_f32(ctx, param, "sgd param");
  check_f32(ctx, grad, "sgd grad");
  check_shape(grad, param.shape(), "sgd grad");
  if (p.momentum != 0.0f) {
    check_f32(ctx, momentum_buf, "sgd momentum buffer");
    check_shape(momentum_buf, param.shape(), "sgd momentum buffer");
  }
  DSTRAIN_CHECK(p.lr >= 0.0f && p.momentum >= 0.0f && p.weight_decay >= 0.0f,
                "sgd lr, momentum and weight decay must be non-negative");
  DSTRAIN_CHECK(!p.nesterov || p.momentum > 0.0f, "nesterov momentum needs momentum > 0");
  DSTRAIN_DISPATCH(sgd_step, param, grad, momentum_buf, p);
}

void copy(Context& ctx, const Tensor& src, Tensor& dst) {
  check_shape(dst, src.shape(), "copy dst");
  check_dtype(dst, src.dtype(), "copy dst");
  for (const Tensor* t : {&src, static_cast<const Tensor*>(&dst)})
    DSTRAIN_CHECK(!t->is_cuda() || t->device() == ctx.device(),
                  "copy between " + src.device().str() + " and " + dst.device().str() + " on a context of " +
                      ctx.device().str());
  if (dst.nbytes() == 0) return;
  if (ctx.is_cuda())
    kernels::memcpy_async(dst.data(), src.data(), dst.nbytes(), ctx.stream());
  else
    std::memcpy(dst.data(), src.data(), dst.nbytes());
}

void convert(Context& ctx, const Tensor& src, Tensor& dst) {
  check_on(ctx, src, "convert src");
  check_on(ctx, dst, "convert dst");
  check_shape(dst, src.shape(), "convert dst");
  DSTRAIN_CHECK(src.dtype() != DType::I32 && dst.dtype() != DType::I32, "convert handles floating dtypes only");
  DSTRAIN_DISPATCH(convert, src, dst);
}

}  // namespace dstrain::ops
