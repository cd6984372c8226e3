// The fused Conv2d + BatchNorm + ReLU ops on the CPU: against the composition of the separate
// public ops (conv2d, batchnorm, relu) on random shapes and dtypes, the fused backward against
// central finite differences, the inference fold against batchnorm_forward_eval, and argument
// checks.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dstrain/amp_policy.h"
#include "dstrain/context.h"
#include "dstrain/error.h"
#include "dstrain/models.h"
#include "dstrain/nn.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

#include "error_code_of.h"

#include "host_tensors.h"

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Shape;
using dstrain::Tensor;
namespace ops = dstrain::ops;
namespace nn = dstrain::nn;
namespace amp = dstrain::amp;

namespace {

// Filled with NaN (all bits set is NaN in fp32, fp16 and bf16): an unwritten element fails.
Tensor poisoned(const Shape& shape, DType dt = DType::F32) { return dstrain_test::poisoned_host(shape, dt); }

Tensor random_f32(const Shape& shape, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  return dstrain_test::uniform_host(shape, rng, lo, hi);
}

Tensor converted(const Tensor& src, DType dt) { return dstrain_test::converted_host(src, dt); }

Tensor random_act(const Shape& shape, DType dt, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  return converted(random_f32(shape, rng, lo, hi), dt);
}

Tensor copy_of(const Tensor& t) { return t.to(Device::cpu()); }

std::vector<double> as_double(const Tensor& t) {
  const std::vector<float> f = t.to_host_floats();
  return std::vector<double>(f.begin(), f.end());
}

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double e : v) m = std::max(m, std::abs(e));
  return m;
}

// Unit roundoff of the dtype (half an ulp at 1).
double unit_roundoff(DType dt) {
  switch (dt) {
    case DType::F16: return std::ldexp(1.0, -11);
    case DType::BF16: return std::ldexp(1.0, -8);
    default: return std::ldexp(1.0, -24);
  }
}

// Every |got - want| <= atol + rtol * |want|; reports the worst element.
void require_close(const std::vector<double>& got, const std::vector<double>& want, double atol, double rtol,
                   const std::string& what) {
  REQUIRE(got.size() == want.size());
  std::size_t bad = 0, worst = 0;
  double worst_ratio = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double tol = atol + rtol * std::abs(want[i]);
    const double err = std::abs(got[i] - want[i]);
    const double ratio = err == 0.0 ? 0.0 : (std::isfinite(err) && tol > 0.0 ? err / tol : INFINITY);
    if (!(err <= tol)) ++bad;
    if (!(ratio <= worst_ratio)) {
      worst_ratio = ratio;
      worst = i;
    }
  }
  INFO(what << ": " << bad << " of " << got.size() << " elements out of tolerance; worst at " << worst
            << ": got " << (got.empty() ? 0.0 : got[worst]) << ", want " << (want.empty() ? 0.0 : want[worst])
            << " (error / tolerance = " << worst_ratio << ")");
  CHECK(bad == 0);
}

void require_close(const Tensor& got, const Tensor& want, double atol, double rtol, const std::string& what) {
  REQUIRE(got.shape() == want.shape());
  require_close(as_double(got), as_double(want), atol, rtol, what);
}

// Tolerance relative to the largest reference value: for outputs that are sums with
// cancellation (gradients), where an element's own size says little about its rounding error.
void require_close_scaled(const Tensor& got, const Tensor& want, double rel, const std::string& what) {
  REQUIRE(got.shape() == want.shape());
  const std::vector<double> w = as_double(want);
  require_close(as_double(got), w, rel * std::max(max_abs(w), 1e-30), rel, what);
}

void require_equal(const Tensor& got, const Tensor& want, const std::string& what) {
  require_close(got, want, 0.0, 0.0, what);
}

using dstrain_test::error_code_of;

struct FusedCase {
  std::int64_t N, H, W, C, K, R;
  int stride, pad;
  std::string str() const {
    std::ostringstream o;
    o << "N" << N << " H" << H << " W" << W << " C" << C << " K" << K << " " << R << "x" << R << " stride " << stride
      << " pad " << pad;
    return o.str();
  }
  ops::ConvBnReluParams params() const {
    ops::ConvBnReluParams p;
    p.conv.stride_h = p.conv.stride_w = stride;
    p.conv.pad_h = p.conv.pad_w = pad;
    p.bn.momentum = 0.25f;
    p.bn.eps = 1e-4f;
    return p;
  }
};

const std::vector<FusedCase>& fused_cases() {
  static const std::vector<FusedCase> cases = {
      {2, 7, 5, 3, 5, 3, 1, 1},   // odd channel counts, 3x3 pad 1, H != W
      {1, 9, 6, 3, 5, 3, 2, 1},   // N = 1, stride 2
      {3, 5, 4, 7, 3, 1, 1, 0},   // 1x1 (the pointwise GEMM path)
      {1, 6, 10, 4, 6, 1, 2, 0},  // 1x1 stride 2
  };
  return cases;
}

}  // namespace

TEST_CASE("conv_bn_relu equals conv2d then batchnorm then relu", "[conv_bn_relu]") {
  Context ctx = Context::cpu();
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    for (const FusedCase& fc : fused_cases()) {
      DYNAMIC_SECTION(dtype_name(dt) << " " << fc.str()) {
        std::mt19937 rng(static_cast<unsigned>(fc.N * 1000 + fc.H * 100 + fc.C * 10 + fc.K) +
                         static_cast<unsigned>(dt) * 7919u);
        const ops::ConvBnReluParams p = fc.params();
        const Shape xs{fc.N, fc.H, fc.W, fc.C}, ws{fc.K, fc.R, fc.R, fc.C};
        const Shape ys = ops::conv2d_output_shape(xs, ws, p.conv);
        const std::int64_t K = fc.K;
        // An input with a mean away from zero, so the batch mean matters.
        Tensor x = random_act(xs, dt, rng, -0.5f, 1.5f), w = random_act(ws, dt, rng);
        // Signed gamma: a negative scale flips which side of the ReLU a value lands on.
        Tensor gamma = random_f32({K}, rng, -1.5f, 1.5f), beta = random_f32({K}, rng, -0.5f, 0.5f);
        Tensor rm0 = random_f32({K}, rng, -0.2f, 0.2f), rv0 = random_f32({K}, rng, 0.5f, 2.0f);
        const double u = unit_roundoff(dt);
        const bool low = dt != DType::F32;

        // Reference: the separate ops, each storing its output in dt.
        Tensor conv_ref = poisoned(ys, dt), bn_ref = poisoned(ys, dt), z_ref = poisoned(ys, dt);
        Tensor rm_ref = copy_of(rm0), rv_ref = copy_of(rv0), sm_ref = poisoned({K}), si_ref = poisoned({K});
        ops::conv2d_forward(ctx, x, w, conv_ref, p.conv);
        ops::batchnorm_forward_train(ctx, conv_ref, gamma, beta, rm_ref, rv_ref, bn_ref, sm_ref, si_ref, p.bn);
        ops::relu_forward(ctx, bn_ref, z_ref);

        Tensor conv_out = poisoned(ys, dt), z = poisoned(ys, dt);
        Tensor rm = copy_of(rm0), rv = copy_of(rv0), sm = poisoned({K}), si = poisoned({K});
        ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z, sm, si, p);

        // The same conv kernel and the same statistics code on the same stored conv output.
        require_equal(conv_out, conv_ref, "conv_out");
        require_close(sm, sm_ref, 1e-7, 1e-6, "save_mean");
        require_close(si, si_ref, 0.0, 1e-6, "save_invstd");
        require_close(rm, rm_ref, 1e-7, 1e-6, "running_mean");
        require_close(rv, rv_ref, 0.0, 1e-6, "running_var");
        // z: fma(y - mean, gamma * invstd, beta) against (y - mean) * scale + beta: a few fp32 ulps
        // before the rounding to dt, so at most one ulp of dt apart after it.
        const double z_tol = low ? 2.0 * u : 1e-5;
        require_close(z, z_ref, z_tol, z_tol, "z");

        // Backward from a random dz.
        Tensor dz = random_act(ys, dt, rng);
        Tensor g_ref = poisoned(ys, dt), dconv_ref = poisoned(ys, dt);
        Tensor dgamma_ref = poisoned({K}), dbeta_ref = poisoned({K});
        Tensor dw_ref = poisoned(ws, dt), dx_ref = poisoned(xs, dt);
        ops::relu_backward(ctx, dz, z_ref, g_ref);
        ops::batchnorm_backward(ctx, g_ref, conv_ref, gamma, sm_ref, si_ref, dconv_ref, dgamma_ref, dbeta_ref);
        ops::conv2d_backward_filter(ctx, x, dconv_ref, dw_ref, p.conv);
        ops::conv2d_backward_data(ctx, dconv_ref, w, dx_ref, p.conv);

        Tensor dconv = poisoned(ys, dt), dw = poisoned(ws, dt), dx = poisoned(xs, dt);
        Tensor dgamma = poisoned({K}), dbeta = poisoned({K});
        ops::conv_bn_relu_backward(ctx, dz, x, w, gamma, beta, conv_out, sm, si, dconv, &dx, dw, dgamma, dbeta, p);

        // dbeta sums the same masked dz in double; dgamma and dconv differ from the reference by
        // fp32 rounding (relative to their largest element, as they are sums with cancellation),
        // then by the rounding to dt.
        require_close(dbeta, dbeta_ref, 1e-6, 1e-6, "dbeta");
        require_close_scaled(dgamma, dgamma_ref, 1e-5, "dgamma");
        const double grad_tol = low ? 2.0 * u : 1e-5;
        require_close_scaled(dconv, dconv_ref, grad_tol, "dconv");
        require_close_scaled(dw, dw_ref, grad_tol, "dw");
        require_close_scaled(dx, dx_ref, grad_tol, "dx");

        // Without dx: the other outputs are the same.
        Tensor dconv2 = poisoned(ys, dt), dw2 = poisoned(ws, dt), dgamma2 = poisoned({K}), dbeta2 = poisoned({K});
        ops::conv_bn_relu_backward(ctx, dz, x, w, gamma, beta, conv_out, sm, si, dconv2, nullptr, dw2, dgamma2,
                                   dbeta2, p);
        require_equal(dconv2, dconv, "dconv without dx");
        require_equal(dw2, dw, "dw without dx");
        require_equal(dgamma2, dgamma, "dgamma without dx");
        require_equal(dbeta2, dbeta, "dbeta without dx");
      }
    }
  }
}

TEST_CASE("conv_bn_relu low precision rounds conv_out before the statistics", "[conv_bn_relu]") {
  // The statistics, z and the ReLU mask must come from the stored (rounded) conv output: recompute
  // them here from conv_out with the documented formula and compare exactly.
  Context ctx = Context::cpu();
  for (DType dt : {DType::F16, DType::BF16}) {
    DYNAMIC_SECTION(dtype_name(dt)) {
      std::mt19937 rng(dt == DType::F16 ? 101u : 102u);
      ops::ConvBnReluParams p;
      p.conv.pad_h = p.conv.pad_w = 1;
      const Shape xs{2, 6, 5, 3}, ws{5, 3, 3, 3};
      const Shape ys = ops::conv2d_output_shape(xs, ws, p.conv);
      const std::int64_t K = 5, rows = ys[0] * ys[1] * ys[2];
      Tensor x = random_act(xs, dt, rng), w = random_act(ws, dt, rng);
      Tensor gamma = random_f32({K}, rng, -1.5f, 1.5f), beta = random_f32({K}, rng, -0.5f, 0.5f);
      Tensor rm = Tensor::zeros({K}, DType::F32, Device::cpu()), rv = Tensor::zeros({K}, DType::F32, Device::cpu());
      Tensor conv_out = poisoned(ys, dt), z = poisoned(ys, dt), sm = poisoned({K}), si = poisoned({K});
      ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z, sm, si, p);

      const std::vector<float> y = conv_out.to_host_floats();
      const float* g = gamma.data_as<float>();
      const float* b = beta.data_as<float>();
      std::vector<double> mean(K, 0.0), var(K, 0.0);
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t k = 0; k < K; ++k) mean[k] += y[i * K + k];
      for (std::int64_t k = 0; k < K; ++k) mean[k] /= static_cast<double>(rows);
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t k = 0; k < K; ++k) var[k] += (y[i * K + k] - mean[k]) * (y[i * K + k] - mean[k]);
      std::vector<float> want_z(static_cast<std::size_t>(rows * K));
      for (std::int64_t k = 0; k < K; ++k) {
        const float m = static_cast<float>(mean[k]);
        const float is = static_cast<float>(1.0 / std::sqrt(var[k] / rows + p.bn.eps));
        CHECK(sm.data_as<float>()[k] == m);
        CHECK(si.data_as<float>()[k] == is);
        const float scale = g[k] * is;
        for (std::int64_t i = 0; i < rows; ++i) {
          const float v = std::fma(y[i * K + k] - m, scale, b[k]);
          want_z[i * K + k] = v < 0.0f ? 0.0f : v;
        }
      }
      Tensor want = converted(Tensor::from_vector(ys, want_z), dt);
      require_equal(z, want, "z from the rounded conv_out");

      // Backward: dconv computed from the stored conv_out and dz, rounded to dt; dw and dx from
      // that rounded dconv through the plain conv ops.
      Tensor dz = random_act(ys, dt, rng);
      Tensor dconv = poisoned(ys, dt), dw = poisoned(ws, dt), dx = poisoned(xs, dt);
      Tensor dgamma = poisoned({K}), dbeta = poisoned({K});
      ops::conv_bn_relu_backward(ctx, dz, x, w, gamma, beta, conv_out, sm, si, dconv, &dx, dw, dgamma, dbeta, p);
      Tensor dw_want = poisoned(ws, dt), dx_want = poisoned(xs, dt);
      ops::conv2d_backward_filter(ctx, x, dconv, dw_want, p.conv);
      ops::conv2d_backward_data(ctx, dconv, w, dx_want, p.conv);
      require_equal(dw, dw_want, "dw from the rounded dconv");
      require_equal(dx, dx_want, "dx from the rounded dconv");
    }
  }
}

TEST_CASE("conv_bn_relu backward matches finite differences", "[conv_bn_relu][grad]") {
  Context ctx = Context::cpu();
  for (const FusedCase& fc : {FusedCase{2, 5, 4, 3, 4, 3, 1, 1}, FusedCase{2, 7, 6, 2, 3, 3, 2, 1}}) {
    DYNAMIC_SECTION(fc.str()) {
      std::mt19937 rng(static_cast<unsigned>(fc.H * 31 + fc.K));
      const ops::ConvBnReluParams p = fc.params();
      const Shape xs{fc.N, fc.H, fc.W, fc.C}, ws{fc.K, fc.R, fc.R, fc.C};
      const Shape ys = ops::conv2d_output_shape(xs, ws, p.conv);
      const std::int64_t K = fc.K;
      Tensor x = random_f32(xs, rng), w = random_f32(ws, rng);
      Tensor gamma = random_f32({K}, rng, 0.5f, 1.5f), beta = random_f32({K}, rng, -0.5f, 0.5f);
      Tensor r = random_f32(ys, rng);
      Tensor rm = Tensor::zeros({K}, DType::F32, Device::cpu()), rv = Tensor::zeros({K}, DType::F32, Device::cpu());
      Tensor conv_out = poisoned(ys), z = poisoned(ys), sm = poisoned({K}), si = poisoned({K});

      // L = sum(z * r) in double; `mask` records which outputs are positive, so a step that
      // moves an output across the ReLU's kink (where L has no derivative) is recognised.
      std::vector<bool> mask;
      auto loss = [&] {
        ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z, sm, si, p);
        const float* zp = z.data_as<float>();
        const float* rp = r.data_as<float>();
        double s = 0.0;
        mask.assign(static_cast<std::size_t>(z.numel()), false);
        for (std::int64_t i = 0; i < z.numel(); ++i) {
          s += static_cast<double>(zp[i]) * rp[i];
          mask[static_cast<std::size_t>(i)] = zp[i] > 0.0f;
        }
        return s;
      };
      loss();
      Tensor dconv = poisoned(ys), dx = poisoned(xs), dw = poisoned(ws), dgamma = poisoned({K}), dbeta = poisoned({K});
      ops::conv_bn_relu_backward(ctx, r, x, w, gamma, beta, conv_out, sm, si, dconv, &dx, dw, dgamma, dbeta, p);

      // Central differences, skipping the elements whose step crosses a kink (at most a few).
      auto check_fd = [&](Tensor& param, const Tensor& analytic, const char* what) {
        const float eps = 1e-3f;
        const std::vector<double> a = as_double(analytic);
        float* pp = param.data_as<float>();
        std::vector<double> got, want;
        for (std::int64_t i = 0; i < param.numel(); ++i) {
          const float v = pp[i];
          const float up = v + eps, down = v - eps;
          pp[i] = up;
          const double lp = loss();
          const std::vector<bool> mask_up = mask;
          pp[i] = down;
          const double lm = loss();
          const std::vector<bool> mask_down = mask;
          pp[i] = v;
          if (mask_up != mask_down) continue;
          got.push_back(a[static_cast<std::size_t>(i)]);
          want.push_back((lp - lm) / (static_cast<double>(up) - static_cast<double>(down)));
        }
        INFO(what << ": " << got.size() << " of " << param.numel() << " elements away from a kink");
        CHECK(static_cast<double>(got.size()) >= 0.8 * static_cast<double>(param.numel()));
        require_close(got, want, 2e-3, 1e-2, what);
      };
      check_fd(x, dx, "dx");
      check_fd(w, dw, "dw");
      check_fd(gamma, dgamma, "dgamma");
      check_fd(beta, dbeta, "dbeta");
    }
  }
}

TEST_CASE("conv_bn_fold then conv_bias_relu equals conv2d then batchnorm eval then relu", "[conv_bn_relu]") {
  Context ctx = Context::cpu();
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    // The folded bias in fp32, and for 16-bit activations also in their dtype.
    const std::vector<DType> bias_types = dt == DType::F32 ? std::vector<DType>{DType::F32}
                                                           : std::vector<DType>{DType::F32, dt};
    for (const FusedCase& fc : fused_cases()) for (DType bt : bias_types) {
      DYNAMIC_SECTION(dtype_name(dt) << " bias " << dtype_name(bt) << " " << fc.str()) {
        std::mt19937 rng(static_cast<unsigned>(fc.W * 97 + fc.K * 13) + static_cast<unsigned>(dt) * 31u);
        const ops::ConvBnReluParams p = fc.params();
        const Shape xs{fc.N, fc.H, fc.W, fc.C}, ws{fc.K, fc.R, fc.R, fc.C};
        const Shape ys = ops::conv2d_output_shape(xs, ws, p.conv);
        const std::int64_t K = fc.K;
        Tensor x = random_act(xs, dt, rng, -0.5f, 1.5f), w = random_act(ws, dt, rng);
        Tensor gamma = random_f32({K}, rng, -1.5f, 1.5f), beta = random_f32({K}, rng, -0.5f, 0.5f);
        Tensor rm = random_f32({K}, rng, -0.5f, 0.5f), rv = random_f32({K}, rng, 0.2f, 3.0f);

        Tensor w_folded = poisoned(ws, dt), bias = poisoned({K}, bt);
        ops::conv_bn_fold(ctx, w, gamma, beta, rm, rv, w_folded, bias, p.bn);

        // The folded parameters against a double computation.
        const std::vector<double> wd = as_double(w);
        std::vector<double> want_w(wd.size()), want_b(static_cast<std::size_t>(K));
        const std::int64_t per_filter = static_cast<std::int64_t>(wd.size()) / K;
        for (std::int64_t k = 0; k < K; ++k) {
          const double s = gamma.data_as<float>()[k] / std::sqrt(double{rv.data_as<float>()[k]} + p.bn.eps);
          want_b[k] = beta.data_as<float>()[k] - rm.data_as<float>()[k] * s;
          for (std::int64_t j = 0; j < per_filter; ++j) want_w[k * per_filter + j] = wd[k * per_filter + j] * s;
        }
        const double u = unit_roundoff(dt);
        // w * s: s and the product rounded in fp32, then once to dt.
        require_close(as_double(w_folded), want_w, 1e-30, 2.0 * u + std::ldexp(1.0, -22), "w_folded");
        const double ub = bt == DType::F32 ? 1e-6 : unit_roundoff(bt);
        require_close(as_double(bias), want_b, 1e-6, ub, "bias");

        Tensor z = poisoned(ys, dt);
        ops::conv_bias_relu_forward(ctx, x, w_folded, bias, z, p.conv);

        Tensor conv_ref = poisoned(ys, dt), bn_ref = poisoned(ys, dt), z_ref = poisoned(ys, dt);
        ops::conv2d_forward(ctx, x, w, conv_ref, p.conv);
        ops::batchnorm_forward_eval(ctx, conv_ref, gamma, beta, rm, rv, bn_ref, p.bn);
        ops::relu_forward(ctx, bn_ref, z_ref);
        // The fold changes where the rounding happens (the weight instead of the conv output):
        // a few roundings of dt relative to the output's scale.
        const double tol = dt == DType::F32 ? 1e-5 : (bt == DType::F32 ? 8.0 : 10.0) * u;
        require_close_scaled(z, z_ref, tol, "z");
      }
    }
  }
}

TEST_CASE("conv_bias_relu equals conv2d plus bias then relu", "[conv_bn_relu]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(5);
  ops::Conv2dParams cp;
  cp.stride_h = 2;
  cp.pad_h = cp.pad_w = 1;
  const Shape xs{2, 7, 6, 3}, ws{5, 3, 3, 3};
  const Shape ys = ops::conv2d_output_shape(xs, ws, cp);
  Tensor x = random_f32(xs, rng), w = random_f32(ws, rng), bias = random_f32({5}, rng);
  Tensor z = poisoned(ys), conv = poisoned(ys);
  ops::conv_bias_relu_forward(ctx, x, w, bias, z, cp);
  ops::conv2d_forward(ctx, x, w, conv, cp);
  std::vector<double> want = as_double(conv);
  for (std::size_t i = 0; i < want.size(); ++i) want[i] = std::max(0.0, want[i] + bias.data_as<float>()[i % 5]);
  require_close(as_double(z), want, 1e-6, 1e-6, "z");
}

TEST_CASE("conv_bn_relu ops reject bad arguments", "[conv_bn_relu]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(9);
  ops::ConvBnReluParams p;
  p.conv.pad_h = p.conv.pad_w = 1;
  const Shape xs{2, 5, 4, 3}, ws{4, 3, 3, 3};
  const Shape ys = ops::conv2d_output_shape(xs, ws, p.conv);
  Tensor x = random_f32(xs, rng), w = random_f32(ws, rng);
  Tensor gamma = random_f32({4}, rng), beta = random_f32({4}, rng);
  Tensor rm = Tensor::zeros({4}, DType::F32, Device::cpu()), rv = Tensor::zeros({4}, DType::F32, Device::cpu());
  Tensor conv_out = poisoned(ys), z = poisoned(ys), sm = poisoned({4}), si = poisoned({4});
  const auto invalid = dstrain::ErrorCode::InvalidArgument;

  // A valid call first, so the failures below are due to the one bad argument each.
  ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z, sm, si, p);

  Tensor gamma_long = random_f32({5}, rng);
  CHECK(error_code_of([&] { ops::conv_bn_relu_forward_train(ctx, x, w, gamma_long, beta, rm, rv, conv_out, z, sm, si, p); }) ==
        invalid);
  Tensor gamma_f16 = converted(gamma, DType::F16);
  CHECK(error_code_of([&] { ops::conv_bn_relu_forward_train(ctx, x, w, gamma_f16, beta, rm, rv, conv_out, z, sm, si, p); }) ==
        invalid);
  Tensor z_f16 = poisoned(ys, DType::F16);
  CHECK(error_code_of([&] { ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z_f16, sm, si, p); }) ==
        invalid);
  Tensor w_other_c = random_f32({4, 3, 3, 2}, rng);
  CHECK(error_code_of([&] { ops::conv_bn_relu_forward_train(ctx, x, w_other_c, gamma, beta, rm, rv, conv_out, z, sm, si, p); }) ==
        invalid);
  Tensor z_wrong = poisoned({2, 5, 4, 5});
  CHECK(error_code_of([&] { ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z_wrong, sm, si, p); }) ==
        invalid);
  // One value per channel has no batch variance.
  Tensor x1 = random_f32({1, 1, 1, 3}, rng), w1 = random_f32({4, 1, 1, 3}, rng);
  Tensor c1 = poisoned({1, 1, 1, 4}), z1 = poisoned({1, 1, 1, 4});
  CHECK(error_code_of([&] { ops::conv_bn_relu_forward_train(ctx, x1, w1, gamma, beta, rm, rv, c1, z1, sm, si, p); }) == invalid);
  ops::ConvBnReluParams bad_eps = p;
  bad_eps.bn.eps = 0.0f;
  CHECK(error_code_of([&] { ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z, sm, si, bad_eps); }) ==
        invalid);

  Tensor dz = random_f32(ys, rng), dconv = poisoned(ys), dx = poisoned(xs), dw = poisoned(ws);
  Tensor dgamma = poisoned({4}), dbeta = poisoned({4});
  Tensor dw_wrong = poisoned({4, 3, 3, 2}), dx_f16 = poisoned(xs, DType::F16);
  CHECK(error_code_of([&] {
          ops::conv_bn_relu_backward(ctx, dz, x, w, gamma, beta, conv_out, sm, si, dconv, &dx, dw_wrong, dgamma, dbeta, p);
        }) == invalid);
  CHECK(error_code_of([&] {
          ops::conv_bn_relu_backward(ctx, dz, x, w, gamma, beta, conv_out, sm, si, dconv, &dx_f16, dw, dgamma, dbeta, p);
        }) == invalid);
  Tensor dz_wrong = random_f32(xs, rng);
  CHECK(error_code_of([&] {
          ops::conv_bn_relu_backward(ctx, dz_wrong, x, w, gamma, beta, conv_out, sm, si, dconv, &dx, dw, dgamma, dbeta, p);
        }) == invalid);

  Tensor w_folded = poisoned(ws), bias = poisoned({4}), bias_long = poisoned({5});
  CHECK(error_code_of([&] { ops::conv_bn_fold(ctx, w, gamma, beta, rm, rv, w_folded, bias_long, p.bn); }) == invalid);
  Tensor w_folded_f16 = poisoned(ws, DType::F16);
  CHECK(error_code_of([&] { ops::conv_bn_fold(ctx, w, gamma, beta, rm, rv, w_folded_f16, bias, p.bn); }) == invalid);
  Tensor x_i32 = Tensor::zeros(xs, DType::I32, Device::cpu());
  CHECK(error_code_of([&] { ops::conv_bias_relu_forward(ctx, x_i32, w, bias, z, p.conv); }) == invalid);
  CHECK(error_code_of([&] { ops::conv_bias_relu_forward(ctx, x, w, bias_long, z, p.conv); }) == invalid);
  // The bias in fp32 or the activations' dtype only: fp32 activations with an fp16 bias, or fp16
  // activations with a bf16 one, are refused.
  Tensor bias_f16 = poisoned({4}, DType::F16), bias_bf16 = poisoned({4}, DType::BF16);
  CHECK(error_code_of([&] { ops::conv_bn_fold(ctx, w, gamma, beta, rm, rv, w_folded, bias_f16, p.bn); }) == invalid);
  CHECK(error_code_of([&] { ops::conv_bias_relu_forward(ctx, x, w, bias_f16, z, p.conv); }) == invalid);
  Tensor x_f16 = Tensor::zeros(xs, DType::F16, Device::cpu()), w_f16 = Tensor::zeros(ws, DType::F16, Device::cpu());
  CHECK(error_code_of([&] {
          ops::conv_bn_fold(ctx, w_f16, gamma, beta, rm, rv, w_folded_f16, bias_bf16, p.bn);
        }) == invalid);
  CHECK(error_code_of([&] { ops::conv_bias_relu_forward(ctx, x_f16, w_f16, bias_bf16, z_f16, p.conv); }) ==
        invalid);
  CHECK_NOTHROW(ops::conv_bias_relu_forward(ctx, x_f16, w_f16, bias_f16, z_f16, p.conv));
}

namespace {

void set_values(Tensor& t, const Tensor& src) { t.copy_from(src); }

// A ConvBnRelu layer and the Conv2d -> BatchNorm2d -> ReLU layers it replaces, with identical
// random parameters and running statistics.
struct LayerPair {
  nn::ConvBnRelu fused;
  nn::Conv2d conv;
  nn::BatchNorm2d bn;
  nn::ReLU relu;
  LayerPair(int in, int out, int kernel, int stride, int pad, amp::Policy policy, std::mt19937& rng)
      : fused(Device::cpu(), in, out, kernel, stride, pad, policy, 0.2f, 1e-4f),
        conv(Device::cpu(), in, out, kernel, stride, pad, false, policy),
        bn(Device::cpu(), out, 0.2f, 1e-4f) {
    Tensor w = random_f32(fused.weight().value.shape(), rng);
    set_values(fused.weight().value, w);
    set_values(conv.weight().value, w);
    Tensor gamma = random_f32({out}, rng, -1.5f, 1.5f), beta = random_f32({out}, rng, -0.5f, 0.5f);
    set_values(fused.gamma().value, gamma);
    set_values(bn.parameters()[0]->value, gamma);
    set_values(fused.beta().value, beta);
    set_values(bn.parameters()[1]->value, beta);
    Tensor rm = random_f32({out}, rng, -0.2f, 0.2f), rv = random_f32({out}, rng, 0.5f, 2.0f);
    set_values(fused.running_mean(), rm);
    set_values(*bn.buffers()[0], rm);
    set_values(fused.running_var(), rv);
    set_values(*bn.buffers()[1], rv);
  }
  const Tensor& reference_forward(Context& ctx, const Tensor& x, bool training) {
    return relu.forward(ctx, bn.forward(ctx, conv.forward(ctx, x, training), training), training);
  }
  const Tensor& reference_backward(Context& ctx, const Tensor& dy) {
    return conv.backward(ctx, bn.backward(ctx, relu.backward(ctx, dy)));
  }
};

}  // namespace

TEST_CASE("ConvBnRelu layer equals Conv2d then BatchNorm2d then ReLU layers", "[conv_bn_relu][nn]") {
  Context ctx = Context::cpu();
  struct LayerCase {
    int in, out, kernel, stride, pad;
  };
  for (const LayerCase lc : {LayerCase{3, 5, 3, 1, 1}, LayerCase{4, 7, 3, 2, 1}, LayerCase{5, 3, 1, 1, 0}}) {
    DYNAMIC_SECTION(lc.in << "->" << lc.out << " " << lc.kernel << "x" << lc.kernel << " stride " << lc.stride) {
      std::mt19937 rng(static_cast<unsigned>(lc.in * 100 + lc.out * 10 + lc.stride));
      LayerPair l(lc.in, lc.out, lc.kernel, lc.stride, lc.pad, amp::Policy::fp32(), rng);
      CHECK(l.fused.parameters().size() == 3);
      CHECK(l.fused.buffers().size() == 2);
      CHECK(l.fused.working_copies().empty());
      const Shape xs{2, 7, 6, lc.in};

      // Two training steps (the second sees the running statistics the first updated), then
      // evaluation with the running statistics.
      for (int step = 0; step < 2; ++step) {
        INFO("training step " << step);
        Tensor x = random_f32(xs, rng, -0.5f, 1.5f);
        const Tensor& z = l.fused.forward(ctx, x, true);
        const Tensor& z_ref = l.reference_forward(ctx, x, true);
        require_close(z, z_ref, 1e-5, 1e-5, "z");
        require_close(l.fused.running_mean(), *l.bn.buffers()[0], 1e-7, 1e-6, "running_mean");
        require_close(l.fused.running_var(), *l.bn.buffers()[1], 0.0, 1e-6, "running_var");

        Tensor dy = random_f32(z.shape(), rng);
        const Tensor& dx = l.fused.backward(ctx, dy);
        const Tensor& dx_ref = l.reference_backward(ctx, dy);
        require_close_scaled(dx, dx_ref, 1e-5, "dx");
        require_close_scaled(l.fused.weight().grad, l.conv.weight().grad, 1e-5, "weight grad");
        require_close_scaled(l.fused.gamma().grad, l.bn.parameters()[0]->grad, 1e-5, "gamma grad");
        require_close(l.fused.beta().grad, l.bn.parameters()[1]->grad, 1e-6, 1e-6, "beta grad");
      }
      Tensor x = random_f32(xs, rng, -0.5f, 1.5f);
      const Tensor& z = l.fused.forward(ctx, x, false);
      const Tensor& z_ref = l.reference_forward(ctx, x, false);
      require_close_scaled(z, z_ref, 1e-5, "z in evaluation");
      // Evaluation leaves the running statistics alone.
      require_close(l.fused.running_mean(), *l.bn.buffers()[0], 1e-7, 1e-6, "running_mean after evaluation");
      // No statistics were kept for a backward.
      Tensor dy = random_f32(z.shape(), rng);
      CHECK(error_code_of([&] { l.fused.backward(ctx, dy); }) == dstrain::ErrorCode::InvalidArgument);
    }
  }
}

TEST_CASE("ConvBnRelu layer without input gradient still writes its parameter gradients", "[conv_bn_relu][nn]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(21);
  LayerPair l(3, 4, 3, 1, 1, amp::Policy::fp32(), rng);
  l.fused.set_needs_input_grad(false);
  Tensor x = random_f32({2, 5, 5, 3}, rng);
  const Tensor& z = l.fused.forward(ctx, x, true);
  l.reference_forward(ctx, x, true);
  Tensor dy = random_f32(z.shape(), rng);
  l.fused.weight().grad.fill_bytes(0xFF);
  l.fused.gamma().grad.fill_bytes(0xFF);
  l.fused.beta().grad.fill_bytes(0xFF);
  CHECK(l.fused.backward(ctx, dy).numel() == 0);
  l.reference_backward(ctx, dy);
  require_close_scaled(l.fused.weight().grad, l.conv.weight().grad, 1e-5, "weight grad");
  require_close_scaled(l.fused.gamma().grad, l.bn.parameters()[0]->grad, 1e-5, "gamma grad");
  require_close(l.fused.beta().grad, l.bn.parameters()[1]->grad, 1e-6, 1e-6, "beta grad");
}

TEST_CASE("ConvBnRelu layer under fp16 and bf16 keeps Conv2d's dtypes", "[conv_bn_relu][nn][lowp]") {
  Context ctx = Context::cpu();
  for (const amp::Policy policy : {amp::Policy::fp16(), amp::Policy::bf16()}) {
    const DType low = policy.compute_dtype(amp::OpKind::Conv);
    DYNAMIC_SECTION(dtype_name(low)) {
      std::mt19937 rng(low == DType::F16 ? 31u : 32u);
      LayerPair l(3, 5, 3, 1, 1, policy, rng);
      REQUIRE(l.fused.compute_dtype() == low);
      REQUIRE(l.fused.working_copies().size() == 1);
      CHECK(l.fused.working_copies()[0].master == &l.fused.weight());
      CHECK(l.fused.working_copies()[0].low->dtype() == low);
      const double u = unit_roundoff(low);

      // An fp32 input: the output in the low type, dL/dx back in fp32, the weight gradient fp32.
      Tensor x = random_f32({2, 6, 5, 3}, rng, -0.5f, 1.5f);
      const Tensor& z = l.fused.forward(ctx, x, true);
      const Tensor& z_ref = l.reference_forward(ctx, x, true);
      CHECK(z.dtype() == low);
      require_close(z, z_ref, 2.0 * u, 2.0 * u, "z");
      Tensor dy = converted(random_f32(z.shape(), rng), low);
      const Tensor& dx = l.fused.backward(ctx, dy);
      const Tensor& dx_ref = l.reference_backward(ctx, dy);
      CHECK(dx.dtype() == DType::F32);
      CHECK(l.fused.weight().grad.dtype() == DType::F32);
      require_close_scaled(dx, dx_ref, 4.0 * u, "dx");
      require_close_scaled(l.fused.weight().grad, l.conv.weight().grad, 4.0 * u, "weight grad");
      require_close_scaled(l.fused.gamma().grad, l.bn.parameters()[0]->grad, 1e-5, "gamma grad");

      // A low-precision input is used as it is; dL/dx comes back in that dtype.
      Tensor x_low = converted(x, low);
      const Tensor& z_low = l.fused.forward(ctx, x_low, true);
      require_equal(z_low, z, "z from the same input given in the low type");
      CHECK(l.fused.backward(ctx, dy).dtype() == low);

      // External working copies: forward computes with the copy as it is, not the master.
      Tensor before = copy_of(l.fused.forward(ctx, x, false));
      l.fused.set_working_copies_external(true);
      const std::vector<float> w = l.fused.weight().value.to_host_floats();
      std::vector<float> doubled(w.size());
      for (std::size_t i = 0; i < w.size(); ++i) doubled[i] = 2.0f * w[i];
      set_values(l.fused.weight().value, Tensor::from_vector(l.fused.weight().value.shape(), doubled));
      require_equal(l.fused.forward(ctx, x, false), before, "z from the unchanged external copy");
      l.fused.set_working_copies_external(false);
      Tensor after = copy_of(l.fused.forward(ctx, x, false));
      const std::vector<float> a = after.to_host_floats(), b = before.to_host_floats();
      CHECK(a != b);  // the converting forward follows the doubled master
    }
  }
}

TEST_CASE("small_cnn is built from ConvBnRelu layers", "[conv_bn_relu][nn]") {
  auto net = dstrain::models::small_cnn(Device::cpu(), 10, 1);
  // Six ConvBnRelu, two max pools, global average pool, linear.
  REQUIRE(net->size() == 10);
  int fused = 0;
  for (std::size_t i = 0; i < net->size(); ++i)
    if (dynamic_cast<nn::ConvBnRelu*>(&net->layer(i)) != nullptr) ++fused;
  CHECK(fused == 6);
  CHECK(net->parameters().size() == 6 * 3 + 2);
  CHECK(net->buffers().size() == 6 * 2);
  CHECK(nn::parameter_count(*net) == 288170);
}

namespace {

// Two fused layers with the same random parameters as another two: for chained vs unchained.
struct FusedStack {
  nn::ConvBnRelu first, second;
  FusedStack(int in, int mid, int out, int stride, amp::Policy policy)
      : first(Device::cpu(), in, mid, 3, 1, 1, policy, 0.2f, 1e-4f),
        second(Device::cpu(), mid, out, 3, stride, 1, policy, 0.2f, 1e-4f) {}
  void copy_parameters_from(FusedStack& o) {
    for (auto [dst, src] : {std::pair{&first, &o.first}, std::pair{&second, &o.second}}) {
      for (std::size_t i = 0; i < dst->parameters().size(); ++i)
        set_values(dst->parameters()[i]->value, *&src->parameters()[i]->value);
      for (std::size_t i = 0; i < dst->buffers().size(); ++i) set_values(*dst->buffers()[i], *src->buffers()[i]);
    }
  }
  void randomise(std::mt19937& rng) {
    for (nn::ConvBnRelu* l : {&first, &second}) {
      set_values(l->weight().value, random_f32(l->weight().value.shape(), rng));
      set_values(l->gamma().value, random_f32(l->gamma().value.shape(), rng, -1.5f, 1.5f));
      set_values(l->beta().value, random_f32(l->beta().value.shape(), rng, -0.5f, 0.5f));
    }
  }
  const Tensor& forward(Context& ctx, const Tensor& x, bool training) {
    return second.forward(ctx, first.forward(ctx, x, training), training);
  }
  const Tensor& backward(Context& ctx, const Tensor& dy) { return first.backward(ctx, second.backward(ctx, dy)); }
};

}  // namespace

TEST_CASE("chained ConvBnRelu layers equal the same layers unchained", "[conv_bn_relu][nn][chain]") {
  Context ctx = Context::cpu();
  for (const amp::Policy policy : {amp::Policy::fp32(), amp::Policy::fp16(), amp::Policy::bf16()}) {
    const DType dt = policy.compute_dtype(amp::OpKind::Conv);
    for (const int stride : {1, 2}) {
      DYNAMIC_SECTION(dtype_name(dt) << " stride " << stride) {
        std::mt19937 rng(static_cast<unsigned>(40 + stride + 3 * static_cast<int>(dt)));
        FusedStack plain(3, 5, 7, stride, policy), chained(3, 5, 7, stride, policy);
        plain.randomise(rng);
        chained.copy_parameters_from(plain);
        REQUIRE(nn::ConvBnRelu::chain(chained.first, chained.second));
        CHECK(chained.first.chained_output());
        CHECK(chained.second.chained_input());
        CHECK_FALSE(plain.first.chained_output());
        chained.first.set_needs_input_grad(true);
        plain.first.set_needs_input_grad(true);
        // The same arithmetic in the same order: equal bit for bit, in every dtype.
        for (int step = 0; step < 2; ++step) {
          INFO("training step " << step);
          Tensor x = random_act({2, 6, 7, 3}, dt, rng, -0.5f, 1.5f);
          const Tensor& z_chained = chained.forward(ctx, x, true);
          const Tensor& z_plain = plain.forward(ctx, x, true);
          require_equal(z_chained, z_plain, "z");
          require_equal(chained.first.running_mean(), plain.first.running_mean(), "first running_mean");
          require_equal(chained.first.running_var(), plain.first.running_var(), "first running_var");
          require_equal(chained.second.running_var(), plain.second.running_var(), "second running_var");
          Tensor dy = random_act(z_plain.shape(), dt, rng);
          for (nn::ConvBnRelu* l : {&chained.first, &chained.second})
            for (nn::Parameter* prm : l->parameters()) prm->grad.fill_bytes(0xFF);  // poisoned
          const Tensor& dx_chained = chained.backward(ctx, dy);
          const Tensor& dx_plain = plain.backward(ctx, dy);
          require_equal(dx_chained, dx_plain, "dx");
          for (std::size_t i = 0; i < 3; ++i) {
            require_equal(chained.first.parameters()[i]->grad, plain.first.parameters()[i]->grad,
                          "first layer gradient " + std::to_string(i));
            require_equal(chained.second.parameters()[i]->grad, plain.second.parameters()[i]->grad,
                          "second layer gradient " + std::to_string(i));
          }
        }
        // Evaluation is not chained: the first layer returns its activated output.
        Tensor x = random_act({2, 6, 7, 3}, dt, rng);
        require_equal(chained.forward(ctx, x, false), plain.forward(ctx, x, false), "z in evaluation");
      }
    }
  }
}

TEST_CASE("ConvBnRelu chains only layers that fit, and a chained layer takes only its producer's output",
          "[conv_bn_relu][nn][chain]") {
  Context ctx = Context::cpu();
  nn::ConvBnRelu a(Device::cpu(), 3, 4, 3, 1, 1), b(Device::cpu(), 4, 4, 3, 1, 1), c(Device::cpu(), 5, 4, 3, 1, 1);
  nn::ConvBnRelu d(Device::cpu(), 4, 4, 3, 1, 1, amp::Policy::fp16());
  nn::ConvBnRelu e(Device::cpu(), 4, 4, 3, 1, 1, amp::Policy::fp8_hybrid());
  CHECK_FALSE(nn::ConvBnRelu::chain(a, c));  // 4 channels out, 5 in
  CHECK_FALSE(nn::ConvBnRelu::chain(a, d));  // fp32 and fp16
  CHECK_FALSE(nn::ConvBnRelu::chain(a, e));  // FP8 convolution
  CHECK_FALSE(nn::ConvBnRelu::chain(b, b));
  REQUIRE(nn::ConvBnRelu::chain(a, b));
  CHECK_FALSE(nn::ConvBnRelu::chain(a, b));  // chained already
  CHECK_FALSE(a.chained_input());
  std::mt19937 rng(50);
  Tensor x = random_f32({2, 5, 5, 3}, rng);
  Tensor other = random_f32({2, 5, 5, 4}, rng);
  // Before the producer ran, and with a tensor that is not the producer's output.
  CHECK(error_code_of([&] { b.forward(ctx, other, true); }) == dstrain::ErrorCode::InvalidArgument);
  const Tensor& raw = a.forward(ctx, x, true);
  CHECK(raw.shape() == Shape{2, 5, 5, 4});
  CHECK(error_code_of([&] { b.forward(ctx, other, true); }) == dstrain::ErrorCode::InvalidArgument);
  CHECK(b.forward(ctx, raw, true).shape() == Shape{2, 5, 5, 4});
  // Evaluation is not chained: any input is taken.
  CHECK(b.forward(ctx, other, false).shape() == Shape{2, 5, 5, 4});
}

TEST_CASE("chained conv_bn_relu ops reject bad arguments", "[conv_bn_relu][chain]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(51);
  const FusedCase fc{2, 5, 5, 3, 4, 3, 1, 1};
  Tensor x = random_f32({2, 5, 5, 3}, rng), w = random_f32({4, 3, 3, 3}, rng);
  Tensor gamma = random_f32({4}, rng), beta = random_f32({4}, rng);
  Tensor rm = Tensor::zeros({4}, DType::F32, Device::cpu()), rv = random_f32({4}, rng, 0.5f, 1.0f);
  Tensor conv_out = poisoned({2, 5, 5, 4}), z = poisoned({2, 5, 5, 4});
  Tensor sm = poisoned({4}), si = poisoned({4});
  Tensor in_gamma = random_f32({3}, rng), in_beta = random_f32({3}, rng), in_mean = random_f32({3}, rng);
  Tensor in_invstd = random_f32({3}, rng, 0.5f, 1.0f), wrong = random_f32({4}, rng);
  Tensor in_dgamma = poisoned({3}), in_dbeta = poisoned({3});
  ops::ChainedInput in{&in_gamma, &in_beta, &in_mean, &in_invstd, &in_dgamma, &in_dbeta};
  ops::ConvBnReluParams p = fc.params();
  p.chained_input = &in;
  // The producer's vectors must have x's channel count.
  ops::ChainedInput bad = in;
  bad.save_mean = &wrong;
  ops::ConvBnReluParams pb = p;
  pb.chained_input = &bad;
  CHECK(error_code_of([&] {
          ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z, sm, si, pb);
        }) == dstrain::ErrorCode::InvalidArgument);
  bad = in;
  bad.gamma = nullptr;
  CHECK(error_code_of([&] {
          ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z, sm, si, pb);
        }) == dstrain::ErrorCode::InvalidArgument);
  ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z, sm, si, p);
  Tensor dz = random_f32({2, 5, 5, 4}, rng), dconv = poisoned({2, 5, 5, 4}), dw = poisoned({4, 3, 3, 3});
  Tensor dgamma = poisoned({4}), dbeta = poisoned({4}), dx = poisoned({2, 5, 5, 3});
  // Backward through a chained input needs dx and somewhere to put the producer's gradients.
  CHECK(error_code_of([&] {
          ops::conv_bn_relu_backward(ctx, dz, x, w, gamma, beta, conv_out, sm, si, dconv, nullptr, dw, dgamma, dbeta,
                                     p);
        }) == dstrain::ErrorCode::InvalidArgument);
  bad = in;
  bad.dbeta = nullptr;
  CHECK(error_code_of([&] {
          ops::conv_bn_relu_backward(ctx, dz, x, w, gamma, beta, conv_out, sm, si, dconv, &dx, dw, dgamma, dbeta, pb);
        }) == dstrain::ErrorCode::InvalidArgument);
  ops::conv_bn_relu_backward(ctx, dz, x, w, gamma, beta, conv_out, sm, si, dconv, &dx, dw, dgamma, dbeta, p);
  for (const Tensor* t : {&dx, &dw, &dgamma, &dbeta, &in_dgamma, &in_dbeta})
    for (float v : t->to_host_floats()) REQUIRE(std::isfinite(v));
}
