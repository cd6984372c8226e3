// CPU ops through the public API against values worked out by hand, and the dispatcher's
// argument checks. Every output is poisoned (0xFF bytes: NaN) first, so an element an op
// forgets to write, or accumulates into, fails.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "dstrain/context.h"
#include "dstrain/device.h"
#include "dstrain/error.h"
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

namespace {

Tensor poisoned(const Shape& shape, DType dt = DType::F32) { return dstrain_test::poisoned_host(shape, dt); }

Tensor labels_of(const std::vector<std::int32_t>& v) {
  Tensor t = Tensor::empty({static_cast<std::int64_t>(v.size())}, DType::I32, Device::cpu());
  std::memcpy(t.data(), v.data(), v.size() * sizeof(std::int32_t));
  return t;
}

// Every element of t within atol + rtol * |want| of want (and the same count).
void require_values(const Tensor& t, const std::vector<double>& want, double atol = 1e-6,
                    double rtol = 1e-6) {
  const std::vector<float> got = t.to_host_floats();
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    INFO("element " << i << ": got " << got[i] << ", want " << want[i]);
    CHECK((got[i] == want[i] || std::abs(got[i] - want[i]) <= atol + rtol * std::abs(want[i])));
  }
}

using dstrain_test::error_code_of;

}  // namespace

// ------------------------------------------------------------------------------------------ conv

TEST_CASE("cuda_description refuses a device that is not there", "[runtime]") {
  const int count = dstrain::cuda_device_count();
  const dstrain::ErrorCode code = error_code_of([&] { (void)dstrain::cuda_description(count); });
  // InvalidArgument in a CUDA build, Unsupported in a build without CUDA
  CHECK((code == dstrain::ErrorCode::InvalidArgument || code == dstrain::ErrorCode::Unsupported));
  CHECK(error_code_of([] { (void)dstrain::cuda_description(-1); }) != dstrain::ErrorCode::Internal);
}

TEST_CASE("CudaGraph refuses an empty replay and a capture without a stream", "[runtime]") {
  const auto refused = [](dstrain::ErrorCode code) {
    // InvalidArgument in a CUDA build, Unsupported in a build without CUDA
    return code == dstrain::ErrorCode::InvalidArgument || code == dstrain::ErrorCode::Unsupported;
  };
  const dstrain::CudaGraph empty;
  CHECK(empty.empty());
  CHECK(refused(error_code_of([&] { empty.replay(nullptr); })));
  bool ran = false;
  CHECK(refused(error_code_of([&] { (void)dstrain::CudaGraph::capture(nullptr, [&] { ran = true; }); })));
  CHECK_FALSE(ran);
}

TEST_CASE("conv2d forward: 3x3 input, 2x2 filter, stride 1 and stride 2 with padding", "[ops][conv]") {
  Context ctx = Context::cpu();
  // x = 1..9 row-major ([1,3,3,1]), w = [[1,2],[3,4]] ([1,2,2,1]).
  Tensor x = Tensor::from_vector({1, 3, 3, 1}, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  Tensor w = Tensor::from_vector({1, 2, 2, 1}, {1, 2, 3, 4});

  SECTION("stride 1, no padding") {
    ops::Conv2dParams p;
    REQUIRE(ops::conv2d_output_shape(x.shape(), w.shape(), p) == Shape{1, 2, 2, 1});
    Tensor y = poisoned({1, 2, 2, 1});
    ops::conv2d_forward(ctx, x, w, y, p);
    // 1+4+12+20, 2+6+15+24, 4+10+21+32, 5+12+24+36
    require_values(y, {37, 47, 67, 77});
  }
  SECTION("stride 2, padding 1") {
    ops::Conv2dParams p;
    p.stride_h = p.stride_w = 2;
    p.pad_h = p.pad_w = 1;
    REQUIRE(ops::conv2d_output_shape(x.shape(), w.shape(), p) == Shape{1, 2, 2, 1});
    Tensor y = poisoned({1, 2, 2, 1});
    ops::conv2d_forward(ctx, x, w, y, p);
    // Windows of the zero-padded 5x5 input at (0,0), (0,2), (2,0), (2,2):
    // 1*4; 2*3 + 3*4; 4*2 + 7*4; 5*1 + 6*2 + 8*3 + 9*4
    require_values(y, {4, 18, 36, 77});
  }
  SECTION("stride 1, padding 1 in width only (non-square output)") {
    ops::Conv2dParams p;
    p.pad_w = 1;
    Tensor y = poisoned({1, 2, 4, 1});
    ops::conv2d_forward(ctx, x, w, y, p);
    // Row 0: [0 1 2 3 0] over [0 4 5 6 0]: 4*4, 1*1+2*2+... per window.
    //   ow0: 0*1 + 1*2 + 0*3 + 4*4 = 18; ow1: 1+4+12+20 = 37; ow2: 47; ow3: 3*1+0+6*3+0 = 21
    // Row 1: over rows [4 5 6] and [7 8 9]:
    //   ow0: 4*2 + 7*4 = 36; ow1: 4+10+21+32 = 67; ow2: 77; ow3: 6*1 + 9*3 = 33
    require_values(y, {18, 37, 47, 21, 36, 67, 77, 33});
  }
}

TEST_CASE("conv2d forward: channels and filters map as NHWC x KRSC", "[ops][conv]") {
  Context ctx = Context::cpu();
  // [1,2,2,2]: pixels (1,2) (3,4) (5,6) (7,8).
  Tensor x = Tensor::from_vector({1, 2, 2, 2}, {1, 2, 3, 4, 5, 6, 7, 8});
  SECTION("1x1 filter, stride 1 (no im2col)") {
    // K=3 filters over C=2: (1,0), (1,-1), (0,2).
    Tensor w = Tensor::from_vector({3, 1, 1, 2}, {1, 0, 1, -1, 0, 2});
    Tensor y = poisoned({1, 2, 2, 3});
    ops::conv2d_forward(ctx, x, w, y, {});
    require_values(y, {1, -1, 4, 3, -1, 8, 5, -1, 12, 7, -1, 16});
  }
  SECTION("1x1 filter, stride 2 keeps the top-left pixel") {
    Tensor w = Tensor::from_vector({3, 1, 1, 2}, {1, 0, 1, -1, 0, 2});
    ops::Conv2dParams p;
    p.stride_h = p.stride_w = 2;
    Tensor y = poisoned({1, 1, 1, 3});
    ops::conv2d_forward(ctx, x, w, y, p);
    require_values(y, {1, -1, 4});
  }
  SECTION("2x2 filter over 2 channels, 2 outputs") {
    // Filter 0 weights channel 0 at (r,s) by 1,2,3,4 and ignores channel 1;
    // filter 1 sums channel 1 only at (1,0).
    Tensor w = Tensor::from_vector({2, 2, 2, 2}, {1, 0, 2, 0, 3, 0, 4, 0,  //
                                                  0, 0, 0, 0, 0, 1, 0, 0});
    Tensor y = poisoned({1, 1, 1, 2});
    ops::conv2d_forward(ctx, x, w, y, {});
    require_values(y, {1 * 1 + 3 * 2 + 5 * 3 + 7 * 4, 6});
  }
}

TEST_CASE("conv2d backward: hand values on the 3x3 example", "[ops][conv]") {
  Context ctx = Context::cpu();
  Tensor x = Tensor::from_vector({1, 3, 3, 1}, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  Tensor w = Tensor::from_vector({1, 2, 2, 1}, {1, 2, 3, 4});
  // dy = [[1,0],[0,2]] (stride 1, no padding).
  Tensor dy = Tensor::from_vector({1, 2, 2, 1}, {1, 0, 0, 2});
  Tensor dx = poisoned({1, 3, 3, 1});
  ops::conv2d_backward_data(ctx, dy, w, dx, {});
  // dx = w placed at (0,0) times 1 plus w placed at (1,1) times 2.
  require_values(dx, {1, 2, 0, 3, 4 + 2, 4, 0, 6, 8});
  Tensor dw = poisoned({1, 2, 2, 1});
  ops::conv2d_backward_filter(ctx, x, dy, dw, {});
  // dw[r,s] = x[r,s] * 1 + x[r+1,s+1] * 2
  require_values(dw, {1 + 10, 2 + 12, 4 + 16, 5 + 18});
  // Both in one call, and dw alone when dx is not wanted.
  Tensor dx2 = poisoned({1, 3, 3, 1}), dw2 = poisoned({1, 2, 2, 1});
  ops::conv2d_backward(ctx, x, dy, w, &dx2, dw2, {});
  require_values(dx2, {1, 2, 0, 3, 4 + 2, 4, 0, 6, 8});
  require_values(dw2, {1 + 10, 2 + 12, 4 + 16, 5 + 18});
  Tensor dw3 = poisoned({1, 2, 2, 1});
  ops::conv2d_backward(ctx, x, dy, w, nullptr, dw3, {});
  require_values(dw3, {1 + 10, 2 + 12, 4 + 16, 5 + 18});
}

// ------------------------------------------------------------------------------------ batchnorm

TEST_CASE("batchnorm training forward and running statistics", "[ops][batchnorm]") {
  Context ctx = Context::cpu();
  // [1,2,2,2]: channel 0 = 0,0,0,4 (mean 1, biased var 3, unbiased 4);
  //            channel 1 = 2,2,2,2 (mean 2, var 0).
  Tensor x = Tensor::from_vector({1, 2, 2, 2}, {0, 2, 0, 2, 0, 2, 4, 2});
  Tensor gamma = Tensor::from_vector({2}, {4, 3});
  Tensor beta = Tensor::from_vector({2}, {1, -1});
  Tensor rm = Tensor::from_vector({2}, {0.5f, 1});
  Tensor rv = Tensor::from_vector({2}, {1, 2});
  Tensor y = poisoned({1, 2, 2, 2});
  Tensor sm = poisoned({2}), si = poisoned({2});
  ops::BatchNormParams p;
  p.momentum = 0.1f;
  p.eps = 1.0f;  // invstd = 1/sqrt(3+1) = 0.5 and 1/sqrt(0+1) = 1
  ops::batchnorm_forward_train(ctx, x, gamma, beta, rm, rv, y, sm, si, p);
  // channel 0: 4 * (x - 1) * 0.5 + 1 = 2x - 1; channel 1: 3 * 0 - 1
  require_values(y, {-1, -1, -1, -1, -1, -1, 7, -1});
  require_values(sm, {1, 2});
  require_values(si, {0.5, 1});
  // running = 0.9 * running + 0.1 * batch, with the unbiased variance (4 and 0).
  require_values(rm, {0.55, 1.1});
  require_values(rv, {1.3, 1.8});

  // A second step accumulates on top.
  ops::batchnorm_forward_train(ctx, x, gamma, beta, rm, rv, y, sm, si, p);
  require_values(rm, {0.9 * 0.55 + 0.1, 0.9 * 1.1 + 0.2});
  require_values(rv, {0.9 * 1.3 + 0.4, 0.9 * 1.8});
}

TEST_CASE("batchnorm over a rank-2 tensor and with the default eps", "[ops][batchnorm]") {
  Context ctx = Context::cpu();
  // [4,1]: 1,3,1,3 -> mean 2, biased var 1, unbiased 4/3.
  Tensor x = Tensor::from_vector({4, 1}, {1, 3, 1, 3});
  Tensor gamma = Tensor::from_vector({1}, {1});
  Tensor beta = Tensor::from_vector({1}, {0});
  Tensor rm = Tensor::from_vector({1}, {0});
  Tensor rv = Tensor::from_vector({1}, {1});
  Tensor y = poisoned({4, 1}), sm = poisoned({1}), si = poisoned({1});
  ops::BatchNormParams p;  // momentum 0.1, eps 1e-5
  ops::batchnorm_forward_train(ctx, x, gamma, beta, rm, rv, y, sm, si, p);
  const double s = 1.0 / std::sqrt(1.0 + 1e-5);
  require_values(y, {-s, s, -s, s});
  require_values(si, {s});
  require_values(rm, {0.2});
  require_values(rv, {0.9 + 0.1 * 4.0 / 3.0});
}

TEST_CASE("batchnorm eval forward uses the running statistics", "[ops][batchnorm]") {
  Context ctx = Context::cpu();
  Tensor x = Tensor::from_vector({1, 2, 2, 2}, {0, 2, 0, 2, 0, 2, 4, 2});
  Tensor gamma = Tensor::from_vector({2}, {4, 3});
  Tensor beta = Tensor::from_vector({2}, {1, -1});
  Tensor rm = Tensor::from_vector({2}, {0, 1});
  Tensor rv = Tensor::from_vector({2}, {3, 0});
  Tensor y = poisoned({1, 2, 2, 2});
  ops::BatchNormParams p;
  p.eps = 1.0f;
  ops::batchnorm_forward_eval(ctx, x, gamma, beta, rm, rv, y, p);
  // channel 0: 4 * x * 0.5 + 1 = 2x + 1; channel 1: 3 * (2 - 1) * 1 - 1 = 2
  require_values(y, {1, 2, 1, 2, 1, 2, 9, 2});
  // Running statistics are inputs only.
  require_values(rm, {0, 1});
  require_values(rv, {3, 0});
}

TEST_CASE("batchnorm backward: hand values", "[ops][batchnorm]") {
  Context ctx = Context::cpu();
  // One channel, x = 0,0,0,4: mean 1, xhat = (x - 1) * invstd.
  Tensor x = Tensor::from_vector({4, 1}, {0, 0, 0, 4});
  Tensor gamma = Tensor::from_vector({1}, {2});
  Tensor mean = Tensor::from_vector({1}, {1});
  Tensor invstd = Tensor::from_vector({1}, {0.5f});
  Tensor dx = poisoned({4, 1}), dg = poisoned({1}), db = poisoned({1});
  SECTION("constant dy: only dbeta") {
    Tensor dy = Tensor::from_vector({4, 1}, {3, 3, 3, 3});
    ops::batchnorm_backward(ctx, dy, x, gamma, mean, invstd, dx, dg, db);
    require_values(db, {12});
    require_values(dg, {0});
    require_values(dx, {0, 0, 0, 0});
  }
  SECTION("dy = 1,0,0,0") {
    Tensor dy = Tensor::from_vector({4, 1}, {1, 0, 0, 0});
    ops::batchnorm_backward(ctx, dy, x, gamma, mean, invstd, dx, dg, db);
    // xhat = -0.5,-0.5,-0.5,1.5; dbeta = 1; dgamma = -0.5;
    // dx = gamma*invstd/n * (n*dy - dbeta - xhat*dgamma) = 0.25 * (4dy - 1 + 0.5 xhat)
    require_values(db, {1});
    require_values(dg, {-0.5});
    require_values(dx, {0.25 * (4 - 1 - 0.25), 0.25 * (-1 - 0.25), 0.25 * (-1 - 0.25), 0.25 * (-1 + 0.75)});
  }
}

// ----------------------------------------------------------------------------------------- relu

TEST_CASE("relu forward and backward", "[ops][relu]") {
  Context ctx = Context::cpu();
  Tensor x = Tensor::from_vector({1, 1, 2, 3}, {-1, 0, 2, -0.5f, 3, 1e-30f});
  Tensor y = poisoned({1, 1, 2, 3});
  ops::relu_forward(ctx, x, y);
  require_values(y, {0, 0, 2, 0, 3, 1e-30});
  Tensor dy = Tensor::from_vector({1, 1, 2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor dx = poisoned({1, 1, 2, 3});
  ops::relu_backward(ctx, dy, y, dx);
  require_values(dx, {0, 0, 3, 0, 5, 6});
}

// -------------------------------------------------------------------------------------- maxpool

TEST_CASE("maxpool2x2: odd sizes, ties, first maximum", "[ops][maxpool]") {
  Context ctx = Context::cpu();
  // [1,3,5,2]; channel 0 rows: [1 5 2 2 9], [5 3 2 2 9], [7 7 7 7 7]; channel 1 = -channel 0.
  const std::vector<float> c0 = {1, 5, 2, 2, 9, 5, 3, 2, 2, 9, 7, 7, 7, 7, 7};
  std::vector<float> xv;
  for (float v : c0) {
    xv.push_back(v);
    xv.push_back(-v);
  }
  Tensor x = Tensor::from_vector({1, 3, 5, 2}, xv);
  Tensor y = poisoned({1, 1, 2, 2});
  ops::maxpool2x2_forward(ctx, x, y);
  // Last column and last row are dropped.
  require_values(y, {5, -1, 2, -2});

  Tensor dy = Tensor::from_vector({1, 1, 2, 2}, {10, 20, 30, 40});
  Tensor dx = poisoned({1, 3, 5, 2});
  ops::maxpool2x2_backward(ctx, dy, x, y, dx);
  std::vector<double> want(30, 0.0);
  auto at = [](int h, int w, int c) { return (h * 5 + w) * 2 + c; };
  want[at(0, 1, 0)] = 10;  // 5 at (0,1) comes before the 5 at (1,0)
  want[at(0, 0, 1)] = 20;  // -1 at (0,0)
  want[at(0, 2, 0)] = 30;  // four 2s: the first
  want[at(0, 2, 1)] = 40;  // four -2s: the first
  require_values(dx, want);
}

TEST_CASE("maxpool2x2: several images", "[ops][maxpool]") {
  Context ctx = Context::cpu();
  // [2,2,4,1]
  Tensor x = Tensor::from_vector({2, 2, 4, 1}, {1, 2, 3, 4, 5, 6, 7, 8,  //
                                                -1, -2, -3, -4, -5, -6, -7, -8});
  Tensor y = poisoned({2, 1, 2, 1});
  ops::maxpool2x2_forward(ctx, x, y);
  require_values(y, {6, 8, -1, -3});
  Tensor dy = Tensor::from_vector({2, 1, 2, 1}, {1, 2, 3, 4});
  Tensor dx = poisoned({2, 2, 4, 1});
  ops::maxpool2x2_backward(ctx, dy, x, y, dx);
  require_values(dx, {0, 0, 0, 0, 0, 1, 0, 2,  //
                      3, 0, 4, 0, 0, 0, 0, 0});
}

TEST_CASE("maxpool2x2 and relu propagate NaN", "[ops][maxpool][relu]") {
  Context ctx = Context::cpu();
  const float nan = std::nanf("");
  // One 2x2 window per channel: channel 0 has a NaN after the maximum, channel 1 none.
  Tensor x = Tensor::from_vector({1, 2, 2, 2}, {1, 1, 5, 2, nan, 3, 2, 0});
  Tensor y = poisoned({1, 1, 1, 2});
  ops::maxpool2x2_forward(ctx, x, y);
  const std::vector<float> yv = y.to_host_floats();
  CHECK(std::isnan(yv[0]));
  CHECK(yv[1] == 3);
  Tensor dy = Tensor::from_vector({1, 1, 1, 2}, {7, 8});
  Tensor dx = poisoned({1, 2, 2, 2});
  ops::maxpool2x2_backward(ctx, dy, x, y, dx);
  require_values(dx, {0, 0, 0, 0, 7, 8, 0, 0});

  Tensor r = poisoned({1, 2, 2, 2});
  ops::relu_forward(ctx, x, r);
  const std::vector<float> rv = r.to_host_floats();
  CHECK(std::isnan(rv[4]));
  CHECK(rv[0] == 1);
}

// ------------------------------------------------------------------------------- global avgpool

TEST_CASE("global average pool forward and backward", "[ops][avgpool]") {
  Context ctx = Context::cpu();
  // [2,1,3,2]: image 0 channel 0 = 1,2,3, channel 1 = 10,20,60; image 1 = -1,0,4 and 0,0,3.
  Tensor x = Tensor::from_vector({2, 1, 3, 2}, {1, 10, 2, 20, 3, 60, -1, 0, 0, 0, 4, 3});
  Tensor y = poisoned({2, 2});
  ops::global_avgpool_forward(ctx, x, y);
  require_values(y, {2, 30, 1, 1});
  Tensor dy = Tensor::from_vector({2, 2}, {3, 6, -3, 0});
  Tensor dx = poisoned({2, 1, 3, 2});
  ops::global_avgpool_backward(ctx, dy, dx);
  require_values(dx, {1, 2, 1, 2, 1, 2, -1, 0, -1, 0, -1, 0});
}

// --------------------------------------------------------------------------------------- linear

TEST_CASE("linear forward with and without bias, backward", "[ops][linear]") {
  Context ctx = Context::cpu();
  Tensor x = Tensor::from_vector({2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor w = Tensor::from_vector({2, 3}, {1, 0, -1, 2, 1, 0});
  Tensor b = Tensor::from_vector({2}, {0.5f, -1});
  Tensor y = poisoned({2, 2});
  ops::linear_forward(ctx, x, w, &b, y);
  require_values(y, {-1.5, 3, -1.5, 12});
  y.fill_bytes(0xFF);
  ops::linear_forward(ctx, x, w, nullptr, y);
  require_values(y, {-2, 4, -2, 13});

  // dy = [[1,0],[0,1]] -> dx = w, dw = x, db = [1,1]; then a general dy.
  Tensor dy = Tensor::from_vector({2, 2}, {1, 0, 0, 1});
  Tensor dx = poisoned({2, 3}), dw = poisoned({2, 3}), db = poisoned({2});
  ops::linear_backward(ctx, dy, x, w, &dx, dw, &db);
  require_values(dx, {1, 0, -1, 2, 1, 0});
  require_values(dw, {1, 2, 3, 4, 5, 6});
  require_values(db, {1, 1});

  Tensor dy2 = Tensor::from_vector({2, 2}, {1, 2, -1, 3});
  dw.fill_bytes(0xFF);
  db.fill_bytes(0xFF);
  // dx not needed.
  ops::linear_backward(ctx, dy2, x, w, nullptr, dw, &db);
  // dw = dy^T x: row 0 = 1*(1,2,3) - 1*(4,5,6); row 1 = 2*(1,2,3) + 3*(4,5,6)
  require_values(dw, {-3, -3, -3, 14, 19, 24});
  require_values(db, {0, 5});
  dw.fill_bytes(0xFF);
  dx.fill_bytes(0xFF);
  ops::linear_backward(ctx, dy2, x, w, &dx, dw, nullptr);
  // dx = dy w: row 0 = 1*(1,0,-1) + 2*(2,1,0); row 1 = -1*(1,0,-1) + 3*(2,1,0)
  require_values(dx, {5, 2, -1, 5, 3, 1});
}

// ---------------------------------------------------------------------------- cross-entropy

TEST_CASE("softmax cross-entropy: loss, accuracy and gradient", "[ops][xent]") {
  Context ctx = Context::cpu();
  // Row 0: equal logits, label 1 (argmax is the first: 0, wrong). Row 1: 1,2,3 with label 2.
  // Row 2: huge logits stay finite; label 0 is the argmax.
  Tensor logits = Tensor::from_vector({3, 3}, {0, 0, 0, 1, 2, 3, 1000, 0, -1000});
  Tensor labels = labels_of({1, 2, 0});
  Tensor dl = poisoned({3, 3}), loss = poisoned({1}), correct = poisoned({1});
  ops::softmax_cross_entropy(ctx, logits, labels, &dl, 0.5f, loss, correct);
  const double z = 1 + std::exp(-1.0) + std::exp(-2.0);  // row 1: softmax = (e^-2, e^-1, 1) / z
  require_values(loss, {std::log(3.0) + std::log(z) + 0.0}, 1e-6, 1e-6);
  require_values(correct, {2});
  require_values(dl, {0.5 / 3, 0.5 * (1.0 / 3 - 1), 0.5 / 3,                             //
                      0.5 * std::exp(-2.0) / z, 0.5 * std::exp(-1.0) / z, 0.5 * (1 / z - 1),  //
                      0, 0, 0},
                 1e-7, 1e-6);

  // Without dlogits; ties with label 0 count as correct.
  Tensor labels0 = labels_of({0, 0, 0});
  loss.fill_bytes(0xFF);
  correct.fill_bytes(0xFF);
  ops::softmax_cross_entropy(ctx, logits, labels0, nullptr, 1.0f, loss, correct);
  require_values(loss, {std::log(3.0) + std::log(z) + 2.0}, 1e-6, 1e-6);
  require_values(correct, {2});
}

TEST_CASE("softmax cross-entropy rejects labels below 0 or at least K", "[ops][xent]") {
  Context ctx = Context::cpu();
  Tensor logits = Tensor::from_vector({2, 3}, {0, 1, 2, 3, 4, 5});
  Tensor loss = poisoned({1}), correct = poisoned({1});
  for (std::int32_t bad : {3, -1, 1 << 30}) {
    Tensor labels = labels_of({0, bad});
    CHECK(error_code_of([&] { ops::softmax_cross_entropy(ctx, logits, labels, nullptr, 1.0f, loss, correct); }) ==
          dstrain::ErrorCode::InvalidArgument);
  }
}

// ------------------------------------------------------------------------------------------ sgd

TEST_CASE("sgd step: plain, weight decay, momentum, nesterov", "[ops][sgd]") {
  Context ctx = Context::cpu();
  Tensor grad = Tensor::from_vector({2}, {0.5f, 1});
  auto run = [&](const ops::SgdParams& p, int steps, Tensor& param, Tensor& buf) {
    for (int i = 0; i < steps; ++i) ops::sgd_step(ctx, param, grad, buf, p);
  };
  ops::SgdParams p;
  p.lr = 0.1f;
  SECTION("plain, without a momentum buffer") {
    Tensor param = Tensor::from_vector({2}, {1, -2});
    Tensor none;
    run(p, 1, param, none);
    require_values(param, {0.95, -2.1});
    run(p, 1, param, none);
    require_values(param, {0.9, -2.2});
  }
  SECTION("weight decay") {
    p.weight_decay = 0.1f;
    Tensor param = Tensor::from_vector({2}, {1, -2});
    Tensor buf = Tensor::zeros({2}, DType::F32, Device::cpu());
    run(p, 1, param, buf);
    require_values(param, {1 - 0.1 * 0.6, -2 - 0.1 * 0.8});
  }
  SECTION("momentum, two steps") {
    p.momentum = 0.9f;
    Tensor param = Tensor::from_vector({2}, {1, -2});
    Tensor buf = Tensor::zeros({2}, DType::F32, Device::cpu());
    run(p, 1, param, buf);
    require_values(buf, {0.5, 1});
    require_values(param, {0.95, -2.1});
    run(p, 1, param, buf);
    require_values(buf, {0.95, 1.9});
    require_values(param, {0.855, -2.29});
  }
  SECTION("nesterov, two steps") {
    p.momentum = 0.9f;
    p.nesterov = true;
    Tensor param = Tensor::from_vector({2}, {1, -2});
    Tensor buf = Tensor::zeros({2}, DType::F32, Device::cpu());
    run(p, 1, param, buf);
    require_values(param, {0.905, -2.19});
    run(p, 1, param, buf);
    require_values(buf, {0.95, 1.9});
    require_values(param, {0.7695, -2.461});
  }
  SECTION("nesterov with weight decay, two steps") {
    p.momentum = 0.9f;
    p.nesterov = true;
    p.weight_decay = 0.1f;
    Tensor param = Tensor::from_vector({2}, {1, -2});
    Tensor buf = Tensor::zeros({2}, DType::F32, Device::cpu());
    // step 1: g = (0.6, 0.8), buf = g, p -= 0.1 * (g + 0.9 buf)
    run(p, 1, param, buf);
    require_values(buf, {0.6, 0.8});
    require_values(param, {0.886, -2.152});
    // step 2: g = (0.5886, 0.7848), buf = (1.1286, 1.5048), update (1.60434, 2.13912)
    run(p, 1, param, buf);
    require_values(buf, {1.1286, 1.5048}, 1e-6, 1e-6);
    require_values(param, {0.725566, -2.365912}, 1e-6, 1e-6);
  }
  SECTION("momentum with weight decay (heavy ball), two steps") {
    p.momentum = 0.5f;
    p.weight_decay = 0.5f;
    Tensor param = Tensor::from_vector({2}, {1, -2});
    Tensor buf = Tensor::zeros({2}, DType::F32, Device::cpu());
    // step 1: g = (1, 0), buf = (1, 0), p = (0.9, -2)
    run(p, 1, param, buf);
    require_values(param, {0.9, -2});
    // step 2: g = (0.95, 0), buf = (1.45, 0), p = (0.755, -2)
    run(p, 1, param, buf);
    require_values(buf, {1.45, 0});
    require_values(param, {0.755, -2});
  }
}

// -------------------------------------------------------------------------------------- convert

TEST_CASE("convert between floating dtypes", "[ops][convert]") {
  Context ctx = Context::cpu();
  Tensor src = Tensor::from_vector({2, 3}, {1, -2.5f, 0.25f, 65504, 1.0f / 3, 1000});
  SECTION("fp32 -> fp16 -> bf16 -> fp32") {
    Tensor h = poisoned({2, 3}, DType::F16);
    ops::convert(ctx, src, h);
    // 1/3 in fp16 is 0x3555 = 0.333251953125.
    require_values(h, {1, -2.5, 0.25, 65504, 0.333251953125, 1000}, 0, 0);
    Tensor b = poisoned({2, 3}, DType::BF16);
    ops::convert(ctx, h, b);
    // bf16 keeps 8 significant bits: 65504 -> 65536, 0.33325 -> 0.333984375, 1000 -> 1000.
    require_values(b, {1, -2.5, 0.25, 65536, 0.333984375, 1000}, 0, 0);
    Tensor f = poisoned({2, 3});
    ops::convert(ctx, b, f);
    require_values(f, {1, -2.5, 0.25, 65536, 0.333984375, 1000}, 0, 0);
  }
  SECTION("fp32 -> fp8 e4m3 saturates, e5m2 rounds") {
    Tensor e4 = poisoned({2, 3}, DType::F8E4M3);
    ops::convert(ctx, src, e4);
    // e4m3: 3 mantissa bits; 1/3 -> 0.34375 (nearest of 0.3125, 0.34375); past 448 saturates.
    require_values(e4, {1, -2.5, 0.25, 448, 0.34375, 448}, 0, 0);
    Tensor e5 = poisoned({2, 3}, DType::F8E5M2);
    ops::convert(ctx, src, e5);
    // e5m2: 2 mantissa bits; 1/3 -> 0.3125 (between 0.3125 and 0.375); 65504 is past
    // max + ulp/2 = 57344 + 4096, so it becomes inf. -2.5 is exact; 1000 -> 1024.
    require_values(e5, {1, -2.5, 0.25, INFINITY, 0.3125, 1024}, 0, 0);
  }
  SECTION("same dtype copies") {
    Tensor f = poisoned({2, 3});
    ops::convert(ctx, src, f);
    require_values(f, {1, -2.5, 0.25, 65504, 1.0 / 3, 1000}, 0, 1e-7);
  }
}

// ----------------------------------------------------------------------------------- dispatcher

TEST_CASE("the dispatcher rejects outputs of the wrong shape", "[ops][dispatch]") {
  Context ctx = Context::cpu();
  Tensor x = Tensor::from_vector({1, 3, 3, 1}, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  Tensor w = Tensor::from_vector({1, 2, 2, 1}, {1, 2, 3, 4});
  Tensor y_wrong = poisoned({1, 3, 3, 1});
  CHECK_THROWS_AS(ops::conv2d_forward(ctx, x, w, y_wrong, {}), dstrain::Error);
  CHECK(error_code_of([&] { ops::conv2d_forward(ctx, x, w, y_wrong, {}); }) == dstrain::ErrorCode::InvalidArgument);
  Tensor y_transposed = poisoned({2, 2});
  Tensor a = Tensor::from_vector({2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor lw = Tensor::from_vector({1, 3}, {1, 1, 1});
  CHECK(error_code_of([&] { ops::linear_forward(ctx, a, lw, nullptr, y_transposed); }) ==
        dstrain::ErrorCode::InvalidArgument);
  Tensor pool_wrong = poisoned({1, 2, 2, 1});
  CHECK(error_code_of([&] { ops::maxpool2x2_forward(ctx, x, pool_wrong); }) == dstrain::ErrorCode::InvalidArgument);
  // A wrong dtype is rejected too.
  Tensor y_f16 = poisoned({1, 2, 2, 1}, DType::F16);
  CHECK(error_code_of([&] { ops::conv2d_forward(ctx, x, w, y_f16, {}); }) == dstrain::ErrorCode::InvalidArgument);
}
