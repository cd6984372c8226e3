// dstrain::amp on the CPU path: the loss scaler's state machine (growth, backoff, skip, a NaN
// injected mid-run, state round trip), FP8 cast rounding and saturation against dtype.h's host
// conversions, amax and scale-update edge cases, the fused optimizers against hand-worked values
// and against ops::sgd_step, and the GEMM reference on exactly representable data.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "dstrain/amp.h"
#include "dstrain/context.h"
#include "dstrain/dtype.h"
#include "dstrain/error.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Tensor;
namespace amp = dstrain::amp;

namespace {

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> floats(const Tensor& t) { return t.to_host_floats(); }

// One step of the loss-scaling protocol on `grads` (values already multiplied by the scale).
void scaler_step(Context& ctx, amp::GradScaler& scaler, std::vector<Tensor*> grads) {
  scaler.unscale_and_check(ctx, grads);
  scaler.update(ctx);
}

Tensor fp8_of(const std::vector<float>& values, amp::Fp8Meta& meta, Context& ctx) {
  const Tensor src = Tensor::from_vector({static_cast<std::int64_t>(values.size())}, values);
  Tensor dst = Tensor::empty(src.shape(), meta.options().format, Device::cpu());
  dst.fill_bytes(0x55);
  amp::cast_to_fp8(ctx, src, dst, meta);
  return dst;
}

std::uint8_t byte_at(const Tensor& t, std::size_t i) { return t.data_as<std::uint8_t>()[i]; }

}  // namespace

TEST_CASE("GradScaler starts with PyTorch's defaults", "[amp][scaler]") {
  Context ctx = Context::cpu();
  amp::GradScaler scaler(Device::cpu());
  CHECK(scaler.scale(ctx) == 65536.0f);
  CHECK(scaler.growth_tracker(ctx) == 0);
  CHECK_FALSE(scaler.found_inf_set(ctx));
  CHECK(scaler.options().growth_interval == 2000);
  CHECK(scaler.options().growth_factor == 2.0f);
  CHECK(scaler.options().backoff_factor == 0.5f);
}

TEST_CASE("GradScaler unscales by 1/scale and grows after 2000 clean steps", "[amp][scaler]") {
  Context ctx = Context::cpu();
  amp::GradScaler scaler(Device::cpu());
  Tensor g = Tensor::from_vector({5}, {65536.0f, -32768.0f, 3.0f * 65536.0f, 0.0f, 1.0f});
  Tensor h = Tensor::from_vector({2}, {131072.0f, 6.5536f});
  scaler.unscale_and_check(ctx, {&g, &h});
  CHECK(floats(g) == std::vector<float>{1.0f, -0.5f, 3.0f, 0.0f, 1.0f / 65536.0f});
  CHECK(floats(h)[0] == 2.0f);
  CHECK(floats(h)[1] == Approx(6.5536f / 65536.0f));
  CHECK_FALSE(scaler.found_inf_set(ctx));
  scaler.update(ctx);  // clean step 1
  CHECK(scaler.growth_tracker(ctx) == 1);
  for (int step = 2; step < 2000; ++step) scaler_step(ctx, scaler, {&g});
  CHECK(scaler.scale(ctx) == 65536.0f);
  CHECK(scaler.growth_tracker(ctx) == 1999);
  scaler_step(ctx, scaler, {&g});  // the 2000th clean step
  CHECK(scaler.scale(ctx) == 131072.0f);
  CHECK(scaler.growth_tracker(ctx) == 0);
}

TEST_CASE("GradScaler backs off and resets the counter on inf or NaN injected mid-run", "[amp][scaler]") {
  Context ctx = Context::cpu();
  amp::GradScalerOptions o;
  o.growth_interval = 3;
  amp::GradScaler scaler(Device::cpu(), o);
  Tensor clean = Tensor::from_vector({3}, {1.0f, 2.0f, 3.0f});
  Tensor dirty = Tensor::from_vector({4}, {1.0f, 2.0f, kNaN, 4.0f});
  scaler_step(ctx, scaler, {&clean});
  scaler_step(ctx, scaler, {&clean});
  CHECK(scaler.growth_tracker(ctx) == 2);
  // NaN in the second of two tensors: flag set, every finite value still unscaled.
  Tensor first = Tensor::from_vector({2}, {65536.0f, 65536.0f});
  scaler.unscale_and_check(ctx, {&first, &dirty});
  CHECK(scaler.found_inf_set(ctx));
  CHECK(floats(first) == std::vector<float>{1.0f, 1.0f});
  CHECK(floats(dirty)[3] == 4.0f / 65536.0f);
  scaler.update(ctx);
  CHECK(scaler.scale(ctx) == 32768.0f);
  CHECK(scaler.growth_tracker(ctx) == 0);
  CHECK_FALSE(scaler.found_inf_set(ctx));
  // An inf: backoff again.
  Tensor inf = Tensor::from_vector({1}, {-kInf});
  scaler_step(ctx, scaler, {&inf});
  CHECK(scaler.scale(ctx) == 16384.0f);
  // Three clean steps in a row: growth back to 32768.
  for (int i = 0; i < 3; ++i) scaler_step(ctx, scaler, {&clean});
  CHECK(scaler.scale(ctx) == 32768.0f);
  CHECK(scaler.growth_tracker(ctx) == 0);
}

TEST_CASE("GradScaler never grows the scale to inf", "[amp][scaler]") {
  Context ctx = Context::cpu();
  amp::GradScalerOptions o;
  o.init_scale = std::ldexp(1.0f, 127);
  o.growth_interval = 1;
  amp::GradScaler scaler(Device::cpu(), o);
  Tensor g = Tensor::from_vector({1}, {1.0f});
  scaler_step(ctx, scaler, {&g});
  CHECK(scaler.scale(ctx) == std::ldexp(1.0f, 127));
  CHECK(scaler.growth_tracker(ctx) == 0);
}

TEST_CASE("GradScaler skip makes the fused optimizers leave everything untouched", "[amp][scaler][optim]") {
  Context ctx = Context::cpu();
  amp::GradScaler scaler(Device::cpu());
  Tensor p = Tensor::from_vector({3}, {1.0f, 2.0f, 3.0f});
  Tensor q = Tensor::from_vector({3}, {1.0f, 2.0f, 3.0f});
  Tensor g = Tensor::from_vector({3}, {65536.0f, kInf, 65536.0f});
  Tensor gq = Tensor::from_vector({3}, {65536.0f, 65536.0f, 65536.0f});
  amp::FusedSGD sgd({&p}, {0.1f, 0.9f, 0.0f, false});
  amp::FusedAdamW adamw({&q}, {});
  scaler.unscale_and_check(ctx, {&g});
  scaler.unscale_and_check(ctx, {&gq});
  REQUIRE(scaler.found_inf_set(ctx));
  sgd.step(ctx, {&g}, &scaler.found_inf());
  adamw.step(ctx, {&gq}, &scaler.found_inf());
  CHECK(floats(p) == std::vector<float>{1.0f, 2.0f, 3.0f});
  CHECK(floats(sgd.momentum_buffers()[0]) == std::vector<float>{0.0f, 0.0f, 0.0f});
  CHECK(floats(q) == std::vector<float>{1.0f, 2.0f, 3.0f});
  CHECK(floats(adamw.exp_avg()[0]) == std::vector<float>{0.0f, 0.0f, 0.0f});
  CHECK(floats(adamw.step_count())[0] == 0.0f);
  scaler.update(ctx);
  // Next step clean: both update.
  Tensor g2 = Tensor::from_vector({3}, {32768.0f, 32768.0f, 32768.0f});
  scaler.unscale_and_check(ctx, {&g2});
  REQUIRE_FALSE(scaler.found_inf_set(ctx));
  sgd.step(ctx, {&g2}, &scaler.found_inf());
  adamw.step(ctx, {&g2}, &scaler.found_inf());
  CHECK(floats(p)[0] == Approx(0.9f));
  CHECK(floats(adamw.step_count())[0] == 1.0f);
  CHECK(floats(q)[0] < 1.0f);
}

TEST_CASE("GradScaler state round trip and corrupt state", "[amp][scaler]") {
  Context ctx = Context::cpu();
  amp::GradScalerOptions o;
  o.growth_interval = 10;
  amp::GradScaler a(Device::cpu(), o);
  Tensor g = Tensor::from_vector({1}, {kNaN});
  scaler_step(ctx, a, {&g});  // scale 32768
  Tensor c = Tensor::from_vector({1}, {1.0f});
  for (int i = 0; i < 7; ++i) scaler_step(ctx, a, {&c});
  const std::vector<char> bytes = a.state();
  amp::GradScaler b(Device::cpu(), o);
  b.load_state(bytes);
  CHECK(b.scale(ctx) == 32768.0f);
  CHECK(b.growth_tracker(ctx) == 7);
  // Both continue identically: 3 more clean steps grow both.
  for (int i = 0; i < 3; ++i) {
    scaler_step(ctx, a, {&c});
    scaler_step(ctx, b, {&c});
  }
  CHECK(a.scale(ctx) == 65536.0f);
  CHECK(b.scale(ctx) == 65536.0f);

  std::vector<char> bad = bytes;
  bad[0] = 'X';
  CHECK_THROWS_AS(b.load_state(bad), dstrain::Error);
  try {
    b.load_state(std::vector<char>(bytes.begin(), bytes.end() - 1));
    FAIL("a truncated state loaded");
  } catch (const dstrain::Error& e) {
    CHECK(e.code() == dstrain::ErrorCode::Corrupt);
  }
  std::vector<char> negative = bytes;
  const float minus = -1.0f;
  std::memcpy(negative.data() + 4, &minus, sizeof(minus));
  CHECK_THROWS_AS(b.load_state(negative), dstrain::Error);
  CHECK(b.scale(ctx) == 65536.0f);  // unchanged by the refused loads
}

TEST_CASE("fp8 cast rounds as dtype.h and saturates past the largest finite value", "[amp][fp8]") {
  Context ctx = Context::cpu();
  SECTION("e4m3") {
    amp::Fp8Meta meta(Device::cpu(), {DType::F8E4M3, 4, amp::AmaxAlgo::Max, 0});
    const std::vector<float> x{448.0f, 464.0f, 500.0f, 1e9f, kInf, -kInf, -600.0f, 0.0f,
                               std::ldexp(1.0f, -9), std::ldexp(1.0f, -10), 3.0f * std::ldexp(1.0f, -10),
                               1.0625f, 1.1875f, kNaN};
    const Tensor q = fp8_of(x, meta, ctx);
    const std::vector<std::uint8_t> expect{0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE, 0x00,
                                           0x01, 0x00, 0x02, 0x38, 0x3A};
    for (std::size_t i = 0; i < expect.size(); ++i) {
      INFO("x = " << x[i]);
      CHECK(int(byte_at(q, i)) == int(expect[i]));
      CHECK(int(byte_at(q, i)) == int(dstrain::float_to_fp8_e4m3(std::fmin(std::fmax(x[i], -448.f), 448.f))));
    }
    CHECK(std::isnan(dstrain::fp8_e4m3_to_float(byte_at(q, x.size() - 1))));
  }
  SECTION("e5m2") {
    amp::Fp8Meta meta(Device::cpu(), {DType::F8E5M2, 4, amp::AmaxAlgo::Max, 0});
    const std::vector<float> x{57344.0f, 60000.0f, 70000.0f, kInf, -kInf, 1.0f, 1.125f, 1.375f, kNaN};
    const Tensor q = fp8_of(x, meta, ctx);
    // 60000 and 70000 would be inf under plain rounding (dtype.h); the cast saturates.
    CHECK(dstrain::float_to_fp8_e5m2(70000.0f) == 0x7C);
    const std::vector<std::uint8_t> expect{0x7B, 0x7B, 0x7B, 0x7B, 0xFB, 0x3C, 0x3C, 0x3E};
    for (std::size_t i = 0; i < expect.size(); ++i) {
      INFO("x = " << x[i]);
      CHECK(int(byte_at(q, i)) == int(expect[i]));
    }
    CHECK(std::isnan(dstrain::fp8_e5m2_to_float(byte_at(q, x.size() - 1))));
  }
  SECTION("random values with a scale, fp32 and bf16 sources, against dtype.h") {
    std::mt19937 rng(std::random_device{}());
    std::uniform_real_distribution<float> d(-3.0f, 3.0f);
    std::vector<float> x(4096);
    for (auto& v : x) v = d(rng);
    amp::Fp8Meta meta(Device::cpu(), {DType::F8E4M3, 1, amp::AmaxAlgo::MostRecent, 0});
    fp8_of({2.0f}, meta, ctx);
    meta.update_scale(ctx);  // scale = 448 / 2
    REQUIRE(floats(meta.scale())[0] == 224.0f);
    const Tensor q = fp8_of(x, meta, ctx);
    Tensor bf = Tensor::empty({4096}, DType::BF16, Device::cpu());
    dstrain::convert_host(x.data(), DType::F32, bf.data(), DType::BF16, x.size());
    Tensor qb = Tensor::empty({4096}, DType::F8E4M3, Device::cpu());
    amp::cast_to_fp8(ctx, bf, qb, meta);
    const std::vector<float> xb = bf.to_host_floats();
    std::size_t wrong = 0, saturated = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const float s = std::fmin(std::fmax(x[i] * 224.0f, -448.0f), 448.0f);
      if (std::fabs(x[i] * 224.0f) > 448.0f) ++saturated;
      if (byte_at(q, i) != dstrain::float_to_fp8_e4m3(s)) ++wrong;
      const float sb = std::fmin(std::fmax(xb[i] * 224.0f, -448.0f), 448.0f);
      if (byte_at(qb, i) != dstrain::float_to_fp8_e4m3(sb)) ++wrong;
    }
    CHECK(wrong == 0);
    CHECK(saturated > 0);  // the data reached past the scale's range
  }
}

TEST_CASE("fp8 amax of the cast input: zero, denormals, inf, NaN", "[amp][fp8]") {
  Context ctx = Context::cpu();
  amp::Fp8Meta meta(Device::cpu(), {DType::F8E4M3, 2, amp::AmaxAlgo::MostRecent, 0});
  fp8_of({0.0f, -0.0f}, meta, ctx);
  CHECK(floats(meta.amax())[0] == 0.0f);
  fp8_of({1e-40f, -2e-41f}, meta, ctx);
  CHECK(floats(meta.amax())[0] == 1e-40f);  // a denormal, kept exactly
  fp8_of({-3.5f, 1.0f}, meta, ctx);
  CHECK(floats(meta.amax())[0] == 3.5f);  // raised across casts of one step
  fp8_of({1.0f}, meta, ctx);
  CHECK(floats(meta.amax())[0] == 3.5f);
  fp8_of({-kInf}, meta, ctx);
  CHECK(floats(meta.amax())[0] == kInf);
  fp8_of({kNaN, 1.0f}, meta, ctx);
  CHECK(std::isnan(floats(meta.amax())[0]));
}

TEST_CASE("fp8 scale update: formula, margin, history, and amax of 0, inf, NaN, denormal", "[amp][fp8]") {
  Context ctx = Context::cpu();
  SECTION("most recent, margin") {
    amp::Fp8Meta meta(Device::cpu(), {DType::F8E4M3, 3, amp::AmaxAlgo::MostRecent, 1});
    fp8_of({3.5f}, meta, ctx);
    meta.update_scale(ctx);
    CHECK(floats(meta.scale())[0] == 64.0f);  // (448 / 3.5) / 2
    CHECK(floats(meta.scale_inv())[0] == 1.0f / 64.0f);
    CHECK(floats(meta.amax())[0] == 0.0f);     // reset for the next step
    CHECK(floats(meta.state())[3] == 3.5f);    // history[0]
  }
  SECTION("edge amaxes keep the previous scale") {
    amp::Fp8Meta meta(Device::cpu(), {DType::F8E5M2, 1, amp::AmaxAlgo::Max, 0});
    fp8_of({7.0f}, meta, ctx);
    meta.update_scale(ctx);
    REQUIRE(floats(meta.scale())[0] == 8192.0f);  // 57344 / 7
    for (const std::vector<float>& step : {std::vector<float>{0.0f}, std::vector<float>{kInf},
                                           std::vector<float>{kNaN}, std::vector<float>{1e-40f}}) {
      INFO("amax input " << step[0]);
      fp8_of(step, meta, ctx);
      meta.update_scale(ctx);
      const float s = floats(meta.scale())[0];
      CHECK(s == 8192.0f);
      CHECK(floats(meta.scale_inv())[0] == 1.0f / 8192.0f);
    }
    // A tiny normal amax whose scale still fits in fp32 is taken.
    fp8_of({1e-30f}, meta, ctx);
    meta.update_scale(ctx);
    CHECK(floats(meta.scale())[0] == Approx(57344.0f / 1e-30f).epsilon(1e-6));
  }
  SECTION("max over the history rolls the old amax out after L steps") {
    amp::Fp8Meta meta(Device::cpu(), {DType::F8E4M3, 3, amp::AmaxAlgo::Max, 0});
    const float amaxes[] = {4.0f, 1.0f, 1.0f, 1.0f};
    const float expect[] = {112.0f, 112.0f, 112.0f, 448.0f};
    for (int s = 0; s < 4; ++s) {
      fp8_of({amaxes[s]}, meta, ctx);
      meta.update_scale(ctx);
      CHECK(floats(meta.scale())[0] == expect[s]);
    }
    const std::vector<float> st = floats(meta.state());
    CHECK(st[3] == 1.0f);
    CHECK(st[4] == 1.0f);
    CHECK(st[5] == 1.0f);
  }
  SECTION("an inf in the history freezes the scale until it rolls out") {
    amp::Fp8Meta meta(Device::cpu(), {DType::F8E4M3, 2, amp::AmaxAlgo::Max, 0});
    fp8_of({2.0f}, meta, ctx);
    meta.update_scale(ctx);
    REQUIRE(floats(meta.scale())[0] == 224.0f);
    fp8_of({kInf}, meta, ctx);
    meta.update_scale(ctx);
    CHECK(floats(meta.scale())[0] == 224.0f);
    fp8_of({8.0f}, meta, ctx);
    meta.update_scale(ctx);
    CHECK(floats(meta.scale())[0] == 224.0f);  // history [8, inf]
    fp8_of({8.0f}, meta, ctx);
    meta.update_scale(ctx);
    CHECK(floats(meta.scale())[0] == 56.0f);  // history [8, 8]
  }
}

TEST_CASE("FusedSGD against hand-worked values", "[amp][optim]") {
  Context ctx = Context::cpu();
  SECTION("momentum and weight decay") {
    Tensor p = Tensor::from_vector({1}, {1.0f});
    Tensor g = Tensor::from_vector({1}, {0.5f});
    amp::FusedSGD opt({&p}, {0.1f, 0.9f, 0.1f, false});
    opt.step(ctx, {&g});
    CHECK(floats(p)[0] == Approx(0.94f));
    opt.step(ctx, {&g});
    CHECK(floats(p)[0] == Approx(0.8266f));
    CHECK(floats(opt.momentum_buffers()[0])[0] == Approx(1.134f));
  }
  SECTION("nesterov") {
    Tensor p = Tensor::from_vector({1}, {1.0f});
    Tensor g = Tensor::from_vector({1}, {0.5f});
    amp::FusedSGD opt({&p}, {0.1f, 0.9f, 0.1f, true});
    opt.step(ctx, {&g});
    CHECK(floats(p)[0] == Approx(0.886f));
  }
}

TEST_CASE("FusedSGD matches ops::sgd_step on random tensors", "[amp][optim]") {
  Context ctx = Context::cpu();
  std::mt19937 rng(std::random_device{}());
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  const std::vector<std::int64_t> sizes{1, 7, 64, 1001};
  for (const dstrain::ops::SgdParams sp : {dstrain::ops::SgdParams{0.05f, 0.0f, 0.0f, false},
                                           dstrain::ops::SgdParams{0.05f, 0.9f, 1e-4f, false},
                                           dstrain::ops::SgdParams{0.05f, 0.9f, 1e-2f, true}}) {
    std::vector<Tensor> p, q, grads, bufs;
    std::vector<Tensor*> pp, gp;
    for (std::int64_t n : sizes) {
      std::vector<float> v(static_cast<std::size_t>(n));
      for (auto& x : v) x = d(rng);
      p.push_back(Tensor::from_vector({n}, v));
      q.push_back(Tensor::from_vector({n}, v));
      bufs.push_back(Tensor::zeros({n}, DType::F32, Device::cpu()));
      grads.push_back(Tensor::zeros({n}, DType::F32, Device::cpu()));
    }
    for (auto& t : p) pp.push_back(&t);
    for (auto& t : grads) gp.push_back(&t);
    amp::FusedSGD opt(pp, {sp.lr, sp.momentum, sp.weight_decay, sp.nesterov});
    std::vector<Tensor> low;
    std::vector<Tensor*> lowp;
    for (std::int64_t n : sizes) low.push_back(Tensor::empty({n}, DType::BF16, Device::cpu()));
    for (auto& t : low) lowp.push_back(&t);
    for (int step = 0; step < 3; ++step) {
      for (auto& g : grads)
        for (std::int64_t i = 0; i < g.numel(); ++i) g.data_as<float>()[i] = d(rng);
      opt.step(ctx, gp, nullptr, &lowp);
      for (std::size_t t = 0; t < sizes.size(); ++t) dstrain::ops::sgd_step(ctx, q[t], grads[t], bufs[t], sp);
    }
    for (std::size_t t = 0; t < sizes.size(); ++t) {
      const std::vector<float> a = floats(p[t]), b = floats(q[t]), l = floats(low[t]);
      for (std::size_t i = 0; i < a.size(); ++i) {
        CHECK(a[i] == Approx(b[i]).margin(1e-6));
        CHECK(l[i] == dstrain::bf16_to_float(dstrain::float_to_bf16(a[i])));
      }
    }
  }
}

TEST_CASE("FusedAdamW against hand-worked values", "[amp][optim]") {
  Context ctx = Context::cpu();
  Tensor p = Tensor::from_vector({1}, {1.0f});
  Tensor g = Tensor::from_vector({1}, {0.5f});
  Tensor lp = Tensor::empty({1}, DType::F16, Device::cpu());
  std::vector<Tensor*> lps{&lp};
  amp::FusedAdamW opt({&p}, {0.1f, 0.9f, 0.999f, 1e-8f, 0.01f});
  opt.step(ctx, {&g}, nullptr, &lps);
  CHECK(floats(p)[0] == Approx(0.899f).epsilon(1e-6));  // the first step moves by lr
  CHECK(floats(lp)[0] == dstrain::fp16_to_float(dstrain::float_to_fp16(floats(p)[0])));
  g.data_as<float>()[0] = -0.5f;
  opt.step(ctx, {&g});
  CHECK(floats(p)[0] == Approx(0.903364f).epsilon(1e-5));
  CHECK(floats(opt.exp_avg()[0])[0] == Approx(-0.005f).epsilon(1e-4));
  // 1 - 0.999f is 0.00099998713 in fp32 (as in PyTorch): 1.3e-5 off the decimal value.
  CHECK(floats(opt.exp_avg_sq()[0])[0] == Approx(0.00049975f).epsilon(5e-5));
  CHECK(floats(opt.step_count())[0] == 2.0f);
}

TEST_CASE("optimizer and scaler argument checks", "[amp]") {
  Context ctx = Context::cpu();
  Tensor p = Tensor::zeros({4}, DType::F32, Device::cpu());
  Tensor g3 = Tensor::zeros({3}, DType::F32, Device::cpu());
  Tensor h = Tensor::zeros({4}, DType::F16, Device::cpu());
  amp::FusedSGD opt({&p}, {});
  CHECK_THROWS_AS(opt.step(ctx, {&g3}), dstrain::Error);
  CHECK_THROWS_AS(opt.step(ctx, {&h}), dstrain::Error);
  CHECK_THROWS_AS(opt.step(ctx, {}), dstrain::Error);
  CHECK_THROWS_AS(amp::FusedSGD({&p}, {0.1f, 0.0f, 0.0f, true}), dstrain::Error);
  CHECK_THROWS_AS(amp::GradScaler(Device::cpu(), {65536.0f, 0.5f, 0.5f, 2000}), dstrain::Error);
  amp::GradScaler scaler(Device::cpu());
  CHECK_THROWS_AS(scaler.unscale_and_check(ctx, {&h}), dstrain::Error);
}

TEST_CASE("GEMM reference on exact data, and its argument checks", "[amp][gemm]") {
  Context ctx = Context::cpu();
  const std::int64_t M = 16, N = 32, K = 48;
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> small(-4, 4);
  std::vector<float> av(static_cast<std::size_t>(M * K)), bv(static_cast<std::size_t>(N * K));
  for (auto& v : av) v = static_cast<float>(small(rng));  // integers: exact in e4m3 and in sums
  for (auto& v : bv) v = static_cast<float>(small(rng)) * 0.5f;
  Tensor a = Tensor::empty({M, K}, DType::F8E4M3, Device::cpu());
  Tensor b = Tensor::empty({N, K}, DType::F8E4M3, Device::cpu());
  dstrain::convert_host(av.data(), DType::F32, a.data(), DType::F8E4M3, av.size());
  dstrain::convert_host(bv.data(), DType::F32, b.data(), DType::F8E4M3, bv.size());
  Tensor sa = Tensor::from_vector({1}, {0.25f}), sb = Tensor::from_vector({1}, {2.0f});
  Tensor amax = Tensor::from_vector({1}, {-1.0f});
  Tensor d = Tensor::empty({M, N}, DType::F32, Device::cpu());
  d.fill_bytes(0xFF);
  amp::GemmOptions o;
  o.a_scale_inv = &sa;
  o.b_scale_inv = &sb;
  o.d_amax = &amax;
  amp::gemm_nt(ctx, a, b, d, o);
  const std::vector<float> dv = floats(d);
  float want_amax = 0.0f;
  for (std::int64_t i = 0; i < M; ++i)
    for (std::int64_t j = 0; j < N; ++j) {
      float s = 0.0f;
      for (std::int64_t k = 0; k < K; ++k) s += av[i * K + k] * bv[j * K + k];
      s *= 0.5f;
      want_amax = std::fmax(want_amax, std::fabs(s));
      CHECK(dv[static_cast<std::size_t>(i * N + j)] == s);
    }
  CHECK(floats(amax)[0] == want_amax);

  Tensor b_bad = Tensor::empty({N, K + 16}, DType::F8E4M3, Device::cpu());
  CHECK_THROWS_AS(amp::gemm_nt(ctx, a, b_bad, d, o), dstrain::Error);
  Tensor e5 = Tensor::empty({M, K}, DType::F8E5M2, Device::cpu());
  Tensor e5b = Tensor::empty({N, K}, DType::F8E5M2, Device::cpu());
  CHECK_THROWS_AS(amp::gemm_nt(ctx, e5, e5b, d, o), dstrain::Error);
  CHECK_THROWS_AS(amp::gemm_nt(ctx, a, b, d, {}), dstrain::Error);  // fp8 without scales
  Tensor a_odd = Tensor::empty({M, 40}, DType::F8E4M3, Device::cpu());
  Tensor b_odd = Tensor::empty({N, 40}, DType::F8E4M3, Device::cpu());
  CHECK_THROWS_AS(amp::gemm_nt(ctx, a_odd, b_odd, d, o), dstrain::Error);  // K not a multiple of 16
}
