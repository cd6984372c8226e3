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

#include "error_code_of.h"

#include "host_tensors.h"

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Shape;
using dstrain::Tensor;
namespace ops = dstrain::ops;
namespace amp = dstrain::amp;

namespace {

Tensor poisoned(const Shape& shape, DType dt) { return dstrain_test::poisoned_host(shape, dt); }

Tensor random_f32(const Shape& shape, std::mt19937& rng, float lo = -2.0f, float hi = 2.0f) {
  return dstrain_test::uniform_host(shape, rng, lo, hi);
}

Tensor converted(const Tensor& src, DType dt) { return dstrain_test::converted_host(src, dt); }

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

using dstrain_test::error_code_of;

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
  CHECK(error_code_of([&] { ops::conv2d_forward(ctx, x16, wb16, y16, cp); }) == bad);
  CHECK(error_code_of([&] { ops::conv2d_forward(ctx, x16, w16, y32, cp); }) == bad);
  Tensor dw32 = Tensor::zeros({2, 3, 3, 3}, DType::F32, Device::cpu());
  CHECK(error_code_of([&] { ops::conv2d_backward_filter(ctx, x16, y16, dw32, cp); }) == bad);

  CHECK(error_code_of([&] { ops::relu_forward(ctx, x8, x8); }) == bad);
  CHECK(error_code_of([&] { ops::relu_forward(ctx, x16, xb16); }) == bad);

  Tensor g32 = Tensor::from_vector({3}, {1, 1, 1}), g16 = Tensor::zeros({3}, DType::F16, Device::cpu());
  Tensor b32 = Tensor::zeros({3}, DType::F32, Device::cpu());
  Tensor rm = Tensor::zeros({3}, DType::F32, Device::cpu()), rv = Tensor::from_vector({3}, {1, 1, 1});
  Tensor sm = Tensor::zeros({3}, DType::F32, Device::cpu()), si = Tensor::zeros({3}, DType::F32, Device::cpu());
  Tensor bn_y16 = Tensor::zeros(x16.shape(), DType::F16, Device::cpu());
  ops::batchnorm_forward_train(ctx, x16, g32, b32, rm, rv, bn_y16, sm, si, {});  // supported
  CHECK(error_code_of([&] { ops::batchnorm_forward_train(ctx, x16, g16, b32, rm, rv, bn_y16, sm, si, {}); }) == bad);
  CHECK(error_code_of([&] { ops::batchnorm_forward_train(ctx, x16, g32, b32, rm, rv, xb16, sm, si, {}); }) == bad);

  Tensor p16 = Tensor::zeros({2, 3}, DType::F16, Device::cpu()), pb16 = Tensor::zeros({2, 3}, DType::BF16, Device::cpu());
  CHECK(error_code_of([&] { ops::global_avgpool_forward(ctx, x16, pb16); }) == bad);
  ops::global_avgpool_forward(ctx, x16, p16);  // supported

  Tensor lx = Tensor::zeros({2, 3}, DType::BF16, Device::cpu()), lw = Tensor::zeros({4, 3}, DType::BF16, Device::cpu());
  Tensor ly16 = Tensor::zeros({2, 4}, DType::F16, Device::cpu()), ly32 = Tensor::zeros({2, 4}, DType::F32, Device::cpu());
  ops::linear_forward(ctx, lx, lw, nullptr, ly32);  // supported
  CHECK(error_code_of([&] { ops::linear_forward(ctx, lx, lw, nullptr, ly16); }) == bad);
  Tensor lb16 = Tensor::zeros({4}, DType::BF16, Device::cpu());
  CHECK(error_code_of([&] { ops::linear_forward(ctx, lx, lw, &lb16, ly32); }) == bad);
  Tensor ldw = Tensor::zeros({4, 3}, DType::F32, Device::cpu());
  CHECK(error_code_of([&] { ops::linear_backward(ctx, ly32, lx, lw, nullptr, ldw, nullptr); }) == bad);  // dy must be bf16

  // The loss stays fp32.
  Tensor labels = Tensor::zeros({2}, DType::I32, Device::cpu());
  Tensor loss = Tensor::zeros({1}, DType::F32, Device::cpu()), correct = Tensor::zeros({1}, DType::F32, Device::cpu());
  CHECK(error_code_of([&] { ops::softmax_cross_entropy(ctx, ly16, labels, nullptr, 1.0f, loss, correct); }) == bad);
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
  CHECK(error_code_of([] { amp::Policy::parse("fp8e4m3"); }) == dstrain::ErrorCode::InvalidArgument);
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
  CHECK(error_code_of([&] { scaler.scale_gradient(ctx, h); }) == dstrain::ErrorCode::InvalidArgument);
}

namespace {
// One training forward/backward of small_cnn under `policy` on a fixed batch; returns the logits
// and every parameter gradient (fp32).
struct StepResult {
  std::vector<float> logits;
  std::vector<std::vector<float>> grads;
  std::vector<DType> grad_dtypes;
};
// calibrate_fp8: one forward and an FP8 scale update first, so the measured step uses scales
// from the observed amax, as every training step after the first does (delayed scaling starts at
// scale 1, where E4M3 holds the filters' small values, about 1/sqrt(fan_in), only as subnormals).
StepResult one_step(amp::Policy policy, bool pass_policy, bool calibrate_fp8 = false) {
  Context ctx = Context::cpu();
  auto net = pass_policy ? dstrain::models::small_cnn(Device::cpu(), 10, 1, policy)
                         : dstrain::models::small_cnn(Device::cpu(), 10, 1);
  dstrain::nn::init_parameters(*net, 7);
  net->set_needs_input_grad(false);
  std::mt19937 rng(3);
  Tensor x = random_f32({4, 12, 12, 1}, rng, 0.0f, 1.0f);
  if (calibrate_fp8) {
    REQUIRE(!net->fp8_metas().empty());
    net->forward(ctx, x, true);
    amp::update_fp8_scales(ctx, net->fp8_metas(), nullptr);
  }
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

// ---- FP8 (amp::Policy::fp8_hybrid) ---------------------------------------------------------

TEST_CASE("amp::Policy::fp8_hybrid is bf16 with the linear layer in fp8", "[amp][lowp][fp8]") {
  using amp::OpKind;
  const amp::Policy p = amp::Policy::fp8_hybrid();
  CHECK(std::string(p.name()) == "fp8");
  CHECK(amp::Policy::parse("fp8") == p);
  CHECK(p != amp::Policy::bf16());
  CHECK(p.fp8_linear());
  CHECK_FALSE(amp::Policy::bf16().fp8_linear());
  CHECK(p.low_precision());
  CHECK_FALSE(p.needs_loss_scaling());
  CHECK(p.activation_dtype() == DType::BF16);
  CHECK(p.compute_dtype(OpKind::Linear) == DType::F8E4M3);
  CHECK(p.compute_dtype(OpKind::Conv) == DType::BF16);
  CHECK(p.compute_dtype(OpKind::Activation) == DType::BF16);
  CHECK(p.compute_dtype(OpKind::BatchNorm) == DType::F32);
  CHECK(p.compute_dtype(OpKind::Loss) == DType::F32);
}

namespace {
void set_fp8_scale(amp::Fp8Meta& meta, float scale) {
  std::vector<float> st = meta.state().to_host_floats();
  st[0] = scale;
  st[1] = 1.0f / scale;
  meta.state().copy_from(Tensor::from_vector(meta.state().shape(), st));
}
float fp8_amax(const amp::Fp8Meta& meta) { return meta.state().to_host_floats()[2]; }
}  // namespace

TEST_CASE("cast_to_fp8_padded is cast_to_fp8 laid out padded (and transposed)", "[amp][lowp][fp8]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(11);
  for (DType src_dt : {DType::F32, DType::BF16}) {
    for (DType fmt : {DType::F8E4M3, DType::F8E5M2}) {
      DYNAMIC_SECTION(dstrain::dtype_name(src_dt) << " -> " << dstrain::dtype_name(fmt)) {
        const std::int64_t R = 37, C = 10, Rp = 64, Cp = 32;
        const Tensor src = converted(random_f32({R, C}, rng, -3.0f, 3.0f), src_dt);
        amp::Fp8MetaOptions o;
        o.format = fmt;
        amp::Fp8Meta plain_meta(Device::cpu(), o), padded_meta(Device::cpu(), o), t_meta(Device::cpu(), o);
        for (amp::Fp8Meta* m : {&plain_meta, &padded_meta, &t_meta}) set_fp8_scale(*m, 100.0f);  // some saturate
        Tensor plain = poisoned({R, C}, fmt);
        amp::cast_to_fp8(ctx, src, plain, plain_meta);
        Tensor padded = poisoned({Rp, Cp}, fmt), transposed = poisoned({Cp, Rp}, fmt);
        amp::cast_to_fp8_padded(ctx, src, padded, padded_meta, amp::Fp8Layout::AsIs);
        amp::cast_to_fp8_padded(ctx, src, transposed, t_meta, amp::Fp8Layout::Transposed);
        const auto* p = plain.data_as<std::uint8_t>();
        const auto* a = padded.data_as<std::uint8_t>();
        const auto* t = transposed.data_as<std::uint8_t>();
        int mismatches = 0;
        for (std::int64_t r = 0; r < Rp; ++r)
          for (std::int64_t c = 0; c < Cp; ++c) {
            const bool valid = r < R && c < C;
            const std::uint8_t want = valid ? p[r * C + c] : 0;
            mismatches += a[r * Cp + c] != want;
            mismatches += t[c * Rp + r] != want;
          }
        CHECK(mismatches == 0);
        const std::vector<float> v = src.to_host_floats();
        float amax = 0.0f;
        for (float x : v) amax = std::max(amax, std::abs(x));
        CHECK(fp8_amax(plain_meta) == amax);
        CHECK(fp8_amax(padded_meta) == amax);
        CHECK(fp8_amax(t_meta) == amax);
        Tensor wrong = poisoned({R, C}, fmt);
        CHECK(error_code_of([&] { amp::cast_to_fp8_padded(ctx, src, wrong, t_meta, amp::Fp8Layout::AsIs); }) ==
              dstrain::ErrorCode::InvalidArgument);
      }
    }
  }
}

TEST_CASE("crop_padded and column_sums", "[amp][lowp][fp8]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(12);
  const Tensor src = random_f32({48, 16}, rng);
  const Tensor bias = random_f32({10}, rng);
  Tensor y = poisoned({37, 10}, DType::F32), y16 = poisoned({37, 10}, DType::BF16);
  amp::crop_padded(ctx, src, y, &bias);
  amp::crop_padded(ctx, src, y16);
  const std::vector<float> s = src.to_host_floats(), b = bias.to_host_floats(), yv = y.to_host_floats(),
                           y16v = y16.to_host_floats();
  int bad = 0;
  for (int r = 0; r < 37; ++r)
    for (int c = 0; c < 10; ++c) {
      bad += yv[r * 10 + c] != s[r * 16 + c] + b[c];
      bad += y16v[r * 10 + c] != dstrain::bf16_to_float(dstrain::float_to_bf16(s[r * 16 + c]));
    }
  CHECK(bad == 0);
  Tensor sums = poisoned({16}, DType::F32);
  amp::column_sums(ctx, src, sums);
  const std::vector<float> sv = sums.to_host_floats();
  for (int c = 0; c < 16; ++c) {
    double ref = 0.0;
    for (int r = 0; r < 48; ++r) ref += s[r * 16 + c];
    CHECK(std::abs(sv[c] - ref) <= 1e-5 * 48 * 2.0);
  }
  Tensor too_big = poisoned({49, 10}, DType::F32);
  CHECK(error_code_of([&] { amp::crop_padded(ctx, src, too_big); }) == dstrain::ErrorCode::InvalidArgument);
}

namespace {
// x * scale saturated and rounded to the fp8 format, then divided back: what the fp8 GEMM sees.
float fp8_roundtrip(float x, float scale, DType fmt) {
  const float limit = amp::fp8_max(fmt);
  const float v = std::fmin(std::fmax(x * scale, -limit), limit);
  const float q = fmt == DType::F8E4M3 ? dstrain::fp8_e4m3_to_float(dstrain::float_to_fp8_e4m3(v))
                                       : dstrain::fp8_e5m2_to_float(dstrain::float_to_fp8_e5m2(v));
  return q;
}

// out[i][j] = sum_k a[i][k] * b[j][k] with a, b quantised (a_scale / b_scale, formats) then
// multiplied back by 1/scale each, in double; `bound` gets sum_k |a||b| of the unquantised values.
void quantised_matmul_nt(const std::vector<float>& a, const std::vector<float>& b, std::int64_t M, std::int64_t N,
                         std::int64_t K, float a_scale, DType a_fmt, float b_scale, DType b_fmt,
                         std::vector<double>& out, std::vector<double>& bound) {
  out.assign(static_cast<std::size_t>(M * N), 0.0);
  bound.assign(static_cast<std::size_t>(M * N), 0.0);
  for (std::int64_t i = 0; i < M; ++i)
    for (std::int64_t j = 0; j < N; ++j) {
      double acc = 0.0, mag = 0.0;
      for (std::int64_t k = 0; k < K; ++k) {
        const float av = a[i * K + k], bv = b[j * K + k];
        acc += static_cast<double>(fp8_roundtrip(av, a_scale, a_fmt)) * fp8_roundtrip(bv, b_scale, b_fmt);
        mag += std::abs(static_cast<double>(av) * bv);
      }
      out[i * N + j] = acc * (1.0 / a_scale) * (1.0 / b_scale);
      bound[i * N + j] = mag;
    }
}

std::vector<float> transposed(const std::vector<float>& v, std::int64_t rows, std::int64_t cols) {
  std::vector<float> t(v.size());
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) t[c * rows + r] = v[r * cols + c];
  return t;
}

// Checks got against the dequantised-operand reference (tight) and against the fp32 layer
// (within rel * sum|a||b|: the fp8 roundings of both operands), and that fp8 changed something.
void check_fp8_result(const char* what, const std::vector<float>& got, const std::vector<double>& quantised_ref,
                      const std::vector<double>& bound, const std::vector<float>& fp32_ref, double rel) {
  INFO(what);
  REQUIRE(got.size() == quantised_ref.size());
  REQUIRE(got.size() == fp32_ref.size());
  int far_from_quantised = 0, far_from_fp32 = 0, differs = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    far_from_quantised += !(std::abs(got[i] - quantised_ref[i]) <= 1e-5 * bound[i] + 1e-7);
    far_from_fp32 += !(std::abs(got[i] - fp32_ref[i]) <= rel * bound[i] + 1e-6);
    differs += got[i] != fp32_ref[i];
  }
  CHECK(far_from_quantised == 0);
  CHECK(far_from_fp32 == 0);
  CHECK(differs > 0);
}
}  // namespace

TEST_CASE("FP8 Linear forward and backward track the fp32 Linear through padding", "[nn][lowp][fp8]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(13);
  const int in = 24, out = 10;  // neither a multiple of 16
  const std::int64_t n = 37;
  dstrain::nn::Linear ref(Device::cpu(), in, out, true);
  dstrain::nn::Linear fp8(Device::cpu(), in, out, true, amp::Policy::fp8_hybrid());
  REQUIRE(fp8.fp8());
  REQUIRE(fp8.fp8_metas().size() == 3);
  CHECK(ref.fp8_metas().empty());
  dstrain::nn::init_parameters(ref, 5);
  dstrain::nn::init_parameters(fp8, 5);
  const Tensor x = random_f32({n, in}, rng, -2.0f, 2.0f);
  const Tensor dy = random_f32({n, out}, rng, -0.01f, 0.01f);

  // A first step from scale 1, then scales from its amaxes: the delayed-scaling steady state.
  fp8.forward(ctx, x, true);
  fp8.backward(ctx, dy);
  amp::Fp8Meta& xm = *fp8.fp8_metas()[0];
  amp::Fp8Meta& wm = *fp8.fp8_metas()[1];
  amp::Fp8Meta& gm = *fp8.fp8_metas()[2];
  const std::vector<float> xv = x.to_host_floats(), dyv = dy.to_host_floats();
  float x_amax = 0.0f, dy_amax = 0.0f;
  for (float v : xv) x_amax = std::max(x_amax, std::abs(v));
  for (float v : dyv) dy_amax = std::max(dy_amax, std::abs(v));
  CHECK(fp8_amax(xm) == x_amax);
  CHECK(fp8_amax(gm) == dy_amax);
  amp::update_fp8_scales(ctx, fp8.fp8_metas(), nullptr);
  CHECK(fp8_amax(xm) == 0.0f);
  const float sx = xm.scale().to_host_floats()[0], sw = wm.scale().to_host_floats()[0],
              sg = gm.scale().to_host_floats()[0];
  CHECK(sx == 448.0f / x_amax);
  CHECK(sg == 57344.0f / dy_amax);

  fp8.weight().grad.fill_bytes(0xFF);
  fp8.bias().grad.fill_bytes(0xFF);
  const std::vector<float> y8 = fp8.forward(ctx, x, true).to_host_floats();
  const Tensor& dx8_t = fp8.backward(ctx, dy);
  REQUIRE(dx8_t.dtype() == DType::F32);
  REQUIRE(dx8_t.shape() == Shape{n, in});
  const std::vector<float> dx8 = dx8_t.to_host_floats();
  const std::vector<float> dw8 = fp8.weight().grad.to_host_floats(), db8 = fp8.bias().grad.to_host_floats();

  const std::vector<float> y32 = ref.forward(ctx, x, true).to_host_floats();
  const std::vector<float> dx32 = ref.backward(ctx, dy).to_host_floats();
  const std::vector<float> dw32 = ref.weight().grad.to_host_floats(), db32 = ref.bias().grad.to_host_floats();

  const std::vector<float> w = ref.weight().value.to_host_floats(), b = ref.bias().value.to_host_floats();
  std::vector<double> q, bound;
  // E4M3 rounds to within 2^-4 relative, E5M2 to within 2^-3: a product of two rounded values is
  // within about their sum (plus subnormal steps, covered by the margin).
  quantised_matmul_nt(xv, w, n, out, in, sx, DType::F8E4M3, sw, DType::F8E4M3, q, bound);
  for (std::int64_t i = 0; i < n; ++i)
    for (int j = 0; j < out; ++j) q[i * out + j] += b[j];
  check_fp8_result("y", y8, q, bound, y32, 0.15);
  quantised_matmul_nt(dyv, transposed(w, out, in), n, in, out, sg, DType::F8E5M2, sw, DType::F8E4M3, q, bound);
  check_fp8_result("dx", dx8, q, bound, dx32, 0.25);
  quantised_matmul_nt(transposed(dyv, n, out), transposed(xv, n, in), out, in, n, sg, DType::F8E5M2, sx,
                      DType::F8E4M3, q, bound);
  check_fp8_result("dw", dw8, q, bound, dw32, 0.25);
  for (int j = 0; j < out; ++j) CHECK(std::abs(db8[j] - db32[j]) <= 1e-6);  // fp32 column sums

  // The first layer of a network skips dx.
  fp8.set_needs_input_grad(false);
  fp8.forward(ctx, x, true);
  CHECK(fp8.backward(ctx, dy).numel() == 0);
}

TEST_CASE("small_cnn under fp8_hybrid tracks fp32", "[nn][lowp][fp8]") {
  const StepResult plain = one_step(amp::Policy::fp32(), false);
  const StepResult low = one_step(amp::Policy::fp8_hybrid(), true, /*calibrate_fp8=*/true);
  REQUIRE(low.logits.size() == plain.logits.size());
  bool any_diff = false;
  for (std::size_t i = 0; i < low.logits.size(); ++i) {
    INFO("logit " << i);
    CHECK(std::abs(low.logits[i] - plain.logits[i]) <= 0.25 * (1.0 + std::abs(plain.logits[i])));
    any_diff = any_diff || low.logits[i] != plain.logits[i];
  }
  CHECK(any_diff);
  REQUIRE(low.grads.size() == plain.grads.size());
  for (std::size_t t = 0; t < low.grads.size(); ++t) {
    CHECK(low.grad_dtypes[t] == DType::F32);
    double num = 0.0, den = 0.0, dot = 0.0, low_sq = 0.0;
    for (std::size_t i = 0; i < low.grads[t].size(); ++i) {
      const double d = low.grads[t][i] - plain.grads[t][i];
      num += d * d;
      den += static_cast<double>(plain.grads[t][i]) * plain.grads[t][i];
      dot += static_cast<double>(low.grads[t][i]) * plain.grads[t][i];
      low_sq += static_cast<double>(low.grads[t][i]) * low.grads[t][i];
    }
    const double cosine = dot / std::max(std::sqrt(den * low_sq), 1e-30);
    INFO("parameter " << t << ": relative L2 error " << std::sqrt(num / std::max(den, 1e-30)) << ", cosine "
                      << cosine);
    // E4M3 keeps 3 mantissa bits: every convolution's forward adds a few percent of noise, which
    // moves ReLU masks and BatchNorm statistics of this 4-image batch; the gradients keep their
    // direction (measured cosines 0.58 to 1) and size. A wrong scale or layout would not.
    CHECK(cosine >= 0.5);
    CHECK(std::sqrt(num) <= 1.0 * std::sqrt(den) + 1e-6);
  }
}
