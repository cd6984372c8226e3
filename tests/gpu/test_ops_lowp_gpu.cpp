// fp16 / bf16 CUDA ops against the CPU reference (which widens the same low-precision inputs to
// fp32, runs the fp32 op and rounds once) on fresh random data. Device outputs are poisoned first
// (0xFF bytes: NaN in fp16 and bf16 too). Tolerances are atol + rtol * |ref| with rtol two units
// in the last place of the dtype and atol scaled by the dtype's epsilon and the output's size.
// Each case prints its seed on failure; DSTRAIN_TEST_SEED replays one.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <utility>
#include <vector>

#include "dstrain/amp.h"
#include "dstrain/amp_policy.h"
#include "dstrain/context.h"
#include "dstrain/dtype.h"
#include "dstrain/models.h"
#include "dstrain/nn.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

#include "gpu/seeded_rng.h"

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Shape;
using dstrain::Tensor;
namespace ops = dstrain::ops;
namespace amp = dstrain::amp;

namespace {

Device gpu() { return Device::cuda(0); }

// The spacing of the dtype's values just above 1.
double eps_of(DType dt) {
  switch (dt) {
    case DType::F16: return 1.0 / 1024.0;
    case DType::BF16: return 1.0 / 128.0;
    default: return 1.0 / 8388608.0;
  }
}

Tensor converted(const Tensor& src, DType dt) {
  Tensor t = Tensor::empty(src.shape(), dt, Device::cpu());
  dstrain::convert_host(src.data(), src.dtype(), t.data(), dt, static_cast<std::size_t>(src.numel()));
  return t;
}

// A host tensor of dtype dt with fresh random values in [lo, hi).
Tensor random_low(const Shape& s, DType dt, std::mt19937& g, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(dstrain::shape_numel(s)));
  for (float& x : v) x = d(g);
  return converted(Tensor::from_vector(s, v), dt);
}

Tensor poisoned(const Shape& s, Device d, DType dt) {
  Tensor t = Tensor::empty(s, dt, d);
  t.fill_bytes(0xFF);
  return t;
}

// Every element of the device tensor within atol_rel * eps * max|ref| + 2 eps |ref| of the CPU result.
void require_close(Context& g, const Tensor& dev, const Tensor& ref, double atol_units) {
  REQUIRE(dev.dtype() == ref.dtype());
  REQUIRE(dev.shape() == ref.shape());
  g.synchronize();
  const std::vector<float> got = dev.to_host_floats(), want = ref.to_host_floats();
  double max_ref = 0.0;
  for (float v : want) max_ref = std::max(max_ref, static_cast<double>(std::abs(v)));
  const double eps = eps_of(dev.dtype());
  const double atol = atol_units * eps * std::max(max_ref, 1e-3), rtol = 2.0 * eps;
  std::size_t bad = 0, first = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const bool ok = std::isfinite(got[i]) && std::abs(got[i] - want[i]) <= atol + rtol * std::abs(want[i]);
    if (!ok && bad++ == 0) first = i;
  }
  INFO(dtype_name(dev.dtype()) << ": " << bad << " of " << want.size() << " elements off; first " << first
                               << ": got " << got[first] << ", want " << want[first] << " (atol " << atol << ")");
  CHECK(bad == 0);
}

const DType kLowTypes[] = {DType::F16, DType::BF16};

}  // namespace

TEST_CASE("CUDA conv2d in fp16/bf16 matches the CPU reference", "[gpu][lowp][conv]") {
  Context g = Context::cuda(0), c = Context::cpu();
  for (DType dt : kLowTypes) {
    DYNAMIC_SECTION(dtype_name(dt)) {
      SEEDED_RNG(rng);
      for (int stride : {1, 2}) {
        const Shape xs{4, 14, 13, 24};
        ops::Conv2dParams p;
        p.stride_h = p.stride_w = stride;
        p.pad_h = p.pad_w = 1;
        Tensor x = random_low(xs, dt, rng), w = random_low({32, 3, 3, 24}, dt, rng);
        const Shape ys = ops::conv2d_output_shape(xs, w.shape(), p);
        Tensor y_ref = poisoned(ys, Device::cpu(), dt), y = poisoned(ys, gpu(), dt);
        ops::conv2d_forward(c, x, w, y_ref, p);
        ops::conv2d_forward(g, x.to(gpu()), w.to(gpu()), y, p);
        require_close(g, y, y_ref, 8.0);

        Tensor dy = random_low(ys, dt, rng);
        Tensor dx_ref = poisoned(xs, Device::cpu(), dt), dx = poisoned(xs, gpu(), dt);
        ops::conv2d_backward_data(c, dy, w, dx_ref, p);
        ops::conv2d_backward_data(g, dy.to(gpu()), w.to(gpu()), dx, p);
        require_close(g, dx, dx_ref, 8.0);

        Tensor dw_ref = poisoned(w.shape(), Device::cpu(), dt), dw = poisoned(w.shape(), gpu(), dt);
        ops::conv2d_backward_filter(c, x, dy, dw_ref, p);
        ops::conv2d_backward_filter(g, x.to(gpu()), dy.to(gpu()), dw, p);
        require_close(g, dw, dw_ref, 8.0);
      }
    }
  }
}

// Shapes our implicit GEMM takes on a Hopper device (C and K multiples of 64, stride 1), the
// forward, the backward data (the forward on rotated filters) and the backward filter: with
// DSTRAIN_FORCE_CHOICE=1 and 2 (ctest gpu_conv_choice_*) it computes them, otherwise the fastest
// of it and cuDNN / cuBLASLt. Rows that fill no whole tile, images smaller than a tile, non-square
// images and filters, no padding, K that only the narrower tiles divide; for the backward filter
// also filter positions that fill no whole tile, more pixel steps than CTAs (a CTA's share
// ends inside one tile and goes on in the next), and for the 3x3 row kernel rows of 7 to 50
// pixels (several rows a step below 32, with images whose height the step's rows do not divide);
// for the 3x3 forward two rows a step (C = 64), images of 7 to 62 pixels, odd heights included.
TEST_CASE("CUDA conv2d forward, backward data and backward filter with C and K multiples of 64 in fp16/bf16 match "
          "the CPU reference",
          "[gpu][lowp][conv][implicit_gemm]") {
  Context g = Context::cuda(0), c = Context::cpu();
  struct Case {
    Shape x;
    std::int64_t K;
    int R, S, pad_h, pad_w;
  };
  const Case cases[] = {
      {{2, 9, 7, 64}, 64, 3, 3, 1, 1},   {{3, 5, 6, 128}, 192, 3, 3, 1, 1}, {{1, 8, 8, 64}, 128, 3, 3, 0, 0},
      {{2, 7, 7, 192}, 256, 3, 3, 1, 1}, {{1, 4, 33, 64}, 64, 5, 3, 2, 1},  {{2, 9, 13, 128}, 512, 1, 1, 0, 0},
      {{1, 3, 3, 512}, 512, 3, 3, 1, 1}, {{4, 20, 19, 64}, 128, 3, 3, 1, 1}, {{3, 16, 16, 64}, 256, 1, 1, 0, 0},
      {{2, 6, 50, 64}, 64, 3, 3, 1, 1},  {{2, 11, 13, 64}, 64, 3, 3, 1, 1}, {{1, 5, 31, 128}, 64, 3, 3, 1, 1},
      {{1, 5, 56, 64}, 64, 3, 3, 1, 1},  {{1, 3, 62, 64}, 128, 3, 3, 1, 1},
  };
  for (DType dt : kLowTypes) {
    for (const Case& cs : cases) {
      DYNAMIC_SECTION(dtype_name(dt) << " x " << dstrain::shape_str(cs.x) << " K " << cs.K << " " << cs.R << "x"
                                     << cs.S) {
        SEEDED_RNG(rng);
        ops::Conv2dParams p;
        p.pad_h = cs.pad_h;
        p.pad_w = cs.pad_w;
        Tensor x = random_low(cs.x, dt, rng), w = random_low({cs.K, cs.R, cs.S, cs.x[3]}, dt, rng);
        const Shape ys = ops::conv2d_output_shape(cs.x, w.shape(), p);
        Tensor y_ref = poisoned(ys, Device::cpu(), dt), y = poisoned(ys, gpu(), dt);
        ops::conv2d_forward(c, x, w, y_ref, p);
        ops::conv2d_forward(g, x.to(gpu()), w.to(gpu()), y, p);
        require_close(g, y, y_ref, 8.0);

        Tensor dy = random_low(ys, dt, rng);
        Tensor dx_ref = poisoned(cs.x, Device::cpu(), dt), dx = poisoned(cs.x, gpu(), dt);
        ops::conv2d_backward_data(c, dy, w, dx_ref, p);
        ops::conv2d_backward_data(g, dy.to(gpu()), w.to(gpu()), dx, p);
        require_close(g, dx, dx_ref, 8.0);

        Tensor dw_ref = poisoned(w.shape(), Device::cpu(), dt), dw = poisoned(w.shape(), gpu(), dt);
        ops::conv2d_backward_filter(c, x, dy, dw_ref, p);
        ops::conv2d_backward_filter(g, x.to(gpu()), dy.to(gpu()), dw, p);
        require_close(g, dw, dw_ref, 8.0);
      }
    }
  }
}

// 1x1 convolutions are GEMMs: cuBLASLt's (its fastest algorithm for the shape) or cuDNN's, timed
// per shape (run with DSTRAIN_FORCE_CHOICE=0 and 1 by ctest to check each path). The shapes
// cover row counts that are no multiple of a tile, channel counts that fill a tile only in part,
// narrow and wide outputs, and channels that are no multiple of 8.
TEST_CASE("CUDA 1x1 convolution and conv + bias + ReLU in fp16/bf16 match the CPU reference",
          "[gpu][lowp][conv][pointwise]") {
  Context g = Context::cuda(0), c = Context::cpu();
  struct Case {
    Shape x;
    std::int64_t K;
  };
  const Case cases[] = {
      {{3, 7, 11, 8}, 8},       {{2, 9, 13, 64}, 256},  {{2, 9, 13, 256}, 64}, {{6, 80, 80, 72}, 136},
      {{1, 5, 5, 24}, 40},      {{2, 6, 7, 20}, 12},    {{2, 11, 9, 200}, 64},
  };
  for (DType dt : kLowTypes) {
    for (const Case& cs : cases) {
      DYNAMIC_SECTION(dtype_name(dt) << " x " << dstrain::shape_str(cs.x) << " K " << cs.K) {
        SEEDED_RNG(rng);
        const ops::Conv2dParams p;  // stride 1, no padding
        const std::int64_t C = cs.x[3];
        Tensor x = random_low(cs.x, dt, rng), w = random_low({cs.K, 1, 1, C}, dt, rng);
        Tensor bias = Tensor::from_vector({cs.K}, [&] {
          std::uniform_real_distribution<float> d(-2.0f, 2.0f);
          std::vector<float> v(static_cast<std::size_t>(cs.K));
          for (float& b : v) b = d(rng);
          return v;
        }());
        const Shape ys = ops::conv2d_output_shape(cs.x, w.shape(), p);
        const Tensor x_g = x.to(gpu()), w_g = w.to(gpu()), bias_g = bias.to(gpu());
        Tensor y_ref = poisoned(ys, Device::cpu(), dt), y = poisoned(ys, gpu(), dt);
        ops::conv2d_forward(c, x, w, y_ref, p);
        ops::conv2d_forward(g, x_g, w_g, y, p);
        require_close(g, y, y_ref, 8.0);

        Tensor z_ref = poisoned(ys, Device::cpu(), dt), z = poisoned(ys, gpu(), dt);
        ops::conv_bias_relu_forward(c, x, w, bias, z_ref, p);
        ops::conv_bias_relu_forward(g, x_g, w_g, bias_g, z, p);
        require_close(g, z, z_ref, 8.0);

        // The bias in the activations' dtype: cuBLASLt's epilogue reads it as it is.
        Tensor low_bias = Tensor::empty({cs.K}, dt, Device::cpu());
        dstrain::convert_host(bias.data(), DType::F32, low_bias.data(), dt, static_cast<std::size_t>(cs.K));
        const Tensor low_bias_g = low_bias.to(gpu());
        Tensor lz_ref = poisoned(ys, Device::cpu(), dt), lz = poisoned(ys, gpu(), dt);
        ops::conv_bias_relu_forward(c, x, w, low_bias, lz_ref, p);
        ops::conv_bias_relu_forward(g, x_g, w_g, low_bias_g, lz, p);
        require_close(g, lz, lz_ref, 8.0);
      }
    }
  }
}

TEST_CASE("CUDA batchnorm in fp16/bf16 matches the CPU reference", "[gpu][lowp][batchnorm]") {
  Context g = Context::cuda(0), c = Context::cpu();
  for (DType dt : kLowTypes) {
    DYNAMIC_SECTION(dtype_name(dt)) {
      SEEDED_RNG(rng);
      const Shape xs{8, 9, 7, 40};
      const std::int64_t C = xs[3];
      Tensor x = random_low(xs, dt, rng, -1.0f, 3.0f);
      Tensor gamma = random_low({C}, DType::F32, rng, 0.5f, 1.5f);
      Tensor beta = random_low({C}, DType::F32, rng);
      Tensor rm_c = random_low({C}, DType::F32, rng), rv_c = random_low({C}, DType::F32, rng, 0.5f, 2.0f);
      Tensor rm_g = rm_c.to(gpu()), rv_g = rv_c.to(gpu());
      Tensor sm_c = poisoned({C}, Device::cpu(), DType::F32), si_c = poisoned({C}, Device::cpu(), DType::F32);
      Tensor sm_g = poisoned({C}, gpu(), DType::F32), si_g = poisoned({C}, gpu(), DType::F32);
      Tensor y_c = poisoned(xs, Device::cpu(), dt), y_g = poisoned(xs, gpu(), dt);
      const Tensor gamma_g = gamma.to(gpu()), beta_g = beta.to(gpu()), x_g = x.to(gpu());
      ops::batchnorm_forward_train(c, x, gamma, beta, rm_c, rv_c, y_c, sm_c, si_c, {});
      ops::batchnorm_forward_train(g, x_g, gamma_g, beta_g, rm_g, rv_g, y_g, sm_g, si_g, {});
      require_close(g, y_g, y_c, 4.0);
      // fp32 statistics: only the summation order differs.
      const std::vector<std::pair<const Tensor*, const Tensor*>> stats{
          {&sm_g, &sm_c}, {&si_g, &si_c}, {&rm_g, &rm_c}, {&rv_g, &rv_c}};
      for (const auto& [dev, ref] : stats) {
        const auto a = dev->to_host_floats(), b = ref->to_host_floats();
        for (std::size_t i = 0; i < b.size(); ++i) CHECK(std::abs(a[i] - b[i]) <= 1e-5 + 1e-4 * std::abs(b[i]));
      }

      Tensor e_c = poisoned(xs, Device::cpu(), dt), e_g = poisoned(xs, gpu(), dt);
      ops::batchnorm_forward_eval(c, x, gamma, beta, rm_c, rv_c, e_c, {});
      ops::batchnorm_forward_eval(g, x_g, gamma_g, beta_g, rm_c.to(gpu()), rv_c.to(gpu()), e_g, {});
      require_close(g, e_g, e_c, 4.0);

      Tensor dy = random_low(xs, dt, rng);
      Tensor dx_c = poisoned(xs, Device::cpu(), dt), dx_g = poisoned(xs, gpu(), dt);
      Tensor dg_c = poisoned({C}, Device::cpu(), DType::F32), db_c = poisoned({C}, Device::cpu(), DType::F32);
      Tensor dg_g = poisoned({C}, gpu(), DType::F32), db_g = poisoned({C}, gpu(), DType::F32);
      ops::batchnorm_backward(c, dy, x, gamma, sm_c, si_c, dx_c, dg_c, db_c);
      ops::batchnorm_backward(g, dy.to(gpu()), x_g, gamma_g, sm_c.to(gpu()), si_c.to(gpu()), dx_g, dg_g, db_g);
      require_close(g, dx_g, dx_c, 8.0);
      const auto dgv = dg_g.to_host_floats(), dgr = dg_c.to_host_floats();
      const auto dbv = db_g.to_host_floats(), dbr = db_c.to_host_floats();
      for (std::size_t i = 0; i < dgr.size(); ++i) {
        CHECK(std::abs(dgv[i] - dgr[i]) <= 1e-3 + 1e-4 * std::abs(dgr[i]));
        CHECK(std::abs(dbv[i] - dbr[i]) <= 1e-3 + 1e-4 * std::abs(dbr[i]));
      }
    }
  }
}

TEST_CASE("CUDA relu, maxpool and global average pool in fp16/bf16 match the CPU", "[gpu][lowp][elementwise]") {
  Context g = Context::cuda(0), c = Context::cpu();
  for (DType dt : kLowTypes) {
    DYNAMIC_SECTION(dtype_name(dt)) {
      SEEDED_RNG(rng);
      const Shape xs{3, 11, 9, 20};
      Tensor x = random_low(xs, dt, rng), dy = random_low(xs, dt, rng);
      const Tensor x_g = x.to(gpu());

      Tensor r_c = poisoned(xs, Device::cpu(), dt), r_g = poisoned(xs, gpu(), dt);
      ops::relu_forward(c, x, r_c);
      ops::relu_forward(g, x_g, r_g);
      require_close(g, r_g, r_c, 0.0);  // exact
      Tensor rd_c = poisoned(xs, Device::cpu(), dt), rd_g = poisoned(xs, gpu(), dt);
      ops::relu_backward(c, dy, r_c, rd_c);
      ops::relu_backward(g, dy.to(gpu()), r_g, rd_g);
      require_close(g, rd_g, rd_c, 0.0);

      const Shape ps{xs[0], xs[1] / 2, xs[2] / 2, xs[3]};
      Tensor m_c = poisoned(ps, Device::cpu(), dt), m_g = poisoned(ps, gpu(), dt);
      ops::maxpool2x2_forward(c, x, m_c);
      ops::maxpool2x2_forward(g, x_g, m_g);
      require_close(g, m_g, m_c, 0.0);
      Tensor mdy = random_low(ps, dt, rng);
      Tensor md_c = poisoned(xs, Device::cpu(), dt), md_g = poisoned(xs, gpu(), dt);
      ops::maxpool2x2_backward(c, mdy, x, m_c, md_c);
      ops::maxpool2x2_backward(g, mdy.to(gpu()), x_g, m_g, md_g);
      require_close(g, md_g, md_c, 0.0);

      for (DType out : {dt, DType::F32}) {
        Tensor a_c = poisoned({xs[0], xs[3]}, Device::cpu(), out), a_g = poisoned({xs[0], xs[3]}, gpu(), out);
        ops::global_avgpool_forward(c, x, a_c);
        ops::global_avgpool_forward(g, x_g, a_g);
        // fp32 output: only the summation order differs.
        require_close(g, a_g, a_c, out == DType::F32 ? 64.0 : 2.0);
        Tensor ady = random_low({xs[0], xs[3]}, out, rng);
        Tensor ad_c = poisoned(xs, Device::cpu(), dt), ad_g = poisoned(xs, gpu(), dt);
        ops::global_avgpool_backward(c, ady, ad_c);
        ops::global_avgpool_backward(g, ady.to(gpu()), ad_g);
        require_close(g, ad_g, ad_c, 0.0);
      }
    }
  }
}

TEST_CASE("CUDA linear with fp16/bf16 operands matches the CPU reference", "[gpu][lowp][linear]") {
  Context g = Context::cuda(0), c = Context::cpu();
  for (DType dt : kLowTypes) {
    DYNAMIC_SECTION(dtype_name(dt)) {
      SEEDED_RNG(rng);
      const std::int64_t N = 64, I = 128, O = 10;
      Tensor x = random_low({N, I}, dt, rng), w = random_low({O, I}, dt, rng);
      Tensor b = random_low({O}, DType::F32, rng);
      const Tensor x_g = x.to(gpu()), w_g = w.to(gpu()), b_g = b.to(gpu());
      for (DType out : {DType::F32, dt}) {
        Tensor y_c = poisoned({N, O}, Device::cpu(), out), y_g = poisoned({N, O}, gpu(), out);
        ops::linear_forward(c, x, w, &b, y_c);
        ops::linear_forward(g, x_g, w_g, &b_g, y_g);
        // fp32 output: fp32 accumulation of exact products, order differs.
        require_close(g, y_g, y_c, out == DType::F32 ? 1024.0 : 4.0);
      }
      Tensor dy = random_low({N, O}, dt, rng);
      const Tensor dy_g = dy.to(gpu());
      Tensor dx_c = poisoned({N, I}, Device::cpu(), dt), dx_g = poisoned({N, I}, gpu(), dt);
      Tensor dw_c = poisoned({O, I}, Device::cpu(), DType::F32), dw_g = poisoned({O, I}, gpu(), DType::F32);
      Tensor db_c = poisoned({O}, Device::cpu(), DType::F32), db_g = poisoned({O}, gpu(), DType::F32);
      ops::linear_backward(c, dy, x, w, &dx_c, dw_c, &db_c);
      ops::linear_backward(g, dy_g, x_g, w_g, &dx_g, dw_g, &db_g);
      require_close(g, dx_g, dx_c, 4.0);
      require_close(g, dw_g, dw_c, 1024.0);
      require_close(g, db_g, db_c, 1024.0);
      Tensor dwl_c = poisoned({O, I}, Device::cpu(), dt), dwl_g = poisoned({O, I}, gpu(), dt);
      ops::linear_backward(c, dy, x, w, nullptr, dwl_c, nullptr);
      ops::linear_backward(g, dy_g, x_g, w_g, nullptr, dwl_g, nullptr);
      require_close(g, dwl_g, dwl_c, 4.0);
    }
  }
}

TEST_CASE("CUDA GradScaler::scale_gradient matches the CPU", "[gpu][lowp][amp]") {
  Context g = Context::cuda(0);
  SEEDED_RNG(rng);
  amp::GradScalerOptions o;
  o.init_scale = 4096.0f;
  amp::GradScaler scaler(gpu(), o);
  Tensor host = random_low({1000}, DType::F32, rng);
  Tensor dev = host.to(gpu());
  scaler.scale_gradient(g, dev);
  g.synchronize();
  const auto got = dev.to_host_floats(), src = host.to_host_floats();
  for (std::size_t i = 0; i < src.size(); ++i) REQUIRE(got[i] == src[i] * 4096.0f);
}

TEST_CASE("small_cnn under fp16/bf16 on the GPU tracks the CPU network", "[gpu][lowp][nn]") {
  for (const amp::Policy& policy : {amp::Policy::fp16(), amp::Policy::bf16()}) {
    DYNAMIC_SECTION(policy.name()) {
      SEEDED_RNG(rng);
      Context g = Context::cuda(0), c = Context::cpu();
      auto net_g = dstrain::models::small_cnn(gpu(), 10, 1, policy);
      auto net_c = dstrain::models::small_cnn(Device::cpu(), 10, 1, policy);
      dstrain::nn::init_parameters(*net_g, 5);
      dstrain::nn::init_parameters(*net_c, 5);
      Tensor x = random_low({16, 28, 28, 1}, DType::F32, rng, 0.0f, 1.0f);
      const Tensor& lg = net_g->forward(g, x.to(gpu()), true);
      const Tensor& lc = net_c->forward(c, x, true);
      REQUIRE(lg.dtype() == DType::F32);
      g.synchronize();
      const auto a = lg.to_host_floats(), b = lc.to_host_floats();
      const double tol = policy == amp::Policy::bf16() ? 0.1 : 0.02;
      for (std::size_t i = 0; i < b.size(); ++i) CHECK(std::abs(a[i] - b[i]) <= tol * (1.0 + std::abs(b[i])));
    }
  }
}

// ---- FP8 (amp::Policy::fp8_hybrid) ---------------------------------------------------------

namespace {
void set_fp8_scale(amp::Fp8Meta& meta, float scale) {
  std::vector<float> st = meta.state().to(Device::cpu()).to_host_floats();
  st[0] = scale;
  st[1] = 1.0f / scale;
  meta.state().copy_from(Tensor::from_vector(meta.state().shape(), st));
}
std::vector<unsigned char> bytes_of(const Tensor& t) {
  const Tensor h = t.to(Device::cpu());
  const auto* p = static_cast<const unsigned char*>(h.data());
  return std::vector<unsigned char>(p, p + h.nbytes());
}
}  // namespace

TEST_CASE("CUDA cast_to_fp8_padded matches the CPU bit for bit", "[gpu][lowp][fp8]") {
  Context g = Context::cuda(0), c = Context::cpu();
  for (DType src_dt : {DType::F32, DType::BF16}) {
    for (DType fmt : {DType::F8E4M3, DType::F8E5M2}) {
      for (amp::Fp8Layout layout : {amp::Fp8Layout::AsIs, amp::Fp8Layout::Transposed}) {
        DYNAMIC_SECTION(dtype_name(src_dt) << " -> " << dtype_name(fmt)
                                           << (layout == amp::Fp8Layout::Transposed ? " transposed" : "")) {
          SEEDED_RNG(rng);
          const std::int64_t R = 85, C = 120, Rp = 96, Cp = 128;
          const Tensor src = random_low({R, C}, src_dt, rng, -4.0f, 4.0f);
          amp::Fp8MetaOptions o;
          o.format = fmt;
          amp::Fp8Meta meta_c(Device::cpu(), o), meta_g(gpu(), o);
          // Scale chosen so that the largest values saturate.
          const float scale = amp::fp8_max(fmt) / 3.0f;
          set_fp8_scale(meta_c, scale);
          set_fp8_scale(meta_g, scale);
          const Shape shape = layout == amp::Fp8Layout::Transposed ? Shape{Cp, Rp} : Shape{Rp, Cp};
          Tensor dst_c = poisoned(shape, Device::cpu(), fmt), dst_g = poisoned(shape, gpu(), fmt);
          amp::cast_to_fp8_padded(c, src, dst_c, meta_c, layout);
          amp::cast_to_fp8_padded(g, src.to(gpu()), dst_g, meta_g, layout);
          g.synchronize();
          const auto bc = bytes_of(dst_c), bg = bytes_of(dst_g);
          std::size_t mismatches = 0;
          for (std::size_t i = 0; i < bc.size(); ++i) mismatches += bc[i] != bg[i];
          CHECK(mismatches == 0);
          const float amax_c = meta_c.state().to_host_floats()[2];
          const float amax_g = meta_g.state().to(Device::cpu()).to_host_floats()[2];
          CHECK(amax_c > 0.0f);
          CHECK(amax_g == amax_c);
        }
      }
    }
  }
}

TEST_CASE("CUDA crop_padded and column_sums match the CPU bit for bit", "[gpu][lowp][fp8]") {
  Context g = Context::cuda(0), c = Context::cpu();
  SEEDED_RNG(rng);
  const Tensor src = random_low({96, 16}, DType::F32, rng), bias = random_low({10}, DType::F32, rng);
  for (DType out : {DType::F32, DType::BF16}) {
    Tensor y_c = poisoned({85, 10}, Device::cpu(), out), y_g = poisoned({85, 10}, gpu(), out);
    amp::crop_padded(c, src, y_c, &bias);
    const Tensor bias_g = bias.to(gpu());
    amp::crop_padded(g, src.to(gpu()), y_g, &bias_g);
    g.synchronize();
    CHECK(bytes_of(y_c) == bytes_of(y_g));
  }
  Tensor s_c = poisoned({16}, Device::cpu(), DType::F32), s_g = poisoned({16}, gpu(), DType::F32);
  amp::column_sums(c, src, s_c);
  amp::column_sums(g, src.to(gpu()), s_g);
  g.synchronize();
  CHECK(bytes_of(s_c) == bytes_of(s_g));
}

TEST_CASE("CUDA FP8 Linear matches the CPU FP8 Linear on the same data and scales", "[gpu][lowp][fp8][nn]") {
  Context g = Context::cuda(0), c = Context::cpu();
  SEEDED_RNG(rng);
  const int in = 128, out = 10;
  const std::int64_t n = 85;  // a per-rank shard that is not a multiple of 16
  dstrain::nn::Linear lc(Device::cpu(), in, out, true, amp::Policy::fp8_hybrid());
  dstrain::nn::Linear lg(gpu(), in, out, true, amp::Policy::fp8_hybrid());
  dstrain::nn::init_parameters(lc, 9);
  dstrain::nn::init_parameters(lg, 9);
  const Tensor x = random_low({n, in}, DType::BF16, rng, 0.0f, 3.0f);  // bf16 activations
  const Tensor dy = random_low({n, out}, DType::F32, rng, -0.004f, 0.004f);
  const Tensor x_g = x.to(gpu()), dy_g = dy.to(gpu());
  // Scales from one CPU step, given to both layers.
  lc.forward(c, x, true);
  lc.backward(c, dy);
  amp::update_fp8_scales(c, lc.fp8_metas(), nullptr);
  for (std::size_t i = 0; i < 3; ++i) lg.fp8_metas()[i]->state().copy_from(lc.fp8_metas()[i]->state());
  lg.weight().grad.fill_bytes(0xFF);
  lg.bias().grad.fill_bytes(0xFF);

  const Tensor& y_c = lc.forward(c, x, true);
  const Tensor& y_g = lg.forward(g, x_g, true);
  REQUIRE(y_g.dtype() == DType::F32);
  // Hopper's FP8 tensor cores keep partial sums to about 2^-11 of their magnitude (fast
  // accumulation off), against the CPU's double: 4096 fp32 ulps of the largest value.
  require_close(g, y_g, y_c, 4096.0);
  const Tensor& dx_c = lc.backward(c, dy);
  const Tensor& dx_g = lg.backward(g, dy_g);
  REQUIRE(dx_g.dtype() == DType::BF16);
  require_close(g, dx_g, dx_c, 4.0);
  require_close(g, lg.weight().grad, lc.weight().grad, 4096.0);
  require_close(g, lg.bias().grad, lc.bias().grad, 0.0);  // the same fp32 column sums
  // Each cast raised the same amax on both sides.
  g.synchronize();
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("fp8 meta " << i);
    CHECK(lg.fp8_metas()[i]->state().to(Device::cpu()).to_host_floats() ==
          lc.fp8_metas()[i]->state().to_host_floats());
  }
}
