// Every dstrain::amp CUDA kernel against the CPU reference (Context::cpu()) on fresh random data:
// multi-tensor unscale (inf/NaN planted in the middle of one tensor, unaligned views, more
// tensors than one launch holds), the scaler update, fused SGD/AdamW (with low-precision copies,
// and the skip path), the FP8 cast with amax, the FP8 scale update, and the FP8/BF16 GEMMs.
// Device outputs are poisoned first. Set DSTRAIN_TEST_SEED to replay a failing seed.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "dstrain/amp.h"
#include "dstrain/context.h"
#include "dstrain/dtype.h"
#include "dstrain/tensor.h"

#include "gpu/seeded_rng.h"
#include "working_copy_check.h"

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Tensor;
namespace amp = dstrain::amp;

namespace {

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

Device gpu() { return Device::cuda(0); }

std::vector<float> random_floats(std::int64_t n, std::mt19937& g, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = d(g);
  return v;
}

std::vector<float> fetch(Context& ctx, const Tensor& t) {
  ctx.synchronize();
  return t.to_host_floats();
}

std::vector<std::uint8_t> fetch_bytes(Context& ctx, const Tensor& t) {
  ctx.synchronize();
  const Tensor h = t.to(Device::cpu());
  const auto* p = static_cast<const std::uint8_t*>(h.data());
  return std::vector<std::uint8_t>(p, p + h.nbytes());
}

bool same_float(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

// |got - ref| <= atol + rtol * |ref| for every element; reports the first misses.
void check_close(const std::vector<float>& got, const std::vector<float>& ref, double atol, double rtol,
                 const char* what) {
  REQUIRE(got.size() == ref.size());
  std::size_t bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double tol = atol + rtol * std::fabs(ref[i]);
    if (!(std::fabs(static_cast<double>(got[i]) - ref[i]) <= tol)) {
      if (bad < 5) UNSCOPED_INFO(what << "[" << i << "]: got " << got[i] << ", reference " << ref[i]);
      ++bad;
    }
  }
  CHECK(bad == 0);
}

struct TensorSet {
  std::vector<Tensor> cpu, dev;
  std::vector<Tensor*> cpu_ptrs() {
    std::vector<Tensor*> v;
    for (auto& t : cpu) v.push_back(&t);
    return v;
  }
  std::vector<Tensor*> dev_ptrs() {
    std::vector<Tensor*> v;
    for (auto& t : dev) v.push_back(&t);
    return v;
  }
};

// Random fp32 tensors of the given sizes on both devices (identical values).
TensorSet random_set(const std::vector<std::int64_t>& sizes, std::mt19937& g, float lo, float hi) {
  TensorSet s;
  for (std::int64_t n : sizes) {
    s.cpu.push_back(Tensor::from_vector({n}, random_floats(n, g, lo, hi)));
    s.dev.push_back(s.cpu.back().to(gpu()));
  }
  return s;
}

std::vector<std::int64_t> random_sizes(int count, std::mt19937& g, std::int64_t max_n) {
  std::uniform_int_distribution<std::int64_t> d(1, max_n);
  std::vector<std::int64_t> v;
  for (int i = 0; i < count; ++i) v.push_back(d(g));
  return v;
}

}  // namespace

TEST_CASE("amp gpu: multi-tensor unscale matches the CPU, finds an inf/NaN planted mid-tensor", "[gpu][amp]") {
  SEEDED_RNG(rng);
  Context gctx = Context::cuda(0);
  Context cctx = Context::cpu();
  // 250 tensors: more than one launch holds (198); sizes across chunk boundaries; one empty.
  std::vector<std::int64_t> sizes = random_sizes(250, rng, 70000);
  sizes[17] = 0;
  sizes[18] = 16384;
  sizes[19] = 16385;
  for (const float planted : {0.0f, kInf, kNaN, -kInf}) {
    INFO("planted " << planted);
    TensorSet g = random_set(sizes, rng, -60000.0f, 60000.0f);
    std::vector<Tensor*> gp = g.dev_ptrs(), cp = g.cpu_ptrs();
    if (planted != 0.0f) {
      // Into the middle of one tensor, on both devices.
      const std::size_t t = std::uniform_int_distribution<std::size_t>(0, sizes.size() - 1)(rng);
      const std::int64_t n = sizes[t] == 0 ? 0 : sizes[t];
      if (n > 0) {
        const std::int64_t i = n / 2;
        g.cpu[t].data_as<float>()[i] = planted;
        g.dev[t].copy_from(g.cpu[t]);
      } else {
        g.cpu[0].data_as<float>()[0] = planted;
        g.dev[0].copy_from(g.cpu[0]);
      }
    }
    // A view one float off 16-byte alignment takes the scalar path.
    Tensor dev_view = Tensor::wrap(g.dev[5].data_as<float>() + 1, {sizes[5] - 1}, DType::F32, gpu());
    Tensor cpu_view = Tensor::wrap(g.cpu[5].data_as<float>() + 1, {sizes[5] - 1}, DType::F32, Device::cpu());
    if (sizes[5] > 1) {
      gp[5] = &dev_view;
      cp[5] = &cpu_view;
    }
    amp::GradScalerOptions o;
    o.init_scale = 3.0f;  // not a power of two: 1/scale rounds, identically on both
    amp::GradScaler gs(gpu(), o), cs(Device::cpu(), o);
    gs.unscale_and_check(gctx, gp);
    cs.unscale_and_check(cctx, cp);
    CHECK(gs.found_inf_set(gctx) == (planted != 0.0f));
    CHECK(cs.found_inf_set(cctx) == (planted != 0.0f));
    std::size_t wrong = 0;
    for (std::size_t t = 0; t < sizes.size(); ++t) {
      const std::vector<float> a = fetch(gctx, g.dev[t]), b = g.cpu[t].to_host_floats();
      for (std::size_t i = 0; i < a.size(); ++i)
        if (!same_float(a[i], b[i])) ++wrong;
    }
    CHECK(wrong == 0);
  }
}

TEST_CASE("amp gpu: scaler update follows the CPU over random clean/overflow steps", "[gpu][amp]") {
  SEEDED_RNG(rng);
  Context gctx = Context::cuda(0);
  Context cctx = Context::cpu();
  amp::GradScalerOptions o;
  o.growth_interval = 3;
  amp::GradScaler gs(gpu(), o), cs(Device::cpu(), o);
  std::bernoulli_distribution overflow(0.3);
  for (int step = 0; step < 40; ++step) {
    const float v = overflow(rng) ? kNaN : 1.0f;
    Tensor hc = Tensor::from_vector({3}, {1.0f, v, 2.0f});
    Tensor hg = hc.to(gpu());
    gs.unscale_and_check(gctx, {&hg});
    cs.unscale_and_check(cctx, {&hc});
    gs.update(gctx);
    cs.update(cctx);
    INFO("step " << step);
    REQUIRE(fetch(gctx, gs.state_tensor()) == cs.state_tensor().to_host_floats());
  }
  gctx.synchronize();
  amp::GradScaler restored(gpu(), o);
  restored.load_state(gs.state());
  CHECK(restored.scale(gctx) == cs.scale(cctx));
  CHECK(restored.growth_tracker(gctx) == cs.growth_tracker(cctx));
}

TEST_CASE("amp gpu: FusedSGD matches the CPU, writes low-precision copies, and skips", "[gpu][amp][optim]") {
  SEEDED_RNG(rng);
  Context gctx = Context::cuda(0);
  Context cctx = Context::cpu();
  const std::vector<std::int64_t> sizes = random_sizes(120, rng, 40000);  // 2 launches (90 per table)
  for (const amp::FusedSGDOptions opt : {amp::FusedSGDOptions{0.05f, 0.0f, 0.0f, false},
                                         amp::FusedSGDOptions{0.05f, 0.9f, 1e-4f, false},
                                         amp::FusedSGDOptions{0.05f, 0.9f, 1e-2f, true}}) {
    for (const DType low : {DType::F16, DType::BF16}) {
      INFO("momentum " << opt.momentum << " nesterov " << opt.nesterov << " low " << dstrain::dtype_name(low));
      TensorSet p = random_set(sizes, rng, -1.0f, 1.0f);
      std::vector<Tensor> lp_dev, lp_cpu;
      for (std::int64_t n : sizes) {
        lp_dev.push_back(Tensor::empty({n}, low, gpu()));
        lp_dev.back().fill_bytes(0xFF);
        lp_cpu.push_back(Tensor::empty({n}, low, Device::cpu()));
      }
      std::vector<Tensor*> lpd, lpc;
      for (auto& t : lp_dev) lpd.push_back(&t);
      for (auto& t : lp_cpu) lpc.push_back(&t);
      amp::FusedSGD gopt(p.dev_ptrs(), opt), copt(p.cpu_ptrs(), opt);
      Tensor flag_dev = Tensor::zeros({1}, DType::F32, gpu());
      Tensor flag_cpu = Tensor::zeros({1}, DType::F32, Device::cpu());
      for (int step = 0; step < 3; ++step) {
        TensorSet g = random_set(sizes, rng, -1.0f, 1.0f);
        gopt.step(gctx, g.dev_ptrs(), &flag_dev, &lpd);
        copt.step(cctx, g.cpu_ptrs(), &flag_cpu, &lpc);
      }
      for (std::size_t t = 0; t < sizes.size(); ++t) {
        check_close(fetch(gctx, p.dev[t]), p.cpu[t].to_host_floats(), 1e-6, 1e-5, "param");
        check_close(fetch(gctx, lp_dev[t]), lp_cpu[t].to_host_floats(), 1e-6, low == DType::F16 ? 1e-3 : 8e-3,
                    "low-precision copy");
      }
      // Skip: found_inf set, nothing written (params, momentum, poisoned copies).
      std::vector<std::vector<std::uint8_t>> before;
      for (auto& t : p.dev) before.push_back(fetch_bytes(gctx, t));
      for (auto& t : gopt.momentum_buffers()) before.push_back(fetch_bytes(gctx, t));
      for (auto& t : lp_dev) {
        t.fill_bytes(0xAB);
        before.push_back(fetch_bytes(gctx, t));
      }
      flag_dev.copy_from(Tensor::from_vector({1}, {1.0f}));
      TensorSet g = random_set(sizes, rng, -1.0f, 1.0f);
      gopt.step(gctx, g.dev_ptrs(), &flag_dev, &lpd);
      std::vector<std::vector<std::uint8_t>> after;
      for (auto& t : p.dev) after.push_back(fetch_bytes(gctx, t));
      for (auto& t : gopt.momentum_buffers()) after.push_back(fetch_bytes(gctx, t));
      for (auto& t : lp_dev) after.push_back(fetch_bytes(gctx, t));
      CHECK(before == after);
    }
  }
}

TEST_CASE("amp gpu: FusedAdamW matches the CPU, counts steps on the device, and skips", "[gpu][amp][optim]") {
  SEEDED_RNG(rng);
  Context gctx = Context::cuda(0);
  Context cctx = Context::cpu();
  const std::vector<std::int64_t> sizes = random_sizes(100, rng, 30000);  // 2 launches (76 per table)
  TensorSet p = random_set(sizes, rng, -1.0f, 1.0f);
  std::vector<Tensor> lp_dev, lp_cpu;
  for (std::int64_t n : sizes) {
    lp_dev.push_back(Tensor::empty({n}, DType::BF16, gpu()));
    lp_dev.back().fill_bytes(0xFF);
    lp_cpu.push_back(Tensor::empty({n}, DType::BF16, Device::cpu()));
  }
  std::vector<Tensor*> lpd, lpc;
  for (auto& t : lp_dev) lpd.push_back(&t);
  for (auto& t : lp_cpu) lpc.push_back(&t);
  const amp::FusedAdamWOptions opt{1e-2f, 0.9f, 0.999f, 1e-8f, 0.05f};
  amp::FusedAdamW gopt(p.dev_ptrs(), opt), copt(p.cpu_ptrs(), opt);
  Tensor flag_dev = Tensor::zeros({1}, DType::F32, gpu());
  Tensor flag_cpu = Tensor::zeros({1}, DType::F32, Device::cpu());
  const std::vector<bool> skipped{false, false, true, false, true, false};
  int taken = 0;
  for (bool skip : skipped) {
    TensorSet g = random_set(sizes, rng, -1.0f, 1.0f);
    flag_dev.copy_from(Tensor::from_vector({1}, {skip ? 1.0f : 0.0f}));
    flag_cpu.data_as<float>()[0] = skip ? 1.0f : 0.0f;
    gopt.step(gctx, g.dev_ptrs(), &flag_dev, &lpd);
    copt.step(cctx, g.cpu_ptrs(), &flag_cpu, &lpc);
    taken += skip ? 0 : 1;
    CHECK(fetch(gctx, gopt.step_count())[0] == static_cast<float>(taken));
  }
  CHECK(copt.step_count().to_host_floats()[0] == static_cast<float>(taken));
  for (std::size_t t = 0; t < sizes.size(); ++t) {
    // powf/sqrtf may differ by an ulp or two between host and device; m/denom amplifies a little.
    check_close(fetch(gctx, p.dev[t]), p.cpu[t].to_host_floats(), 1e-6, 1e-5, "param");
    check_close(fetch(gctx, gopt.exp_avg()[t]), copt.exp_avg()[t].to_host_floats(), 1e-7, 1e-5, "exp_avg");
    check_close(fetch(gctx, gopt.exp_avg_sq()[t]), copt.exp_avg_sq()[t].to_host_floats(), 1e-9, 1e-5, "exp_avg_sq");
    check_close(fetch(gctx, lp_dev[t]), lp_cpu[t].to_host_floats(), 1e-6, 8e-3, "bf16 copy");
  }
}

TEST_CASE("amp gpu: fp8 cast and amax match the CPU, scale updates match", "[gpu][amp][fp8]") {
  SEEDED_RNG(rng);
  Context gctx = Context::cuda(0);
  Context cctx = Context::cpu();
  for (const DType fmt : {DType::F8E4M3, DType::F8E5M2}) {
    for (const DType src_dt : {DType::F32, DType::BF16}) {
      INFO(dstrain::dtype_name(fmt) << " from " << dstrain::dtype_name(src_dt));
      const amp::Fp8MetaOptions mo{fmt, 4, amp::AmaxAlgo::Max, 0};
      amp::Fp8Meta gm(gpu(), mo), cm(Device::cpu(), mo);
      for (int step = 0; step < 6; ++step) {
        INFO("step " << step);
        const std::int64_t n = std::uniform_int_distribution<std::int64_t>(1, 300000)(rng);
        const float range = std::ldexp(1.0f, std::uniform_int_distribution<int>(-20, 12)(rng));
        std::vector<float> x = random_floats(n, rng, -range, range);
        // Edge values: a denormal, a big value past the coming scale, and on step 4 a NaN, on 5 an inf.
        x[static_cast<std::size_t>(n / 2)] = 1e-40f;
        if (n > 3) x[static_cast<std::size_t>(n / 3)] = range * 4.0f;
        if (step == 4) x[static_cast<std::size_t>(n - 1)] = kNaN;
        if (step == 5) x[0] = -kInf;
        Tensor xf = Tensor::from_vector({n}, x);
        Tensor xc = Tensor::empty({n}, src_dt, Device::cpu());
        dstrain::convert_host(x.data(), DType::F32, xc.data(), src_dt, x.size());
        Tensor xg = xc.to(gpu());
        Tensor qg = Tensor::empty({n}, fmt, gpu());
        qg.fill_bytes(0x55);
        Tensor qc = Tensor::empty({n}, fmt, Device::cpu());
        amp::cast_to_fp8(gctx, xg, qg, gm);
        amp::cast_to_fp8(cctx, xc, qc, cm);
        const std::vector<std::uint8_t> a = fetch_bytes(gctx, qg), b = fetch_bytes(cctx, qc);
        std::size_t wrong = 0;
        for (std::size_t i = 0; i < a.size(); ++i) {
          const bool nan_a = std::isnan(fmt == DType::F8E4M3 ? dstrain::fp8_e4m3_to_float(a[i])
                                                             : dstrain::fp8_e5m2_to_float(a[i]));
          const bool nan_b = std::isnan(fmt == DType::F8E4M3 ? dstrain::fp8_e4m3_to_float(b[i])
                                                             : dstrain::fp8_e5m2_to_float(b[i]));
          if (a[i] != b[i] && !(nan_a && nan_b)) ++wrong;
        }
        CHECK(wrong == 0);
        CHECK(same_float(fetch(gctx, gm.amax())[0], cm.amax().to_host_floats()[0]));
        gm.update_scale(gctx);
        cm.update_scale(cctx);
        const std::vector<float> sg = fetch(gctx, gm.state()), sc = cm.state().to_host_floats();
        REQUIRE(sg.size() == sc.size());
        for (std::size_t i = 0; i < sg.size(); ++i) CHECK(same_float(sg[i], sc[i]));
        CHECK(std::isfinite(sg[0]));
        CHECK(sg[0] > 0.0f);
      }
    }
  }
}

namespace {

// Random fp8 data (values spread over the format's range after a random scale), both devices.
void fp8_operand(std::int64_t rows, std::int64_t cols, DType fmt, std::mt19937& g, Tensor& host, Tensor& dev) {
  const float lim = fmt == DType::F8E4M3 ? 400.0f : 50000.0f;
  std::vector<float> v = random_floats(rows * cols, g, -lim, lim);
  host = Tensor::empty({rows, cols}, fmt, Device::cpu());
  dstrain::convert_host(v.data(), DType::F32, host.data(), fmt, v.size());
  dev = host.to(gpu());
}

// Per-element bound: the output rounding (rtol) plus accumulation error relative to sum |a_k b_k|.
void check_gemm(const std::vector<float>& got, const std::vector<float>& ref, const Tensor& a, const Tensor& b,
                float alpha, double acc_rel, double out_rel) {
  const std::int64_t M = a.dim(0), K = a.dim(1), N = b.dim(0);
  const std::vector<float> av = a.to_host_floats(), bv = b.to_host_floats();
  std::size_t bad = 0;
  for (std::int64_t i = 0; i < M; ++i)
    for (std::int64_t j = 0; j < N; ++j) {
      double mag = 0.0;
      for (std::int64_t k = 0; k < K; ++k) mag += std::fabs(static_cast<double>(av[i * K + k]) * bv[j * K + k]);
      const std::size_t e = static_cast<std::size_t>(i * N + j);
      const double tol = acc_rel * mag * std::fabs(alpha) + out_rel * std::fabs(ref[e]) + 1e-30;
      if (!(std::fabs(static_cast<double>(got[e]) - ref[e]) <= tol)) {
        if (bad < 5) UNSCOPED_INFO("d[" << i << "," << j << "]: got " << got[e] << ", reference " << ref[e]);
        ++bad;
      }
    }
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("amp gpu: FP8 GEMM through cuBLASLt matches the dequantised CPU product", "[gpu][amp][gemm]") {
  SEEDED_RNG(rng);
  Context gctx = Context::cuda(0);
  Context cctx = Context::cpu();
  const std::int64_t M = 512, N = 256, K = 384;
  struct Case {
    DType a, b, d;
    bool fast;
  };
  for (const Case c : {Case{DType::F8E4M3, DType::F8E4M3, DType::BF16, false},
                       Case{DType::F8E4M3, DType::F8E4M3, DType::BF16, true},
                       Case{DType::F8E4M3, DType::F8E5M2, DType::BF16, false},
                       Case{DType::F8E5M2, DType::F8E4M3, DType::F32, false}}) {
    INFO(dstrain::dtype_name(c.a) << " x " << dstrain::dtype_name(c.b) << " -> " << dstrain::dtype_name(c.d)
                                  << (c.fast ? " fast accumulate" : ""));
    Tensor ah, ad, bh, bd;
    fp8_operand(M, K, c.a, rng, ah, ad);
    fp8_operand(N, K, c.b, rng, bh, bd);
    const float sa = std::ldexp(1.0f, std::uniform_int_distribution<int>(-12, -6)(rng)) * 1.5f;
    const float sb = std::ldexp(1.0f, std::uniform_int_distribution<int>(-12, -6)(rng));
    Tensor sa_h = Tensor::from_vector({1}, {sa}), sb_h = Tensor::from_vector({1}, {sb});
    Tensor sa_d = sa_h.to(gpu()), sb_d = sb_h.to(gpu());
    Tensor amax_h = Tensor::from_vector({1}, {0.0f});
    Tensor amax_d = Tensor::from_vector({1}, {-1.0f}).to(gpu());
    Tensor dh = Tensor::empty({M, N}, c.d, Device::cpu());
    Tensor dd = Tensor::empty({M, N}, c.d, gpu());
    dd.fill_bytes(0xFF);
    amp::GemmOptions og, oc;
    og.a_scale_inv = &sa_d;
    og.b_scale_inv = &sb_d;
    og.d_amax = &amax_d;
    og.fast_accumulate = c.fast;
    oc.a_scale_inv = &sa_h;
    oc.b_scale_inv = &sb_h;
    oc.d_amax = &amax_h;
    amp::gemm_nt(gctx, ad, bd, dd, og);
    amp::gemm_nt(cctx, ah, bh, dh, oc);
    // Reference in fp32 before the output rounding, for an honest bound.
    Tensor ref32 = Tensor::empty({M, N}, DType::F32, Device::cpu());
    amp::GemmOptions o32 = oc;
    o32.d_amax = nullptr;
    amp::gemm_nt(cctx, ah, bh, ref32, o32);
    const double out_rel = c.d == DType::BF16 ? std::ldexp(1.0, -8) : 1e-6;
    // Hopper's FP8 tensor cores keep partial sums in reduced precision; without fast accumulation
    // cuBLASLt promotes them to fp32 regularly, with it far less often.
    const double acc_rel = c.fast ? std::ldexp(1.0, -7) : std::ldexp(1.0, -11);
    const std::vector<float> got = fetch(gctx, dd);
    check_gemm(got, ref32.to_host_floats(), ah, bh, sa * sb, acc_rel, out_rel);
    // The amax is that of d (before or after its rounding to the output type).
    float got_max = 0.0f;
    for (float v : got) got_max = std::fmax(got_max, std::fabs(v));
    CHECK(fetch(gctx, amax_d)[0] == Approx(got_max).epsilon(std::ldexp(1.0, -7)));
    CHECK(amax_h.to_host_floats()[0] == Approx(got_max).epsilon(0.05));
    // The same algorithm again from the cache: same result.
    Tensor dd2 = Tensor::empty({M, N}, c.d, gpu());
    dd2.fill_bytes(0xFF);
    amp::gemm_nt(gctx, ad, bd, dd2, og);
    CHECK(fetch_bytes(gctx, dd2) == fetch_bytes(gctx, dd));
  }
}

TEST_CASE("amp gpu: BF16 GEMM matches the CPU product", "[gpu][amp][gemm]") {
  SEEDED_RNG(rng);
  Context gctx = Context::cuda(0);
  Context cctx = Context::cpu();
  const std::int64_t M = 512, N = 256, K = 384;
  for (const DType out : {DType::BF16, DType::F32}) {
    INFO("bf16 -> " << dstrain::dtype_name(out));
    std::vector<float> av = random_floats(M * K, rng, -1.0f, 1.0f), bv = random_floats(N * K, rng, -1.0f, 1.0f);
    Tensor ah = Tensor::empty({M, K}, DType::BF16, Device::cpu()), bh = Tensor::empty({N, K}, DType::BF16, Device::cpu());
    dstrain::convert_host(av.data(), DType::F32, ah.data(), DType::BF16, av.size());
    dstrain::convert_host(bv.data(), DType::F32, bh.data(), DType::BF16, bv.size());
    Tensor ad = ah.to(gpu()), bd = bh.to(gpu());
    Tensor dd = Tensor::empty({M, N}, out, gpu());
    dd.fill_bytes(0xFF);
    Tensor ref = Tensor::empty({M, N}, DType::F32, Device::cpu());
    amp::gemm_nt(gctx, ad, bd, dd);
    amp::gemm_nt(cctx, ah, bh, ref);
    check_gemm(fetch(gctx, dd), ref.to_host_floats(), ah, bh, 1.0f, 3e-5,
               out == DType::BF16 ? std::ldexp(1.0, -8) : 1e-6);
  }
}

// The optimizer's working copies on the device: a network whose layers compute from the copies
// the fused kernel writes (null slots for BatchNorm and the bias in the same launch) against the
// same network converting at every forward: copies equal the device masters rounded on the host,
// forward outputs bit-identical, a skipped step writes nothing (tests/working_copy_check.h).
TEST_CASE("amp gpu: external working copies written by the fused optimizers", "[gpu][amp][optim]") {
  SEEDED_RNG(rng);
  Context gctx = Context::cuda(0);
  for (const amp::Policy policy : {amp::Policy::fp16(), amp::Policy::bf16(), amp::Policy::fp8_hybrid()}) {
    for (const auto kind : {dstrain_test::FusedOptimizer::Sgd, dstrain_test::FusedOptimizer::AdamW}) {
      INFO("policy " << (policy.fp8_linear() ? "fp8" : dstrain::dtype_name(policy.compute_dtype(amp::OpKind::Conv)))
                     << (kind == dstrain_test::FusedOptimizer::Sgd ? ", FusedSGD" : ", FusedAdamW"));
      dstrain_test::check_external_working_copies(gctx, policy, kind, rng);
    }
  }
}
