// CPU reference of the fused Conv2d + BatchNorm + ReLU ops, built on the conv2d kernels of
// conv2d.cpp. Activations may be fp32, fp16 or bf16: low-precision inputs are widened to fp32,
// the math runs in fp32 (per-channel sums in double) and each stored output is rounded once, in
// the order the GPU stores them: conv_out is rounded first and the statistics and z come from the
// rounded values; backward rounds dconv and computes dw and dx from the rounded dconv.
#include <cmath>
#include <cstdint>
#include <vector>

#include "bn_relu_mask.h"
#include "ops_cpu.h"
#include "widen.h"

namespace dstrain::kernels::cpu {
namespace {

// Rounds f into t (a no-op when f is t's own memory). Afterwards f holds exactly t's values, so
// later math reads what was stored, as the GPU does.
void store_rounded(Tensor& f, Tensor& t) {
  if (t.dtype() == DType::F32) return;
  const std::size_t n = static_cast<std::size_t>(t.numel());
  convert_host(f.data(), DType::F32, t.data(), t.dtype(), n);
  convert_host(t.data(), t.dtype(), f.data(), DType::F32, n);
}

// The pre-activation of the fused op, shared by forward (z) and backward (the ReLU mask) so both
// agree bit for bit with each other and with the GPU kernels (bn_relu_mask.h): scale = gamma *
// invstd (fp32) and v = fma(y - mean, scale, beta) in fp32.
using kernels::bn::preactivation;

// a = relu(bn(x)) of a chained input, rounded to x's dtype as the GPU's separate-kernel path
// stores it (cuDNN's prologue keeps it in fp32: the difference is within the dtype's rounding).
Tensor chained_activation(const Tensor& x, const ops::ChainedInput& in) {
  Tensor a = x.dtype() == DType::F32 ? x.to(x.device()) : widened(x);  // a copy either way
  const std::int64_t C = x.dim(-1);
  const std::int64_t rows = C > 0 ? x.numel() / C : 0;
  const float* gp = in.gamma->data_as<float>();
  const float* bp = in.beta->data_as<float>();
  const float* mp = in.save_mean->data_as<float>();
  const float* ip = in.save_invstd->data_as<float>();
  float* ap = a.data_as<float>();
  for (std::int64_t i = 0; i < rows; ++i) {
    float* r = ap + i * C;
    for (std::int64_t c = 0; c < C; ++c) {
      const float v = preactivation(r[c], mp[c], gp[c] * ip[c], bp[c]);
      r[c] = v < 0.0f ? 0.0f : v;
    }
  }
  if (x.dtype() != DType::F32) {
    Tensor stored = Tensor::empty(x.shape(), x.dtype(), x.device());
    store_rounded(a, stored);
  }
  return a;
}

// Backward through relu(bn(y)) given dz = dL/drelu: g = dz where the pre-activation is positive;
// dbeta = sum g, dgamma = sum g * xhat; out = gamma * invstd * (g - dbeta / M - xhat * dgamma / M).
// `out` may be `dz`.
void bn_relu_backward_rows(const float* dzp, const float* yp, std::int64_t rows, std::int64_t K, const float* gp,
                           const float* bp, const float* sm, const float* si, float* out, float* dgp, float* dbp) {
  std::vector<float> scale(K);
  for (std::int64_t k = 0; k < K; ++k) scale[k] = gp[k] * si[k];
  std::vector<double> sum_g(K, 0.0), sum_g_xhat(K, 0.0);
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* yr = yp + i * K;
    const float* dr = dzp + i * K;
    for (std::int64_t k = 0; k < K; ++k) {
      if (!(preactivation(yr[k], sm[k], scale[k], bp[k]) > 0.0f)) continue;
      const float xhat = (yr[k] - sm[k]) * si[k];
      sum_g[k] += dr[k];
      sum_g_xhat[k] += static_cast<double>(dr[k]) * xhat;
    }
  }
  std::vector<float> g_shift(K), xhat_coeff(K);  // dbeta / M and dgamma / M
  const double M = static_cast<double>(rows);
  for (std::int64_t k = 0; k < K; ++k) {
    dbp[k] = static_cast<float>(sum_g[k]);
    dgp[k] = static_cast<float>(sum_g_xhat[k]);
    g_shift[k] = static_cast<float>(sum_g[k] / M);
    xhat_coeff[k] = static_cast<float>(sum_g_xhat[k] / M);
  }
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* yr = yp + i * K;
    const float* dr = dzp + i * K;
    float* o = out + i * K;
    for (std::int64_t k = 0; k < K; ++k) {
      const float g = preactivation(yr[k], sm[k], scale[k], bp[k]) > 0.0f ? dr[k] : 0.0f;
      const float xhat = (yr[k] - sm[k]) * si[k];
      o[k] = scale[k] * (g - g_shift[k] - xhat * xhat_coeff[k]);
    }
  }
}

}  // namespace

void conv_bn_relu_forward_train(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& gamma,
                                const Tensor& beta, Tensor& running_mean, Tensor& running_var, Tensor& conv_out,
                                Tensor& z, Tensor& save_mean, Tensor& save_invstd, const ops::ConvBnReluParams& p) {
  Tensor conv_f;
  if (p.conv_out_given) {
    conv_f = widened(conv_out);  // computed by the caller
  } else {
    conv_f = f32_output(conv_out);
    const Tensor input = p.chained_input != nullptr ? chained_activation(x, *p.chained_input) : widened(x);
    cpu::conv2d_forward(ctx, input, widened(w), conv_f, p.conv);
    store_rounded(conv_f, conv_out);
  }

  const std::int64_t K = conv_out.dim(-1);
  const std::int64_t rows = K > 0 ? conv_out.numel() / K : 0;
  const float* yp = conv_f.data_as<float>();

  // Two passes: the mean first, then the squared deviations from it (no cancellation when
  // |mean| >> std).
  std::vector<double> mean(K, 0.0), var(K, 0.0);
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* yr = yp + i * K;
    for (std::int64_t k = 0; k < K; ++k) mean[k] += yr[k];
  }
  for (std::int64_t k = 0; k < K; ++k) mean[k] /= static_cast<double>(rows);
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* yr = yp + i * K;
    for (std::int64_t k = 0; k < K; ++k) {
      const double d = yr[k] - mean[k];
      var[k] += d * d;
    }
  }

  const float* gp = gamma.data_as<float>();
  const float* bp = beta.data_as<float>();
  float* rm = running_mean.data_as<float>();
  float* rv = running_var.data_as<float>();
  float* sm = save_mean.data_as<float>();
  float* si = save_invstd.data_as<float>();
  const double mom = p.bn.momentum;
  std::vector<float> scale(K);
  for (std::int64_t k = 0; k < K; ++k) {
    const double biased = var[k] / static_cast<double>(rows);
    const double unbiased = var[k] / static_cast<double>(rows - 1);
    sm[k] = static_cast<float>(mean[k]);
    si[k] = static_cast<float>(1.0 / std::sqrt(biased + static_cast<double>(p.bn.eps)));
    rm[k] = static_cast<float>((1.0 - mom) * rm[k] + mom * mean[k]);
    rv[k] = static_cast<float>((1.0 - mom) * rv[k] + mom * unbiased);
    scale[k] = gp[k] * si[k];
  }
  if (p.chained_output) return;  // the next layer applies BN + ReLU

  Tensor z_f = f32_output(z);
  float* zp = z_f.data_as<float>();
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* yr = yp + i * K;
    float* zr = zp + i * K;
    for (std::int64_t k = 0; k < K; ++k) {
      const float v = preactivation(yr[k], sm[k], scale[k], bp[k]);
      zr[k] = v < 0.0f ? 0.0f : v;  // NaN passes through, as relu_forward
    }
  }
  store_rounded(z_f, z);
}

void conv_bn_relu_backward(Context& ctx, const Tensor& dz, const Tensor& x, const Tensor& w, const Tensor& gamma,
                           const Tensor& beta, const Tensor& conv_out, const Tensor& save_mean,
                           const Tensor& save_invstd, Tensor& dconv, Tensor* dx, Tensor& dw, Tensor& dgamma,
                           Tensor& dbeta, const ops::ConvBnReluParams& p) {
  const std::int64_t K = conv_out.dim(-1);
  const std::int64_t rows = K > 0 ? conv_out.numel() / K : 0;
  Tensor dconv_f;
  if (p.chained_output) {
    dconv_f = widened(dz);  // dz is dL/dconv_out: the next layer went through this BN and ReLU
  } else {
    const Tensor y_f = widened(conv_out);
    const Tensor dz_f = widened(dz);
    dconv_f = f32_output(dconv);
    bn_relu_backward_rows(dz_f.data_as<float>(), y_f.data_as<float>(), rows, K, gamma.data_as<float>(),
                          beta.data_as<float>(), save_mean.data_as<float>(), save_invstd.data_as<float>(),
                          dconv_f.data_as<float>(), dgamma.data_as<float>(), dbeta.data_as<float>());
    // dw and dx are computed from the stored (rounded) dconv.
    store_rounded(dconv_f, dconv);
  }

  const ops::ChainedInput* in = p.chained_input;
  Tensor dw_f = f32_output(dw);
  const Tensor input = in != nullptr ? chained_activation(x, *in) : widened(x);
  cpu::conv2d_backward_filter(ctx, input, dconv_f, dw_f, p.conv);
  store_rounded(dw_f, dw);
  if (dx != nullptr) {
    Tensor dx_f = f32_output(*dx);
    cpu::conv2d_backward_data(ctx, dconv_f, widened(w), dx_f, p.conv);
    store_rounded(dx_f, *dx);  // dL/da as stored before the producing layer's BN backward
    if (in != nullptr) {
      const std::int64_t C = x.dim(-1);
      const Tensor x_f = widened(x);
      bn_relu_backward_rows(dx_f.data_as<float>(), x_f.data_as<float>(), C > 0 ? x.numel() / C : 0, C,
                            in->gamma->data_as<float>(), in->beta->data_as<float>(),
                            in->save_mean->data_as<float>(), in->save_invstd->data_as<float>(),
                            dx_f.data_as<float>(), in->dgamma->data_as<float>(), in->dbeta->data_as<float>());
      store_rounded(dx_f, *dx);
    }
  }
}

void conv_bn_fold(Context&, const Tensor& w, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                  const Tensor& running_var, Tensor& w_folded, Tensor& bias, const ops::BatchNormParams& p) {
  const std::int64_t K = w.dim(0);
  const std::int64_t per_filter = K > 0 ? w.numel() / K : 0;
  const float* gp = gamma.data_as<float>();
  const float* bp = beta.data_as<float>();
  const float* rm = running_mean.data_as<float>();
  const float* rv = running_var.data_as<float>();
  Tensor bias_f = f32_output(bias);
  float* biasp = bias_f.data_as<float>();

  const Tensor w_f = widened(w);
  Tensor wf_f = f32_output(w_folded);
  const float* wp = w_f.data_as<float>();
  float* op = wf_f.data_as<float>();
  for (std::int64_t k = 0; k < K; ++k) {
    const double s = static_cast<double>(gp[k]) / std::sqrt(static_cast<double>(rv[k]) + static_cast<double>(p.eps));
    const float s_f = static_cast<float>(s);
    biasp[k] = static_cast<float>(static_cast<double>(bp[k]) - static_cast<double>(rm[k]) * s);
    for (std::int64_t j = 0; j < per_filter; ++j) op[k * per_filter + j] = wp[k * per_filter + j] * s_f;
  }
  store_rounded(wf_f, w_folded);
  store_rounded(bias_f, bias);
}

void conv_bias_relu_forward(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& z,
                            const ops::Conv2dParams& p) {
  Tensor z_f = f32_output(z);
  cpu::conv2d_forward(ctx, widened(x), widened(w), z_f, p);
  const std::int64_t K = z.dim(-1);
  const std::int64_t rows = K > 0 ? z.numel() / K : 0;
  const Tensor bias_f = widened(bias);
  const float* bp = bias_f.data_as<float>();
  float* zp = z_f.data_as<float>();
  for (std::int64_t i = 0; i < rows; ++i) {
    float* zr = zp + i * K;
    for (std::int64_t k = 0; k < K; ++k) {
      const float v = zr[k] + bp[k];
      zr[k] = v < 0.0f ? 0.0f : v;
    }
  }
  store_rounded(z_f, z);
}

}  // namespace dstrain::kernels::cpu
