// CPU ops on random data: conv2d against a direct double-precision reference, and every op's
// backward against central finite differences of L = sum(y * r) for a fixed random r.
// Unaffected outputs round identically in both evaluations of L (summed in double), so the
// differences are clean and the tolerances can be tight enough to catch a transposed filter,
// a dropped padding term or a wrong normalisation.
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dstrain/context.h"
#include "dstrain/error.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

#include "host_tensors.h"

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Shape;
using dstrain::Tensor;
namespace ops = dstrain::ops;

namespace {

Tensor poisoned(const Shape& shape) { return dstrain_test::poisoned_host(shape, DType::F32); }

Tensor random_tensor(const Shape& shape, std::mt19937& rng, float lo = -1.0f, float hi = 1.0f) {
  return dstrain_test::uniform_host(shape, rng, lo, hi);
}

std::vector<double> as_double(const Tensor& t) {
  const std::vector<float> f = t.to_host_floats();
  return std::vector<double>(f.begin(), f.end());
}

// sum(y * r) in double.
double weighted_sum(const Tensor& y, const Tensor& r) {
  const float* a = y.data_as<float>();
  const float* b = r.data_as<float>();
  double s = 0.0;
  for (std::int64_t i = 0; i < y.numel(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// Central differences of loss() with respect to each element of `param` (perturbed in place and
// restored). The step actually taken is measured in float, so representation error cancels.
std::vector<double> fd_grad(Tensor& param, const std::function<double()>& loss, float eps) {
  float* p = param.data_as<float>();
  std::vector<double> g(static_cast<std::size_t>(param.numel()));
  for (std::int64_t i = 0; i < param.numel(); ++i) {
    const float v = p[i];
    const float up = v + eps, down = v - eps;
    p[i] = up;
    const double lp = loss();
    p[i] = down;
    const double lm = loss();
    p[i] = v;
    g[i] = (lp - lm) / (static_cast<double>(up) - static_cast<double>(down));
  }
  return g;
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
    const double ratio = std::isfinite(err) ? err / tol : INFINITY;
    if (!(ratio <= 1.0)) ++bad;
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

void require_close(const Tensor& got, const std::vector<double>& want, double atol, double rtol,
                   const std::string& what) {
  require_close(as_double(got), want, atol, rtol, what);
}

// ------------------------------------------------------------------------ conv reference (double)

struct ConvCase {
  std::int64_t N, H, W, C, K, R, S;
  int sh, sw, ph, pw;
  std::string name() const {
    std::ostringstream o;
    o << "x[" << N << "," << H << "," << W << "," << C << "] w[" << K << "," << R << "," << S << "," << C
      << "] stride " << sh << "x" << sw << " pad " << ph << "x" << pw;
    return o.str();
  }
  ops::Conv2dParams params() const {
    ops::Conv2dParams p;
    p.stride_h = sh;
    p.stride_w = sw;
    p.pad_h = ph;
    p.pad_w = pw;
    return p;
  }
  std::int64_t Ho() const { return (H + 2 * ph - R) / sh + 1; }
  std::int64_t Wo() const { return (W + 2 * pw - S) / sw + 1; }
};

// Calls f(n, oh, ow, k, r, s, c, x index, w index, y index) for every in-range tap.
template <class F>
void for_each_tap(const ConvCase& g, F&& f) {
  const std::int64_t Ho = g.Ho(), Wo = g.Wo();
  for (std::int64_t n = 0; n < g.N; ++n)
    for (std::int64_t oh = 0; oh < Ho; ++oh)
      for (std::int64_t ow = 0; ow < Wo; ++ow)
        for (std::int64_t k = 0; k < g.K; ++k)
          for (std::int64_t r = 0; r < g.R; ++r) {
            const std::int64_t ih = oh * g.sh - g.ph + r;
            if (ih < 0 || ih >= g.H) continue;
            for (std::int64_t s = 0; s < g.S; ++s) {
              const std::int64_t iw = ow * g.sw - g.pw + s;
              if (iw < 0 || iw >= g.W) continue;
              for (std::int64_t c = 0; c < g.C; ++c)
                f(((n * g.H + ih) * g.W + iw) * g.C + c, ((k * g.R + r) * g.S + s) * g.C + c,
                  ((n * Ho + oh) * Wo + ow) * g.K + k);
            }
          }
}

const std::vector<ConvCase>& small_conv_cases() {
  static const std::vector<ConvCase> cases = {
      {2, 5, 7, 3, 4, 3, 3, 1, 1, 1, 1},   // 3x3 "same", non-square
      {1, 6, 9, 5, 3, 3, 3, 2, 2, 1, 1},   // stride 2, N = 1
      {2, 4, 5, 10, 6, 1, 1, 1, 1, 0, 0},  // 1x1 stride 1: no im2col
      {2, 5, 6, 3, 4, 1, 1, 2, 2, 0, 0},   // 1x1 stride 2: im2col path
      {1, 7, 6, 3, 2, 5, 5, 1, 1, 2, 2},   // 5x5 "same"
      {2, 9, 8, 2, 3, 5, 5, 2, 2, 0, 0},   // 5x5 stride 2, trailing rows/columns unused
      {1, 5, 8, 9, 3, 3, 2, 1, 2, 0, 1},   // 3x2 filter, mixed stride and padding, C = 9
      {1, 3, 4, 2, 2, 3, 3, 1, 1, 3, 2},   // padding >= filter: fully padded windows
      {3, 4, 4, 1, 5, 3, 3, 1, 1, 1, 1},   // C = 1 (the first layer of the CNN)
  };
  return cases;
}

}  // namespace

// ------------------------------------------------------------------------------------------ conv

TEST_CASE("conv2d matches a direct double-precision reference", "[ops][conv]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(1234);
  std::vector<ConvCase> cases = small_conv_cases();
  // Large enough that the column matrix is processed in several blocks.
  cases.push_back({2, 13, 17, 64, 8, 3, 3, 1, 1, 1, 1});
  cases.push_back({1, 20, 30, 40, 5, 3, 3, 2, 1, 0, 1});
  cases.push_back({2, 14, 14, 32, 16, 1, 1, 1, 1, 0, 0});
  for (const ConvCase& g : cases) {
    SECTION(g.name()) {
      const Shape ys = {g.N, g.Ho(), g.Wo(), g.K};
      Tensor x = random_tensor({g.N, g.H, g.W, g.C}, rng);
      Tensor w = random_tensor({g.K, g.R, g.S, g.C}, rng);
      Tensor dy = random_tensor(ys, rng);
      REQUIRE(ops::conv2d_output_shape(x.shape(), w.shape(), g.params()) == ys);

      const std::vector<double> xd = as_double(x), wd = as_double(w), dyd = as_double(dy);
      std::vector<double> y_ref(dstrain::shape_numel(ys), 0.0), dx_ref(xd.size(), 0.0), dw_ref(wd.size(), 0.0);
      std::vector<double> y_mag(y_ref.size(), 0.0), dx_mag(xd.size(), 0.0), dw_mag(wd.size(), 0.0);
      for_each_tap(g, [&](std::int64_t xi, std::int64_t wi, std::int64_t yi) {
        y_ref[yi] += xd[xi] * wd[wi];
        dx_ref[xi] += dyd[yi] * wd[wi];
        dw_ref[wi] += dyd[yi] * xd[xi];
        y_mag[yi] += std::abs(xd[xi] * wd[wi]);
        dx_mag[xi] += std::abs(dyd[yi] * wd[wi]);
        dw_mag[wi] += std::abs(dyd[yi] * xd[xi]);
      });
      // fp32 sums: the error scales with the sum of magnitudes of the terms.
      auto check = [](const Tensor& got, const std::vector<double>& want, const std::vector<double>& mag,
                      const std::string& what) {
        const std::vector<double> g2 = as_double(got);
        std::size_t bad = 0, worst = 0;
        double worst_ratio = 0;
        for (std::size_t i = 0; i < want.size(); ++i) {
          const double tol = 1e-6 + 5e-6 * mag[i];
          const double ratio = std::abs(g2[i] - want[i]) / tol;
          if (!(ratio <= 1.0)) ++bad;
          if (!(ratio <= worst_ratio)) {
            worst_ratio = ratio;
            worst = i;
          }
        }
        INFO(what << ": " << bad << " bad; worst " << worst << " got " << g2[worst] << " want " << want[worst]);
        CHECK(bad == 0);
      };

      Tensor y = poisoned(ys);
      ops::conv2d_forward(ctx, x, w, y, g.params());
      check(y, y_ref, y_mag, "forward");
      Tensor dx = poisoned(x.shape());
      ops::conv2d_backward_data(ctx, dy, w, dx, g.params());
      check(dx, dx_ref, dx_mag, "backward data");
      Tensor dw = poisoned(w.shape());
      ops::conv2d_backward_filter(ctx, x, dy, dw, g.params());
      check(dw, dw_ref, dw_mag, "backward filter");
    }
  }
}

TEST_CASE("conv2d backward matches finite differences", "[ops][conv][grad]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(42);
  for (const ConvCase& g : small_conv_cases()) {
    SECTION(g.name()) {
      const Shape ys = {g.N, g.Ho(), g.Wo(), g.K};
      Tensor x = random_tensor({g.N, g.H, g.W, g.C}, rng);
      Tensor w = random_tensor({g.K, g.R, g.S, g.C}, rng);
      Tensor r = random_tensor(ys, rng);
      Tensor y = poisoned(ys);
      auto loss = [&] {
        ops::conv2d_forward(ctx, x, w, y, g.params());
        return weighted_sum(y, r);
      };
      Tensor dx = poisoned(x.shape()), dw = poisoned(w.shape());
      ops::conv2d_backward_data(ctx, r, w, dx, g.params());
      ops::conv2d_backward_filter(ctx, x, r, dw, g.params());
      // Linear in x and in w: the central difference is exact up to rounding.
      require_close(dx, fd_grad(x, loss, 0.05f), 2e-4, 1e-3, "dx");
      require_close(dw, fd_grad(w, loss, 0.05f), 2e-4, 1e-3, "dw");
    }
  }
}

// ------------------------------------------------------------------------------------ batchnorm

TEST_CASE("batchnorm backward matches finite differences", "[ops][batchnorm][grad]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(7);
  const std::vector<Shape> shapes = {{2, 3, 5, 7}, {1, 4, 3, 9}, {6, 5}, {3, 2, 2, 16}};
  for (const Shape& xs : shapes) {
    SECTION(dstrain::shape_str(xs)) {
      const std::int64_t C = xs.back();
      // A mean away from zero and unequal spreads per channel.
      Tensor x = random_tensor(xs, rng, -1.0f, 3.0f);
      Tensor gamma = random_tensor({C}, rng, 0.5f, 2.0f);
      Tensor beta = random_tensor({C}, rng);
      Tensor r = random_tensor(xs, rng);
      Tensor rm = Tensor::zeros({C}, DType::F32, Device::cpu());
      Tensor rv = Tensor::zeros({C}, DType::F32, Device::cpu());
      Tensor y = poisoned(xs), sm = poisoned({C}), si = poisoned({C});
      ops::BatchNormParams p;
      auto loss = [&] {
        ops::batchnorm_forward_train(ctx, x, gamma, beta, rm, rv, y, sm, si, p);
        return weighted_sum(y, r);
      };
      loss();
      // Saved statistics against a double computation.
      {
        const std::vector<double> xd = as_double(x);
        const std::int64_t rows = x.numel() / C;
        std::vector<double> mean(C, 0.0), var(C, 0.0);
        for (std::int64_t i = 0; i < rows; ++i)
          for (std::int64_t c = 0; c < C; ++c) mean[c] += xd[i * C + c] / rows;
        for (std::int64_t i = 0; i < rows; ++i)
          for (std::int64_t c = 0; c < C; ++c) var[c] += std::pow(xd[i * C + c] - mean[c], 2) / rows;
        std::vector<double> invstd(C);
        for (std::int64_t c = 0; c < C; ++c) invstd[c] = 1.0 / std::sqrt(var[c] + p.eps);
        require_close(sm, mean, 1e-6, 1e-6, "save_mean");
        require_close(si, invstd, 1e-6, 1e-6, "save_invstd");
      }
      Tensor dx = poisoned(xs), dg = poisoned({C}), db = poisoned({C});
      ops::batchnorm_backward(ctx, r, x, gamma, sm, si, dx, dg, db);
      require_close(dx, fd_grad(x, loss, 1e-2f), 1e-3, 1e-2, "dx");
      require_close(dg, fd_grad(gamma, loss, 1e-2f), 1e-3, 1e-3, "dgamma");
      require_close(db, fd_grad(beta, loss, 1e-2f), 1e-3, 1e-3, "dbeta");
    }
  }
}

TEST_CASE("batchnorm keeps precision when the mean is large", "[ops][batchnorm]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(11);
  const Shape xs = {4, 4, 4, 3};
  Tensor x = random_tensor(xs, rng, 999.0f, 1001.0f);
  Tensor gamma = Tensor::from_vector({3}, {1, 1, 1});
  Tensor beta = Tensor::from_vector({3}, {0, 0, 0});
  Tensor rm = Tensor::zeros({3}, DType::F32, Device::cpu());
  Tensor rv = Tensor::zeros({3}, DType::F32, Device::cpu());
  Tensor y = poisoned(xs), sm = poisoned({3}), si = poisoned({3});
  ops::batchnorm_forward_train(ctx, x, gamma, beta, rm, rv, y, sm, si, {});
  const std::vector<double> yd = as_double(y);
  // Per channel: mean 0 and biased variance 1 (up to eps).
  for (int c = 0; c < 3; ++c) {
    double m = 0, v = 0;
    for (std::int64_t i = 0; i < 64; ++i) m += yd[i * 3 + c] / 64;
    for (std::int64_t i = 0; i < 64; ++i) v += (yd[i * 3 + c] - m) * (yd[i * 3 + c] - m) / 64;
    CHECK(std::abs(m) < 1e-4);
    CHECK(std::abs(v - 1.0) < 1e-3);
  }
}

// ------------------------------------------------------------------------------- relu, pooling

TEST_CASE("relu backward matches finite differences", "[ops][relu][grad]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(3);
  const Shape xs = {2, 3, 5, 7};
  Tensor x = random_tensor(xs, rng);
  // Keep away from the kink.
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    float& v = x.data_as<float>()[i];
    if (std::abs(v) < 0.1f) v = v < 0 ? v - 0.1f : v + 0.1f;
  }
  Tensor r = random_tensor(xs, rng);
  Tensor y = poisoned(xs);
  auto loss = [&] {
    ops::relu_forward(ctx, x, y);
    return weighted_sum(y, r);
  };
  loss();
  Tensor dx = poisoned(xs);
  ops::relu_backward(ctx, r, y, dx);
  require_close(dx, fd_grad(x, loss, 1e-2f), 1e-4, 1e-3, "dx");
}

TEST_CASE("maxpool2x2 backward matches finite differences", "[ops][maxpool][grad]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(5);
  for (const Shape& xs : std::vector<Shape>{{2, 6, 8, 3}, {1, 5, 7, 9}, {3, 3, 2, 1}}) {
    SECTION(dstrain::shape_str(xs)) {
      // Distinct values 0.05 apart in random order: a step of 0.01 never changes a maximum.
      const std::int64_t n = dstrain::shape_numel(xs);
      std::vector<float> v(static_cast<std::size_t>(n));
      for (std::int64_t i = 0; i < n; ++i) v[i] = 0.05f * static_cast<float>(i - n / 2);
      std::shuffle(v.begin(), v.end(), rng);
      Tensor x = Tensor::from_vector(xs, v);
      const Shape ys = {xs[0], xs[1] / 2, xs[2] / 2, xs[3]};
      Tensor r = random_tensor(ys, rng);
      Tensor y = poisoned(ys);
      auto loss = [&] {
        ops::maxpool2x2_forward(ctx, x, y);
        return weighted_sum(y, r);
      };
      loss();
      Tensor dx = poisoned(xs);
      ops::maxpool2x2_backward(ctx, r, x, y, dx);
      require_close(dx, fd_grad(x, loss, 1e-2f), 1e-4, 1e-3, "dx");
    }
  }
}

TEST_CASE("global avgpool backward matches finite differences", "[ops][avgpool][grad]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(9);
  for (const Shape& xs : std::vector<Shape>{{2, 3, 5, 7}, {1, 7, 7, 12}}) {
    SECTION(dstrain::shape_str(xs)) {
      Tensor x = random_tensor(xs, rng);
      const Shape ys = {xs[0], xs[3]};
      Tensor r = random_tensor(ys, rng);
      Tensor y = poisoned(ys);
      auto loss = [&] {
        ops::global_avgpool_forward(ctx, x, y);
        return weighted_sum(y, r);
      };
      Tensor dx = poisoned(xs);
      ops::global_avgpool_backward(ctx, r, dx);
      require_close(dx, fd_grad(x, loss, 0.05f), 1e-5, 1e-3, "dx");
    }
  }
}

// --------------------------------------------------------------------------------------- linear

TEST_CASE("linear backward matches finite differences", "[ops][linear][grad]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(13);
  struct Dims { std::int64_t N, I, O; };
  for (const Dims d : {Dims{4, 7, 5}, Dims{1, 9, 3}, Dims{6, 1, 10}}) {
    SECTION(std::to_string(d.N) + "x" + std::to_string(d.I) + " -> " + std::to_string(d.O)) {
      Tensor x = random_tensor({d.N, d.I}, rng);
      Tensor w = random_tensor({d.O, d.I}, rng);
      Tensor b = random_tensor({d.O}, rng);
      Tensor r = random_tensor({d.N, d.O}, rng);
      Tensor y = poisoned({d.N, d.O});
      auto loss = [&] {
        ops::linear_forward(ctx, x, w, &b, y);
        return weighted_sum(y, r);
      };
      Tensor dx = poisoned(x.shape()), dw = poisoned(w.shape()), db = poisoned(b.shape());
      ops::linear_backward(ctx, r, x, w, &dx, dw, &db);
      require_close(dx, fd_grad(x, loss, 0.05f), 1e-4, 1e-3, "dx");
      require_close(dw, fd_grad(w, loss, 0.05f), 1e-4, 1e-3, "dw");
      require_close(db, fd_grad(b, loss, 0.05f), 1e-4, 1e-3, "db");
    }
  }
}

// -------------------------------------------------------------------------------- cross-entropy

TEST_CASE("softmax cross-entropy gradient matches finite differences", "[ops][xent][grad]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(17);
  const std::int64_t N = 5, K = 7;
  Tensor logits = random_tensor({N, K}, rng, -3.0f, 3.0f);
  Tensor labels = Tensor::empty({N}, DType::I32, Device::cpu());
  for (std::int64_t i = 0; i < N; ++i) labels.data_as<std::int32_t>()[i] = static_cast<std::int32_t>((3 * i + 1) % K);
  Tensor loss_t = poisoned({1}), correct = poisoned({1});
  auto loss = [&] {
    ops::softmax_cross_entropy(ctx, logits, labels, nullptr, 1.0f, loss_t, correct);
    return static_cast<double>(loss_t.data_as<float>()[0]);
  };
  Tensor dl = poisoned({N, K});
  ops::softmax_cross_entropy(ctx, logits, labels, &dl, 1.0f, loss_t, correct);
  const std::vector<double> fd = fd_grad(logits, loss, 1e-2f);
  require_close(dl, fd, 5e-4, 1e-2, "dlogits");
  // grad_scale multiplies the gradient only.
  Tensor dl_scaled = poisoned({N, K});
  const float loss_before = static_cast<float>(loss());
  ops::softmax_cross_entropy(ctx, logits, labels, &dl_scaled, 0.125f, loss_t, correct);
  CHECK(loss_t.data_as<float>()[0] == loss_before);
  std::vector<double> want = as_double(dl);
  for (double& v : want) v *= 0.125;
  require_close(dl_scaled, want, 0, 1e-6, "scaled dlogits");
  // Rows of the gradient sum to zero.
  for (std::int64_t i = 0; i < N; ++i) {
    double s = 0;
    for (std::int64_t k = 0; k < K; ++k) s += dl.data_as<float>()[i * K + k];
    CHECK(std::abs(s) < 1e-6);
  }
}

// ------------------------------------------------------------------------------------ benchmark

namespace {
double median_ms(const std::function<void()>& f, int reps) {
  f();  // warm-up (and scratch allocation)
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto a = std::chrono::steady_clock::now();
    f();
    const auto b = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double, std::milli>(b - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
}  // namespace

// Hidden; run with: dstrain_cpu_tests "[bench]"
TEST_CASE("conv2d timing on the training CNN's layers (batch 64)", "[.bench]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(1);
  struct Layer { std::int64_t HW, C, K; };
  const std::vector<Layer> layers = {{28, 1, 32}, {28, 32, 32}, {14, 32, 64}, {14, 64, 64}, {7, 64, 128}, {7, 128, 128}};
  const std::int64_t N = 64;
  ops::Conv2dParams p;
  p.pad_h = p.pad_w = 1;
  double total = 0;
  std::printf("%-22s %9s %9s %9s %9s %8s\n", "layer", "fwd(ms)", "bwd_d(ms)", "bwd_f(ms)", "sum(ms)", "GFLOP/s");
  for (const Layer& l : layers) {
    Tensor x = random_tensor({N, l.HW, l.HW, l.C}, rng);
    Tensor w = random_tensor({l.K, 3, 3, l.C}, rng);
    Tensor y = poisoned({N, l.HW, l.HW, l.K});
    Tensor dx = poisoned(x.shape()), dw = poisoned(w.shape());
    const double f = median_ms([&] { ops::conv2d_forward(ctx, x, w, y, p); }, 5);
    const double bd = median_ms([&] { ops::conv2d_backward_data(ctx, y, w, dx, p); }, 5);
    const double bf = median_ms([&] { ops::conv2d_backward_filter(ctx, x, y, dw, p); }, 5);
    const double flop = 2.0 * N * l.HW * l.HW * l.K * 9 * l.C;
    std::printf("%3lldx%-3lld %4lld->%-4lld 3x3   %9.2f %9.2f %9.2f %9.2f %8.1f\n", (long long)l.HW, (long long)l.HW,
                (long long)l.C, (long long)l.K, f, bd, bf, f + bd + bf, 3 * flop / ((f + bd + bf) * 1e6));
    total += f + bd + bf;
  }
  std::printf("all conv layers, forward + backward: %.1f ms\n", total);
  SUCCEED();
}
