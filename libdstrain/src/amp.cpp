// dstrain::amp: argument checks and state handling, then dispatch to kernels::cpu or
// kernels::cuda on the context's device.
#include "dstrain/amp.h"
#include "dstrain/amp_policy.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "dstrain/error.h"
#include "libdstrain/src/dispatch.h"
#include "kernels/cpu/amp_cpu.h"
#ifdef DSTRAIN_HAVE_CUDA
#include "kernels/amp_cuda.h"
#endif

namespace dstrain::amp {

namespace {


void check_on(const Context& ctx, const Tensor& t, const std::string& what) {
  if (t.device() != ctx.device())
    DSTRAIN_THROW(ErrorCode::InvalidArgument,
                  what + " is on " + t.device().str() + " but the context runs on " + ctx.device().str());
  if (t.numel() > 0 && t.data() == nullptr) DSTRAIN_THROW(ErrorCode::InvalidArgument, what + " has no storage");
}

void check_f32_on(const Context& ctx, const Tensor& t, const std::string& what) {
  check_on(ctx, t, what);
  check_dtype(t, DType::F32, what.c_str());
}

std::string item(const char* what, std::size_t i) { return std::string(what) + " " + std::to_string(i); }

void check_list(const Context& ctx, const std::vector<Tensor*>& list, const char* what) {
  for (std::size_t i = 0; i < list.size(); ++i) {
    DSTRAIN_CHECK(list[i] != nullptr, item(what, i) + " is null");
    check_f32_on(ctx, *list[i], item(what, i));
  }
}

void check_scalar_flag(const Context& ctx, const Tensor* flag, const char* what) {
  if (flag == nullptr) return;
  check_f32_on(ctx, *flag, what);
  DSTRAIN_CHECK(flag->numel() == 1, std::string(what) + " must hold one value");
}

// Gradients match their parameters; working copies, when given, too (fp16 or bf16, one dtype; a
// null entry: that parameter has none). Returns the copies to write: null when there are none.
const std::vector<Tensor*>* check_step_args(const Context& ctx, const std::vector<Tensor*>& params,
                                            const std::vector<Tensor*>& grads, const Tensor* found_inf,
                                            const std::vector<Tensor*>* low_precision) {
  DSTRAIN_CHECK(grads.size() == params.size(), "optimizer step got " + std::to_string(grads.size()) +
                                                   " gradients for " + std::to_string(params.size()) + " parameters");
  check_list(ctx, params, "parameter");
  check_list(ctx, grads, "gradient");
  for (std::size_t i = 0; i < params.size(); ++i) check_shape(*grads[i], params[i]->shape(), item("gradient", i).c_str());
  check_scalar_flag(ctx, found_inf, "found_inf");
  if (low_precision == nullptr) return nullptr;
  DSTRAIN_CHECK(low_precision->size() == params.size(), "one low-precision copy (or null) per parameter");
  const Tensor* first = nullptr;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const Tensor* lp = (*low_precision)[i];
    if (lp == nullptr) continue;
    check_on(ctx, *lp, item("low-precision copy", i));
    check_shape(*lp, params[i]->shape(), item("low-precision copy", i).c_str());
    DSTRAIN_CHECK(lp->dtype() == DType::F16 || lp->dtype() == DType::BF16, "low-precision copies are fp16 or bf16");
    if (first == nullptr) first = lp;
    DSTRAIN_CHECK(lp->dtype() == first->dtype(), "low-precision copies must share one dtype");
  }
  return first != nullptr ? low_precision : nullptr;
}

Device device_of(const std::vector<Tensor*>& params) {
  DSTRAIN_CHECK(!params.empty(), "an optimizer needs at least one parameter");
  for (const Tensor* p : params) {
    DSTRAIN_CHECK(p != nullptr, "null parameter");
    check_dtype(*p, DType::F32, "master weight");
    DSTRAIN_CHECK(p->device() == params[0]->device(), "all parameters must live on one device");
  }
  return params[0]->device();
}

std::vector<Tensor*> pointers(std::vector<Tensor>& v) {
  std::vector<Tensor*> out;
  out.reserve(v.size());
  for (Tensor& t : v) out.push_back(&t);
  return out;
}

Tensor host_or_device(const std::vector<float>& values, Device device) {
  Tensor host = Tensor::from_vector({static_cast<std::int64_t>(values.size())}, values);
  return device.is_cuda() ? host.to(device) : std::move(host);
}

Tensor element_view(Tensor& t, std::int64_t i) {
  return Tensor::wrap(t.data_as<float>() + i, {1}, DType::F32, t.device());
}

float read_element(Context& ctx, const Tensor& t, std::int64_t i) {
  ctx.synchronize();
  return t.to_host_floats()[static_cast<std::size_t>(i)];
}

constexpr char kScalerMagic[4] = {'D', 'G', 'S', '1'};

}  // namespace

// ---- GradScaler ----

GradScaler::GradScaler(Device device, const GradScalerOptions& options) : options_(options) {
  DSTRAIN_CHECK(options.init_scale > 0.0f && std::isfinite(options.init_scale), "init_scale must be positive");
  DSTRAIN_CHECK(options.growth_factor > 1.0f, "growth_factor must be above 1");
  DSTRAIN_CHECK(options.backoff_factor > 0.0f && options.backoff_factor < 1.0f, "backoff_factor must be in (0, 1)");
  DSTRAIN_CHECK(options.growth_interval > 0 && options.growth_interval < (1 << 24),
                "growth_interval must be in [1, 2^24) (counted exactly in fp32)");
  state_ = host_or_device({options.init_scale, 0.0f, 0.0f, 0.0f}, device);
  scale_view_ = element_view(state_, 0);
  found_inf_view_ = element_view(state_, 1);
}

void GradScaler::unscale_and_check(Context& ctx, const std::vector<Tensor*>& grads) {
  check_on(ctx, state_, "grad scaler state");
  check_list(ctx, grads, "gradient");
  DSTRAIN_DISPATCH(amp_unscale_and_check, grads, state_);
}

void GradScaler::scale_gradient(Context& ctx, Tensor& grad) const {
  check_on(ctx, state_, "grad scaler state");
  check_f32_on(ctx, grad, "scaled gradient");
  DSTRAIN_DISPATCH(amp_scale_by_loss_scale, grad, state_);
}

void GradScaler::agree_found_inf(Communicator& comm, Context& ctx) {
  check_on(ctx, state_, "grad scaler state");
  if (comm.size() == 1) return;
  DSTRAIN_CHECK(comm.device() == state_.device(),
                "the communicator works on " + comm.device().str() + ", the scaler on " + state_.device().str());
  comm.allreduce(found_inf_view_, ReduceOp::Max, ctx);
}

void GradScaler::update(Context& ctx) {
  check_on(ctx, state_, "grad scaler state");
  DSTRAIN_DISPATCH(amp_scaler_update, state_, options_);
}

float GradScaler::scale(Context& ctx) const { return read_element(ctx, state_, 0); }
bool GradScaler::found_inf_set(Context& ctx) const { return read_element(ctx, state_, 1) != 0.0f; }
int GradScaler::growth_tracker(Context& ctx) const { return static_cast<int>(read_element(ctx, state_, 2)); }

std::vector<char> GradScaler::state() const {
  const std::vector<float> values = state_.to_host_floats();
  const float scale = values[0];
  const std::int32_t growth = static_cast<std::int32_t>(values[2]);
  std::vector<char> bytes(sizeof(kScalerMagic) + sizeof(scale) + sizeof(growth));
  std::memcpy(bytes.data(), kScalerMagic, sizeof(kScalerMagic));
  std::memcpy(bytes.data() + 4, &scale, sizeof(scale));
  std::memcpy(bytes.data() + 8, &growth, sizeof(growth));
  return bytes;
}

void GradScaler::load_state(const std::vector<char>& bytes) {
  if (bytes.size() != 12 || std::memcmp(bytes.data(), kScalerMagic, sizeof(kScalerMagic)) != 0)
    DSTRAIN_THROW(ErrorCode::Corrupt, "grad scaler state: expected 12 bytes starting with 'DGS1', got " +
                                          std::to_string(bytes.size()) + " bytes");
  float scale = 0.0f;
  std::int32_t growth = 0;
  std::memcpy(&scale, bytes.data() + 4, sizeof(scale));
  std::memcpy(&growth, bytes.data() + 8, sizeof(growth));
  if (!(scale > 0.0f) || !std::isfinite(scale) || growth < 0 || growth >= options_.growth_interval)
    DSTRAIN_THROW(ErrorCode::Corrupt, "grad scaler state: scale " + std::to_string(scale) + ", growth counter " +
                                          std::to_string(growth) + " out of range");
  const Tensor host = Tensor::from_vector({4}, {scale, 0.0f, static_cast<float>(growth), 0.0f});
  state_.copy_from(host);
}

// ---- FusedSGD ----

FusedSGD::FusedSGD(std::vector<Tensor*> params, const FusedSGDOptions& options)
    : params_(std::move(params)), options_(options) {
  const Device device = device_of(params_);
  DSTRAIN_CHECK(options.lr >= 0.0f && options.momentum >= 0.0f && options.weight_decay >= 0.0f,
                "sgd lr, momentum and weight decay must be non-negative");
  DSTRAIN_CHECK(!options.nesterov || options.momentum > 0.0f, "nesterov momentum needs momentum > 0");
  if (options.momentum != 0.0f)
    for (const Tensor* p : params_) momentum_.push_back(Tensor::zeros(p->shape(), DType::F32, device));
}

void FusedSGD::step(Context& ctx, const std::vector<Tensor*>& grads, const Tensor* found_inf,
                    const std::vector<Tensor*>* low_precision) {
  const std::vector<Tensor*>* copies = check_step_args(ctx, params_, grads, found_inf, low_precision);
  DSTRAIN_CHECK(options_.lr >= 0.0f, "sgd lr must be non-negative");
  const std::vector<Tensor*> momentum = pointers(momentum_);
  DSTRAIN_DISPATCH(amp_fused_sgd, params_, grads, momentum, found_inf, copies, options_);
}

// ---- FusedAdamW ----

FusedAdamW::FusedAdamW(std::vector<Tensor*> params, const FusedAdamWOptions& options)
    : params_(std::move(params)), options_(options) {
  const Device device = device_of(params_);
  DSTRAIN_CHECK(options.lr >= 0.0f && options.weight_decay >= 0.0f, "adamw lr and weight decay must be non-negative");
  DSTRAIN_CHECK(options.beta1 >= 0.0f && options.beta1 < 1.0f && options.beta2 >= 0.0f && options.beta2 < 1.0f,
                "adamw betas must be in [0, 1)");
  DSTRAIN_CHECK(options.eps > 0.0f, "adamw eps must be positive");
  for (const Tensor* p : params_) {
    exp_avg_.push_back(Tensor::zeros(p->shape(), DType::F32, device));
    exp_avg_sq_.push_back(Tensor::zeros(p->shape(), DType::F32, device));
  }
  step_ = Tensor::zeros({1}, DType::I32, device);
}

void FusedAdamW::step(Context& ctx, const std::vector<Tensor*>& grads, const Tensor* found_inf,
                      const std::vector<Tensor*>* low_precision) {
  const std::vector<Tensor*>* copies = check_step_args(ctx, params_, grads, found_inf, low_precision);
  const std::vector<Tensor*> m = pointers(exp_avg_), v = pointers(exp_avg_sq_);
  DSTRAIN_DISPATCH(amp_fused_adamw, params_, grads, m, v, step_, found_inf, copies, options_);
}

// ---- FP8 ----

float fp8_max(DType format) {
  if (format == DType::F8E4M3) return 448.0f;
  if (format == DType::F8E5M2) return 57344.0f;
  DSTRAIN_THROW(ErrorCode::InvalidArgument, std::string("fp8_max: ") + dtype_name(format) + " is not an fp8 format");
}

Fp8Meta::Fp8Meta(Device device, const Fp8MetaOptions& options) : options_(options) {
  fp8_max(options.format);  // validates the format
  DSTRAIN_CHECK(options.history_len >= 1 && options.history_len <= 1024, "amax history length must be in [1, 1024]");
  DSTRAIN_CHECK(options.margin >= 0 && options.margin < 64, "margin must be in [0, 64)");
  std::vector<float> init(static_cast<std::size_t>(3 + options.history_len), 0.0f);
  init[0] = 1.0f;
  init[1] = 1.0f;
  state_ = host_or_device(init, device);
  scale_view_ = element_view(state_, 0);
  scale_inv_view_ = element_view(state_, 1);
  amax_view_ = element_view(state_, 2);
}

void Fp8Meta::update_scale(Context& ctx) {
  check_on(ctx, state_, "fp8 meta state");
  DSTRAIN_DISPATCH(amp_fp8_update_scale, state_, options_);
}

void cast_to_fp8(Context& ctx, const Tensor& src, Tensor& dst, Fp8Meta& meta) {
  check_on(ctx, src, "cast_to_fp8 src");
  check_on(ctx, dst, "cast_to_fp8 dst");
  check_on(ctx, meta.state(), "fp8 meta state");
  check_shape(dst, src.shape(), "cast_to_fp8 dst");
  DSTRAIN_CHECK(src.dtype() == DType::F32 || src.dtype() == DType::BF16, "cast_to_fp8 reads fp32 or bf16");
  DSTRAIN_CHECK(dst.dtype() == meta.options().format, std::string("cast_to_fp8 dst must be ") +
                                                          dtype_name(meta.options().format) + " (the meta's format)");
  DSTRAIN_DISPATCH(amp_cast_to_fp8, src, dst, meta.state());
}

void update_fp8_scales(Context& ctx, const std::vector<Fp8Meta*>& metas, Communicator* comm) {
  for (Fp8Meta* meta : metas) {
    DSTRAIN_CHECK(meta != nullptr, "update_fp8_scales: null Fp8Meta");
    check_on(ctx, meta->state(), "fp8 meta state");
    if (comm != nullptr && comm->size() > 1) {
      DSTRAIN_CHECK(comm->device() == meta->state().device(), "the communicator works on " + comm->device().str() +
                                                                  ", the fp8 meta on " + meta->state().device().str());
      Tensor amax = Tensor::wrap(meta->state().data_as<float>() + 2, {1}, DType::F32, meta->state().device());
      comm->allreduce(amax, ReduceOp::Max, ctx);
    }
    meta->update_scale(ctx);
  }
}

void cast_to_fp8_padded(Context& ctx, const Tensor& src, Tensor& dst, Fp8Meta& meta, Fp8Layout layout) {
  check_on(ctx, src, "cast_to_fp8_padded src");
  check_on(ctx, dst, "cast_to_fp8_padded dst");
  check_on(ctx, meta.state(), "fp8 meta state");
  DSTRAIN_CHECK(src.ndim() == 2, "cast_to_fp8_padded takes a 2-d src, got " + shape_str(src.shape()));
  const std::int64_t rows = fp8_padded_size(src.dim(0)), cols = fp8_padded_size(src.dim(1));
  const bool transpose = layout == Fp8Layout::Transposed;
  check_shape(dst, transpose ? Shape{cols, rows} : Shape{rows, cols}, "cast_to_fp8_padded dst");
  DSTRAIN_CHECK(src.dtype() == DType::F32 || src.dtype() == DType::BF16, "cast_to_fp8_padded reads fp32 or bf16");
  DSTRAIN_CHECK(dst.dtype() == meta.options().format, std::string("cast_to_fp8_padded dst must be ") +
                                                          dtype_name(meta.options().format) + " (the meta's format)");
  if (dst.numel() == 0) return;
  DSTRAIN_DISPATCH(amp_cast_to_fp8_padded, src, dst, meta.state(), transpose);
}

void crop_padded(Context& ctx, const Tensor& src, Tensor& dst, const Tensor* bias) {
  check_f32_on(ctx, src, "crop_padded src");
  check_on(ctx, dst, "crop_padded dst");
  DSTRAIN_CHECK(src.ndim() == 2 && dst.ndim() == 2, "crop_padded takes 2-d tensors");
  DSTRAIN_CHECK(src.dim(0) >= dst.dim(0) && src.dim(1) >= dst.dim(1),
                "crop_padded: src " + shape_str(src.shape()) + " is smaller than dst " + shape_str(dst.shape()));
  DSTRAIN_CHECK(dst.dtype() == DType::F32 || dst.dtype() == DType::BF16, "crop_padded writes fp32 or bf16");
  if (bias != nullptr) {
    check_f32_on(ctx, *bias, "crop_padded bias");
    check_shape(*bias, {dst.dim(1)}, "crop_padded bias");
  }
  if (dst.numel() == 0) return;
  DSTRAIN_DISPATCH(amp_crop_padded, src, dst, bias);
}

void column_sums(Context& ctx, const Tensor& src, Tensor& dst) {
  check_f32_on(ctx, src, "column_sums src");
  check_f32_on(ctx, dst, "column_sums dst");
  DSTRAIN_CHECK(src.ndim() == 2, "column_sums takes a 2-d src, got " + shape_str(src.shape()));
  check_shape(dst, {src.dim(1)}, "column_sums dst");
  if (dst.numel() == 0) return;
  DSTRAIN_DISPATCH(amp_column_sums, src, dst);
}

// ---- GEMM ----

void gemm_nt(Context& ctx, const Tensor& a, const Tensor& b, Tensor& d, const GemmOptions& options) {
  check_on(ctx, a, "gemm a");
  check_on(ctx, b, "gemm b");
  check_on(ctx, d, "gemm d");
  DSTRAIN_CHECK(a.ndim() == 2 && b.ndim() == 2, "gemm operands are 2-d: a [M,K], b [N,K]");
  const std::int64_t M = a.dim(0), K = a.dim(1), N = b.dim(0);
  DSTRAIN_CHECK(b.dim(1) == K, "gemm: a is " + shape_str(a.shape()) + ", b is " + shape_str(b.shape()) +
                                   " (both must be K-contiguous: a [M,K], b [N,K])");
  check_shape(d, {M, N}, "gemm d");
  DSTRAIN_CHECK(d.dtype() == DType::BF16 || d.dtype() == DType::F32, "gemm d is bf16 or fp32");
  const bool fp8 = a.dtype() == DType::F8E4M3 || a.dtype() == DType::F8E5M2;
  if (fp8) {
    DSTRAIN_CHECK(b.dtype() == DType::F8E4M3 || b.dtype() == DType::F8E5M2, "gemm: fp8 a needs an fp8 b");
    DSTRAIN_CHECK(!(a.dtype() == DType::F8E5M2 && b.dtype() == DType::F8E5M2),
                  "gemm: E5M2 x E5M2 is not supported (one operand must be E4M3)");
    DSTRAIN_CHECK(options.a_scale_inv != nullptr && options.b_scale_inv != nullptr,
                  "fp8 gemm needs a_scale_inv and b_scale_inv");
    check_scalar_flag(ctx, options.a_scale_inv, "gemm a_scale_inv");
    check_scalar_flag(ctx, options.b_scale_inv, "gemm b_scale_inv");
    check_scalar_flag(ctx, options.d_amax, "gemm d_amax");
    DSTRAIN_CHECK(M % 16 == 0 && N % 16 == 0 && K % 16 == 0,
                  "fp8 gemm needs M, N, K multiples of 16, got " + std::to_string(M) + "x" + std::to_string(N) + "x" +
                      std::to_string(K));
  } else {
    DSTRAIN_CHECK(a.dtype() == DType::BF16 && b.dtype() == DType::BF16, "gemm operands are both fp8 or both bf16");
    DSTRAIN_CHECK(options.a_scale_inv == nullptr && options.b_scale_inv == nullptr && options.d_amax == nullptr &&
                      !options.fast_accumulate,
                  "scales, amax and fast accumulation apply to fp8 gemms only");
  }
  if (M == 0 || N == 0) return;
  DSTRAIN_CHECK(K > 0, "gemm needs K > 0");
  DSTRAIN_DISPATCH(amp_gemm_nt, a, b, d, options);
}

bool conv2d_forward_fp8(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& x_scale_inv,
                        const Tensor& w_scale_inv, Tensor& y, const ops::Conv2dParams& params) {
  check_on(ctx, x, "conv2d_forward_fp8 x");
  check_on(ctx, w, "conv2d_forward_fp8 w");
  check_on(ctx, y, "conv2d_forward_fp8 y");
  check_dtype(x, DType::F8E4M3, "conv2d_forward_fp8 x");
  check_dtype(w, DType::F8E4M3, "conv2d_forward_fp8 w");
  check_dtype(y, DType::BF16, "conv2d_forward_fp8 y");
  check_shape(y, ops::conv2d_output_shape(x.shape(), w.shape(), params), "conv2d_forward_fp8 y");
  for (const Tensor* s : {&x_scale_inv, &w_scale_inv}) {
    check_f32_on(ctx, *s, "conv2d_forward_fp8 descale");
    DSTRAIN_CHECK(s->numel() == 1, "conv2d_forward_fp8: a descale is one fp32 value, got " + shape_str(s->shape()));
  }
  if (y.numel() == 0) return true;
#ifdef DSTRAIN_HAVE_CUDA
  if (ctx.is_cuda()) return kernels::cuda::amp_conv2d_forward_fp8(ctx, x, w, x_scale_inv, w_scale_inv, y, params);
#endif
  if (ctx.is_cuda()) DSTRAIN_THROW(ErrorCode::Unsupported, "conv2d_forward_fp8: a CUDA context in a build without CUDA");
  return kernels::cpu::amp_conv2d_forward_fp8(ctx, x, w, x_scale_inv, w_scale_inv, y, params);
}

}  // namespace dstrain::amp

// ---- Policy ---------------------------------------------------------------------------------

namespace dstrain::amp {

Policy Policy::parse(const std::string& name) {
  if (name == "fp32") return fp32();
  if (name == "fp16") return fp16();
  if (name == "bf16") return bf16();
  if (name == "fp8") return fp8_hybrid();
  DSTRAIN_THROW(ErrorCode::InvalidArgument, "precision '" + name + "': expected fp32, fp16, bf16 or fp8");
}

DType Policy::compute_dtype(OpKind kind) const {
  switch (kind) {
    case OpKind::Linear: return fp8_linear_ ? DType::F8E4M3 : low_;
    case OpKind::Conv:
    case OpKind::Activation: return low_;
    case OpKind::BatchNorm:
    case OpKind::Loss:
    case OpKind::Reduction:
    case OpKind::Optimizer: return DType::F32;
  }
  return DType::F32;
}

}  // namespace dstrain::amp
