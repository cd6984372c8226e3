// implicit_gemm_bench: every tile configuration of the implicit-GEMM convolution forward
// (kernels/sm90/): plain, with its BatchNorm-statistics epilogue, with the statistics and a
// chained layer's BatchNorm + ReLU prologue on its input, and with the inference epilogue
// relu(y + bias); against cuDNN's fastest
// legacy algorithm (cudnnFindConvolutionForwardAlgorithmEx, timed the same way), on one Hopper GPU.
// Each result is checked before timing: the output (poisoned first) against a direct convolution
// in fp32 on the GPU, the statistics against sums over the output itself. Times: median of --iters
// repeats of --batch back-to-back calls after --warmup calls, CUDA events.
#include <cudnn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "sm90/implicit_gemm_conv_kernels.cuh"

namespace {

using namespace dstrain::kernels::cuda::igemm;

const char* kUsage =
    "usage: implicit_gemm_bench [options]\n"
    "  Times each tile configuration of the implicit-GEMM convolution forward (NHWC, stride 1,\n"
    "  padding k/2) against cuDNN's fastest legacy algorithm, on a compute capability 9.0 GPU.\n"
    "  --shape N,C,K,H,k  batch N, C -> K channels (multiples of 64), H x H input, k x k filter;\n"
    "                     repeatable. Default: the six ResNet-50 shapes of conv_bn_relu_bench\n"
    "  --dtype fp16|bf16|all  (default all)\n"
    "  --warmup N   calls before timing (10)\n"
    "  --iters N    timed repeats, the median is reported (20)\n"
    "  --batch N    back-to-back calls per timed repeat (5)\n"
    "  --help       this text\n";

struct Failure {
  std::string what;
};

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Failure{std::string(what) + ": " + cudaGetErrorString(e)};
}
void check(cudnnStatus_t e, const char* what) {
  if (e != CUDNN_STATUS_SUCCESS) throw Failure{std::string(what) + ": " + cudnnGetErrorString(e)};
}

// Device buffer, freed on scope exit.
template <typename T>
struct Buffer {
  T* p = nullptr;
  explicit Buffer(std::size_t n) { check(cudaMalloc(&p, n * sizeof(T) + 16), "cudaMalloc"); }
  ~Buffer() { cudaFree(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// y = conv(a, w) in fp32, a = x, or relu(x * scale + shift) rounded to T when scale is given
// (scale and shift in T, as the kernel reads them).
template <typename T>
__global__ void reference_conv(const T* x, const T* w, float* y, int N, int H, int W, int C, int K, int R, int S,
                               int pad, const T* scale, const T* shift) {
  const long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (idx >= static_cast<long long>(N) * H * W * K) return;
  const int k = static_cast<int>(idx % K);
  const long long m = idx / K;
  const int q = static_cast<int>(m % W), p = static_cast<int>((m / W) % H), n = static_cast<int>(m / (W * H));
  float acc = 0.0f;
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) {
      const int h = p + r - pad, wc = q + s - pad;
      if (h < 0 || h >= H || wc < 0 || wc >= W) continue;
      const T* xp = x + ((static_cast<long long>(n) * H + h) * W + wc) * C;
      const T* wp = w + ((static_cast<long long>(k) * R + r) * S + s) * C;
      for (int c = 0; c < C; ++c) {
        float a = static_cast<float>(xp[c]);
        if (scale != nullptr)
          a = static_cast<float>(static_cast<T>(
              fmaxf(static_cast<float>(fma(static_cast<double>(a), static_cast<double>(static_cast<float>(scale[c])),
                                           static_cast<double>(static_cast<float>(shift[c])))),
                    0.0f)));
        acc += a * static_cast<float>(wp[c]);
      }
    }
  y[idx] = acc;
}

// The prologue's constants in T, as the kernel derives them from the BatchNorm's fp32 parameters.
template <typename T>
__global__ void prologue_constants(int C, const float* gamma, const float* beta, const float* mean,
                                   const float* invstd, T* scale, T* shift) {
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c >= C) return;
  const dstrain::kernels::cuda::bn::ScaleShift k =
      dstrain::kernels::cuda::bn::prologue_scale_shift(gamma[c], beta[c], mean[c], invstd[c]);
  scale[c] = static_cast<T>(k.scale);
  shift[c] = static_cast<T>(k.shift);
}

template <typename T>
__global__ void fill_uniform(T* p, long long n, unsigned seed, float lo, float hi) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
  h ^= h >> 13;
  h *= 0x5bd1e995u;
  h ^= h >> 15;
  p[i] = static_cast<T>(lo + (hi - lo) * static_cast<float>(h & 0xFFFFFF) / 16777216.0f);
}

struct Options {
  std::vector<std::vector<int>> shapes;
  bool fp16 = true, bf16 = true;
  int warmup = 10, iters = 20, batch = 5;
};

template <typename F>
float median_ms(const Options& o, F&& fn) {
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  for (int i = 0; i < o.warmup; ++i) fn();
  std::vector<float> t;
  for (int r = 0; r < o.iters; ++r) {
    check(cudaEventRecord(a, 0), "cudaEventRecord");
    for (int i = 0; i < o.batch; ++i) fn();
    check(cudaEventRecord(b, 0), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    t.push_back(ms / static_cast<float>(o.batch));
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// y = relu(y + bias[k]) over [rows, K] fp32 values: the reference of the inference epilogue.
std::vector<float> bias_relu_reference(const std::vector<float>& y, const std::vector<float>& bias) {
  std::vector<float> r(y.size());
  const std::size_t K = bias.size();
  for (std::size_t i = 0; i < y.size(); ++i) r[i] = std::max(y[i] + bias[i % K], 0.0f);
  return r;
}

// Returns false when a result is wrong.
template <typename T>
bool run_shape(const Options& o, cudnnHandle_t dnn, const std::vector<int>& sh, cudnnDataType_t dt, const char* dname) {
  const int N = sh[0], C = sh[1], K = sh[2], H = sh[3], R = sh[4], W = H, S = R, pad = R / 2;
  const long long xn = 1LL * N * H * W * C, wn = 1LL * K * R * S * C, yn = 1LL * N * H * W * K;
  Buffer<T> x(xn), w(wn), y(yn);
  Buffer<float> ref(yn), ref_pro(yn), sum(K), sq(K);
  Buffer<T> scale(C), shift(C);
  Buffer<float> in_gamma(C), in_beta(C), in_mean(C), in_invstd(C);
  Buffer<float> bias(K);
  fill_uniform<<<static_cast<unsigned>((xn + 255) / 256), 256>>>(x.p, xn, 1234u + C, -1.0f, 1.0f);
  const float wb = 1.0f / std::sqrt(static_cast<float>(C * R * S));
  fill_uniform<<<static_cast<unsigned>((wn + 255) / 256), 256>>>(w.p, wn, 777u + K, -wb, wb);
  // The prologue's BatchNorm: scale about [0.4, 1.9), shift about [-0.9, 0.9) (about half the
  // inputs survive ReLU).
  const unsigned cb = static_cast<unsigned>((C + 255) / 256);
  fill_uniform<<<cb, 256>>>(in_gamma.p, C, 99u, 0.5f, 1.5f);
  fill_uniform<<<cb, 256>>>(in_beta.p, C, 98u, -0.5f, 0.5f);
  fill_uniform<<<cb, 256>>>(in_mean.p, C, 96u, -0.3f, 0.3f);
  fill_uniform<<<cb, 256>>>(in_invstd.p, C, 95u, 0.8f, 1.25f);
  prologue_constants<<<cb, 256>>>(C, in_gamma.p, in_beta.p, in_mean.p, in_invstd.p, scale.p, shift.p);
  fill_uniform<<<static_cast<unsigned>((K + 255) / 256), 256>>>(bias.p, K, 97u, -0.5f, 0.5f);
  reference_conv<<<static_cast<unsigned>((yn + 255) / 256), 256>>>(x.p, w.p, ref.p, N, H, W, C, K, R, S, pad,
                                                                    static_cast<const T*>(nullptr),
                                                                    static_cast<const T*>(nullptr));
  reference_conv<<<static_cast<unsigned>((yn + 255) / 256), 256>>>(x.p, w.p, ref_pro.p, N, H, W, C, K, R, S, pad,
                                                                    scale.p, shift.p);
  check(cudaDeviceSynchronize(), "reference convolution");
  std::vector<float> href(yn), href_pro(yn);
  check(cudaMemcpy(href.data(), ref.p, yn * 4, cudaMemcpyDeviceToHost), "copy");
  check(cudaMemcpy(href_pro.data(), ref_pro.p, yn * 4, cudaMemcpyDeviceToHost), "copy");
  std::vector<float> hbias(K);
  check(cudaMemcpy(hbias.data(), bias.p, K * 4, cudaMemcpyDeviceToHost), "copy");
  const std::vector<float> href_bias = bias_relu_reference(href, hbias);
  const double ulp = dt == CUDNN_DATA_HALF ? 2.0 / 1024.0 : 2.0 / 128.0;
  const double flops = 2.0 * yn * C * R * S;
  char name[64];
  std::snprintf(name, sizeof(name), "N%d_c%d-%d_h%d_k%d", N, C, K, H, R);
  ConvForwardArgs a{};
  a.x = x.p;
  a.w = w.p;
  a.y = y.p;
  a.N = N;
  a.H = a.P = H;
  a.W = a.Q = W;
  a.C = C;
  a.K = K;
  a.R = R;
  a.S = S;
  a.pad_h = a.pad_w = pad;
  a.M = N * H * W;
  bool all_ok = true;
  float best_plain = 1e30f, best_stats = 1e30f, best_chained = 1e30f, best_bias = 1e30f;
  for (int vi = 0; vi < kForwardVariants; ++vi) {
    const ForwardVariant v = static_cast<ForwardVariant>(vi);
    if (K % variant_bn(v) != 0) continue;
    ConvTensorMaps maps{};
    check(make_tensor_maps<T>(a, v, maps), "tensor maps");
    // 0: plain; 1: with statistics; 2: with the prologue and statistics (a chained layer's
    // forward); 3: bias + ReLU (inference).
    for (int mode = 0; mode < 4; ++mode) {
      const bool with_stats = mode == 1 || mode == 2, with_prologue = mode == 2, with_bias = mode == 3;
      if ((with_stats && K > kMaxStatsChannels) || (with_prologue && (!variant_has_prologue(v) || C > kMaxPrologueChannels)))
        continue;
      a.sum = with_stats ? sum.p : nullptr;
      a.sqsum = with_stats ? sq.p : nullptr;
      a.in = with_prologue ? InputBatchNorm{in_gamma.p, in_beta.p, in_mean.p, in_invstd.p} : InputBatchNorm{};
      a.bias = with_bias ? bias.p : nullptr;
      const std::vector<float>& want = with_prologue ? href_pro : with_bias ? href_bias : href;
      double ref_max = 0.0;
      for (float v : want) ref_max = std::max(ref_max, static_cast<double>(std::fabs(v)));
      const double tol = ulp * ref_max;
      check(cudaMemset(y.p, 0xFF, yn * sizeof(T)), "poison");
      check(cudaMemset(sum.p, 0, K * 4), "memset");
      check(cudaMemset(sq.p, 0, K * 4), "memset");
      check(conv_forward<T>(v, a, maps, 0), "launch");
      check(cudaDeviceSynchronize(), "kernel");
      std::vector<T> hy(yn);
      check(cudaMemcpy(hy.data(), y.p, yn * sizeof(T), cudaMemcpyDeviceToHost), "copy");
      double max_err = 0.0;
      std::vector<double> cs(K, 0.0), cq(K, 0.0);
      for (long long i = 0; i < yn; ++i) {
        const float v2 = static_cast<float>(hy[i]);
        max_err = std::max(max_err, std::isfinite(v2) ? std::fabs(v2 - want[i]) : 1e30);
        cs[i % K] += v2;
        cq[i % K] += static_cast<double>(v2) * v2;
      }
      double stat_err = 0.0;
      if (with_stats) {
        std::vector<float> hs(K), hq(K);
        check(cudaMemcpy(hs.data(), sum.p, K * 4, cudaMemcpyDeviceToHost), "copy");
        check(cudaMemcpy(hq.data(), sq.p, K * 4, cudaMemcpyDeviceToHost), "copy");
        for (int k = 0; k < K; ++k) {
          stat_err = std::max(stat_err, std::fabs(hs[k] - cs[k]) / (std::sqrt(cq[k] * yn / K) + 1e-6));
          stat_err = std::max(stat_err, std::fabs(hq[k] - cq[k]) / (cq[k] + 1e-6));
        }
      }
      const bool ok = max_err <= tol && stat_err <= 1e-4;
      all_ok = all_ok && ok;
      const float ms = median_ms(o, [&] {
        if (with_stats) {
          cudaMemsetAsync(sum.p, 0, K * 4, 0);
          cudaMemsetAsync(sq.p, 0, K * 4, 0);
        }
        conv_forward<T>(v, a, maps, 0);
      });
      check(cudaGetLastError(), "timed launches");
      float& best = with_prologue ? best_chained : with_stats ? best_stats : with_bias ? best_bias : best_plain;
      best = std::min(best, ms);
      std::printf("%-20s %-5s own %-17s %-15s %9.4f ms %6.0f TFLOP/s  max err %.2e (tol %.2e) stats err %.1e%s\n",
                  name, dname, variant_name(v).c_str(),
                  with_prologue ? "+prologue+stats" : with_stats ? "+stats" : with_bias ? "+bias+relu" : "", ms,
                  flops / ms / 1e9, max_err, tol, stat_err, ok ? "" : "  WRONG");
    }
  }
  // cuDNN: the fastest of its legacy algorithms for this NHWC shape, timed as above.
  cudnnTensorDescriptor_t xd = nullptr, yd = nullptr;
  cudnnFilterDescriptor_t wd = nullptr;
  cudnnConvolutionDescriptor_t cd = nullptr;
  check(cudnnCreateTensorDescriptor(&xd), "descriptor");
  check(cudnnCreateTensorDescriptor(&yd), "descriptor");
  check(cudnnCreateFilterDescriptor(&wd), "descriptor");
  check(cudnnCreateConvolutionDescriptor(&cd), "descriptor");
  float cudnn_ms = 0.0f;
  int algo = -1;
  try {
    check(cudnnSetTensor4dDescriptor(xd, CUDNN_TENSOR_NHWC, dt, N, C, H, W), "x descriptor");
    check(cudnnSetTensor4dDescriptor(yd, CUDNN_TENSOR_NHWC, dt, N, K, H, W), "y descriptor");
    check(cudnnSetFilter4dDescriptor(wd, dt, CUDNN_TENSOR_NHWC, K, C, R, S), "w descriptor");
    check(cudnnSetConvolution2dDescriptor(cd, pad, pad, 1, 1, 1, 1, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT), "conv");
    check(cudnnSetConvolutionMathType(cd, CUDNN_TENSOR_OP_MATH), "math type");
    const std::size_t ws_bytes = std::size_t(512) << 20;
    Buffer<char> ws(ws_bytes);
    cudnnConvolutionFwdAlgoPerf_t perf[8];
    int got = 0;
    check(cudnnFindConvolutionForwardAlgorithmEx(dnn, xd, x.p, wd, w.p, cd, yd, y.p, 8, &got, perf, ws.p, ws_bytes),
          "find");
    const float one = 1.0f, zero = 0.0f;
    cudnn_ms = 1e30f;
    for (int i = 0; i < std::min(got, 2); ++i) {
      if (perf[i].status != CUDNN_STATUS_SUCCESS) continue;
      const cudnnConvolutionFwdAlgo_t al = perf[i].algo;
      const float ms = median_ms(o, [&] {
        cudnnConvolutionForward(dnn, &one, xd, x.p, wd, w.p, cd, al, ws.p, ws_bytes, &zero, yd, y.p);
      });
      if (ms < cudnn_ms) {
        cudnn_ms = ms;
        algo = static_cast<int>(al);
      }
    }
  } catch (...) {
    cudnnDestroyTensorDescriptor(xd);
    cudnnDestroyTensorDescriptor(yd);
    cudnnDestroyFilterDescriptor(wd);
    cudnnDestroyConvolutionDescriptor(cd);
    throw;
  }
  cudnnDestroyTensorDescriptor(xd);
  cudnnDestroyTensorDescriptor(yd);
  cudnnDestroyFilterDescriptor(wd);
  cudnnDestroyConvolutionDescriptor(cd);
  std::printf("%-20s %-5s cuDNN legacy algo %d: %.4f ms %6.0f TFLOP/s | best own %.4f ms (%.2fx cuDNN), +stats %.4f ms, "
              "+prologue+stats %.4f ms, +bias+relu %.4f ms\n",
              name, dname, algo, cudnn_ms, flops / cudnn_ms / 1e9, best_plain, best_plain / cudnn_ms, best_stats,
              best_chained, best_bias);
  std::fflush(stdout);
  return all_ok;
}

std::vector<int> parse_shape(const std::string& v) {
  std::vector<int> f;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) {
    char* end = nullptr;
    const long n = std::strtol(item.c_str(), &end, 10);
    if (end == item.c_str() || *end != '\0' || n < 1 || n > 100000) throw Failure{"--shape '" + v + "': bad number"};
    f.push_back(static_cast<int>(n));
  }
  if (f.size() != 5) throw Failure{"--shape '" + v + "': expected N,C,K,H,k"};
  if (f[1] % 64 != 0 || f[2] % 64 != 0) throw Failure{"--shape '" + v + "': C and K must be multiples of 64"};
  return f;
}

int parse_count(const std::string& flag, const std::string& v, int lo) {
  char* end = nullptr;
  const long n = std::strtol(v.c_str(), &end, 10);
  if (end == v.c_str() || *end != '\0' || n < lo || n > 100000) throw Failure{flag + " '" + v + "': bad number"};
  return static_cast<int>(n);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o;
    for (int i = 1; i < argc; ++i) {
      const std::string f = argv[i];
      if (f == "--help" || f == "-h") {
        std::fputs(kUsage, stdout);
        return 0;
      }
      if (i + 1 >= argc) throw Failure{f + " needs a value (see --help)"};
      const std::string v = argv[++i];
      if (f == "--shape") o.shapes.push_back(parse_shape(v));
      else if (f == "--dtype") {
        if (v != "fp16" && v != "bf16" && v != "all") throw Failure{"--dtype '" + v + "': fp16, bf16 or all"};
        o.fp16 = v != "bf16";
        o.bf16 = v != "fp16";
      } else if (f == "--warmup") o.warmup = parse_count(f, v, 0);
      else if (f == "--iters") o.iters = parse_count(f, v, 1);
      else if (f == "--batch") o.batch = parse_count(f, v, 1);
      else throw Failure{"unknown option " + f + " (see --help)"};
    }
    if (o.shapes.empty())
      o.shapes = {{128, 64, 64, 56, 3},  {128, 128, 128, 28, 3}, {128, 256, 256, 14, 3},
                  {128, 512, 512, 7, 3}, {128, 256, 64, 56, 1},  {128, 64, 256, 56, 1}};
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
      throw Failure{"no CUDA device: this benchmark needs a compute capability 9.0 GPU"};
    int major = 0, minor = 0;
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "device");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0), "device");
    if (major != 9 || minor != 0) throw Failure{"needs a compute capability 9.0 GPU (Hopper)"};
    cudnnHandle_t dnn = nullptr;
    check(cudnnCreate(&dnn), "cudnnCreate");
    std::printf("# implicit_gemm_bench: median of %d x %d calls after %d warm-up, CUDA events\n", o.iters, o.batch,
                o.warmup);
    bool ok = true;
    for (const auto& s : o.shapes) {
      if (o.fp16) ok = run_shape<__half>(o, dnn, s, CUDNN_DATA_HALF, "fp16") && ok;
      if (o.bf16) ok = run_shape<__nv_bfloat16>(o, dnn, s, CUDNN_DATA_BFLOAT16, "bf16") && ok;
    }
    cudnnDestroy(dnn);
    if (!ok) std::printf("# some results are wrong (WRONG)\n");
    return ok ? 0 : 1;
  } catch (const Failure& f) {
    std::fprintf(stderr, "implicit_gemm_bench: %s\n", f.what.c_str());
    return 2;
  }
}
