// Every CUDA op against the CPU reference (dstrain::Context::cpu()) on fresh random data.
// Each case prints its seed on failure; set DSTRAIN_TEST_SEED to replay one. Device outputs are
// poisoned first (0xFF bytes: NaN in fp32), so an element an op forgets to write fails; for
// conversions, whose expected values include NaN, each case runs under two different poisons.
// Tolerances have the form atol + rtol * |ref|, sized to how many fp32 terms each value sums.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dstrain/context.h"
#include "dstrain/device.h"
#include "dstrain/dtype.h"
#include "dstrain/error.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

#include "error_code_of.h"
#include "gpu/seeded_rng.h"

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Shape;
using dstrain::Tensor;
namespace ops = dstrain::ops;
using dstrain_test::error_code_of;

namespace {

Device gpu() { return Device::cuda(0); }

std::vector<float> uniform(std::int64_t n, std::mt19937& g, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = d(g);
  return v;
}

Tensor random_host(const Shape& s, std::mt19937& g, float lo = -1.0f, float hi = 1.0f) {
  return Tensor::from_vector(s, uniform(dstrain::shape_numel(s), g, lo, hi));
}

// Pairwise distinct values in random order: max pooling then has no ties anywhere.
Tensor distinct_host(const Shape& s, std::mt19937& g) {
  const std::int64_t n = dstrain::shape_numel(s);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = static_cast<float>(i - n / 2) * 1e-3f;
  std::shuffle(v.begin(), v.end(), g);
  return Tensor::from_vector(s, v);
}

Tensor poisoned(const Shape& s, Device d, DType dt = DType::F32, unsigned char byte = 0xFF) {
  Tensor t = Tensor::empty(s, dt, d);
  t.fill_bytes(byte);
  return t;
}
Tensor gpu_poisoned(const Shape& s, DType dt = DType::F32, unsigned char byte = 0xFF) {
  return poisoned(s, gpu(), dt, byte);
}
Tensor cpu_poisoned(const Shape& s, DType dt = DType::F32) { return poisoned(s, Device::cpu(), dt); }

// Host values of a device tensor once the context's queued work is done.
std::vector<float> fetch(Context& ctx, const Tensor& t) {
  ctx.synchronize();
  return t.to_host_floats();
}

std::vector<std::uint8_t> fetch_bytes(Context& ctx, const Tensor& t) {
  ctx.synchronize();
  Tensor h = t.to(Device::cpu());
  const auto* p = static_cast<const std::uint8_t*>(h.data());
  return std::vector<std::uint8_t>(p, p + h.nbytes());
}

struct Tol {
  double atol, rtol;
};

// A tolerance for values that each sum `terms` products of O(1) fp32 numbers in some order.
Tol sum_tol(std::int64_t terms, double rtol = 1e-4) { return {1e-5 + 2e-7 * static_cast<double>(terms), rtol}; }

void require_close(const std::vector<float>& got, const std::vector<float>& want, Tol tol, const std::string& what) {
  REQUIRE(got.size() == want.size());
  std::size_t bad = 0;
  double worst = 0.0;
  std::ostringstream first;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i];
    const bool ok = (g == w) || (std::isnan(g) && std::isnan(w)) ||
                    (std::abs(g - w) <= tol.atol + tol.rtol * std::abs(w));
    if (!ok) {
      if (bad < 8) first << "  [" << i << "] got " << got[i] << ", want " << want[i] << "\n";
      if (!std::isnan(g)) worst = std::max(worst, std::abs(g - w));
      ++bad;
    }
  }
  INFO(what << ": " << bad << " of " << got.size() << " elements outside " << tol.atol << " + " << tol.rtol
            << " * |ref| (largest finite error " << worst << ")\n"
            << first.str());
  CHECK(bad == 0);
}

void require_close(Context& g, const Tensor& device_out, const Tensor& cpu_ref, Tol tol, const std::string& what) {
  require_close(fetch(g, device_out), cpu_ref.to_host_floats(), tol, what);
}

Tensor labels_host(std::int64_t n, std::int64_t k, std::mt19937& g) {
  Tensor t = Tensor::empty({n}, DType::I32, Device::cpu());
  std::uniform_int_distribution<std::int32_t> d(0, static_cast<std::int32_t>(k - 1));
  auto* p = t.data_as<std::int32_t>();
  for (std::int64_t i = 0; i < n; ++i) p[i] = d(g);
  return t;
}

std::string shape_name(const Shape& s) { return dstrain::shape_str(s); }

// A device fp32 view `offset` floats into a larger poisoned buffer (kept alive in `owners`):
// offset 1 gives a pointer that is 4- but not 16-byte aligned, as views into flat buffers are.
Tensor gpu_view(const Shape& s, std::vector<Tensor>& owners, int offset) {
  Tensor buf = gpu_poisoned({dstrain::shape_numel(s) + offset});
  Tensor view = Tensor::wrap(buf.data_as<float>() + offset, s, DType::F32, gpu());
  owners.push_back(std::move(buf));
  return view;
}
Tensor gpu_view_of(const Tensor& host, std::vector<Tensor>& owners, int offset) {
  Tensor v = gpu_view(host.shape(), owners, offset);
  v.copy_from(host);
  return v;
}

}  // namespace

// ------------------------------------------------------------------------------------- runtime

TEST_CASE("cuda runtime: contexts, streams, events and copies", "[gpu][runtime]") {
  SEEDED_RNG(rng);
  REQUIRE(dstrain::cuda_available());
  const std::string description = dstrain::cuda_description(0);
  INFO(description);
  CHECK(description.find("sm_") != std::string::npos);
  CHECK(description.find("cuDNN 9.") != std::string::npos);
  Context g = Context::cuda(0);
  REQUIRE(g.is_cuda());
  REQUIRE(g.stream() != nullptr);

  Tensor h = random_host({1000, 3}, rng);
  Tensor d = gpu_poisoned(h.shape());
  ops::copy(g, h, d);  // host -> device on the stream
  Tensor back = cpu_poisoned(h.shape());
  ops::copy(g, d, back);  // device -> host on the stream
  g.synchronize();
  require_close(back.to_host_floats(), h.to_host_floats(), {0, 0}, "ops::copy round trip");

  Tensor d2 = gpu_poisoned(h.shape());
  ops::copy(g, d, d2);  // device -> device
  require_close(g, d2, h, {0, 0}, "device to device copy");

  dstrain::Event start = dstrain::Event::create(0), stop = dstrain::Event::create(0);
  start.record(g.stream());
  ops::relu_forward(g, d, d2);
  stop.record(g.stream());
  stop.synchronize();
  CHECK(stop.elapsed_ms(start) >= 0.0f);

  dstrain::Stream other = dstrain::Stream::create(0);
  dstrain::Event done = dstrain::Event::create(0, /*timing=*/false);
  done.record(g.stream());
  done.wait(other.handle());
  other.synchronize();
  dstrain::Stream moved = std::move(other);
  CHECK(other.handle() == nullptr);
  CHECK(moved.handle() != nullptr);
  { dstrain::DeviceGuard guard(0); }
}

TEST_CASE("CudaGraph replays captured ops on new data; a failed capture leaves the stream usable",
          "[gpu][runtime]") {
  SEEDED_RNG(rng);
  Context g = Context::cuda(0);
  Tensor a = gpu_poisoned({4096}), b = gpu_poisoned({4096});
  const dstrain::CudaGraph graph = dstrain::CudaGraph::capture(g.stream(), [&] { ops::relu_forward(g, a, b); });
  CHECK_FALSE(graph.empty());
  auto check_relu = [&](const Tensor& in) {
    std::vector<float> want = in.to_host_floats();
    for (float& v : want) v = std::max(v, 0.0f);
    require_close(b.to_host_floats(), want, {0, 0}, "relu replayed from the graph");
  };
  for (int round = 0; round < 2; ++round) {  // the graph reads what `a` holds at each replay
    const Tensor h = random_host({4096}, rng);
    a.copy_from(h);
    b.fill_bytes(0xFF);
    graph.replay(g.stream());
    g.synchronize();
    check_relu(h);
  }
  // Work that throws: the error propagates and the stream is out of capture.
  CHECK(error_code_of([&] {
          (void)dstrain::CudaGraph::capture(g.stream(), [] {
            DSTRAIN_THROW(dstrain::ErrorCode::InvalidArgument, "refused inside the capture");
          });
        }) == dstrain::ErrorCode::InvalidArgument);
  // Work that cannot be captured (a synchronisation): a CUDA error, and again the stream is usable.
  CHECK(error_code_of([&] { (void)dstrain::CudaGraph::capture(g.stream(), [&] { g.synchronize(); }); }) ==
        dstrain::ErrorCode::Cuda);
  const Tensor h = random_host({4096}, rng);
  a.copy_from(h);
  b.fill_bytes(0xFF);
  ops::relu_forward(g, a, b);
  g.synchronize();
  check_relu(h);
  CHECK(error_code_of([&] { dstrain::CudaGraph().replay(g.stream()); }) == dstrain::ErrorCode::InvalidArgument);
}

// ---------------------------------------------------------------------------------------- conv

namespace {
struct ConvCase {
  std::int64_t N, H, W, C, K, R, S;
  int sh, sw, ph, pw;
};
std::string conv_name(const ConvCase& c) {
  std::ostringstream o;
  o << "x[" << c.N << "," << c.H << "," << c.W << "," << c.C << "] w[" << c.K << "," << c.R << "," << c.S << ","
    << c.C << "] stride " << c.sh << "x" << c.sw << " pad " << c.ph << "x" << c.pw;
  return o.str();
}
}  // namespace

TEST_CASE("conv2d forward, backward data and backward filter match the CPU", "[gpu][conv]") {
  const ConvCase cases[] = {
      {2, 9, 7, 3, 5, 3, 3, 1, 1, 1, 1},     // odd channels, 3x3, pad 1, H != W
      {1, 8, 11, 5, 17, 5, 5, 2, 2, 0, 0},   // N = 1, 5x5, stride 2, no padding
      {3, 6, 5, 17, 3, 1, 1, 2, 2, 0, 0},    // 1x1, stride 2
      {4, 7, 3, 32, 16, 1, 1, 1, 1, 0, 0},   // 1x1, stride 1
      {2, 10, 13, 4, 8, 3, 3, 2, 2, 1, 1},   // 3x3, stride 2, pad 1
      {1, 5, 5, 1, 1, 5, 5, 1, 1, 1, 1},     // one channel, one filter, 5x5, pad 1
      {2, 7, 9, 5, 3, 3, 3, 1, 2, 0, 1},     // unequal strides and paddings
      {1, 12, 10, 17, 5, 5, 5, 1, 1, 2, 2},  // 5x5, pad 2
      {64, 28, 28, 1, 32, 3, 3, 1, 1, 1, 1},   // the training model's first conv
      {64, 28, 28, 32, 32, 3, 3, 1, 1, 1, 1},  // the training model's second conv
  };
  Context g = Context::cuda(0);
  Context c = Context::cpu();
  for (const ConvCase& k : cases) {
    DYNAMIC_SECTION(conv_name(k)) {
      SEEDED_RNG(rng);
      ops::Conv2dParams p;
      p.stride_h = k.sh;
      p.stride_w = k.sw;
      p.pad_h = k.ph;
      p.pad_w = k.pw;
      const Shape xs{k.N, k.H, k.W, k.C}, ws{k.K, k.R, k.S, k.C};
      const Shape ys = ops::conv2d_output_shape(xs, ws, p);
      Tensor x = random_host(xs, rng), w = random_host(ws, rng), dy = random_host(ys, rng);
      Tensor xg = x.to(gpu()), wg = w.to(gpu()), dyg = dy.to(gpu());

      Tensor y_ref = cpu_poisoned(ys), y_gpu = gpu_poisoned(ys);
      ops::conv2d_forward(c, x, w, y_ref, p);
      ops::conv2d_forward(g, xg, wg, y_gpu, p);
      require_close(g, y_gpu, y_ref, sum_tol(k.C * k.R * k.S), "conv2d_forward y");

      Tensor dx_ref = cpu_poisoned(xs), dx_gpu = gpu_poisoned(xs);
      ops::conv2d_backward_data(c, dy, w, dx_ref, p);
      ops::conv2d_backward_data(g, dyg, wg, dx_gpu, p);
      require_close(g, dx_gpu, dx_ref, sum_tol(k.K * k.R * k.S), "conv2d_backward_data dx");

      Tensor dw_ref = cpu_poisoned(ws), dw_gpu = gpu_poisoned(ws);
      ops::conv2d_backward_filter(c, x, dy, dw_ref, p);
      ops::conv2d_backward_filter(g, xg, dyg, dw_gpu, p);
      require_close(g, dw_gpu, dw_ref, sum_tol(ys[0] * ys[1] * ys[2]), "conv2d_backward_filter dw");

      // Both gradients in one call (dw on the side stream beside dx), read after the main stream's
      // synchronisation only: the main stream must have waited for the side's work.
      Tensor dx_both = gpu_poisoned(xs), dw_both = gpu_poisoned(ws);
      ops::conv2d_backward(g, xg, dyg, wg, &dx_both, dw_both, p);
      require_close(g, dx_both, dx_ref, sum_tol(k.K * k.R * k.S), "conv2d_backward dx");
      require_close(g, dw_both, dw_ref, sum_tol(ys[0] * ys[1] * ys[2]), "conv2d_backward dw");

      // A second call reuses the cached plan and must give the same result.
      Tensor y_again = gpu_poisoned(ys);
      ops::conv2d_forward(g, xg, wg, y_again, p);
      require_close(fetch(g, y_again), fetch(g, y_gpu), {0, 0}, "conv2d_forward again (cached plan)");
    }
  }
}

TEST_CASE("conv2d on tensors that are not 16-byte aligned matches the CPU", "[gpu][conv]") {
  const ConvCase cases[] = {
      {2, 9, 7, 3, 5, 3, 3, 1, 1, 1, 1},
      {3, 6, 5, 17, 3, 1, 1, 2, 2, 0, 0},
      {64, 28, 28, 32, 32, 3, 3, 1, 1, 1, 1},
  };
  Context g = Context::cuda(0);
  Context c = Context::cpu();
  for (const ConvCase& k : cases) {
    DYNAMIC_SECTION(conv_name(k)) {
      SEEDED_RNG(rng);
      ops::Conv2dParams p;
      p.stride_h = k.sh;
      p.stride_w = k.sw;
      p.pad_h = k.ph;
      p.pad_w = k.pw;
      const Shape xs{k.N, k.H, k.W, k.C}, ws{k.K, k.R, k.S, k.C};
      const Shape ys = ops::conv2d_output_shape(xs, ws, p);
      Tensor x = random_host(xs, rng), w = random_host(ws, rng), dy = random_host(ys, rng);
      std::vector<Tensor> owners;
      Tensor xg = gpu_view_of(x, owners, 1), wg = gpu_view_of(w, owners, 3), dyg = gpu_view_of(dy, owners, 1);

      Tensor y_ref = cpu_poisoned(ys), y_gpu = gpu_view(ys, owners, 1);
      ops::conv2d_forward(c, x, w, y_ref, p);
      ops::conv2d_forward(g, xg, wg, y_gpu, p);
      require_close(g, y_gpu, y_ref, sum_tol(k.C * k.R * k.S), "conv2d_forward y (misaligned)");

      Tensor dx_ref = cpu_poisoned(xs), dx_gpu = gpu_view(xs, owners, 2);
      ops::conv2d_backward_data(c, dy, w, dx_ref, p);
      ops::conv2d_backward_data(g, dyg, wg, dx_gpu, p);
      require_close(g, dx_gpu, dx_ref, sum_tol(k.K * k.R * k.S), "conv2d_backward_data dx (misaligned)");

      Tensor dw_ref = cpu_poisoned(ws), dw_gpu = gpu_view(ws, owners, 1);
      ops::conv2d_backward_filter(c, x, dy, dw_ref, p);
      ops::conv2d_backward_filter(g, xg, dyg, dw_gpu, p);
      require_close(g, dw_gpu, dw_ref, sum_tol(ys[0] * ys[1] * ys[2]), "conv2d_backward_filter dw (misaligned)");
    }
  }
}

TEST_CASE("reading a tensor right after an op sees the op's result", "[gpu][runtime]") {
  // No explicit Context::synchronize(): Tensor::to_host_floats / to / fill_bytes must wait for
  // work queued on the Context's (non-blocking) stream.
  SEEDED_RNG(rng);
  Context g = Context::cuda(0);
  Context c = Context::cpu();
  ops::Conv2dParams p;
  p.pad_h = p.pad_w = 1;
  const Shape xs{64, 28, 28, 32}, ws{32, 3, 3, 32};
  Tensor x = random_host(xs, rng), w = random_host(ws, rng);
  Tensor xg = x.to(gpu()), wg = w.to(gpu());
  Tensor y_ref = cpu_poisoned(xs);
  ops::conv2d_forward(c, x, w, y_ref, p);
  Tensor r_ref = cpu_poisoned(xs);
  ops::relu_forward(c, x, r_ref);
  const std::vector<float> want = y_ref.to_host_floats(), want_relu = r_ref.to_host_floats();
  for (int i = 0; i < 3; ++i) {
    Tensor y = gpu_poisoned(xs);
    for (int r = 0; r < 20; ++r) ops::conv2d_forward(g, xg, wg, y, p);  // keep the stream busy
    require_close(y.to_host_floats(), want, sum_tol(32 * 9), "conv2d y read without synchronising");
    for (int r = 0; r < 20; ++r) ops::conv2d_forward(g, xg, wg, y, p);
    y.fill_bytes(0xFF);  // must wait for the queued convolutions, which write y
    ops::relu_forward(g, xg, y);
    require_close(y.to(Device::cpu()).to_host_floats(), want_relu, {0, 0}, "relu y after fill_bytes");
  }
}

// ----------------------------------------------------------------------------------- batchnorm

namespace {
struct BnCase {
  Shape shape;
  float offset;  // added to the data: |mean| >> std tests the variance's numerics
  float scale;
};
}  // namespace

TEST_CASE("batchnorm train, eval and backward match the CPU", "[gpu][batchnorm]") {
  const BnCase cases[] = {
      {{2, 5, 3, 17}, 0.0f, 1.0f},   {{64, 28, 28, 32}, 0.0f, 1.0f}, {{1, 7, 9, 5}, 0.5f, 2.0f},
      {{6, 3}, 0.0f, 1.0f},          {{3, 1, 1, 33}, 0.0f, 1.0f},    {{2, 4, 4, 1}, -1.0f, 0.5f},
      {{64, 28, 28, 32}, 5.0f, 0.1f}, {{16, 9, 9, 64}, 100.0f, 1.0f},
  };
  Context g = Context::cuda(0);
  Context c = Context::cpu();
  for (const BnCase& k : cases) {
    std::ostringstream name;
    name << shape_name(k.shape) << " offset " << k.offset << " scale " << k.scale;
    DYNAMIC_SECTION(name.str()) {
      SEEDED_RNG(rng);
      const std::int64_t C = k.shape.back();
      const std::int64_t M = dstrain::shape_numel(k.shape) / C;
      std::vector<float> xv = uniform(dstrain::shape_numel(k.shape), rng);
      for (auto& v : xv) v = k.offset + k.scale * v;
      Tensor x = Tensor::from_vector(k.shape, xv);
      Tensor gamma = random_host({C}, rng, 0.5f, 1.5f), beta = random_host({C}, rng);
      Tensor rmean = random_host({C}, rng), rvar = random_host({C}, rng, 0.5f, 2.0f);
      Tensor xg = x.to(gpu()), gammag = gamma.to(gpu()), betag = beta.to(gpu());
      ops::BatchNormParams p;
      p.momentum = 0.1f;
      p.eps = 1e-5f;

      SECTION("forward train") {
        Tensor rmean_g = rmean.to(gpu()), rvar_g = rvar.to(gpu());
        Tensor y_ref = cpu_poisoned(k.shape), sm_ref = cpu_poisoned({C}), si_ref = cpu_poisoned({C});
        Tensor y_gpu = gpu_poisoned(k.shape), sm_gpu = gpu_poisoned({C}), si_gpu = gpu_poisoned({C});
        // Two steps: the running statistics move twice.
        for (int step = 0; step < 2; ++step) {
          ops::batchnorm_forward_train(c, x, gamma, beta, rmean, rvar, y_ref, sm_ref, si_ref, p);
          ops::batchnorm_forward_train(g, xg, gammag, betag, rmean_g, rvar_g, y_gpu, sm_gpu, si_gpu, p);
        }
        // Mean of M values of size ~offset+scale: its error scales with the offset.
        const double mean_atol = 1e-6 * (std::abs(k.offset) + k.scale) + 1e-6;
        require_close(g, sm_gpu, sm_ref, {mean_atol, 1e-5}, "save_mean");
        require_close(g, si_gpu, si_ref, {0, 1e-4}, "save_invstd");
        require_close(g, rmean_g, rmean, {mean_atol, 1e-5}, "running_mean");
        require_close(g, rvar_g, rvar, {1e-6, 1e-4}, "running_var");
        // y = (x - mean) * invstd * gamma + beta; an error e in the mean moves y by e * invstd.
        const double invstd = 1.0 / (k.scale * 0.5774);
        require_close(g, y_gpu, y_ref, {1e-4 + 4.0 * mean_atol * invstd, 1e-4}, "y (train)");
      }
      SECTION("forward eval") {
        Tensor rmean_g = rmean.to(gpu()), rvar_g = rvar.to(gpu());
        // Running statistics near the data's so that y is O(1).
        Tensor y_ref = cpu_poisoned(k.shape), y_gpu = gpu_poisoned(k.shape);
        ops::batchnorm_forward_eval(c, x, gamma, beta, rmean, rvar, y_ref, p);
        ops::batchnorm_forward_eval(g, xg, gammag, betag, rmean_g, rvar_g, y_gpu, p);
        require_close(g, y_gpu, y_ref, {1e-5 * (1.0 + std::abs(k.offset)), 1e-5}, "y (eval)");
      }
      SECTION("backward") {
        // Statistics from the CPU's training pass feed both backends.
        Tensor y_ref = cpu_poisoned(k.shape), sm = cpu_poisoned({C}), si = cpu_poisoned({C});
        Tensor rm2 = rmean.to(Device::cpu()), rv2 = rvar.to(Device::cpu());
        ops::batchnorm_forward_train(c, x, gamma, beta, rm2, rv2, y_ref, sm, si, p);
        Tensor dy = random_host(k.shape, rng), dyg = dy.to(gpu());
        Tensor smg = sm.to(gpu()), sig = si.to(gpu());
        Tensor dx_ref = cpu_poisoned(k.shape), dg_ref = cpu_poisoned({C}), db_ref = cpu_poisoned({C});
        Tensor dx_gpu = gpu_poisoned(k.shape), dg_gpu = gpu_poisoned({C}), db_gpu = gpu_poisoned({C});
        ops::batchnorm_backward(c, dy, x, gamma, sm, si, dx_ref, dg_ref, db_ref);
        ops::batchnorm_backward(g, dyg, xg, gammag, smg, sig, dx_gpu, dg_gpu, db_gpu);
        require_close(g, db_gpu, db_ref, sum_tol(M), "dbeta");
        require_close(g, dg_gpu, dg_ref, sum_tol(M), "dgamma");
        require_close(g, dx_gpu, dx_ref, {1e-4, 1e-4}, "dx");
      }
    }
  }
}

// ---------------------------------------------------------------------------------------- relu

TEST_CASE("relu forward and backward match the CPU", "[gpu][relu]") {
  const Shape shapes[] = {{1001}, {64, 28, 28, 32}, {3, 5, 7, 1}, {2, 2}};
  Context g = Context::cuda(0);
  Context c = Context::cpu();
  for (const Shape& s : shapes) {
    DYNAMIC_SECTION(shape_name(s)) {
      SEEDED_RNG(rng);
      Tensor x = random_host(s, rng), dy = random_host(s, rng);
      Tensor xg = x.to(gpu()), dyg = dy.to(gpu());
      Tensor y_ref = cpu_poisoned(s), y_gpu = gpu_poisoned(s);
      ops::relu_forward(c, x, y_ref);
      ops::relu_forward(g, xg, y_gpu);
      require_close(g, y_gpu, y_ref, {0, 0}, "relu y");
      Tensor dx_ref = cpu_poisoned(s), dx_gpu = gpu_poisoned(s);
      ops::relu_backward(c, dy, y_ref, dx_ref);
      ops::relu_backward(g, dyg, y_gpu, dx_gpu);
      require_close(g, dx_gpu, dx_ref, {0, 0}, "relu dx");
    }
  }
  SECTION("views that are not 16-byte aligned, and in place") {
    SEEDED_RNG(rng);
    const std::int64_t n = 1027;
    Tensor x = random_host({n}, rng), dy = random_host({n}, rng);
    Tensor xbuf = gpu_poisoned({n + 1}), ybuf = gpu_poisoned({n + 3}), dybuf = gpu_poisoned({n + 2});
    Tensor xv = Tensor::wrap(xbuf.data_as<float>() + 1, {n}, DType::F32, gpu());
    Tensor yv = Tensor::wrap(ybuf.data_as<float>() + 3, {n}, DType::F32, gpu());
    Tensor dyv = Tensor::wrap(dybuf.data_as<float>() + 2, {n}, DType::F32, gpu());
    xv.copy_from(x);
    dyv.copy_from(dy);
    Tensor y_ref = cpu_poisoned({n}), dx_ref = cpu_poisoned({n});
    ops::relu_forward(c, x, y_ref);
    ops::relu_backward(c, dy, y_ref, dx_ref);
    ops::relu_forward(g, xv, yv);
    require_close(g, yv, y_ref, {0, 0}, "relu y (misaligned)");
    ops::relu_backward(g, dyv, yv, dyv);  // in place: dx is dy
    require_close(g, dyv, dx_ref, {0, 0}, "relu dx (misaligned, in place)");
    ops::relu_forward(g, xv, xv);  // in place
    require_close(g, xv, y_ref, {0, 0}, "relu y (in place)");
  }
}

// ------------------------------------------------------------------------------------- maxpool

TEST_CASE("maxpool2x2 forward and backward match the CPU", "[gpu][maxpool]") {
  const Shape shapes[] = {{2, 9, 7, 3}, {64, 28, 28, 32}, {1, 2, 2, 1}, {3, 5, 8, 17}, {1, 14, 14, 32}, {2, 3, 3, 5}};
  Context g = Context::cuda(0);
  Context c = Context::cpu();
  for (const Shape& s : shapes) {
    DYNAMIC_SECTION(shape_name(s)) {
      SEEDED_RNG(rng);
      const Shape ys{s[0], s[1] / 2, s[2] / 2, s[3]};
      Tensor x = distinct_host(s, rng), dy = random_host(ys, rng);
      Tensor xg = x.to(gpu()), dyg = dy.to(gpu());
      Tensor y_ref = cpu_poisoned(ys), y_gpu = gpu_poisoned(ys);
      ops::maxpool2x2_forward(c, x, y_ref);
      ops::maxpool2x2_forward(g, xg, y_gpu);
      require_close(g, y_gpu, y_ref, {0, 0}, "maxpool y");
      Tensor dx_ref = cpu_poisoned(s), dx_gpu = gpu_poisoned(s);
      ops::maxpool2x2_backward(c, dy, x, y_ref, dx_ref);
      ops::maxpool2x2_backward(g, dyg, xg, y_gpu, dx_gpu);
      require_close(g, dx_gpu, dx_ref, {0, 0}, "maxpool dx");
    }
  }
}

// -------------------------------------------------------------------------------------- avgpool

TEST_CASE("global_avgpool forward and backward match the CPU", "[gpu][avgpool]") {
  const Shape shapes[] = {{2, 9, 7, 3}, {64, 7, 7, 32}, {1, 1, 1, 5}, {3, 28, 28, 33}, {1, 4, 6, 40}};
  Context g = Context::cuda(0);
  Context c = Context::cpu();
  for (const Shape& s : shapes) {
    DYNAMIC_SECTION(shape_name(s)) {
      SEEDED_RNG(rng);
      const Shape ys{s[0], s[3]};
      Tensor x = random_host(s, rng), dy = random_host(ys, rng);
      Tensor xg = x.to(gpu()), dyg = dy.to(gpu());
      Tensor y_ref = cpu_poisoned(ys), y_gpu = gpu_poisoned(ys);
      ops::global_avgpool_forward(c, x, y_ref);
      ops::global_avgpool_forward(g, xg, y_gpu);
      require_close(g, y_gpu, y_ref, {1e-6, 1e-5}, "avgpool y");
      Tensor dx_ref = cpu_poisoned(s), dx_gpu = gpu_poisoned(s);
      ops::global_avgpool_backward(c, dy, dx_ref);
      ops::global_avgpool_backward(g, dyg, dx_gpu);
      require_close(g, dx_gpu, dx_ref, {1e-9, 1e-6}, "avgpool dx");
    }
  }
}

// --------------------------------------------------------------------------------------- linear

namespace {
struct LinearCase {
  std::int64_t N, I, O;
  bool bias, want_dx, want_db;
};

void run_linear_case(Context& g, Context& c, const LinearCase& k, std::mt19937& rng, bool misaligned) {
  const Shape xs{k.N, k.I}, ws{k.O, k.I}, ys{k.N, k.O};
  Tensor x = random_host(xs, rng), w = random_host(ws, rng), b = random_host({k.O}, rng), dy = random_host(ys, rng);

  // Device tensors, fresh (256-byte aligned) or views one float into a larger buffer.
  std::vector<Tensor> owners;
  auto on_gpu = [&](const Shape& s, int offset) { return gpu_view(s, owners, offset); };
  const int off = misaligned ? 1 : 0;
  Tensor xg = on_gpu(xs, off), wg = on_gpu(ws, off), bg = on_gpu({k.O}, off), dyg = on_gpu(ys, off);
  xg.copy_from(x);
  wg.copy_from(w);
  bg.copy_from(b);
  dyg.copy_from(dy);

  Tensor y_ref = cpu_poisoned(ys);
  Tensor y_gpu = on_gpu(ys, off);
  ops::linear_forward(c, x, w, k.bias ? &b : nullptr, y_ref);
  ops::linear_forward(g, xg, wg, k.bias ? &bg : nullptr, y_gpu);
  require_close(g, y_gpu, y_ref, sum_tol(k.I), "linear y");

  Tensor dx_ref = cpu_poisoned(xs), dw_ref = cpu_poisoned(ws), db_ref = cpu_poisoned({k.O});
  Tensor dx_gpu = on_gpu(xs, off), dw_gpu = on_gpu(ws, off), db_gpu = on_gpu({k.O}, off);
  ops::linear_backward(c, dy, x, w, k.want_dx ? &dx_ref : nullptr, dw_ref, k.want_db ? &db_ref : nullptr);
  ops::linear_backward(g, dyg, xg, wg, k.want_dx ? &dx_gpu : nullptr, dw_gpu, k.want_db ? &db_gpu : nullptr);
  require_close(g, dw_gpu, dw_ref, sum_tol(k.N), "linear dw");
  if (k.want_dx) {
    require_close(g, dx_gpu, dx_ref, sum_tol(k.O), "linear dx");
  } else {  // not asked for: must stay untouched (still the NaN poison)
    const std::vector<float> v = fetch(g, dx_gpu);
    CHECK(std::all_of(v.begin(), v.end(), [](float f) { return std::isnan(f); }));
  }
  if (k.want_db) require_close(g, db_gpu, db_ref, sum_tol(k.N), "linear db");
}
}  // namespace

TEST_CASE("linear forward and backward match the CPU", "[gpu][linear]") {
  const LinearCase cases[] = {
      {64, 32, 10, true, true, true},     {1, 5, 3, true, true, true},       {7, 17, 13, false, true, false},
      {33, 100, 65, true, false, true},   {64, 1568, 10, true, true, true},  {5, 1, 1, true, true, true},
      {128, 256, 512, false, false, false}, {3, 7, 1, true, true, true},
  };
  Context g = Context::cuda(0);
  Context c = Context::cpu();
  for (const LinearCase& k : cases) {
    std::ostringstream name;
    name << "N " << k.N << " I " << k.I << " O " << k.O << (k.bias ? " bias" : " no bias")
         << (k.want_dx ? " dx" : " no dx") << (k.want_db ? " db" : " no db");
    DYNAMIC_SECTION(name.str()) {
      SEEDED_RNG(rng);
      run_linear_case(g, c, k, rng, /*misaligned=*/false);
    }
    DYNAMIC_SECTION(name.str() << ", tensors not 16-byte aligned") {
      SEEDED_RNG(rng);
      run_linear_case(g, c, k, rng, /*misaligned=*/true);
    }
  }
}

// -------------------------------------------------------------------------------- cross-entropy

TEST_CASE("softmax cross-entropy matches the CPU", "[gpu][softmax_ce]") {
  struct CeCase {
    std::int64_t N, K;
    float grad_scale;
    bool with_dlogits;
  };
  const CeCase cases[] = {
      {64, 10, 1.0f / 64, true}, {1, 3, 1.0f, true}, {37, 1000, 0.5f, true},
      {5, 17, 1.0f, false},      {300, 33, 1.0f / 300, true}, {2, 1, 1.0f, true},
  };
  Context g = Context::cuda(0);
  Context c = Context::cpu();
  for (const CeCase& k : cases) {
    std::ostringstream name;
    name << "N " << k.N << " K " << k.K << (k.with_dlogits ? " with dlogits" : " without dlogits");
    DYNAMIC_SECTION(name.str()) {
      SEEDED_RNG(rng);
      Tensor logits = random_host({k.N, k.K}, rng, -3.0f, 3.0f);
      Tensor labels = labels_host(k.N, k.K, rng);
      Tensor lg = logits.to(gpu()), lab_g = labels.to(gpu());
      Tensor loss_ref = cpu_poisoned({1}), corr_ref = cpu_poisoned({1}), d_ref = cpu_poisoned({k.N, k.K});
      Tensor loss_gpu = gpu_poisoned({1}), corr_gpu = gpu_poisoned({1}), d_gpu = gpu_poisoned({k.N, k.K});
      ops::softmax_cross_entropy(c, logits, labels, k.with_dlogits ? &d_ref : nullptr, k.grad_scale, loss_ref,
                                 corr_ref);
      // Twice: the outputs are overwritten, not accumulated into.
      for (int i = 0; i < 2; ++i)
        ops::softmax_cross_entropy(g, lg, lab_g, k.with_dlogits ? &d_gpu : nullptr, k.grad_scale, loss_gpu,
                                   corr_gpu);
      require_close(g, loss_gpu, loss_ref, {1e-5, 1e-5}, "loss_sum");
      require_close(g, corr_gpu, corr_ref, {0, 0}, "correct");
      if (k.with_dlogits) require_close(g, d_gpu, d_ref, {1e-7, 1e-4}, "dlogits");
    }
  }
  SECTION("a label outside [0, K) makes loss_sum NaN") {
    SEEDED_RNG(rng);
    const std::int64_t N = 9, K = 4;
    Tensor logits = random_host({N, K}, rng);
    Tensor labels = labels_host(N, K, rng);
    labels.data_as<std::int32_t>()[3] = static_cast<std::int32_t>(K);
    labels.data_as<std::int32_t>()[7] = -1;
    Tensor lg = logits.to(gpu()), lab_g = labels.to(gpu());
    Tensor loss_gpu = gpu_poisoned({1}), corr_gpu = gpu_poisoned({1}), d_gpu = gpu_poisoned({N, K});
    ops::softmax_cross_entropy(g, lg, lab_g, &d_gpu, 1.0f, loss_gpu, corr_gpu);
    const std::vector<float> loss = fetch(g, loss_gpu), corr = fetch(g, corr_gpu);
    CHECK(std::isnan(loss[0]));
    CHECK(corr[0] >= 0.0f);
    CHECK(corr[0] <= static_cast<float>(N - 2));
  }
}

// ------------------------------------------------------------------------------------------ sgd

TEST_CASE("sgd_step matches the CPU over several steps", "[gpu][sgd]") {
  const ops::SgdParams configs[] = {
      {0.1f, 0.0f, 0.0f, false}, {0.05f, 0.9f, 0.0f, false}, {0.1f, 0.9f, 1e-4f, true},
      {0.01f, 0.5f, 5e-4f, false}, {0.2f, 0.0f, 1e-2f, false}, {0.1f, 0.9f, 5e-4f, true},
  };
  const std::int64_t sizes[] = {1001, 4099, 4};
  Context g = Context::cuda(0);
  Context c = Context::cpu();
  for (const ops::SgdParams& p : configs) {
    for (std::int64_t n : sizes) {
      DYNAMIC_SECTION("n " << n << " lr " << p.lr << " momentum " << p.momentum << " wd " << p.weight_decay
                           << (p.nesterov ? " nesterov" : "")) {
        SEEDED_RNG(rng);
        Tensor param = random_host({n}, rng), pg = param.to(gpu());
        Tensor buf = Tensor::zeros({n}, DType::F32, Device::cpu()), bg = Tensor::zeros({n}, DType::F32, gpu());
        for (int step = 0; step < 5; ++step) {
          INFO("step " << step);
          Tensor grad = random_host({n}, rng), gg = grad.to(gpu());
          ops::sgd_step(c, param, grad, buf, p);
          ops::sgd_step(g, pg, gg, bg, p);
          require_close(g, pg, param, {1e-6, 1e-5}, "param");
          require_close(g, bg, buf, {1e-6, 1e-5}, "momentum buffer");
        }
      }
    }
  }
}

// -------------------------------------------------------------------------------------- convert

namespace {

const DType kFloatTypes[] = {DType::F32, DType::F16, DType::BF16, DType::F8E4M3, DType::F8E5M2};

std::uint32_t code_at(const std::vector<std::uint8_t>& bytes, DType dt, std::size_t i) {
  const std::size_t sz = dstrain::dtype_size(dt);
  std::uint32_t v = 0;
  std::memcpy(&v, bytes.data() + i * sz, sz);  // little-endian
  return v;
}

float decode(DType dt, std::uint32_t code) {
  switch (dt) {
    case DType::F32: {
      float f;
      std::memcpy(&f, &code, 4);
      return f;
    }
    case DType::F16: return dstrain::fp16_to_float(static_cast<std::uint16_t>(code));
    case DType::BF16: return dstrain::bf16_to_float(static_cast<std::uint16_t>(code));
    case DType::F8E4M3: return dstrain::fp8_e4m3_to_float(static_cast<std::uint8_t>(code));
    default: return dstrain::fp8_e5m2_to_float(static_cast<std::uint8_t>(code));
  }
}

std::uint32_t encode(DType dt, float f) {
  switch (dt) {
    case DType::F32: {
      std::uint32_t u;
      std::memcpy(&u, &f, 4);
      return u;
    }
    case DType::F16: return dstrain::float_to_fp16(f);
    case DType::BF16: return dstrain::float_to_bf16(f);
    case DType::F8E4M3: return dstrain::float_to_fp8_e4m3(f);
    default: return dstrain::float_to_fp8_e5m2(f);
  }
}

// Every source code converted on the device to `dst` must have the host conversion's bits
// (any NaN for a NaN). Runs under two poisons so that no expected value can hide an unwritten one.
void check_convert(Context& g, const std::vector<std::uint8_t>& src_bytes, DType src, DType dst) {
  const std::size_t n = src_bytes.size() / dstrain::dtype_size(src);
  Tensor host_src = Tensor::empty({static_cast<std::int64_t>(n)}, src, Device::cpu());
  std::memcpy(host_src.data(), src_bytes.data(), src_bytes.size());
  Tensor dsrc = host_src.to(gpu());
  for (unsigned char poison : {0xFF, 0x55}) {
    Tensor out = gpu_poisoned({static_cast<std::int64_t>(n)}, dst, poison);
    ops::convert(g, dsrc, out);
    const std::vector<std::uint8_t> got = fetch_bytes(g, out);
    std::size_t bad = 0;
    std::ostringstream first;
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint32_t in = code_at(src_bytes, src, i);
      const std::uint32_t want = encode(dst, decode(src, in));
      const std::uint32_t have = code_at(got, dst, i);
      const bool ok = have == want || (std::isnan(decode(dst, want)) && std::isnan(decode(dst, have)));
      if (!ok) {
        if (bad < 8)
          first << "  [" << i << "] source code 0x" << std::hex << in << " (" << std::dec << decode(src, in)
                << "): got 0x" << std::hex << have << ", want 0x" << want << std::dec << "\n";
        ++bad;
      }
    }
    INFO(dstrain::dtype_name(src) << " -> " << dstrain::dtype_name(dst) << " (poison 0x" << std::hex
                                  << static_cast<int>(poison) << std::dec << "): " << bad << " of " << n
                                  << " wrong\n"
                                  << first.str());
    CHECK(bad == 0);
  }
}

// fp32 test values: a wide random spread plus the edges of every narrow format.
std::vector<float> convert_inputs(std::mt19937& rng) {
  std::vector<float> v = {0.0f,       -0.0f,      1.0f,       -1.0f,       INFINITY,   -INFINITY,
                          NAN,        -NAN,       65504.0f,   65520.0f,    65519.99f,  -65536.0f,
                          448.0f,     464.0f,     463.99f,    -480.0f,     1e6f,       -1e30f,
                          57344.0f,   61440.0f,   61439.99f,  -65536.0f,   3.0e38f,    -3.4e38f,
                          5.96e-8f,   2.98e-8f,   2.99e-8f,   6.1e-5f,     1.9531e-3f, 9.766e-4f,
                          9.77e-4f,   1.5259e-5f, 7.63e-6f,   7.7e-6f,     1e-40f,     -1e-45f,
                          1.0009765625f, 1.00048828125f, 1.0078125f, 1.00390625f, 1.0625f, 1.125f,
                          1.1875f,    -2.25f,     0.0068359375f, 0.00146484375f};
  // Halfway points and their neighbours between consecutive fp8 values (ties to even).
  for (int code = 0; code < 0x7F; ++code) {
    for (DType dt : {DType::F8E4M3, DType::F8E5M2}) {
      const float a = decode(dt, static_cast<std::uint32_t>(code)), b = decode(dt, static_cast<std::uint32_t>(code + 1));
      if (!std::isfinite(a) || !std::isfinite(b)) continue;
      const float mid = 0.5f * (a + b);
      v.push_back(mid);
      v.push_back(-mid);
      v.push_back(std::nextafter(mid, 0.0f));
      v.push_back(std::nextafter(mid, INFINITY));
    }
  }
  std::uniform_real_distribution<float> e(-30.0f, 20.0f), m(1.0f, 2.0f);
  std::bernoulli_distribution sign(0.5);
  for (int i = 0; i < 20000; ++i) {
    const float f = std::ldexp(m(rng), static_cast<int>(std::floor(e(rng))));
    v.push_back(sign(rng) ? -f : f);
  }
  std::uniform_int_distribution<std::uint32_t> bits;
  for (int i = 0; i < 5000; ++i) {
    const std::uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    v.push_back(f);
  }
  return v;
}

}  // namespace

TEST_CASE("convert between floating dtypes matches the host conversions", "[gpu][convert]") {
  Context g = Context::cuda(0);
  SECTION("from fp32 (random spread, format edges, ties, specials)") {
    SEEDED_RNG(rng);
    const std::vector<float> v = convert_inputs(rng);
    std::vector<std::uint8_t> bytes(v.size() * 4);
    std::memcpy(bytes.data(), v.data(), bytes.size());
    for (DType dst : kFloatTypes) check_convert(g, bytes, DType::F32, dst);
  }
  SECTION("from every fp16, bf16, fp8 e4m3 and fp8 e5m2 code") {
    for (DType src : {DType::F16, DType::BF16, DType::F8E4M3, DType::F8E5M2}) {
      const std::size_t sz = dstrain::dtype_size(src);
      const std::size_t count = sz == 1 ? 256 : 65536;
      std::vector<std::uint8_t> bytes(count * sz);
      for (std::size_t code = 0; code < count; ++code) {
        const std::uint32_t c32 = static_cast<std::uint32_t>(code);
        std::memcpy(bytes.data() + code * sz, &c32, sz);
      }
      for (DType dst : kFloatTypes) check_convert(g, bytes, src, dst);
    }
  }
  SECTION("odd sizes and the CPU op agree") {
    SEEDED_RNG(rng);
    Context c = Context::cpu();
    for (std::int64_t n : {1, 3, 7, 1025}) {
      Tensor x = random_host({n}, rng, -500.0f, 500.0f);
      Tensor xg = x.to(gpu());
      for (DType dst : {DType::F16, DType::BF16, DType::F8E4M3, DType::F8E5M2}) {
        Tensor ref = cpu_poisoned({n}, dst), out = gpu_poisoned({n}, dst);
        ops::convert(c, x, ref);
        ops::convert(g, xg, out);
        INFO("n " << n << " -> " << dstrain::dtype_name(dst));
        const std::vector<std::uint8_t> got = fetch_bytes(g, out);
        const auto* want = static_cast<const std::uint8_t*>(ref.data());
        CHECK(std::equal(got.begin(), got.end(), want));
        // And back to fp32.
        Tensor back_ref = cpu_poisoned({n}), back = gpu_poisoned({n});
        ops::convert(c, ref, back_ref);
        ops::convert(g, out, back);
        require_close(g, back, back_ref, {0, 0}, std::string("back to fp32 from ") + dstrain::dtype_name(dst));
      }
    }
  }
}
