// CPU references of the mixed-precision kernels (dstrain/amp.h): loss-scaler state machine,
// multi-tensor unscale, fused SGD/AdamW, FP8 cast with amax, FP8 scale update, GEMM by
// dequantising and multiplying. The CUDA kernels follow the same fp32 arithmetic step by step.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "amp_cpu.h"
#include "ops_cpu.h"
#include "dstrain/dtype.h"

namespace dstrain::kernels::cpu {

namespace {

bool skip_step(const Tensor* found_inf) { return found_inf != nullptr && found_inf->data_as<float>()[0] != 0.0f; }

void store_low_precision(Tensor* t, std::int64_t i, float v) {
  if (t->dtype() == DType::F16)
    t->data_as<std::uint16_t>()[i] = float_to_fp16(v);
  else
    t->data_as<std::uint16_t>()[i] = float_to_bf16(v);
}

std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace

void amp_scale_by_loss_scale(Context&, Tensor& t, const Tensor& scaler_state) {
  const float scale = scaler_state.data_as<float>()[0];
  float* p = t.data_as<float>();
  for (std::int64_t i = 0; i < t.numel(); ++i) p[i] *= scale;
}

void amp_unscale_and_check(Context&, const std::vector<Tensor*>& grads, Tensor& scaler_state) {
  float* st = scaler_state.data_as<float>();
  const float inv_scale = 1.0f / st[0];
  bool found = false;
  for (Tensor* t : grads) {
    float* g = t->data_as<float>();
    for (std::int64_t i = 0; i < t->numel(); ++i) {
      if (!std::isfinite(g[i])) found = true;
      g[i] *= inv_scale;
    }
  }
  if (found) st[1] = 1.0f;
}

void amp_scaler_update(Context&, Tensor& scaler_state, const amp::GradScalerOptions& o) {
  float* st = scaler_state.data_as<float>();
  if (st[1] != 0.0f) {
    st[0] *= o.backoff_factor;
    st[2] = 0.0f;
  } else {
    const float successful = st[2] + 1.0f;
    if (successful >= static_cast<float>(o.growth_interval)) {
      const float grown = st[0] * o.growth_factor;
      if (std::isfinite(grown)) st[0] = grown;
      st[2] = 0.0f;
    } else {
      st[2] = successful;
    }
  }
  st[1] = 0.0f;
}

void amp_fused_sgd(Context&, const std::vector<Tensor*>& params, const std::vector<Tensor*>& grads,
                   const std::vector<Tensor*>& momentum, const Tensor* found_inf,
                   const std::vector<Tensor*>* low_precision, const amp::FusedSGDOptions& o) {
  if (skip_step(found_inf)) return;
  const bool use_momentum = o.momentum != 0.0f;
  for (std::size_t t = 0; t < params.size(); ++t) {
    float* p = params[t]->data_as<float>();
    const float* g = grads[t]->data_as<float>();
    float* buf = use_momentum ? momentum[t]->data_as<float>() : nullptr;
    Tensor* lp = low_precision ? (*low_precision)[t] : nullptr;
    for (std::int64_t i = 0; i < params[t]->numel(); ++i) {
      float gi = g[i] + o.weight_decay * p[i];
      if (use_momentum) {
        buf[i] = o.momentum * buf[i] + gi;
        gi = o.nesterov ? gi + o.momentum * buf[i] : buf[i];
      }
      p[i] = p[i] - o.lr * gi;
      if (lp) store_low_precision(lp, i, p[i]);
    }
  }
}

void amp_fused_adamw(Context&, const std::vector<Tensor*>& params, const std::vector<Tensor*>& grads,
                     const std::vector<Tensor*>& exp_avg, const std::vector<Tensor*>& exp_avg_sq, Tensor& step,
                     const Tensor* found_inf, const std::vector<Tensor*>* low_precision,
                     const amp::FusedAdamWOptions& o) {
  if (skip_step(found_inf)) return;
  const std::int32_t t_step = step.data_as<std::int32_t>()[0] + 1;
  const float bias_correction1 = 1.0f - std::pow(o.beta1, static_cast<float>(t_step));
  const float bias_correction2_sqrt = std::sqrt(1.0f - std::pow(o.beta2, static_cast<float>(t_step)));
  const float step_size = o.lr / bias_correction1;
  const float decay = 1.0f - o.lr * o.weight_decay;
  for (std::size_t t = 0; t < params.size(); ++t) {
    float* p = params[t]->data_as<float>();
    const float* g = grads[t]->data_as<float>();
    float* m = exp_avg[t]->data_as<float>();
    float* v = exp_avg_sq[t]->data_as<float>();
    Tensor* lp = low_precision ? (*low_precision)[t] : nullptr;
    for (std::int64_t i = 0; i < params[t]->numel(); ++i) {
      p[i] *= decay;
      m[i] = o.beta1 * m[i] + (1.0f - o.beta1) * g[i];
      v[i] = o.beta2 * v[i] + (1.0f - o.beta2) * g[i] * g[i];
      const float denom = std::sqrt(v[i]) / bias_correction2_sqrt + o.eps;
      p[i] -= step_size * (m[i] / denom);
      if (lp) store_low_precision(lp, i, p[i]);
    }
  }
  step.data_as<std::int32_t>()[0] = t_step;
}

void amp_cast_to_fp8(Context&, const Tensor& src, Tensor& dst, Tensor& fp8_state) {
  float* st = fp8_state.data_as<float>();
  const float scale = st[0];
  const float limit = amp::fp8_max(dst.dtype());
  const bool e4m3 = dst.dtype() == DType::F8E4M3;
  auto* out = dst.data_as<std::uint8_t>();
  std::uint32_t amax_bits = float_bits(st[2]);
  for (std::int64_t i = 0; i < src.numel(); ++i) {
    const float x = src.dtype() == DType::F32 ? src.data_as<float>()[i]
                                              : bf16_to_float(src.data_as<std::uint16_t>()[i]);
    // |x| as bits orders like the value for non-negative floats, NaN above inf.
    const std::uint32_t bits = float_bits(x) & 0x7FFFFFFFu;
    if (bits > amax_bits) amax_bits = bits;
    float v = x * scale;
    if (!std::isnan(v)) v = std::fmin(std::fmax(v, -limit), limit);
    out[i] = e4m3 ? float_to_fp8_e4m3(v) : float_to_fp8_e5m2(v);
  }
  st[2] = bits_float(amax_bits);
}

void amp_fp8_update_scale(Context&, Tensor& fp8_state, const amp::Fp8MetaOptions& o) {
  float* st = fp8_state.data_as<float>();
  float* history = st + 3;
  const int len = o.history_len;
  for (int i = len - 1; i > 0; --i) history[i] = history[i - 1];
  history[0] = st[2];
  float amax = history[0];
  if (o.algo == amp::AmaxAlgo::Max) {
    for (int i = 1; i < len; ++i) {
      if (std::isnan(amax)) break;
      if (std::isnan(history[i]) || history[i] > amax) amax = history[i];
    }
  }
  const float candidate = (amp::fp8_max(o.format) / amax) / std::ldexp(1.0f, o.margin);
  if (amax > 0.0f && std::isfinite(amax) && std::isfinite(candidate) && candidate > 0.0f) {
    st[0] = candidate;
    st[1] = 1.0f / candidate;
  }
  st[2] = 0.0f;
}

void amp_gemm_nt(Context&, const Tensor& a, const Tensor& b, Tensor& d, const amp::GemmOptions& o) {
  const std::int64_t M = a.dim(0), K = a.dim(1), N = b.dim(0);
  const std::vector<float> av = a.to_host_floats(), bv = b.to_host_floats();
  float alpha = 1.0f;
  if (o.a_scale_inv) alpha *= o.a_scale_inv->data_as<float>()[0];
  if (o.b_scale_inv) alpha *= o.b_scale_inv->data_as<float>()[0];
  std::vector<float> out(static_cast<std::size_t>(M * N));
  float amax = 0.0f;
  for (std::int64_t i = 0; i < M; ++i) {
    const float* ar = av.data() + i * K;
    for (std::int64_t j = 0; j < N; ++j) {
      const float* br = bv.data() + j * K;
      double acc = 0.0;
      for (std::int64_t k = 0; k < K; ++k) acc += static_cast<double>(ar[k]) * static_cast<double>(br[k]);
      const float v = static_cast<float>(alpha * acc);
      out[static_cast<std::size_t>(i * N + j)] = v;
      if (!(std::fabs(v) <= amax)) amax = std::fabs(v);  // NaN sticks
    }
  }
  convert_host(out.data(), DType::F32, d.data(), d.dtype(), out.size());
  if (o.d_amax) o.d_amax->data_as<float>()[0] = amax;
}

bool amp_conv2d_forward_fp8(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& x_scale_inv,
                            const Tensor& w_scale_inv, Tensor& y, const ops::Conv2dParams& p) {
  Tensor xf = Tensor::empty(x.shape(), DType::F32, Device::cpu()), wf = Tensor::empty(w.shape(), DType::F32, Device::cpu());
  convert_host(x.data(), x.dtype(), xf.data(), DType::F32, static_cast<std::size_t>(x.numel()));
  convert_host(w.data(), w.dtype(), wf.data(), DType::F32, static_cast<std::size_t>(w.numel()));
  Tensor yf = Tensor::empty(y.shape(), DType::F32, Device::cpu());
  cpu::conv2d_forward(ctx, xf, wf, yf, p);
  const float descale = x_scale_inv.data_as<float>()[0] * w_scale_inv.data_as<float>()[0];
  float* v = yf.data_as<float>();
  for (std::int64_t i = 0; i < yf.numel(); ++i) v[i] *= descale;
  convert_host(yf.data(), DType::F32, y.data(), y.dtype(), static_cast<std::size_t>(y.numel()));
  return true;
}

void amp_cast_to_fp8_padded(Context&, const Tensor& src, Tensor& dst, Tensor& fp8_state, bool transpose) {
  float* st = fp8_state.data_as<float>();
  const float scale = st[0];
  const float limit = amp::fp8_max(dst.dtype());
  const bool e4m3 = dst.dtype() == DType::F8E4M3;
  const std::int64_t rows = src.dim(0), cols = src.dim(1);
  const std::int64_t dst_cols = dst.dim(1);
  auto* out = dst.data_as<std::uint8_t>();
  std::memset(out, 0, static_cast<std::size_t>(dst.numel()));  // fp8 zero is all-zero bits
  std::uint32_t amax_bits = float_bits(st[2]);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      const std::int64_t i = r * cols + c;
      const float x = src.dtype() == DType::F32 ? src.data_as<float>()[i]
                                                : bf16_to_float(src.data_as<std::uint16_t>()[i]);
      const std::uint32_t bits = float_bits(x) & 0x7FFFFFFFu;
      if (bits > amax_bits) amax_bits = bits;
      float v = x * scale;
      if (!std::isnan(v)) v = std::fmin(std::fmax(v, -limit), limit);
      out[transpose ? c * dst_cols + r : r * dst_cols + c] = e4m3 ? float_to_fp8_e4m3(v) : float_to_fp8_e5m2(v);
    }
  }
  st[2] = bits_float(amax_bits);
}

void amp_crop_padded(Context&, const Tensor& src, Tensor& dst, const Tensor* bias) {
  const std::int64_t rows = dst.dim(0), cols = dst.dim(1), src_cols = src.dim(1);
  const float* in = src.data_as<float>();
  const float* b = bias ? bias->data_as<float>() : nullptr;
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      float v = in[r * src_cols + c];
      if (b) v += b[c];
      if (dst.dtype() == DType::F32)
        dst.data_as<float>()[r * cols + c] = v;
      else
        dst.data_as<std::uint16_t>()[r * cols + c] = float_to_bf16(v);
    }
  }
}

void amp_column_sums(Context&, const Tensor& src, Tensor& dst) {
  const std::int64_t rows = src.dim(0), cols = src.dim(1);
  const float* in = src.data_as<float>();
  float* out = dst.data_as<float>();
  for (std::int64_t c = 0; c < cols; ++c) {
    float sum = 0.0f;
    for (std::int64_t r = 0; r < rows; ++r) sum += in[r * cols + c];
    out[c] = sum;
  }
}

}  // namespace dstrain::kernels::cpu
