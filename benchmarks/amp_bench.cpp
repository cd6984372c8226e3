// amp_bench: the mixed-precision kernels on one GPU.
//  (a) GradScaler::unscale_and_check over a ResNet-50-sized gradient set (161 fp32 tensors,
//      25.56M values) in one launch: effective bandwidth = (bytes read + bytes written) / time.
//  (b) FP8 GEMM (E4M3 x E4M3 -> BF16, device scales, amax of D) through cuBLASLt at 8192^3,
//      with and without fast accumulation, against our BF16 GEMM of the same shape: TFLOP/s.
// Results are checked before timing; times are CUDA events around each launch, median of -n
// repeats after -w warm-up runs. Without a GPU every row prints "not run: no GPU" and exits 0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "benchmarks/harness.h"
#include "dstrain/amp.h"
#include "dstrain/context.h"
#include "dstrain/device.h"
#include "dstrain/dtype.h"
#include "dstrain/error.h"
#include "dstrain/tensor.h"
#include "dstrain/version.h"

namespace {

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Tensor;
namespace amp = dstrain::amp;

struct Options {
  int iters = 50;
  int warmup = 10;
  bool check = true;
  std::int64_t gemm_size = 8192;
  std::string only;  // "", "unscale" or "gemm"
  std::string json;
};

const char* kUsage =
    "usage: amp_bench [options]\n"
    "  -n N           timed repeats per row (median reported), default 50\n"
    "  -w N           warm-up runs per row, default 10\n"
    "  -c 0|1         check results before timing, default 1\n"
    "  -s N           GEMM size M = N = K (a multiple of 16), default 8192\n"
    "  --only WHAT    unscale or gemm\n"
    "  --json FILE    also write the rows as JSON\n"
    "  --help         this text\n";

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--help" || f == "-h") {
      std::printf("%s", kUsage);
      std::exit(0);
    }
    if (i + 1 >= argc) DSTRAIN_THROW(dstrain::ErrorCode::InvalidArgument, "flag " + f + " needs a value\n" + kUsage);
    const std::string v = argv[++i];
    if (f == "-n") {
      o.iters = std::stoi(v);
    } else if (f == "-w") {
      o.warmup = std::stoi(v);
    } else if (f == "-c") {
      o.check = std::stoi(v) != 0;
    } else if (f == "-s") {
      o.gemm_size = static_cast<std::int64_t>(dstrain::bench::parse_size(v));
    } else if (f == "--only") {
      o.only = v;
    } else if (f == "--json") {
      o.json = v;
    } else {
      DSTRAIN_THROW(dstrain::ErrorCode::InvalidArgument, "unknown flag " + f + "\n" + kUsage);
    }
  }
  if (o.iters < 1 || o.warmup < 0 || o.gemm_size < 16 || o.gemm_size % 16 != 0 ||
      !(o.only.empty() || o.only == "unscale" || o.only == "gemm"))
    DSTRAIN_THROW(dstrain::ErrorCode::InvalidArgument, std::string("bad flag value\n") + kUsage);
  return o;
}

struct Row {
  std::string name, shape, dtype;
  double time_us = 0, tflops = 0, gbs = 0, max_err = 0;
  bool ok = true;
};

void print_row(const Row& r) {
  std::printf("%-26s %-22s %-8s %12.2f %9.1f %9.1f %10.3g%s\n", r.name.c_str(), r.shape.c_str(), r.dtype.c_str(),
              r.time_us, r.tflops, r.gbs, r.max_err, r.ok ? "" : "  FAILED");
}

double time_us(Context& ctx, const Options& o, int batch, const std::function<void()>& fn) {
  return dstrain::bench::time_us(ctx, o.warmup, o.iters, batch, fn);
}

// ResNet-50's parameter sizes: 53 convolutions, 53 batch norms (weight and bias), the fc layer.
std::vector<std::int64_t> resnet50_parameter_sizes() {
  std::vector<std::int64_t> s;
  auto conv_bn = [&](std::int64_t in, std::int64_t out, std::int64_t k) {
    s.push_back(in * out * k * k);
    s.push_back(out);
    s.push_back(out);
  };
  conv_bn(3, 64, 7);
  std::int64_t in = 64;
  const int blocks[4] = {3, 4, 6, 3};
  for (int layer = 0; layer < 4; ++layer) {
    const std::int64_t width = std::int64_t(64) << layer;
    for (int b = 0; b < blocks[layer]; ++b) {
      conv_bn(in, width, 1);
      conv_bn(width, width, 3);
      conv_bn(width, 4 * width, 1);
      if (b == 0) conv_bn(in, 4 * width, 1);  // downsample
      in = 4 * width;
    }
  }
  s.push_back(2048 * 1000);
  s.push_back(1000);
  return s;
}

float pseudo_random(std::uint64_t i) {  // uniform in [-1, 1), cheap enough for 64M values
  std::uint64_t x = i * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  return static_cast<float>(x >> 40) / static_cast<float>(1u << 23) - 1.0f;
}

Row bench_unscale(Context& ctx, const Options& o) {
  const std::vector<std::int64_t> sizes = resnet50_parameter_sizes();
  std::int64_t total = 0;
  for (auto n : sizes) total += n;
  std::vector<Tensor> grads;
  std::vector<Tensor*> ptrs;
  std::uint64_t seed = 0;
  for (std::int64_t n : sizes) {
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = pseudo_random(seed++) * 65536.0f;
    grads.push_back(Tensor::from_vector({n}, v).to(ctx.device()));
  }
  for (auto& t : grads) ptrs.push_back(&t);
  Row r;
  r.name = "unscale_and_check";
  r.shape = std::to_string(sizes.size()) + "x" + std::to_string(total);
  r.dtype = "fp32";
  if (o.check) {
    // Every value back to pseudo_random(i) (exact: the scale is a power of two), flag clear;
    // then a NaN planted mid-tensor sets the flag.
    amp::GradScaler scaler(ctx.device());
    scaler.unscale_and_check(ctx, ptrs);
    r.ok = !scaler.found_inf_set(ctx);
    seed = 0;
    for (auto& t : grads) {
      const std::vector<float> v = t.to_host_floats();
      for (float x : v) r.max_err = std::max(r.max_err, static_cast<double>(std::fabs(x - pseudo_random(seed++))));
    }
    r.ok = r.ok && r.max_err == 0.0;
    Tensor& victim = grads[100];
    std::vector<float> v = victim.to_host_floats();
    const float keep = v[v.size() / 2];
    v[v.size() / 2] = std::nanf("");
    victim.copy_from(Tensor::from_vector(victim.shape(), v));
    scaler.unscale_and_check(ctx, ptrs);
    r.ok = r.ok && scaler.found_inf_set(ctx);
    v[v.size() / 2] = keep;
    victim.copy_from(Tensor::from_vector(victim.shape(), v));
  }
  // Timed with scale 1: the same reads, multiplies and writes, and values that stay put.
  amp::GradScalerOptions so;
  so.init_scale = 1.0f;
  amp::GradScaler timed(ctx.device(), so);
  r.time_us = time_us(ctx, o, 10, [&] { timed.unscale_and_check(ctx, ptrs); });
  r.gbs = 2.0 * 4.0 * static_cast<double>(total) / (r.time_us * 1e-6) / 1e9;
  return r;
}

// The product at a few sampled elements, in double from the dequantised operands.
double sampled_gemm_error(const Tensor& a_dev, const Tensor& b_dev, const Tensor& d_dev, double alpha) {
  const std::int64_t M = a_dev.dim(0), K = a_dev.dim(1), N = b_dev.dim(0);
  const std::vector<float> a = a_dev.to_host_floats(), b = b_dev.to_host_floats(), d = d_dev.to_host_floats();
  double worst = 0.0;
  for (int s = 0; s < 64; ++s) {
    const std::int64_t i = (s * 7919) % M, j = (s * 104729) % N;
    double acc = 0.0, mag = 0.0;
    for (std::int64_t k = 0; k < K; ++k) {
      acc += static_cast<double>(a[i * K + k]) * b[j * K + k];
      mag += std::fabs(static_cast<double>(a[i * K + k]) * b[j * K + k]);
    }
    acc *= alpha;
    mag *= std::fabs(alpha);
    worst = std::max(worst, std::fabs(d[static_cast<std::size_t>(i * N + j)] - acc) / (mag + 1e-30));
  }
  return worst;  // relative to sum |a_k b_k|
}

std::vector<Row> bench_gemm(Context& ctx, const Options& o) {
  const std::int64_t n = o.gemm_size;
  const double flops = 2.0 * static_cast<double>(n) * n * n;
  std::vector<float> v(static_cast<std::size_t>(n * n));
  auto make = [&](DType dt, std::uint64_t salt, float range) {
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = pseudo_random(i + salt) * range;
    Tensor h = Tensor::empty({n, n}, dt, Device::cpu());
    dstrain::convert_host(v.data(), DType::F32, h.data(), dt, v.size());
    return h.to(ctx.device());
  };
  std::vector<Row> rows;
  {
    Tensor a = make(DType::F8E4M3, 0, 448.0f), b = make(DType::F8E4M3, std::uint64_t(1) << 40, 448.0f);
    Tensor d = Tensor::empty({n, n}, DType::BF16, ctx.device());
    Tensor sa = Tensor::from_vector({1}, {1.0f / 448.0f}).to(ctx.device());
    Tensor sb = Tensor::from_vector({1}, {1.0f / 448.0f}).to(ctx.device());
    Tensor amax = Tensor::zeros({1}, DType::F32, ctx.device());
    // As torch._scaled_mm (scales, no amax), then with the amax of D that delayed scaling needs.
    struct Variant {
      const char* name;
      bool fast, amax;
    };
    for (const Variant var : {Variant{"fp8_gemm", false, false}, Variant{"fp8_gemm_fast_accum", true, false},
                              Variant{"fp8_gemm_amax_d", false, true}}) {
      const bool fast = var.fast;
      amp::GemmOptions go;
      go.a_scale_inv = &sa;
      go.b_scale_inv = &sb;
      go.d_amax = var.amax ? &amax : nullptr;
      go.fast_accumulate = fast;
      Row r;
      r.name = var.name;
      r.shape = std::to_string(n) + "x" + std::to_string(n) + "x" + std::to_string(n);
      r.dtype = "e4m3>bf16";
      if (o.check) {
        d.fill_bytes(0xFF);
        amp::gemm_nt(ctx, a, b, d, go);
        ctx.synchronize();
        r.max_err = sampled_gemm_error(a, b, d, 1.0 / (448.0 * 448.0));
        r.ok = r.max_err < (fast ? 1e-2 : 2e-3) &&
               (!var.amax || (std::isfinite(amax.to_host_floats()[0]) && amax.to_host_floats()[0] > 0.0f));
      }
      r.time_us = time_us(ctx, o, 1, [&] { amp::gemm_nt(ctx, a, b, d, go); });
      r.tflops = flops / (r.time_us * 1e-6) / 1e12;
      r.gbs = (2.0 * n * n + 2.0 * n * n) / (r.time_us * 1e-6) / 1e9;
      rows.push_back(r);
    }
  }
  {
    Tensor a = make(DType::BF16, 0, 1.0f), b = make(DType::BF16, std::uint64_t(1) << 40, 1.0f);
    Tensor d = Tensor::empty({n, n}, DType::BF16, ctx.device());
    Row r;
    r.name = "bf16_gemm";
    r.shape = std::to_string(n) + "x" + std::to_string(n) + "x" + std::to_string(n);
    r.dtype = "bf16>bf16";
    if (o.check) {
      d.fill_bytes(0xFF);
      amp::gemm_nt(ctx, a, b, d);
      ctx.synchronize();
      r.max_err = sampled_gemm_error(a, b, d, 1.0);
      r.ok = r.max_err < 2e-3;
    }
    r.time_us = time_us(ctx, o, 1, [&] { amp::gemm_nt(ctx, a, b, d); });
    r.tflops = flops / (r.time_us * 1e-6) / 1e12;
    r.gbs = (2.0 * 2 * n * n + 2.0 * n * n) / (r.time_us * 1e-6) / 1e9;
    rows.push_back(r);
  }
  return rows;
}

void write_json(const std::string& path, const std::vector<Row>& rows) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) DSTRAIN_THROW(dstrain::ErrorCode::Io, "cannot write " + path);
  std::fprintf(f, "[\n");
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    std::fprintf(f,
                 "  {\"name\": \"%s\", \"shape\": \"%s\", \"dtype\": \"%s\", \"time_us\": %.3f, \"tflops\": %.3f, "
                 "\"gbs\": %.3f, \"max_err\": %.6g, \"ok\": %s}%s\n",
                 r.name.c_str(), r.shape.c_str(), r.dtype.c_str(), r.time_us, r.tflops, r.gbs, r.max_err,
                 r.ok ? "true" : "false", i + 1 < rows.size() ? "," : "");
  }
  std::fprintf(f, "]\n");
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    std::printf("# amp_bench dstrain %s\n", DSTRAIN_VERSION_STRING);
    const bool gpu = dstrain::cuda_available();
    std::printf("# device: %s\n", gpu ? "cuda:0" : "cpu (no GPU visible)");
    std::printf("# repeats %d (median), warm-up %d, check %d\n", o.iters, o.warmup, o.check ? 1 : 0);
    std::printf("# unscale GB/s = (bytes read + written) / time; GEMM TFLOP/s = 2 M N K / time\n");
    std::printf("%-26s %-22s %-8s %12s %9s %9s %10s\n", "# name", "shape", "dtype", "time(us)", "TFLOP/s", "GB/s",
                "max_err");
    if (!gpu) {
      if (o.only != "gemm") std::printf("unscale_and_check          not run: no GPU\n");
      if (o.only != "unscale") std::printf("fp8_gemm / bf16_gemm       not run: no GPU\n");
      if (!o.json.empty()) write_json(o.json, {});
      return 0;
    }
    Context ctx = Context::cuda(0);
    std::vector<Row> rows;
    if (o.only != "gemm") {
      rows.push_back(bench_unscale(ctx, o));
      print_row(rows.back());
    }
    if (o.only != "unscale") {
      for (const Row& r : bench_gemm(ctx, o)) {
        rows.push_back(r);
        print_row(r);
      }
    }
    if (!o.json.empty()) write_json(o.json, rows);
    bool ok = true;
    for (const Row& r : rows) ok = ok && r.ok;
    if (!ok) std::printf("# FAILED: a result check failed\n");
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "amp_bench: %s\n", e.what());
    return 2;
  }
}
