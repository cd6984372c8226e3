// fp16 / bf16 activations on the CPU: each op on low-precision tensors must give exactly the fp32
// op's result on the same (rounded) inputs, rounded once to the low type. Also the dispatcher's
// dtype rules, amp::Policy, GradScaler::scale_gradient and the layers under a low-precision policy.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "dstrain/amp.h"
#include "dstrain/amp_policy.h"
#include "dstrain/context.h"
#include "dstrain/error.h"
#include "dstrain/models.h"
#include "dstrain/nn.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Shape;
using dstrain::Tensor;
namespace ops = dstrain::ops;
namespace amp = dstrain::amp;

namespace {

Tensor poisoned(const Shape& shape, DType dt) {
  Tensor t = Tensor::empty(shape, dt, Device::cpu());
  t.fill_bytes(0xFF);
  return t;
}

Tensor random_f32(const Shape& shape, std::mt19937& rng, float lo = -2.0f, float hi = 2.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(dstrain::shape_numel(shape)));
  for (float& x : v) x = dist(rng);
  return Tensor::from_vector(shape, v);
}

Tensor converted(const Tensor& src, DType dt) {
  Tensor t = Tensor::empty(src.shape(), dt, Device::cpu());
  dstrain::convert_host(src.data(), src.dtype(), t.data(), dt, static_cast<std::size_t>(src.numel()));
  return t;
}

// Low-precision tensor of fresh random values, and its exact fp32 twin.
struct Pair {
  Tensor low, f32;
};
Pair random_pair(const Shape& shape, DType dt, std::mt19937& rng) {
  Pair p;
  p.low = converted(random_f32(shape, rng), dt);
  p.f32 = converted(p.low, DType::F32);
  return p;
}

// `low` holds exactly ref rounded to low's dtype.
void require_rounded(const Tensor& low, const Tensor& ref) {
  REQUIRE(low.shape() == ref.shape());
  const std::vector<float> got = low.to_host_floats();
  const std::vector<float> want = converted(converted(ref, low.dtype()), DType::F32).to_host_floats();
  for (std::size_t i = 0; i < want.size(); ++i) {
    INFO("element " << i << " of " << want.size() << ": got " << got[i] << ", want " << want[i]);
    REQUIRE(got[i] == want[i]);
  }
}

dstrain::ErrorCode code_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const dstrain::Error& e) {
    return e.code();
  }
  FAIL("expected a dstrain::Error");
  return dstrain::ErrorCode::Internal;
}

}  // namespace

TEST_CASE("low-precision CPU ops equal the fp32 ops on rounded inputs", "[ops][lowp]") {
  Context ctx = Context::cpu();
  for (DType dt : {DType::F16, DType::BF16}) {
    DYNAMIC_SECTION(dtype_name(dt)) {
      std::mt19937 rng(dt == DType::F16 ? 11u : 12u);
      const Shape xs{2, 5, 6, 3};

      // Convolution: forward, backward data, backward filter.
      ops::Conv2dParams cp;
      cp.pad_h = cp.pad_w = 1;
      Pair x = random_pair(xs, dt, rng), w = random_pair({4, 3, 3, 3}, dt, rng);
      const Shape ys = ops::conv2d_output_shape(xs, w.low.shape(), cp);
      Tensor y = poisoned(ys, dt), y_ref = poisoned(ys, DType::F32);
      ops::conv2d_forward(ctx, x.low, w.low, y, cp);
      ops::conv2d_forward(ctx, x.f32, w.f32, y_ref, cp);
      require_rounded(y, y_ref);
      Pair dy = random_pair(ys, dt, rng);
      Tensor dx = poisoned(xs, dt), dx_ref = poisoned(xs, DType::F32);
      ops::conv2d_backward_data(ctx, dy.low, w.low, dx, cp);
      ops::conv2d_backward_data(ctx, dy.f32, w.f32, dx_ref, cp);
      require_rounded(dx, dx_ref);
      Tensor dw = poisoned(w.low.shape(), dt), dw_ref = poisoned(w.low.shape(), DType::F32);
      ops::conv2d_backward_filter(ctx, x.low, dy.low, dw, cp);
      ops::conv2d_backward_filter(ctx, x.f32, dy.f32, dw_ref, cp);
      require_rounded(dw, dw_ref);

      // BatchNorm: statistics and parameters fp32, x/y/dy/dx low.
      const std::int64_t C = xs[3];
      Tensor gamma = random_f32({C}, rng, 0.5f, 1.5f), beta = random_f32({C}, rng);
      Tensor rm = Tensor::zeros({C}, DType::F32, Device::cpu()), rv = Tensor::from_vector({C}, {1, 1, 1});
      Tensor rm_ref = Tensor::zeros({C}, DType::F32, Device::cpu()), rv_ref = Tensor::from_vector({C}, {1, 1, 1});
      Tensor sm = poisoned({C}, DType::F32), si = poisoned({C}, DType::F32);
      Tensor sm_ref = poisoned({C}, DType::F32), si_ref = poisoned({C}, DType::F32);
      Tensor bn_y = poisoned(xs, dt), bn_y_ref = poisoned(xs, DType::F32);
      ops::batchnorm_forward_train(ctx, x.low, gamma, beta, rm, rv, bn_y, sm, si, {});
      ops::batchnorm_forward_train(ctx, x.f32, gamma, beta, rm_ref, rv_ref, bn_y_ref, sm_ref, si_ref, {});
      require_rounded(bn_y, bn_y_ref);
      CHECK(sm.to_host_floats() == sm_ref.to_host_floats());
      CHECK(si.to_host_floats() == si_ref.to_host_floats());
      CHECK(rv.to_host_floats() == rv_ref.to_host_floats());
      Tensor bn_e = poisoned(xs, dt), bn_e_ref = poisoned(xs, DType::F32);
      ops::batchnorm_forward_eval(ctx, x.low, gamma, beta, rm, rv, bn_e, {});
      ops::batchnorm_forward_eval(ctx, x.f32, gamma, beta, rm, rv, bn_e_ref, {});
      require_rounded(bn_e, bn_e_ref);
      Pair bn_dy = random_pair(xs, dt, rng);
      Tensor bn_dx = poisoned(xs, dt), bn_dx_ref = poisoned(xs, DType::F32);
      Tensor dg = poisoned({C}, DType::F32), db = poisoned({C}, DType::F32);
      Tensor dg_ref = poisoned({C}, DType::F32), db_ref = poisoned({C}, DType::F32);
      ops::batchnorm_backward(ctx, bn_dy.low, x.low, gamma, sm, si, bn_dx, dg, db);
      ops::batchnorm_backward(ctx, bn_dy.f32, x.f32, gamma, sm, si, bn_dx_ref, dg_ref, db_ref);
      require_rounded(bn_dx, bn_dx_ref);
      CHECK(dg.to_host_floats() == dg_ref.to_host_floats());
      CHECK(db.to_host_floats() == db_ref.to_host_floats());

      // ReLU.
      Tensor r = poisoned(xs, dt), r_ref = poisoned(xs, DType::F32);
      ops::relu_forward(ctx, x.low, r);
      ops::relu_forward(ctx, x.f32, r_ref);
      require_rounded(r, r_ref);
      Tensor rdx = poisoned(xs, dt), rdx_ref = poisoned(xs, DType::F32);
      ops::relu_backward(ctx, bn_dy.low, r, rdx);
      ops::relu_backward(ctx, bn_dy.f32, r_ref, rdx_ref);
      require_rounded(rdx, rdx_ref);

      // Max pooling (odd width: the dropped column gets a zero gradient).
      const Shape ps{xs[0], xs[1] / 2, xs[2] / 2, xs[3]};
      Tensor mp = poisoned(ps, dt), mp_ref = poisoned(ps, DType::F32);
      ops::maxpool2x2_forward(ctx, x.low, mp);
      ops::maxpool2x2_forward(ctx, x.f32, mp_ref);
      require_rounded(mp, mp_ref);
      Pair mp_dy = random_pair(ps, dt, rng);
      Tensor mp_dx = poisoned(xs, dt), mp_dx_ref = poisoned(xs, DType::F32);
      ops::maxpool2x2_backward(ctx, mp_dy.low, x.low, mp, mp_dx);
      ops::maxpool2x2_backward(ctx, mp_dy.f32, x.f32, mp_ref, mp_dx_ref);
      require_rounded(mp_dx, mp_dx_ref);

      // Global average pooling: low output and fp32 output; backward from low and fp32 dy.
      Tensor ap = poisoned({xs[0], C}, dt), ap32 = poisoned({xs[0], C}, DType::F32);
      Tensor ap_ref = poisoned({xs[0], C}, DType::F32);
      ops::global_avgpool_forward(ctx, x.low, ap);
      ops::global_avgpool_forward(ctx, x.low, ap32);
      ops::global_avgpool_forward(ctx, x.f32, ap_ref);
      require_rounded(ap, ap_ref);
      CHECK(ap32.to_host_floats() == ap_ref.to_host_floats());
      Pair ap_dy = random_pair({xs[0], C}, dt, rng);
      Tensor ap_dx = poisoned(xs, dt), ap_dx32 = poisoned(xs, dt), ap_dx_ref = poisoned(xs, DType::F32);
      ops::global_avgpool_backward(ctx, ap_dy.low, ap_dx);
      ops::global_avgpool_backward(ctx, ap_dy.f32, ap_dx32);
      ops::global_avgpool_backward(ctx, ap_dy.f32, ap_dx_ref);
      require_rounded(ap_dx, ap_dx_ref);
      require_rounded(ap_dx32, ap_dx_ref);

      // Linear: low operands, fp32 logits and fp32 weight gradient; and an all-low variant.
      Pair lx = random_pair({5, 7}, dt, rng), lw = random_pair({3, 7}, dt, rng);
      Tensor lb = random_f32({3}, rng);
      Tensor ly = poisoned({5, 3}, DType::F32), ly_low = poisoned({5, 3}, dt), ly_ref = poisoned({5, 3}, DType::F32);
      ops::linear_forward(ctx, lx.low, lw.low, &lb, ly);
      ops::linear_forward(ctx, lx.low, lw.low, &lb, ly_low);
      ops::linear_forward(ctx, lx.f32, lw.f32, &lb, ly_ref);
      CHECK(ly.to_host_floats() == ly_ref.to_host_floats());
      require_rounded(ly_low, ly_ref);
      Pair ldy = random_pair({5, 3}, dt, rng);
      Tensor ldx = poisoned({5, 7}, dt), ldw = poisoned({3, 7}, DType::F32), ldw_low = poisoned({3, 7}, dt);
      Tensor ldb = poisoned({3}, DType::F32);
      Tensor ldx_ref = poisoned({5, 7}, DType::F32), ldw_ref = poisoned({3, 7}, DType::F32);
      Tensor ldb_ref = poisoned({3}, DType::F32);
      ops::linear_backward(ctx, ldy.low, lx.low, lw.low, &ldx, ldw, &ldb);
      ops::linear_backward(ctx, ldy.low, lx.low, lw.low, nullptr, ldw_low, nullptr);
      ops::linear_backward(ctx, ldy.f32, lx.f32, lw.f32, &ldx_ref, ldw_ref, &ldb_ref);
      require_rounded(ldx, ldx_ref);
      CHECK(ldw.to_host_floats() == ldw_ref.to_host_floats());
      require_rounded(ldw_low, ldw_ref);
      CHECK(ldb.to_host_floats() == ldb_ref.to_host_floats());
    }
  }
}

TEST_CASE("ops accept exactly the supported dtype combinations", "[ops][lowp]") {
  Context ctx = Context::cpu();
  const auto bad = dstrain::ErrorCode::InvalidArgument;
  Tensor x16 = Tensor::zeros({2, 4, 4, 3}, DType::F16, Device::cpu());
  Tensor xb16 = Tensor::zeros({2, 4, 4, 3}, DType::BF16, Device::cpu());
  Tensor x8 = Tensor::zeros({2, 4, 4, 3}, DType::F8E4M3, Device::cpu());
  Tensor w16 = Tensor::zeros({2, 3, 3, 3}, DType::F16, Device::cpu());
  Tensor wb16 = Tensor::zeros({2, 3, 3, 3}, DType::BF16, Device::cpu());
  ops::Conv2dParams cp;
  cp.pad_h = cp.pad_w = 1;
  Tensor y16 = Tensor::zeros({2, 4, 4, 2}, DType::F16, Device::cpu());
  Tensor y32 = Tensor::zeros({2, 4, 4, 2}, DType::F32, Device::cpu());
  ops::conv2d_forward(ctx, x16, w16, y16, cp);  // supported
  CHECK(code_of([&] { ops::conv2d_forward(ctx, x16, wb16, y16, cp); }) == bad);
  CHECK(code_of([&] { ops::conv2d_forward(ctx, x16, w16, y32, cp); }) == bad);
  Tensor dw32 = Tensor::zeros({2, 3, 3, 3}, DType::F32, Device::cpu());
  CHECK(code_of([&] { ops::conv2d_backward_filter(ctx, x16, y16, dw32, cp); }) == bad);

  CHECK(code_of([&] { ops::relu_forward(ctx, x8, x8); }) == bad);
  CHECK(code_of([&] { ops::relu_forward(ctx, x16, xb16); }) == bad);

  Tensor g32 = Tensor::from_vector({3}, {1, 1, 1}), g16 = Tensor::zeros({3}, DType::F16, Device::cpu());
  Tensor b32 = Tensor::zeros({3}, DType::F32, Device::cpu());
  Tensor rm = Tensor::zeros({3}, DType::F32, Device::cpu()), rv = Tensor::from_vector({3}, {1, 1, 1});
  Tensor sm = Tensor::zeros({3}, DType::F32, Device::cpu()), si = Tensor::zeros({3}, DType::F32, Device::cpu());
  Tensor bn_y16 = Tensor::zeros(x16.shape(), DType::F16, Device::cpu());
  ops::batchnorm_forward_train(ctx, x16, g32, b32, rm, rv, bn_y16, sm, si, {});  // supported
  CHECK(code_of([&] { ops::batchnorm_forward_train(ctx, x16, g16, b32, rm, rv, bn_y16, sm, si, {}); }) == bad);
  CHECK(code_of([&] { ops::batchnorm_forward_train(ctx, x16, g32, b32, rm, rv, xb16, sm, si, {}); }) == bad);

  Tensor p16 = Tensor::zeros({2, 3}, DType::F16, Device::cpu()), pb16 = Tensor::zeros({2, 3}, DType::BF16, Device::cpu());
  CHECK(code_of([&] { ops::global_avgpool_forward(ctx, x16, pb16); }) == bad);
  ops::global_avgpool_forward(ctx, x16, p16);  // supported

  Tensor lx = Tensor::zeros({2, 3}, DType::BF16, Device::cpu()), lw = Tensor::zeros({4, 3}, DType::BF16, Device::cpu());
  Tensor ly16 = Tensor::zeros({2, 4}, DType::F16, Device::cpu()), ly32 = Tensor::zeros({2, 4}, DType::F32, Device::cpu());
  ops::linear_forward(ctx, lx, lw, nullptr, ly32);  // supported
  CHECK(code_of([&] { ops::linear_forward(ctx, lx, lw, nullptr, ly16); }) == bad);
  Tensor lb16 = Tensor::zeros({4}, DType::BF16, Device::cpu());
  CHECK(code_of([&] { ops::linear_forward(ctx, lx, lw, &lb16, ly32); }) == bad);
  Tensor ldw = Tensor::zeros({4, 3}, DType::F32, Device::cpu());
  CHECK(code_of([&] { ops::linear_backward(ctx, ly32, lx, lw, nullptr, ldw, nullptr); }) == bad);  // dy must be bf16

  // The loss stays fp32.
  Tensor labels = Tensor::zeros({2}, DType::I32, Device::cpu());
  Tensor loss = Tensor::zeros({1}, DType::F32, Device::cpu()), correct = Tensor::zeros({1}, DType::F32, Device::cpu());
  CHECK(code_of([&] { ops::softmax_cross_entropy(ctx, ly16, labels, nullptr, 1.0f, loss, correct); }) == bad);
}

TEST_CASE("amp::Policy names the compute dtype of each op kind", "[amp][lowp]") {
  using amp::OpKind;
  const amp::Policy def;
  CHECK(def == amp::Policy::fp32());
  CHECK_FALSE(def.low_precision());
  for (OpKind k : {OpKind::Conv, OpKind::Linear, OpKind::Activation, OpKind::BatchNorm, OpKind::Loss,
                   OpKind::Reduction, OpKind::Optimizer})
    CHECK(def.compute_dtype(k) == DType::F32);
  for (const amp::Policy& p : {amp::Policy::fp16(), amp::Policy::bf16()}) {
    const DType low = p == amp::Policy::fp16() ? DType::F16 : DType::BF16;
    CHECK(p.low_precision());
    CHECK(p.activation_dtype() == low);
    CHECK(p.compute_dtype(OpKind::Conv) == low);
    CHECK(p.compute_dtype(OpKind::Linear) == low);
    CHECK(p.compute_dtype(OpKind::Activation) == low);
    CHECK(p.compute_dtype(OpKind::BatchNorm) == DType::F32);
    CHECK(p.compute_dtype(OpKind::Loss) == DType::F32);
    CHECK(p.compute_dtype(OpKind::Reduction) == DType::F32);
    CHECK(p.compute_dtype(OpKind::Optimizer) == DType::F32);
  }
  CHECK(amp::Policy::fp16().needs_loss_scaling());
  CHECK_FALSE(amp::Policy::bf16().needs_loss_scaling());
  CHECK_FALSE(amp::Policy::fp32().needs_loss_scaling());
  CHECK(amp::Policy::parse("bf16") == amp::Policy::bf16());
  CHECK(amp::Policy::parse("fp16") == amp::Policy::fp16());
  CHECK(amp::Policy::parse("fp32") == amp::Policy::fp32());
  CHECK(code_of([] { amp::Policy::parse("fp8e4m3"); }) == dstrain::ErrorCode::InvalidArgument);
}

TEST_CASE("GradScaler::scale_gradient multiplies by the current scale", "[amp][lowp]") {
  Context ctx = Context::cpu();
  amp::GradScalerOptions o;
  o.init_scale = 1024.0f;
  amp::GradScaler scaler(Device::cpu(), o);
  Tensor g = Tensor::from_vector({3}, {0.5f, -0.25f, 3.0f});
  scaler.scale_gradient(ctx, g);
  CHECK(g.to_host_floats() == std::vector<float>{512.0f, -256.0f, 3072.0f});
  Tensor h = Tensor::zeros({3}, DType::F16, Device::cpu());
  CHECK(code_of([&] { scaler.scale_gradient(ctx, h); }) == dstrain::ErrorCode::InvalidArgument);
}

namespace {
// One training forward/backward of small_cnn under `policy` on a fixed batch; returns the logits
// and every parameter gradient (fp32).
struct StepResult {
  std::vector<float> logits;
  std::vector<std::vector<float>> grads;
  std::vector<DType> grad_dtypes;
};
StepResult one_step(amp::Policy policy, bool pass_policy) {
  Context ctx = Context::cpu();
  auto net = pass_policy ? dstrain::models::small_cnn(Device::cpu(), 10, 1, policy)
                         : dstrain::models::small_cnn(Device::cpu(), 10, 1);
  dstrain::nn::init_parameters(*net, 7);
  net->set_needs_input_grad(false);
  std::mt19937 rng(3);
  Tensor x = random_f32({4, 12, 12, 1}, rng, 0.0f, 1.0f);
  const Tensor& logits = net->forward(ctx, x, true);
  REQUIRE(logits.dtype() == DType::F32);
  StepResult r;
  r.logits = logits.to_host_floats();
  Tensor dlogits = random_f32(logits.shape(), rng, -0.1f, 0.1f);
  net->backward(ctx, dlogits);
  for (dstrain::nn::Parameter* p : net->parameters()) {
    r.grads.push_back(p->grad.to_host_floats());
    r.grad_dtypes.push_back(p->grad.dtype());
    CHECK(p->value.dtype() == DType::F32);
  }
  return r;
}
}  // namespace

TEST_CASE("small_cnn under fp16 and bf16 policies tracks fp32 and the fp32 policy is unchanged", "[nn][lowp]") {
  const StepResult plain = one_step(amp::Policy::fp32(), false);
  const StepResult fp32 = one_step(amp::Policy::fp32(), true);
  CHECK(plain.logits == fp32.logits);  // bit for bit
  CHECK(plain.grads == fp32.grads);
  for (const amp::Policy& p : {amp::Policy::fp16(), amp::Policy::bf16()}) {
    DYNAMIC_SECTION(p.name()) {
      const StepResult low = one_step(p, true);
      // bf16 keeps 8 bits of mantissa, fp16 11: sized tolerances on O(1) values.
      const double tol = p == amp::Policy::bf16() ? 0.08 : 0.02;
      REQUIRE(low.logits.size() == plain.logits.size());
      bool any_diff = false;
      for (std::size_t i = 0; i < low.logits.size(); ++i) {
        INFO("logit " << i);
        CHECK(std::abs(low.logits[i] - plain.logits[i]) <= tol * (1.0 + std::abs(plain.logits[i])));
        any_diff = any_diff || low.logits[i] != plain.logits[i];
      }
      CHECK(any_diff);  // the low-precision path really ran
      REQUIRE(low.grads.size() == plain.grads.size());
      for (std::size_t t = 0; t < low.grads.size(); ++t) {
        CHECK(low.grad_dtypes[t] == DType::F32);
        double num = 0.0, den = 0.0;
        for (std::size_t i = 0; i < low.grads[t].size(); ++i) {
          const double d = low.grads[t][i] - plain.grads[t][i];
          num += d * d;
          den += static_cast<double>(plain.grads[t][i]) * plain.grads[t][i];
        }
        INFO("parameter " << t << ": relative L2 error " << std::sqrt(num / std::max(den, 1e-30)));
        CHECK(std::sqrt(num) <= 5.0 * tol * std::sqrt(den) + 1e-6);
      }
    }
  }
}
