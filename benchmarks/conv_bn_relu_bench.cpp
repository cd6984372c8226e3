// conv_bn_relu_bench: the fused Conv+BN+ReLU layer against the convolution alone (the floor) and
// against the unfused ops (conv2d, batchnorm, relu), per shape and dtype, on the GPU.
//
// Training step = forward with batch statistics + backward with dx, dw, dgamma, dbeta (as
// PyTorch's x.requires_grad_() step in torch_baseline.py `block`). Inference = conv + bias + ReLU
// from BN-folded weights (folded once, outside the timing), against the convolution forward alone.
// Each figure is the median of --iters repeats of --batch back-to-back calls after --warmup calls,
// timed with CUDA events on the context's stream; each repeat runs every path of a shape in turn
// (interleaved), so that a slow spell of the device moves no single column. Results are checked before timing: the fused
// output z and dx against the unfused path's, and the inference output against eval-mode BN.
// "chained" is one layer inside a chain of fused layers (ops::ChainedInput): see run(). The "memory
// floor" line is the least time of a fused step that takes its statistics from y: see t_floor.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#ifdef DSTRAIN_BENCH_PROFILER_RANGE
#include <cuda_profiler_api.h>
#endif

#include "benchmarks/harness.h"
#include "dstrain/context.h"
#include "dstrain/dtype.h"
#include "dstrain/error.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Shape;
using dstrain::Tensor;
namespace ops = dstrain::ops;

namespace {

struct BlockShape {
  int N, C, K, H, k, stride;
};

struct Options {
  std::vector<BlockShape> shapes;
  std::vector<DType> dtypes{DType::F16, DType::BF16};
  int warmup = 10, iters = 20, batch = 5;
  int device = 0;
  bool profile = false;
};

const char* kUsage =
    "usage: conv_bn_relu_bench [options]\n"
    "  Times the fused Conv+BN+ReLU (training forward+backward and inference forward) against the\n"
    "  convolution alone and the unfused ops, NHWC, on one GPU; the fused step, the chained step\n"
    "  and the convolutions alone also replayed from CUDA graphs (--batch steps per graph), and a\n"
    "  memory floor per shape for the fused step: the faster convolutions alone plus two copies of\n"
    "  the output tensor (see the source).\n"
    "  --shape N,C,K,H,k[,stride]  a block: batch N, C -> K channels, H x H input, k x k filter\n"
    "                              (padding k/2); repeatable. Default: the six ResNet-50 shapes at\n"
    "                              N=128 (64-64 56 3x3, 128-128 28, 256-256 14, 512-512 7, 256-64 56\n"
    "                              1x1, 64-256 56 1x1), as torch_baseline.py block\n"
    "  --dtype fp16|bf16|fp32|all  (default fp16 and bf16)\n"
    "  --warmup N   calls before timing (10)\n"
    "  --iters N    timed repeats, the median is reported (20)\n"
    "  --batch N    back-to-back calls per timed repeat (5)\n"
    "  --device N   CUDA device (0)\n"
    "  --profile    after timing each shape, run one fused step, one chained step and the\n"
    "               convolutions alone, in that order, between cudaProfilerStart and Stop (for\n"
    "               ncu --profile-from-start off, or nsys --capture-range=cudaProfilerApi)\n"
    "  --help       this text\n";

int parse_int(const std::string& flag, const std::string& v, int lo) {
  char* end = nullptr;
  const long n = std::strtol(v.c_str(), &end, 10);
  if (end == v.c_str() || *end != '\0' || n < lo || n > 1000000)
    DSTRAIN_THROW(dstrain::ErrorCode::InvalidArgument, flag + " '" + v + "': expected an integer >= " + std::to_string(lo));
  return static_cast<int>(n);
}

BlockShape parse_shape(const std::string& v) {
  std::vector<int> f;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) f.push_back(parse_int("--shape", item, 1));
  if (f.size() != 5 && f.size() != 6)
    DSTRAIN_THROW(dstrain::ErrorCode::InvalidArgument, "--shape '" + v + "': expected N,C,K,H,k[,stride]");
  return {f[0], f[1], f[2], f[3], f[4], f.size() == 6 ? f[5] : 1};
}

Options parse(int argc, char** argv) {
  Options o;
  bool dtypes_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--help" || f == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (f == "--profile") {
#ifdef DSTRAIN_BENCH_PROFILER_RANGE
      o.profile = true;
      continue;
#else
      DSTRAIN_THROW(dstrain::ErrorCode::InvalidArgument, "--profile: this build has no CUDA");
#endif
    }
    if (i + 1 >= argc) DSTRAIN_THROW(dstrain::ErrorCode::InvalidArgument, f + " needs a value (see --help)");
    const std::string v = argv[++i];
    if (f == "--shape") {
      o.shapes.push_back(parse_shape(v));
    } else if (f == "--dtype") {
      if (!dtypes_given) o.dtypes.clear();
      dtypes_given = true;
      if (v == "fp16") o.dtypes.push_back(DType::F16);
      else if (v == "bf16") o.dtypes.push_back(DType::BF16);
      else if (v == "fp32") o.dtypes.push_back(DType::F32);
      else if (v == "all") o.dtypes = {DType::F32, DType::F16, DType::BF16};
      else DSTRAIN_THROW(dstrain::ErrorCode::InvalidArgument, "--dtype '" + v + "': expected fp16, bf16, fp32 or all");
    } else if (f == "--warmup") {
      o.warmup = parse_int(f, v, 0);
    } else if (f == "--iters") {
      o.iters = parse_int(f, v, 1);
    } else if (f == "--batch") {
      o.batch = parse_int(f, v, 1);
    } else if (f == "--device") {
      o.device = parse_int(f, v, 0);
    } else {
      DSTRAIN_THROW(dstrain::ErrorCode::InvalidArgument, "unknown option " + f + " (see --help)");
    }
  }
  if (o.shapes.empty())
    o.shapes = {{128, 64, 64, 56, 3, 1},  {128, 128, 128, 28, 3, 1}, {128, 256, 256, 14, 3, 1},
                {128, 512, 512, 7, 3, 1}, {128, 256, 64, 56, 1, 1},  {128, 64, 256, 56, 1, 1}};
  return o;
}

Tensor random_device(const Shape& s, DType dt, std::mt19937& g, Device d, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(dstrain::shape_numel(s)));
  for (float& x : v) x = dist(g);
  Tensor f = Tensor::from_vector(s, v);
  Tensor t = Tensor::empty(s, dt, Device::cpu());
  dstrain::convert_host(f.data(), DType::F32, t.data(), dt, v.size());
  return t.to(d);
}

struct Diff {
  double max_rel = 0.0;  // max |a - b| / max |b|
  double rms_rel = 0.0;  // rms(a - b) / rms(b)
};

Diff compare(const Tensor& a, const Tensor& b) {
  const std::vector<float> x = a.to_host_floats(), y = b.to_host_floats();
  double diff = 0.0, scale = 0.0, se = 0.0, sr = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double d = std::isfinite(x[i]) ? std::abs(static_cast<double>(x[i]) - y[i]) : INFINITY;
    diff = std::max(diff, d);
    scale = std::max(scale, std::abs(static_cast<double>(y[i])));
    se += d * d;
    sr += static_cast<double>(y[i]) * y[i];
  }
  Diff r;
  r.max_rel = scale > 0 ? diff / scale : diff;
  r.rms_rel = sr > 0 ? std::sqrt(se / sr) : std::sqrt(se);
  return r;
}

const char* dt_name(DType dt) { return dt == DType::F16 ? "fp16" : dt == DType::BF16 ? "bf16" : "fp32"; }

int run(const Options& o) {
  Context ctx = Context::cuda(o.device);
  const Device dev = ctx.device();
  std::mt19937 rng(12345);
  std::printf("# conv_bn_relu_bench: median of %d x %d calls after %d warm-up, CUDA events; times in ms\n", o.iters,
              o.batch, o.warmup);
  std::printf("# device: %s\n", dstrain::cuda_description(o.device).c_str());
  std::printf("# train = forward (batch stats) + backward with dx; infer = conv+bias+ReLU from folded weights (bias in the activations' dtype)\n");
  std::printf("%-22s %-5s %9s %9s %9s %7s %8s %9s %9s %7s %9s %9s %9s\n", "shape", "dtype", "fused", "conv",
              "unfused", "f/conv", "TFLOP/s", "err_z", "err_dx", "infer", "conv_fwd", "i/conv", "err_inf");
  bool all_ok = true;
  for (const BlockShape& b : o.shapes) {
    for (DType dt : o.dtypes) {
      ops::ConvBnReluParams p;
      p.conv.stride_h = p.conv.stride_w = b.stride;
      p.conv.pad_h = p.conv.pad_w = b.k / 2;
      const Shape xs{b.N, b.H, b.H, b.C}, ws{b.K, b.k, b.k, b.C};
      const Shape ys = ops::conv2d_output_shape(xs, ws, p.conv);
      const std::int64_t K = b.K;
      const Tensor x = random_device(xs, dt, rng, dev, -1.0f, 1.0f);
      const float wbound = 1.0f / std::sqrt(static_cast<float>(b.C * b.k * b.k));
      const Tensor w = random_device(ws, dt, rng, dev, -wbound, wbound);
      const Tensor dz = random_device(ys, dt, rng, dev, -1.0f, 1.0f);
      const Tensor gamma = random_device({K}, DType::F32, rng, dev, 0.5f, 1.5f);
      const Tensor beta = random_device({K}, DType::F32, rng, dev, -0.5f, 0.5f);
      Tensor rm = Tensor::zeros({K}, DType::F32, dev), rv = random_device({K}, DType::F32, rng, dev, 0.5f, 2.0f);
      Tensor conv_out = Tensor::empty(ys, dt, dev), z = Tensor::empty(ys, dt, dev), dconv = Tensor::empty(ys, dt, dev);
      Tensor dx = Tensor::empty(xs, dt, dev), dw = Tensor::empty(ws, dt, dev);
      Tensor sm = Tensor::empty({K}, DType::F32, dev), si = Tensor::empty({K}, DType::F32, dev);
      Tensor dg = Tensor::empty({K}, DType::F32, dev), db = Tensor::empty({K}, DType::F32, dev);
      // Unfused path's buffers.
      Tensor u_bn = Tensor::empty(ys, dt, dev), u_z = Tensor::empty(ys, dt, dev), u_dbn = Tensor::empty(ys, dt, dev);
      Tensor u_dconv = Tensor::empty(ys, dt, dev), u_dx = Tensor::empty(xs, dt, dev);
      Tensor u_sm = Tensor::empty({K}, DType::F32, dev), u_si = Tensor::empty({K}, DType::F32, dev);
      Tensor u_rm = Tensor::zeros({K}, DType::F32, dev), u_rv = rv.to(dev);

      auto fused = [&] {
        ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z, sm, si, p);
        ops::conv_bn_relu_backward(ctx, dz, x, w, gamma, beta, conv_out, sm, si, dconv, &dx, dw, dg, db, p);
      };
      auto conv_only = [&] {
        ops::conv2d_forward(ctx, x, w, conv_out, p.conv);
        ops::conv2d_backward_data(ctx, dz, w, dx, p.conv);
        ops::conv2d_backward_filter(ctx, x, dz, dw, p.conv);
      };
      // The same convolutions with both gradients from one call (ops::conv2d_backward: wgrad on a
      // second stream beside dgrad, as the fused layer runs them): the floor for that way of running.
      auto conv_beside = [&] {
        ops::conv2d_forward(ctx, x, w, conv_out, p.conv);
        ops::conv2d_backward(ctx, x, dz, w, &dx, dw, p.conv);
      };
      auto unfused = [&] {
        ops::conv2d_forward(ctx, x, w, conv_out, p.conv);
        ops::batchnorm_forward_train(ctx, conv_out, gamma, beta, u_rm, u_rv, u_bn, u_sm, u_si, p.bn);
        ops::relu_forward(ctx, u_bn, u_z);
        ops::relu_backward(ctx, dz, u_z, u_dbn);
        ops::batchnorm_backward(ctx, u_dbn, conv_out, gamma, u_sm, u_si, u_dconv, dg, db);
        ops::conv2d_backward_data(ctx, u_dconv, w, u_dx, p.conv);
        ops::conv2d_backward_filter(ctx, x, u_dconv, dw, p.conv);
      };
      // Check first: the fused results against the unfused ones from the same inputs.
      fused();
      unfused();
      ctx.synchronize();
      const Diff err_z = compare(z, u_z), err_dx = compare(dx, u_dx);
      // Inference: fold the running statistics once, then conv + bias + ReLU (the bias in the
      // activations' dtype, as nn::ConvBnRelu folds it).
      Tensor wf = Tensor::empty(ws, dt, dev), bias = Tensor::empty({K}, dt, dev);
      Tensor iz = Tensor::empty(ys, dt, dev), ref_bn = Tensor::empty(ys, dt, dev), ref_z = Tensor::empty(ys, dt, dev);
      ops::conv_bn_fold(ctx, w, gamma, beta, rm, rv, wf, bias, p.bn);
      auto infer = [&] { ops::conv_bias_relu_forward(ctx, x, wf, bias, iz, p.conv); };
      auto conv_fwd = [&] { ops::conv2d_forward(ctx, x, w, conv_out, p.conv); };
      infer();
      ops::conv2d_forward(ctx, x, w, conv_out, p.conv);
      ops::batchnorm_forward_eval(ctx, conv_out, gamma, beta, rm, rv, ref_bn, p.bn);
      ops::relu_forward(ctx, ref_bn, ref_z);
      ctx.synchronize();
      const Diff err_inf = compare(iz, ref_z);
      // Judged on the rms error, a few units of the dtype's precision: the two paths may disagree
      // on the ReLU mask where the pre-activation is within rounding of 0, which moves single
      // elements of dx by a full gradient (the max error reports it) but not the rms.
      const double tol = dt == DType::F32 ? 1e-5 : dt == DType::F16 ? 4e-3 : 3e-2;
      const bool ok = err_z.rms_rel <= tol && err_dx.rms_rel <= tol && err_inf.rms_rel <= tol;
      all_ok = all_ok && ok;

      // A layer inside a chain of fused layers (ops::ChainedInput): x is the previous layer's raw
      // convolution output, whose BN + ReLU this layer applies in its convolution's prologue;
      // this layer hands its own raw output on, and its backward starts from dL/dconv_out and
      // ends with dL/dx through the previous layer's ReLU and BN (dgamma, dbeta of that layer).
      // Per layer of a chain that is all the work there is: the same figure for every layer.
      const Tensor in_gamma = random_device({b.C}, DType::F32, rng, dev, 0.5f, 1.5f);
      const Tensor in_beta = random_device({b.C}, DType::F32, rng, dev, -0.5f, 0.5f);
      const Tensor in_mean = random_device({b.C}, DType::F32, rng, dev, -0.3f, 0.3f);
      const Tensor in_invstd = random_device({b.C}, DType::F32, rng, dev, 0.5f, 2.0f);
      Tensor in_dg = Tensor::empty({b.C}, DType::F32, dev), in_db = Tensor::empty({b.C}, DType::F32, dev);
      const ops::ChainedInput chained_in{&in_gamma, &in_beta, &in_mean, &in_invstd, &in_dg, &in_db};
      ops::ConvBnReluParams pc = p;
      pc.chained_input = &chained_in;
      pc.chained_output = true;
      Tensor no_tensor, c_dx = Tensor::empty(xs, dt, dev);
      auto chain_fwd = [&] {
        ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, no_tensor, sm, si, pc);
      };
      auto chain_bwd = [&] {
        ops::conv_bn_relu_backward(ctx, dz, x, w, gamma, beta, conv_out, sm, si, no_tensor, &c_dx, dw, dg, db, pc);
      };
      // Checked against the separate public ops: a = relu(batchnorm_eval(x)) with the producer's
      // statistics (var = 1/invstd^2 - eps), conv2d; then dgrad, relu_backward and batchnorm_backward.
      chain_fwd();
      chain_bwd();
      Tensor chain_y = conv_out.to(dev), chain_dw = dw.to(dev);
      std::vector<float> var_h = in_invstd.to_host_floats();
      for (float& v : var_h) v = 1.0f / (v * v) - p.bn.eps;
      const Tensor in_var = Tensor::from_vector({b.C}, var_h).to(dev);
      Tensor r_bn = Tensor::empty(xs, dt, dev), r_a = Tensor::empty(xs, dt, dev), r_y = Tensor::empty(ys, dt, dev);
      Tensor r_da = Tensor::empty(xs, dt, dev), r_dam = Tensor::empty(xs, dt, dev), r_dx = Tensor::empty(xs, dt, dev);
      Tensor r_dw = Tensor::empty(ws, dt, dev), r_dg = Tensor::empty({b.C}, DType::F32, dev);
      Tensor r_db = Tensor::empty({b.C}, DType::F32, dev);
      ops::batchnorm_forward_eval(ctx, x, in_gamma, in_beta, in_mean, in_var, r_bn, p.bn);
      ops::relu_forward(ctx, r_bn, r_a);
      ops::conv2d_forward(ctx, r_a, w, r_y, p.conv);
      ops::conv2d_backward_filter(ctx, r_a, dz, r_dw, p.conv);
      ops::conv2d_backward_data(ctx, dz, w, r_da, p.conv);
      ops::relu_backward(ctx, r_da, r_a, r_dam);
      ops::batchnorm_backward(ctx, r_dam, x, in_gamma, in_mean, in_invstd, r_dx, r_dg, r_db);
      ctx.synchronize();
      const Diff err_cy = compare(chain_y, r_y), err_cdx = compare(c_dx, r_dx), err_cdw = compare(chain_dw, r_dw);
      const Diff err_cdg = compare(in_dg, r_dg);
      const bool chain_ok = err_cy.rms_rel <= tol && err_cdx.rms_rel <= tol && err_cdw.rms_rel <= tol &&
                            err_cdg.rms_rel <= tol;
      all_ok = all_ok && chain_ok;
      auto chain_step = [&] {
        chain_fwd();
        chain_bwd();
      };
      // The memory floor of the fused step (it takes dz and hands on z = relu(bn(y))) when the batch
      // statistics come from y itself: z can be written only once the statistics of the whole of y
      // are known (y read, z written, after the forward convolution), and no gradient GEMM can start
      // before dgamma and dbeta's sums have read dz and y. Each of those two serial passes moves at
      // least twice the output tensor's bytes, as one device-to-device copy of it does
      // (cudaMemcpyAsync, the memory's speed). The chained layer hands on y and takes dL/dy, so
      // this does not bound it; nor a 1x1 layer that took its statistics from its input's Gram
      // matrix (RESULTS.md, "the 1x1 identities").
      Tensor copy_of_y = Tensor::empty(ys, dt, dev);
      // Every eager figure from one set of interleaved repeats (harness.h: time_interleaved_us):
      // the paths to compare, then where the time goes (the fused forward and backward, the copy
      // of the floor, the convolutions alone, the chained step's halves).
      double t_fused, t_conv, t_conv_beside, t_unfused, t_infer, t_conv_fwd, t_ffwd, t_fbwd, t_copy, t_dgrad, t_wgrad;
      double t_cfwd, t_cbwd, t_chain;
      const std::vector<std::pair<double*, std::function<void()>>> eager{
          {&t_fused, fused},
          {&t_conv, conv_only},
          {&t_conv_beside, conv_beside},
          {&t_unfused, unfused},
          {&t_infer, infer},
          {&t_conv_fwd, conv_fwd},
          {&t_ffwd, [&] { ops::conv_bn_relu_forward_train(ctx, x, w, gamma, beta, rm, rv, conv_out, z, sm, si, p); }},
          {&t_fbwd,
           [&] { ops::conv_bn_relu_backward(ctx, dz, x, w, gamma, beta, conv_out, sm, si, dconv, &dx, dw, dg, db, p); }},
          {&t_copy, [&] { ops::copy(ctx, conv_out, copy_of_y); }},
          {&t_dgrad, [&] { ops::conv2d_backward_data(ctx, dz, w, dx, p.conv); }},
          {&t_wgrad, [&] { ops::conv2d_backward_filter(ctx, x, dz, dw, p.conv); }},
          {&t_cfwd, chain_fwd},
          {&t_cbwd, chain_bwd},
          {&t_chain, chain_step}};
      std::vector<std::function<void()>> eager_paths;
      for (const auto& e : eager) eager_paths.push_back(e.second);
      const std::vector<double> eager_us =
          dstrain::bench::time_interleaved_us(ctx, o.warmup, o.iters, o.batch, eager_paths);
      for (std::size_t i = 0; i < eager.size(); ++i) *eager[i].first = eager_us[i] / 1000.0;
      const double t_floor = std::min(t_conv, t_conv_beside) + 2.0 * t_copy;
      // The host's time to enqueue one step, no synchronisation inside (median of --iters repeats of
      // --batch steps): while it stays below the GPU's time, the GPU never waits for a launch.
      auto host_ms = [&](const std::function<void()>& fn) {
        std::vector<double> t;
        for (int i = 0; i < o.iters; ++i) {
          ctx.synchronize();
          const auto t0 = std::chrono::steady_clock::now();
          for (int j = 0; j < o.batch; ++j) fn();
          const auto t1 = std::chrono::steady_clock::now();
          t.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count() / o.batch);
        }
        ctx.synchronize();
        return dstrain::bench::median(t);
      };
      const double h_fused = host_ms(fused), h_conv = host_ms(conv_only);
      // The same steps replayed from CUDA graphs (dstrain::CudaGraph, captured now, so with the choices
      // made above): the host launches one graph of --batch steps per path, the like-for-like peer
      // of PyTorch's graph figure, the paths' replays interleaved. The fused graph's results are
      // checked first.
      auto graph_ms = [&](const std::vector<std::function<void()>>& steps) {
        std::vector<dstrain::CudaGraph> graphs;
        std::vector<std::function<void()>> replays;
        for (const auto& step : steps)
          graphs.push_back(dstrain::CudaGraph::capture(ctx.stream(), [&] {
            for (int j = 0; j < o.batch; ++j) step();
          }));
        for (const auto& graph : graphs) replays.push_back([&] { graph.replay(ctx.stream()); });
        std::vector<double> ms = dstrain::bench::time_interleaved_us(ctx, o.warmup, o.iters, 1, replays);
        for (double& v : ms) v /= 1000.0 * o.batch;
        return ms;
      };
      // A step that cannot be captured is reported, not fatal: the eager figures above still stand.
      Diff err_gz{}, err_gdx{};
      double g_fused = 0.0, g_conv = 0.0, g_chain = 0.0;
      std::string graph_error;
      try {
        {
          const dstrain::CudaGraph once = dstrain::CudaGraph::capture(ctx.stream(), fused);
          z.fill_bytes(0xFF);
          dx.fill_bytes(0xFF);
          once.replay(ctx.stream());
          ctx.synchronize();
          err_gz = compare(z, u_z);
          err_gdx = compare(dx, u_dx);
        }
        const std::vector<double> g = graph_ms({fused, conv_only, chain_step});
        g_fused = g[0];
        g_conv = g[1];
        g_chain = g[2];
      } catch (const dstrain::Error& e) {
        graph_error = e.what();
      }
      const bool graph_ok = !graph_error.empty() || (err_gz.rms_rel <= tol && err_gdx.rms_rel <= tol);
      all_ok = all_ok && graph_ok;
#ifdef DSTRAIN_BENCH_PROFILER_RANGE
      if (o.profile) {  // one step of each path, in a known order, for a profiler's capture range
        ctx.synchronize();
        cudaProfilerStart();
        fused();
        ctx.synchronize();
        chain_fwd();
        chain_bwd();
        ctx.synchronize();
        conv_only();
        ctx.synchronize();
        cudaProfilerStop();
        std::printf("# profiled %s: fused step, chained step, convolutions alone\n", dt_name(dt));
      }
#endif
      const double flops = 3.0 * 2.0 * static_cast<double>(ys[0] * ys[1] * ys[2]) * K * b.C * b.k * b.k;
      char name[64];
      std::snprintf(name, sizeof(name), "N%d_c%d-%d_h%d_k%d%s", b.N, b.C, b.K, b.H, b.k, b.stride > 1 ? "_s2" : "");
      std::printf("%-22s %-5s %9.4f %9.4f %9.4f %7.3f %8.1f %9.2e %9.2e %7.4f %9.4f %7.3f %9.2e%s\n", name, dt_name(dt),
                  t_fused, t_conv, t_unfused, t_fused / t_conv, flops / (t_fused * 1e-3) / 1e12, err_z.max_rel,
                  err_dx.max_rel, t_infer, t_conv_fwd, t_infer / t_conv_fwd, err_inf.max_rel, ok ? "" : "  WRONG");
      std::printf("#   parts: fused fwd %.4f bwd %.4f | conv fwd %.4f dgrad %.4f wgrad %.4f | host enqueue fused %.4f "
                  "conv %.4f | rms err z %.1e dx %.1e inf %.1e\n",
                  t_ffwd, t_fbwd, t_conv_fwd, t_dgrad, t_wgrad, h_fused, h_conv, err_z.rms_rel, err_dx.rms_rel,
                  err_inf.rms_rel);
      std::printf("#   conv alone with dgrad beside wgrad (ops::conv2d_backward): %.4f | fused / that %.3f\n",
                  t_conv_beside, t_fused / t_conv_beside);
      std::printf("#   memory floor: copy of the output tensor (%.1f MB) %.4f | faster convolutions alone + 2 copies "
                  "%.4f | floor/conv %.3f\n",
                  static_cast<double>(conv_out.nbytes()) / 1e6, t_copy, t_floor, t_floor / t_conv);
      std::printf("#   chained: %.4f (fwd %.4f bwd %.4f) chained/conv %.3f | rms err conv_out %.1e dx %.1e dw %.1e "
                  "dgamma %.1e%s\n",
                  t_chain, t_cfwd, t_cbwd, t_chain / t_conv, err_cy.rms_rel, err_cdx.rms_rel, err_cdw.rms_rel,
                  err_cdg.rms_rel, chain_ok ? "" : "  WRONG");
      if (graph_error.empty()) {
        std::printf("#   from CUDA graphs: fused %.4f conv alone %.4f chained %.4f | fused/conv %.3f chained/conv "
                    "%.3f | rms err z %.1e dx %.1e%s\n",
                    g_fused, g_conv, g_chain, g_fused / g_conv, g_chain / g_conv, err_gz.rms_rel, err_gdx.rms_rel,
                    graph_ok ? "" : "  WRONG");
      } else {
        std::printf("#   from CUDA graphs: not measured (%s)\n", graph_error.c_str());
      }
      std::fflush(stdout);
    }
  }
  if (!all_ok) std::printf("# some results differ from the unfused path beyond tolerance (WRONG)\n");
  std::printf("# err_*: max |fused - unfused| / max |unfused| (err_inf: against conv -> eval BN -> ReLU)\n");
  return all_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const dstrain::Error& e) {
    std::fprintf(stderr, "conv_bn_relu_bench: %s\n", e.what());
    return 2;
  }
}
