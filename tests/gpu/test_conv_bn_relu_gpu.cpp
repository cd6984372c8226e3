// The fused Conv+BN+ReLU ops on the GPU against the CPU reference, on fresh random data, in fp32,
// fp16 and bf16, for shapes that take the fused cuDNN graph (channel counts that are multiples of
// 8) and shapes that fall back to separate kernels (odd channel counts, N=1, 1x1, stride 2,
// non-square). Device outputs are poisoned first. The backward and inference checks feed both
// sides the same inputs (the GPU forward's conv_out and statistics), so the ReLU mask is the same
// and the comparison measures the arithmetic only.
#include <catch2/catch.hpp>

#include <algorithm>
#include <functional>
#include <iterator>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "dstrain/amp.h"
#include "dstrain/context.h"
#include "dstrain/device.h"
#include "dstrain/dtype.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

#include "gpu/seeded_rng.h"

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Shape;
using dstrain::Tensor;
namespace ops = dstrain::ops;

namespace {

Device gpu() { return Device::cuda(0); }
Device cpu() { return Device::cpu(); }

double eps_of(DType dt) {
  switch (dt) {
    case DType::F16: return 1.0 / 1024.0;
    case DType::BF16: return 1.0 / 128.0;
    default: return 1.0 / 8388608.0;
  }
}

Tensor random_tensor(const Shape& s, DType dt, std::mt19937& g, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(dstrain::shape_numel(s)));
  for (float& x : v) x = d(g);
  Tensor f = Tensor::from_vector(s, v);
  if (dt == DType::F32) return f;
  Tensor t = Tensor::empty(s, dt, cpu());
  dstrain::convert_host(f.data(), DType::F32, t.data(), dt, v.size());
  return t;
}

Tensor poisoned(const Shape& s, Device d, DType dt) {
  Tensor t = Tensor::empty(s, dt, d);
  t.fill_bytes(0xFF);  // NaN in every float format
  return t;
}

double max_abs(const Tensor& t) {
  double m = 0.0;
  for (float v : t.to_host_floats()) m = std::max(m, static_cast<double>(std::abs(v)));
  return m;
}

// Every element within units * eps * scale + 4 eps |ref| of the reference; scale is max|ref|
// unless given (a batch mean is small next to the values it averages: its scale is theirs).
// `eps`: the precision unit (default: the dtype's, fp32 for fp32 tensors). fp32 results computed
// from low-precision data (statistics, BatchNorm weight gradients) pass the data's dtype: one path
// may reduce the values before they are rounded to that dtype (cuDNN's fused epilogues), the other
// after.
void require_close(Context& g, const Tensor& dev, const Tensor& ref, double units, const char* what,
                   double scale = -1.0, double eps = 0.0) {
  REQUIRE(dev.shape() == ref.shape());
  g.synchronize();
  const std::vector<float> got = dev.to_host_floats(), want = ref.to_host_floats();
  double max_ref = scale;
  if (max_ref < 0)
    for (float v : want) max_ref = std::max(max_ref, static_cast<double>(std::abs(v)));
  if (eps <= 0.0) eps = eps_of(dev.dtype() == DType::F32 ? ref.dtype() : dev.dtype());
  const double atol = units * eps * std::max(max_ref, 1e-3), rtol = 4.0 * eps;
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const bool ok = std::isfinite(got[i]) && std::abs(got[i] - want[i]) <= atol + rtol * std::abs(want[i]);
    if (!ok && bad++ == 0) first = i;
  }
  INFO(what << " " << dtype_name(dev.dtype()) << ": " << bad << " of " << want.size() << " elements off; first "
            << first << ": got " << got[first] << ", want " << want[first] << " (atol " << atol << ")");
  CHECK(bad == 0);
}

struct Case {
  Shape x;  // N, H, W, C
  int K, R, stride;

  Shape filter() const { return {K, R, R, x[3]}; }
  // The case's convolution (padding R / 2) with BatchNorm's default momentum.
  ops::ConvBnReluParams params() const {
    ops::ConvBnReluParams p;
    p.conv.stride_h = p.conv.stride_w = stride;
    p.conv.pad_h = p.conv.pad_w = R / 2;
    p.bn.momentum = 0.1f;
    return p;
  }
};

const Case kCases[] = {
    {{4, 14, 13, 24}, 32, 3, 1},  // fused graph for fp16/bf16
    {{2, 9, 11, 5}, 7, 3, 2},     // odd channels, stride 2: separate kernels, scalar passes
    {{1, 8, 8, 16}, 64, 1, 1},    // N = 1, 1x1
    {{3, 10, 6, 8}, 24, 1, 2},    // 1x1 stride 2, non-square
    {{2, 9, 7, 64}, 128, 3, 1},   // C, K multiples of 64: the implicit GEMM with statistics (Hopper)
    {{2, 5, 6, 128}, 64, 1, 1},   // the same, 1x1
};

const DType kTypes[] = {DType::F32, DType::F16, DType::BF16};

// Tolerance units per dtype: fp32 results differ by summation order over up to 9*C products.
double units(DType dt, double low, double f32) { return dt == DType::F32 ? f32 : low; }

// A GPU training forward's statistics, running statistics and z against the CPU's BatchNorm + ReLU
// applied to the GPU's own conv_out: cuDNN's convolution may round differently from the CPU's
// (fp32 FFT or Winograd algorithms), and the comparison is about the statistics. rm0 / rv0: the
// running statistics before the forward (host). Returns that conv_out, on the host.
Tensor require_bn_relu_forward_close(Context& g, Context& c, const Tensor& y_g, const Tensor& z_g, const Tensor& sm_g,
                                     const Tensor& si_g, const Tensor& rm_g, const Tensor& rv_g, const Tensor& rm0,
                                     const Tensor& rv0, const Tensor& gamma, const Tensor& beta,
                                     const ops::BatchNormParams& bn) {
  const DType dt = y_g.dtype();
  const Shape ys = y_g.shape(), ks = sm_g.shape();
  Tensor y_h = y_g.to(cpu());
  Tensor rm_r = rm0.to(cpu()), rv_r = rv0.to(cpu());
  Tensor bn_r = poisoned(ys, cpu(), dt), z_r = poisoned(ys, cpu(), dt);
  Tensor sm_r = poisoned(ks, cpu(), DType::F32), si_r = poisoned(ks, cpu(), DType::F32);
  ops::batchnorm_forward_train(c, y_h, gamma, beta, rm_r, rv_r, bn_r, sm_r, si_r, bn);
  ops::relu_forward(c, bn_r, z_r);
  const double y_scale = max_abs(y_h);
  require_close(g, sm_g, sm_r, units(dt, 2, 16), "save_mean", y_scale, eps_of(dt));
  require_close(g, si_g, si_r, units(dt, 4, 16), "save_invstd", -1.0, eps_of(dt));
  require_close(g, rm_g, rm_r, units(dt, 2, 16), "running_mean", y_scale, eps_of(dt));
  require_close(g, rv_g, rv_r, units(dt, 4, 16), "running_var", -1.0, eps_of(dt));
  require_close(g, z_g, z_r, units(dt, 8, 64), "z");
  return y_h;
}

// A GPU backward's gradients against the CPU's backward from the same state: the GPU forward's
// conv_out (y_h, on the host) and statistics; x, w and dz on the host. dconv_g is checked when given.
void require_backward_close(Context& g, Context& c, const Tensor& dz, const Tensor& x, const Tensor& w,
                            const Tensor& gamma, const Tensor& beta, const Tensor& y_h, const Tensor& sm_g,
                            const Tensor& si_g, const Tensor* dconv_g, const Tensor& dx_g, const Tensor& dw_g,
                            const Tensor& dg_g, const Tensor& db_g, const ops::ConvBnReluParams& p) {
  const DType dt = x.dtype();
  const std::int64_t K = w.dim(0);
  const Tensor sm_h = sm_g.to(cpu()), si_h = si_g.to(cpu());
  Tensor dconv_c = poisoned(y_h.shape(), cpu(), dt), dx_c = poisoned(x.shape(), cpu(), dt);
  Tensor dw_c = poisoned(w.shape(), cpu(), dt);
  Tensor dg_c = poisoned({K}, cpu(), DType::F32), db_c = poisoned({K}, cpu(), DType::F32);
  ops::conv_bn_relu_backward(c, dz, x, w, gamma, beta, y_h, sm_h, si_h, dconv_c, &dx_c, dw_c, dg_c, db_c, p);
  require_close(g, db_g, db_c, units(dt, 8, 64), "dbeta");
  require_close(g, dg_g, dg_c, units(dt, 8, 64), "dgamma");
  if (dconv_g != nullptr) require_close(g, *dconv_g, dconv_c, units(dt, 16, 256), "dconv");
  require_close(g, dw_g, dw_c, units(dt, 32, 256), "dw");
  require_close(g, dx_g, dx_c, units(dt, 32, 256), "dx");
}

}  // namespace

TEST_CASE("CUDA conv_bn_relu forward, backward and inference match the CPU reference", "[gpu][conv_bn_relu]") {
  Context g = Context::cuda(0), c = Context::cpu();
  for (DType dt : kTypes) {
    for (const Case& cs : kCases) {
      DYNAMIC_SECTION(dtype_name(dt) << " x " << dstrain::shape_str(cs.x) << " K " << cs.K << " R " << cs.R
                                     << " stride " << cs.stride) {
        SEEDED_RNG(rng);
        const ops::ConvBnReluParams p = cs.params();
        const std::int64_t K = cs.K;
        const Shape ws = cs.filter();
        const Shape ys = ops::conv2d_output_shape(cs.x, ws, p.conv);
        Tensor x = random_tensor(cs.x, dt, rng), w = random_tensor(ws, dt, rng);
        Tensor gamma = random_tensor({K}, DType::F32, rng, 0.5f, 1.5f), beta = random_tensor({K}, DType::F32, rng);
        Tensor rm_c = random_tensor({K}, DType::F32, rng), rv_c = random_tensor({K}, DType::F32, rng, 0.5f, 2.0f);
        const Tensor rm_c0 = rm_c.to(cpu()), rv_c0 = rv_c.to(cpu());  // before the forward updates them
        Tensor rm_g = rm_c.to(gpu()), rv_g = rv_c.to(gpu());
        const Tensor x_g = x.to(gpu()), w_g = w.to(gpu()), gamma_g = gamma.to(gpu()), beta_g = beta.to(gpu());

        // Forward.
        Tensor y_c = poisoned(ys, cpu(), dt), z_c = poisoned(ys, cpu(), dt);
        Tensor y_g = poisoned(ys, gpu(), dt), z_g = poisoned(ys, gpu(), dt);
        Tensor sm_c = poisoned({K}, cpu(), DType::F32), si_c = poisoned({K}, cpu(), DType::F32);
        Tensor sm_g = poisoned({K}, gpu(), DType::F32), si_g = poisoned({K}, gpu(), DType::F32);
        ops::conv_bn_relu_forward_train(c, x, w, gamma, beta, rm_c, rv_c, y_c, z_c, sm_c, si_c, p);
        ops::conv_bn_relu_forward_train(g, x_g, w_g, gamma_g, beta_g, rm_g, rv_g, y_g, z_g, sm_g, si_g, p);
        require_close(g, y_g, y_c, units(dt, 8, 64), "conv_out");
        const Tensor y_h = require_bn_relu_forward_close(g, c, y_g, z_g, sm_g, si_g, rm_g, rv_g, rm_c0, rv_c0, gamma,
                                                         beta, p.bn);
        require_close(g, z_g, z_c, units(dt, 16, 1024), "z against the CPU fused op");

        // Backward, from the GPU forward's state on both sides.
        Tensor dz = random_tensor(ys, dt, rng);
        const Tensor dz_g = dz.to(gpu());
        Tensor dconv_g = poisoned(ys, gpu(), dt), dx_g = poisoned(cs.x, gpu(), dt), dw_g = poisoned(ws, gpu(), dt);
        Tensor dg_g = poisoned({K}, gpu(), DType::F32), db_g = poisoned({K}, gpu(), DType::F32);
        ops::conv_bn_relu_backward(g, dz_g, x_g, w_g, gamma_g, beta_g, y_g, sm_g, si_g, dconv_g, &dx_g, dw_g, dg_g,
                                   db_g, p);
        require_backward_close(g, c, dz, x, w, gamma, beta, y_h, sm_g, si_g, &dconv_g, dx_g, dw_g, dg_g, db_g, p);

        // Inference: the fold, then conv + bias + ReLU from the same folded filter on both sides.
        Tensor wf_c = poisoned(ws, cpu(), dt), wf_g = poisoned(ws, gpu(), dt);
        Tensor b_c = poisoned({K}, cpu(), DType::F32), b_g = poisoned({K}, gpu(), DType::F32);
        ops::conv_bn_fold(c, w, gamma, beta, rm_c, rv_c, wf_c, b_c, p.bn);
        ops::conv_bn_fold(g, w_g, gamma_g, beta_g, rm_c.to(gpu()), rv_c.to(gpu()), wf_g, b_g, p.bn);
        require_close(g, wf_g, wf_c, units(dt, 2, 8), "w_folded");
        require_close(g, b_g, b_c, units(dt, 2, 8), "bias");
        const Tensor wf_h = wf_g.to(cpu()), b_h = b_g.to(cpu());
        Tensor e_c = poisoned(ys, cpu(), dt), e_g = poisoned(ys, gpu(), dt);
        ops::conv_bias_relu_forward(c, x, wf_h, b_h, e_c, p.conv);
        ops::conv_bias_relu_forward(g, x_g, wf_g, b_g, e_g, p.conv);
        require_close(g, e_g, e_c, units(dt, 16, 64), "inference z");
        if (dt != DType::F32) {  // the folded bias in the activations' dtype (cuBLASLt takes it as it is)
          Tensor lb_c = poisoned({K}, cpu(), dt), lb_g = poisoned({K}, gpu(), dt);
          ops::conv_bn_fold(c, w, gamma, beta, rm_c, rv_c, wf_c, lb_c, p.bn);
          ops::conv_bn_fold(g, w_g, gamma_g, beta_g, rm_c.to(gpu()), rv_c.to(gpu()), wf_g, lb_g, p.bn);
          require_close(g, lb_g, lb_c, units(dt, 2, 8), "bias in the activations' dtype");
          const Tensor lb_h = lb_g.to(cpu());
          Tensor l_c = poisoned(ys, cpu(), dt), l_g = poisoned(ys, gpu(), dt);
          ops::conv_bias_relu_forward(c, x, wf_h, lb_h, l_c, p.conv);
          ops::conv_bias_relu_forward(g, x_g, wf_g, lb_g, l_g, p.conv);
          require_close(g, l_g, l_c, units(dt, 16, 64), "inference z, bias in the activations' dtype");
        }
      }
    }
  }
}

namespace {

// Moves x away from the ReLU kink of the producer's BatchNorm: where |v| < margin, v =
// (x - mean) * gamma * invstd + beta, x is shifted so that |v| is about 2 * margin. The GPU's fused
// dgrad computes v in another order than the CPU; an element within rounding of 0 could take the
// other side of the mask, which would say nothing about either.
void keep_off_relu_kink(Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& mean, const Tensor& invstd,
                        float margin) {
  std::vector<float> v = x.to_host_floats();
  const std::vector<float> gm = gamma.to_host_floats(), bt = beta.to_host_floats(), mn = mean.to_host_floats(),
                           is = invstd.to_host_floats();
  const std::size_t C = gm.size();
  for (std::size_t i = 0; i < v.size(); ++i) {
    const std::size_t c = i % C;
    const float s = gm[c] * is[c];
    const float pre = (v[i] - mn[c]) * s + bt[c];
    if (std::abs(pre) < margin) v[i] += (pre >= 0.0f ? 2.0f : -2.0f) * margin / s;
  }
  Tensor f = Tensor::from_vector(x.shape(), v);
  if (x.dtype() == DType::F32) {
    x.copy_from(f);
  } else {
    dstrain::convert_host(f.data(), DType::F32, x.data(), x.dtype(), v.size());
  }
}

}  // namespace

TEST_CASE("CUDA chained conv_bn_relu matches the CPU reference", "[gpu][conv_bn_relu][chain]") {
  Context g = Context::cuda(0), c = Context::cpu();
  std::vector<Case> cases(std::begin(kCases), std::end(kCases));
  // dgrad through the producer's BatchNorm on the implicit GEMM (Hopper) over several tiles of rows
  // and of columns: partial sums from many CTAs, finished by the last.
  cases.push_back({{4, 12, 11, 128}, 192, 3, 1});
  // Rows of 33 to 64 pixels: the 3x3 wgrad a row a step at its widest rows (Hopper).
  cases.push_back({{2, 5, 40, 64}, 64, 3, 1});
  // Rows of 14 pixels: the 3x3 wgrad four rows a step, the last step of each image short.
  cases.push_back({{2, 10, 14, 64}, 64, 3, 1});
  // Rows of 56 pixels: the 3x3 forward two rows a step with the prologue (Hopper).
  cases.push_back({{1, 6, 56, 64}, 64, 3, 1});
  // The same two rows a step on rows of 5 pixels, an odd height (the last step one row), and on
  // the widest rows it takes (62 pixels): the prologue's and the BatchNorm-backward sums' edges.
  cases.push_back({{3, 7, 5, 64}, 64, 3, 1});
  cases.push_back({{1, 4, 62, 64}, 64, 3, 1});
  for (DType dt : kTypes) {
    for (const Case& cs : cases) {
      DYNAMIC_SECTION(dtype_name(dt) << " x " << dstrain::shape_str(cs.x) << " K " << cs.K << " R " << cs.R
                                     << " stride " << cs.stride) {
        SEEDED_RNG(rng);
        const std::int64_t C = cs.x[3], K = cs.K;
        // The producing layer's BatchNorm (its statistics as a training forward leaves them).
        Tensor in_gamma = random_tensor({C}, DType::F32, rng, 0.5f, 1.5f);
        Tensor in_beta = random_tensor({C}, DType::F32, rng, -0.5f, 0.5f);
        Tensor in_mean = random_tensor({C}, DType::F32, rng, -0.3f, 0.3f);
        Tensor in_invstd = random_tensor({C}, DType::F32, rng, 0.5f, 2.0f);
        Tensor x = random_tensor(cs.x, dt, rng);
        keep_off_relu_kink(x, in_gamma, in_beta, in_mean, in_invstd, 0.02f);
        const Tensor in_gamma_g = in_gamma.to(gpu()), in_beta_g = in_beta.to(gpu()), in_mean_g = in_mean.to(gpu()),
                     in_invstd_g = in_invstd.to(gpu());
        Tensor in_dg_c = poisoned({C}, cpu(), DType::F32), in_db_c = poisoned({C}, cpu(), DType::F32);
        Tensor in_dg_g = poisoned({C}, gpu(), DType::F32), in_db_g = poisoned({C}, gpu(), DType::F32);
        ops::ChainedInput in_c{&in_gamma, &in_beta, &in_mean, &in_invstd, &in_dg_c, &in_db_c};
        ops::ChainedInput in_g{&in_gamma_g, &in_beta_g, &in_mean_g, &in_invstd_g, &in_dg_g, &in_db_g};

        ops::ConvBnReluParams p = cs.params();
        p.chained_output = true;  // also chained on its output side: no z, dz is dL/dconv_out
        ops::ConvBnReluParams pc = p, pg = p;
        pc.chained_input = &in_c;
        pg.chained_input = &in_g;
        const Shape ws = cs.filter();
        const Shape ys = ops::conv2d_output_shape(cs.x, ws, p.conv);
        Tensor w = random_tensor(ws, dt, rng);
        Tensor gamma = random_tensor({K}, DType::F32, rng, 0.5f, 1.5f), beta = random_tensor({K}, DType::F32, rng);
        Tensor rm_c = Tensor::zeros({K}, DType::F32, cpu()), rv_c = random_tensor({K}, DType::F32, rng, 0.5f, 2.0f);
        Tensor rm_g = rm_c.to(gpu()), rv_g = rv_c.to(gpu());
        const Tensor rv0 = rv_c.to(cpu());
        const Tensor x_g = x.to(gpu()), w_g = w.to(gpu()), gamma_g = gamma.to(gpu()), beta_g = beta.to(gpu());

        // Forward: the convolution of relu(bn(x)) and its statistics.
        Tensor y_c = poisoned(ys, cpu(), dt), y_g = poisoned(ys, gpu(), dt), no_z;
        Tensor sm_c = poisoned({K}, cpu(), DType::F32), si_c = poisoned({K}, cpu(), DType::F32);
        Tensor sm_g = poisoned({K}, gpu(), DType::F32), si_g = poisoned({K}, gpu(), DType::F32);
        ops::conv_bn_relu_forward_train(c, x, w, gamma, beta, rm_c, rv_c, y_c, no_z, sm_c, si_c, pc);
        ops::conv_bn_relu_forward_train(g, x_g, w_g, gamma_g, beta_g, rm_g, rv_g, y_g, no_z, sm_g, si_g, pg);
        require_close(g, y_g, y_c, units(dt, 8, 64), "chained conv_out");
        // The statistics against the CPU's from the GPU's own conv_out (as in the test above).
        const Tensor y_h = y_g.to(cpu());
        // The running statistics start where the GPU's did, and are updated once.
        Tensor rm_r = Tensor::zeros({K}, DType::F32, cpu()), rv_r = rv0.to(cpu());
        Tensor bn_r = poisoned(ys, cpu(), dt);
        Tensor sm_r = poisoned({K}, cpu(), DType::F32), si_r = poisoned({K}, cpu(), DType::F32);
        ops::batchnorm_forward_train(c, y_h, gamma, beta, rm_r, rv_r, bn_r, sm_r, si_r, p.bn);
        const double y_scale = max_abs(y_h);
        require_close(g, sm_g, sm_r, units(dt, 2, 16), "chained save_mean", y_scale, eps_of(dt));
        require_close(g, si_g, si_r, units(dt, 4, 16), "chained save_invstd", -1.0, eps_of(dt));
        require_close(g, rm_g, rm_r, units(dt, 2, 16), "chained running_mean", y_scale, eps_of(dt));
        require_close(g, rv_g, rv_r, units(dt, 4, 16), "chained running_var", -1.0, eps_of(dt));

        // Backward from dL/dconv_out: dw from relu(bn(x)), dx through the producer's ReLU and BN.
        Tensor dconv = random_tensor(ys, dt, rng);
        const Tensor dconv_g = dconv.to(gpu());
        Tensor unused;
        Tensor dx_c = poisoned(cs.x, cpu(), dt), dx_g = poisoned(cs.x, gpu(), dt);
        Tensor dw_c = poisoned(ws, cpu(), dt), dw_g = poisoned(ws, gpu(), dt);
        Tensor dg_c = Tensor::zeros({K}, DType::F32, cpu()), db_c = Tensor::zeros({K}, DType::F32, cpu());
        Tensor dg_g = Tensor::zeros({K}, DType::F32, gpu()), db_g = Tensor::zeros({K}, DType::F32, gpu());
        ops::conv_bn_relu_backward(c, dconv, x, w, gamma, beta, y_h, sm_r, si_r, unused, &dx_c, dw_c, dg_c, db_c, pc);
        ops::conv_bn_relu_backward(g, dconv_g, x_g, w_g, gamma_g, beta_g, y_g, sm_g, si_g, unused, &dx_g, dw_g, dg_g,
                                   db_g, pg);
        require_close(g, dw_g, dw_c, units(dt, 32, 256), "chained dw");
        // Sums over dgrad's output: in fp32 they carry dgrad's own error (cuDNN may pick Winograd).
        require_close(g, in_db_g, in_db_c, units(dt, 16, 4096), "producer dbeta", -1.0, eps_of(dt));
        require_close(g, in_dg_g, in_dg_c, units(dt, 16, 4096), "producer dgamma", -1.0, eps_of(dt));
        require_close(g, dx_g, dx_c, units(dt, 32, 256), "chained dx");
      }
    }
  }
}

TEST_CASE("CUDA conv_bn_relu in deterministic mode is bitwise repeatable", "[gpu][conv_bn_relu]") {
  Context g = Context::cuda(0);
  SEEDED_RNG(rng);
  const bool was = ops::deterministic();
  ops::set_deterministic(true);
  ops::ConvBnReluParams p;
  p.conv.pad_h = p.conv.pad_w = 1;
  const Shape xs{8, 12, 12, 16}, ws{32, 3, 3, 16};
  const Shape ys = ops::conv2d_output_shape(xs, ws, p.conv);
  const Tensor x = random_tensor(xs, DType::F16, rng).to(gpu()), w = random_tensor(ws, DType::F16, rng).to(gpu());
  const Tensor gamma = random_tensor({32}, DType::F32, rng, 0.5f, 1.5f).to(gpu());
  const Tensor beta = random_tensor({32}, DType::F32, rng).to(gpu());
  const Tensor dz = random_tensor(ys, DType::F16, rng).to(gpu());
  std::vector<std::vector<float>> runs;
  for (int r = 0; r < 2; ++r) {
    Tensor rm = Tensor::zeros({32}, DType::F32, gpu()), rv = Tensor::zeros({32}, DType::F32, gpu());
    Tensor y = poisoned(ys, gpu(), DType::F16), z = poisoned(ys, gpu(), DType::F16);
    Tensor sm = poisoned({32}, gpu(), DType::F32), si = poisoned({32}, gpu(), DType::F32);
    Tensor dconv = poisoned(ys, gpu(), DType::F16), dx = poisoned(xs, gpu(), DType::F16);
    Tensor dw = poisoned(ws, gpu(), DType::F16);
    Tensor dg = poisoned({32}, gpu(), DType::F32), db = poisoned({32}, gpu(), DType::F32);
    ops::conv_bn_relu_forward_train(g, x, w, gamma, beta, rm, rv, y, z, sm, si, p);
    ops::conv_bn_relu_backward(g, dz, x, w, gamma, beta, y, sm, si, dconv, &dx, dw, dg, db, p);
    g.synchronize();
    std::vector<float> all;
    for (const Tensor* t : {&z, &dx, &dw, &dg, &db, &rv}) {
      const std::vector<float> v = t->to_host_floats();
      all.insert(all.end(), v.begin(), v.end());
    }
    runs.push_back(all);
  }
  ops::set_deterministic(was);
  REQUIRE(runs[0].size() == runs[1].size());
  std::size_t differ = 0;
  for (std::size_t i = 0; i < runs[0].size(); ++i)
    if (!(runs[0][i] == runs[1][i]) && !(std::isnan(runs[0][i]) && std::isnan(runs[1][i]))) ++differ;
  CHECK(differ == 0);
  for (float v : runs[0]) REQUIRE(std::isfinite(v));
}

TEST_CASE("CUDA FP8 convolution forward matches the CPU reference", "[gpu][conv_bn_relu][fp8]") {
  Context g = Context::cuda(0), c = Context::cpu();
  SEEDED_RNG(rng);
  for (int stride : {1, 2}) {
    ops::Conv2dParams p;
    p.stride_h = p.stride_w = stride;
    p.pad_h = p.pad_w = 1;
    const Shape xs{8, 12, 11, 32}, ws{48, 3, 3, 32};
    const Shape ys = ops::conv2d_output_shape(xs, ws, p);
    const Tensor x = random_tensor(xs, DType::BF16, rng, -3.0f, 3.0f).to(gpu());
    const Tensor w = random_tensor(ws, DType::F32, rng, -0.2f, 0.2f).to(gpu());
    dstrain::amp::Fp8Meta x_meta(gpu()), w_meta(gpu());
    // Scales from a first cast's amax, so the operands use E4M3's range as in training.
    Tensor x8 = poisoned(xs, gpu(), DType::F8E4M3), w8 = poisoned(ws, gpu(), DType::F8E4M3);
    dstrain::amp::cast_to_fp8(g, x, x8, x_meta);
    dstrain::amp::cast_to_fp8(g, w, w8, w_meta);
    dstrain::amp::update_fp8_scales(g, {&x_meta, &w_meta}, nullptr);
    dstrain::amp::cast_to_fp8(g, x, x8, x_meta);
    dstrain::amp::cast_to_fp8(g, w, w8, w_meta);
    Tensor y = poisoned(ys, gpu(), DType::BF16), y_ref = poisoned(ys, cpu(), DType::BF16);
    const bool ran = dstrain::amp::conv2d_forward_fp8(g, x8, w8, x_meta.scale_inv(), w_meta.scale_inv(), y, p);
    REQUIRE(ran);  // sm_90 with cuDNN 9: an FP8 plan exists for this aligned shape
    const Tensor sx = x_meta.scale_inv().to(cpu()), sw = w_meta.scale_inv().to(cpu());
    REQUIRE(sx.to_host_floats()[0] != 1.0f);  // the scales were really updated
    REQUIRE(dstrain::amp::conv2d_forward_fp8(c, x8.to(cpu()), w8.to(cpu()), sx, sw, y_ref, p));
    require_close(g, y, y_ref, 4, "fp8 conv y");
  }
}

namespace {

struct GraphCase {
  Case shape;
  DType dt;
  bool warm;  // the step ran once outside the capture first; else its first use is in the capture
};

}  // namespace

// A training step (forward with batch statistics, backward with dx) captured into a CUDA graph and
// replayed on new data loaded into the same buffers, against the CPU reference. "cold" shapes are
// used nowhere else in this program, so their plans are built and their choices made inside the
// capture (untimed: the first way); "warm" ones ran once before, so the graph holds the timed choices.
TEST_CASE("CUDA conv_bn_relu training step replayed from a CUDA graph matches the CPU reference",
          "[gpu][conv_bn_relu][graph]") {
  Context g = Context::cuda(0), c = Context::cpu();
  const GraphCase cases[] = {
      {{{3, 11, 9, 40}, 48, 3, 1}, DType::F16, false},  // cuDNN graphs, first use inside the capture
      {{{2, 7, 7, 32}, 96, 1, 1}, DType::BF16, false},  // 1x1 (cuBLASLt), first use inside the capture
      {{{2, 9, 7, 64}, 128, 3, 1}, DType::F16, true},   // the implicit GEMM's shapes (Hopper), warmed up
      {{{2, 9, 11, 5}, 7, 3, 2}, DType::F32, true},     // odd channels, stride 2: separate kernels
  };
  for (const GraphCase& gc : cases) {
    const Case& cs = gc.shape;
    const DType dt = gc.dt;
    DYNAMIC_SECTION(dtype_name(dt) << " x " << dstrain::shape_str(cs.x) << " K " << cs.K << " R " << cs.R
                                   << " stride " << cs.stride << (gc.warm ? " warm" : " cold")) {
      SEEDED_RNG(rng);
      const ops::ConvBnReluParams p = cs.params();
      const std::int64_t K = cs.K;
      const Shape ws = cs.filter();
      const Shape ys = ops::conv2d_output_shape(cs.x, ws, p.conv);
      const Tensor w = random_tensor(ws, dt, rng), gamma = random_tensor({K}, DType::F32, rng, 0.5f, 1.5f),
                   beta = random_tensor({K}, DType::F32, rng);
      const Tensor w_g = w.to(gpu()), gamma_g = gamma.to(gpu()), beta_g = beta.to(gpu());
      // The step's buffers: the graph reads and writes these addresses on every replay.
      Tensor x_g = poisoned(cs.x, gpu(), dt), dz_g = poisoned(ys, gpu(), dt);
      Tensor rm_g = poisoned({K}, gpu(), DType::F32), rv_g = poisoned({K}, gpu(), DType::F32);
      Tensor y_g = poisoned(ys, gpu(), dt), z_g = poisoned(ys, gpu(), dt), dconv_g = poisoned(ys, gpu(), dt);
      Tensor sm_g = poisoned({K}, gpu(), DType::F32), si_g = poisoned({K}, gpu(), DType::F32);
      Tensor dx_g = poisoned(cs.x, gpu(), dt), dw_g = poisoned(ws, gpu(), dt);
      Tensor dg_g = poisoned({K}, gpu(), DType::F32), db_g = poisoned({K}, gpu(), DType::F32);
      const auto step = [&] {
        ops::conv_bn_relu_forward_train(g, x_g, w_g, gamma_g, beta_g, rm_g, rv_g, y_g, z_g, sm_g, si_g, p);
        ops::conv_bn_relu_backward(g, dz_g, x_g, w_g, gamma_g, beta_g, y_g, sm_g, si_g, dconv_g, &dx_g, dw_g, dg_g,
                                   db_g, p);
      };
      if (gc.warm) {
        x_g.copy_from(random_tensor(cs.x, dt, rng));
        dz_g.copy_from(random_tensor(ys, dt, rng));
        rm_g.copy_from(Tensor::zeros({K}, DType::F32, cpu()));
        rv_g.copy_from(Tensor::zeros({K}, DType::F32, cpu()));
        step();
        g.synchronize();
      }
      const dstrain::CudaGraph graph = dstrain::CudaGraph::capture(g.stream(), step);
      for (int replay = 0; replay < 2; ++replay) {  // new data each time: the graph must read it
        INFO("replay " << replay);
        const Tensor x = random_tensor(cs.x, dt, rng), dz = random_tensor(ys, dt, rng);
        const Tensor rm0 = random_tensor({K}, DType::F32, rng), rv0 = random_tensor({K}, DType::F32, rng, 0.5f, 2.0f);
        x_g.copy_from(x);
        dz_g.copy_from(dz);
        rm_g.copy_from(rm0);
        rv_g.copy_from(rv0);
        for (Tensor* t : {&y_g, &z_g, &dconv_g, &sm_g, &si_g, &dx_g, &dw_g, &dg_g, &db_g}) t->fill_bytes(0xFF);
        graph.replay(g.stream());
        g.synchronize();

        // Forward against the CPU: the convolution, then BatchNorm + ReLU of the GPU's own conv_out.
        Tensor y_c = poisoned(ys, cpu(), dt);
        ops::conv2d_forward(c, x, w, y_c, p.conv);
        require_close(g, y_g, y_c, units(dt, 8, 64), "conv_out");
        const Tensor y_h =
            require_bn_relu_forward_close(g, c, y_g, z_g, sm_g, si_g, rm_g, rv_g, rm0, rv0, gamma, beta, p.bn);

        // Backward against the CPU from the GPU forward's state.
        require_backward_close(g, c, dz, x, w, gamma, beta, y_h, sm_g, si_g, nullptr, dx_g, dw_g, dg_g, db_g, p);
      }
    }
  }
}
