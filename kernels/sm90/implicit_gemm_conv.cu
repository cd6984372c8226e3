// Host side of the implicit-GEMM convolution forward, backward data and backward filter
// (implicit_gemm_conv.h). This translation unit
// is compiled for sm_90a only (CMakeLists.txt): the wgmma and TMA instructions exist there.
#include "implicit_gemm_conv.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "conv_graphs.h"
#include "cuda_check.h"
#include "cuda_state.h"
#include "cudnn_graph.h"
#include "dstrain/error.h"
#include "sm90/implicit_gemm_conv_rows_kernels.cuh"
#include "sm90/implicit_gemm_wgrad_rows_kernels.cuh"

namespace dstrain::kernels::cuda {

namespace {

using igemm::ForwardVariant;

// The convolution's dimensions in kernel arguments (ConvForwardArgs, WgradArgs): x [N, H, W, C],
// the filters w [K, R, S, C], the output y [N, P, Q, K].
template <typename Args>
void set_conv_shape(Args& a, const Tensor& x, const Tensor& w, const Tensor& y, const ops::Conv2dParams& p) {
  a.N = static_cast<int>(x.dim(0));
  a.H = static_cast<int>(x.dim(1));
  a.W = static_cast<int>(x.dim(2));
  a.C = static_cast<int>(x.dim(3));
  a.K = static_cast<int>(w.dim(0));
  a.R = static_cast<int>(w.dim(1));
  a.S = static_cast<int>(w.dim(2));
  a.P = static_cast<int>(y.dim(1));
  a.Q = static_cast<int>(y.dim(2));
  a.pad_h = p.pad_h;
  a.pad_w = p.pad_w;
  a.M = a.N * a.P * a.Q;
}

// sums: null, or [2K] (the column sums, then the sums of squares).
igemm::ConvForwardArgs args_of(const Tensor& x, const Tensor& w, Tensor& y, const ops::Conv2dParams& p,
                               float* sums) {
  igemm::ConvForwardArgs a{};
  a.x = x.data();
  a.w = w.data();
  a.y = y.data();
  a.sum = sums;
  a.sqsum = sums != nullptr ? sums + w.dim(0) : nullptr;
  set_conv_shape(a, x, w, y, p);
  a.overlap_launch = overlap_launches(x.device().index);
  return a;
}

// 3x3 filters with padding 1 and the output the image's size (stride 1): the shapes of both row
// kernels (forward and wgrad arguments alike).
template <class Args>
bool same_size_3x3(const Args& a) {
  return a.R == 3 && a.S == 3 && a.pad_h == 1 && a.pad_w == 1 && a.P == a.H && a.Q == a.W;
}

// The row kernel's shapes: 3x3 same-size, 64 input channels, images up to kMaxConvRowsWidth wide.
bool conv_rows_apply(const igemm::ConvForwardArgs& a) {
  return same_size_3x3(a) && a.C == 64 && a.K % 64 == 0 && a.W <= igemm::kMaxConvRowsWidth;
}

// The tiles whose width divides K (with the prologue where it is wanted), then the row kernel
// where it takes the shape.
std::vector<ForwardVariant> variants_for(const igemm::ConvForwardArgs& a) {
  const bool prologue = a.in.gamma != nullptr;
  std::vector<ForwardVariant> v;
  for (int i = 0; i < igemm::kForwardVariants; ++i) {
    const auto f = static_cast<ForwardVariant>(i);
    if (a.K % igemm::variant_bn(f) == 0 && (!prologue || igemm::variant_has_prologue(f))) v.push_back(f);
  }
  if (conv_rows_apply(a)) v.push_back(ForwardVariant::Rows);
  return v;
}

// Untimed pick (stream capture): the row kernel where it takes the shape, but for the BatchNorm
// backward (1.6x to 1.8x faster than the tiles on the 56 x 56 layer in every other epilogue,
// benchmarks/RESULTS.md); else wide tiles where K allows them and the reduction is long.
ForwardVariant default_variant(const igemm::ConvForwardArgs& a) {
  if (conv_rows_apply(a) && a.bwd.x == nullptr) return ForwardVariant::Rows;
  const int reduction = a.R * a.S * a.C;
  if (a.K % 256 == 0 && reduction >= 2048) return ForwardVariant::M128N256;
  if (a.K % 128 == 0) return ForwardVariant::M128N128;
  return ForwardVariant::M256N64;
}

void launch(CudaState& st, ForwardVariant v, const igemm::ConvForwardArgs& a, DType dt) {
  cudaStream_t stream = st.cuda_stream();
  if (a.sum != nullptr && a.finish.count == nullptr)  // the sums of squares follow the sums (args_of)
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(a.sum, 0, 2 * sizeof(float) * static_cast<std::size_t>(a.K), stream));
  igemm::ConvTensorMaps maps{};
  const bool half = dt == DType::F16, rows = v == ForwardVariant::Rows;
  const cudaError_t mapped = rows ? (half ? igemm::make_conv_rows_tensor_maps<__half>(a, maps)
                                          : igemm::make_conv_rows_tensor_maps<__nv_bfloat16>(a, maps))
                                  : (half ? igemm::make_tensor_maps<__half>(a, v, maps)
                                          : igemm::make_tensor_maps<__nv_bfloat16>(a, v, maps));
  if (mapped != cudaSuccess)
    DSTRAIN_THROW(ErrorCode::Cuda, "implicit-GEMM convolution: the driver refused its tensor maps (" +
                                       std::string(cudaGetErrorString(mapped)) + ")");
  if (rows) {
    // Each block of 64 filters gets as many CTAs as the multiprocessors allow, at most one a step.
    const int k_blocks = a.K / 64, steps = a.N * ((a.P + 1) / 2);
    const int per_block = std::max(1, std::min(sm_count(st.device) / k_blocks, steps));
    DSTRAIN_CUDA_CHECK(half ? igemm::conv_rows_forward<__half>(a, maps, per_block * k_blocks, stream)
                            : igemm::conv_rows_forward<__nv_bfloat16>(a, maps, per_block * k_blocks, stream));
    return;
  }
  DSTRAIN_CUDA_CHECK(half ? igemm::conv_forward<__half>(v, a, maps, stream)
                          : igemm::conv_forward<__nv_bfloat16>(v, a, maps, stream));
}

// The variant index that the environment variable `name` forces (for tests of every kernel), in
// [0, count); -1 when unset.
int forced_variant(const char* name, int count) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return -1;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  if (*end != '\0' || v < 0 || v >= count)
    DSTRAIN_THROW(ErrorCode::InvalidArgument, std::string(name) + " must be a variant index (0 to " +
                                                  std::to_string(count - 1) + "), not '" + env + "'");
  return static_cast<int>(v);
}

// DSTRAIN_FORWARD_VARIANT=i: the forward takes its i-th variant among those that take the shape and
// extras (variants_for; the last where fewer: 9 is the row kernel where it applies), untimed.
int forced_forward_variant() {
  static const int forced = forced_variant("DSTRAIN_FORWARD_VARIANT", igemm::kForwardVariants + 1);
  return forced;
}

// DSTRAIN_WGRAD_VARIANT=i: the wgrad takes its i-th variant among those that divide K and take the
// shape (the last where fewer), untimed.
int forced_wgrad_variant() {
  static const int forced = forced_variant("DSTRAIN_WGRAD_VARIANT", igemm::kWgradVariants);
  return forced;
}

// The candidate that the timed choice keeps for `key` in `chosen` (guarded by `mutex`): the one
// found there, or the fastest of candidates() now (three calls of run(v) each, then after_timing()),
// logged under DSTRAIN_LOG_CHOICES as "choice <describe()>: <name(v)> <ms> / ...". Nothing is
// timed inside a stream capture: `untimed` then, not remembered.
template <typename Key, typename V, typename Candidates, typename Run, typename After, typename Name,
          typename Describe>
V timed_choice(CudaState& st, std::mutex& mutex, std::map<Key, V>& chosen, const Key& key, V untimed,
               Candidates candidates, Run run, After after_timing, Name name, Describe describe) {
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = chosen.find(key);
    if (it != chosen.end()) return it->second;
  }
  if (capturing(st.cuda_stream())) return untimed;
  const std::vector<V> vs = candidates();
  std::vector<float> ms;
  for (V v : vs) ms.push_back(cudnn_graph::time_calls_ms(st.cuda_stream(), 3, [&] { run(v); }));
  after_timing();
  const std::size_t best = static_cast<std::size_t>(std::min_element(ms.begin(), ms.end()) - ms.begin());
  if (choices_logged()) {
    std::string times;
    for (std::size_t i = 0; i < vs.size(); ++i)
      times += (i > 0 ? " / " : "") + name(vs[i]) + " " + std::to_string(ms[i] / 3.0f);
    detail::log_warning("choice " + describe() + ": " + times + " ms");
  }
  std::lock_guard<std::mutex> lock(mutex);
  return chosen.emplace(key, vs[best]).first->second;
}

// The fastest variant for (device, shape, dtype, extras), timed on first use. The timed launches
// leave the batch statistics unwritten (the sums alone, zeroed before each): the real launch
// writes them once.
ForwardVariant choose_variant(CudaState& st, const igemm::ConvForwardArgs& a, DType dt, const Tensor& x,
                              const Tensor& w) {
  static std::mutex mutex;
  static auto* chosen = new std::map<std::array<int, 15>, ForwardVariant>();  // never destroyed
  const std::array<int, 15> key{st.device,        a.N,        a.H,        a.W,
                                a.C,              a.K,        a.R,        a.S,
                                a.pad_h,          a.pad_w,    static_cast<int>(dt),
                                a.sum != nullptr, a.in.gamma != nullptr, a.bias != nullptr,
                                a.bwd.x != nullptr};
  if (const int forced = forced_forward_variant(); forced >= 0) {
    const std::vector<ForwardVariant> vs = variants_for(a);
    return vs[std::min<std::size_t>(static_cast<std::size_t>(forced), vs.size() - 1)];
  }
  igemm::ConvForwardArgs timed = a;
  timed.finish = {};
  return timed_choice(
      st, mutex, *chosen, key, default_variant(a), [&] { return variants_for(a); },
      [&](ForwardVariant v) { launch(st, v, timed, dt); },
      [&] {
        if (a.finish.count != nullptr)  // the finishing launch needs its accumulators zeroed again
          DSTRAIN_CUDA_CHECK(
              cudaMemsetAsync(a.sum, 0, 2 * sizeof(float) * static_cast<std::size_t>(a.K), st.cuda_stream()));
      },
      igemm::variant_name,
      [&] {
        return "implicit-GEMM tile for x " + shape_str(x.shape()) + " w " + shape_str(w.shape()) + " " +
               dtype_name(dt) + (a.in.gamma != nullptr ? " with prologue" : "") +
               (a.bias != nullptr ? " with bias + ReLU" : "") +
               (a.bwd.x != nullptr ? " with the BatchNorm backward" : a.sum != nullptr ? " with statistics" : "");
      });
}

// w_rot[c, R - 1 - r, S - 1 - s, k] = w[k, r, s, c] (rs = r S + s becomes RS - 1 - rs): dgrad's
// filters as a forward convolution's, for 16-bit elements and K, C multiples of 64. 64 x 64 (k, c)
// tiles through shared memory, every global access two elements wide, so that a warp reads 128
// bytes of a filter row (over c) and writes 128 bytes of a rotated one (over k).
__global__ void rotate_filters_kernel(const std::uint16_t* w, std::uint16_t* w_rot, int K, int RS, int C) {
  __shared__ __align__(4) std::uint16_t tile[64][66];  // [k][c]; the padding spreads the column reads
  const int c0 = static_cast<int>(blockIdx.x) * 64, k0 = static_cast<int>(blockIdx.y) * 64;
  const int rs = static_cast<int>(blockIdx.z);
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  for (int i = ty; i < 64; i += 8) {
    const std::size_t row = (static_cast<std::size_t>(k0 + i) * RS + rs) * C + c0;
    *reinterpret_cast<std::uint32_t*>(&tile[i][2 * tx]) = *reinterpret_cast<const std::uint32_t*>(w + row + 2 * tx);
  }
  __syncthreads();
  for (int i = ty; i < 64; i += 8) {
    const std::size_t row = (static_cast<std::size_t>(c0 + i) * RS + (RS - 1 - rs)) * K + k0;
    const std::uint32_t pair = tile[2 * tx][i] | (static_cast<std::uint32_t>(tile[2 * tx + 1][i]) << 16);
    *reinterpret_cast<std::uint32_t*>(w_rot + row + 2 * tx) = pair;
  }
}

// dgrad's padding as a forward convolution: R - 1 - pad.
ops::Conv2dParams dgrad_params(const Tensor& w, const ops::Conv2dParams& p) {
  ops::Conv2dParams q = p;
  q.pad_h = static_cast<int>(w.dim(1)) - 1 - p.pad_h;
  q.pad_w = static_cast<int>(w.dim(2)) - 1 - p.pad_w;
  return q;
}

// True where the chained input's BatchNorm tensors that a kernel reads are all fp32 [C]: gamma,
// beta and the batch statistics, and with `gradients` its dgamma and dbeta too.
bool chained_input_fits(const ops::ChainedInput& in, std::int64_t C, bool gradients) {
  for (const Tensor* t : {in.gamma, static_cast<const Tensor*>(in.beta), in.save_mean, in.save_invstd})
    if (t == nullptr || t->dtype() != DType::F32 || t->numel() != C) return false;
  if (gradients)
    for (const Tensor* t : {in.dgamma, in.dbeta})
      if (t == nullptr || t->dtype() != DType::F32 || t->numel() != C) return false;
  return true;
}

using igemm::WgradVariant;

// Variant v on at most one CTA per multiprocessor (the configurations' shared memory allows no
// second). Where whole chunks of steps for every tile fill at least 90% of the multiprocessors,
// tiles x chunks CTAs each take one (their reads of x and dy then meet in L2: a 56 x 56 image's
// tensors do not fit there); else one chunk, cut evenly over all of them.
void launch_wgrad(CudaState& st, WgradVariant v, igemm::WgradArgs a, void* dw, DType dt) {
  cudaStream_t stream = st.cuda_stream();
  const int sms = sm_count(st.device);
  const bool rows = igemm::is_wgrad_rows(v);  // a step is one or more output rows, else a run of pixels
  const bool several_rows = v == WgradVariant::RowBlocks;
  if (rows) {
    a.steps = a.N * igemm::wgrad_row_steps(a.P, igemm::wgrad_rows_per_step(a.Q, several_rows));
  } else {
    const int step_pixels = igemm::wgrad_step_pixels(v);
    a.steps = (a.M + step_pixels - 1) / step_pixels;
  }
  const int tiles = igemm::wgrad_tiles(v, a);
  const int chunks = std::min(sms / tiles, a.steps);
  if (chunks >= 1 && 10 * tiles * chunks >= 9 * sms) {
    a.chunks = chunks;
    a.ctas = tiles * chunks;
  } else {
    a.chunks = 1;
    a.ctas = static_cast<int>(std::min<long long>(sms, static_cast<long long>(tiles) * a.steps));
  }
  DSTRAIN_CUDA_CHECK(cudaMemsetAsync(a.work, 0, sizeof(float) * static_cast<std::size_t>(a.R) * a.S * a.C * a.K, stream));
  igemm::WgradTensorMaps maps{};
  const bool half = dt == DType::F16;
  const cudaError_t mapped =
      rows ? (half ? igemm::make_wgrad_rows_tensor_maps<__half>(a, several_rows, maps)
                   : igemm::make_wgrad_rows_tensor_maps<__nv_bfloat16>(a, several_rows, maps))
           : (half ? igemm::make_wgrad_tensor_maps<__half>(a, v, maps)
                   : igemm::make_wgrad_tensor_maps<__nv_bfloat16>(a, v, maps));
  if (mapped != cudaSuccess)
    DSTRAIN_THROW(ErrorCode::Cuda, "implicit-GEMM wgrad: the driver refused its tensor maps (" +
                                       std::string(cudaGetErrorString(mapped)) + ")");
  if (rows)
    DSTRAIN_CUDA_CHECK(half ? igemm::conv_wgrad_rows<__half>(a, several_rows, maps, dw, stream)
                            : igemm::conv_wgrad_rows<__nv_bfloat16>(a, several_rows, maps, dw, stream));
  else
    DSTRAIN_CUDA_CHECK(half ? igemm::conv_wgrad<__half>(v, a, maps, dw, stream)
                            : igemm::conv_wgrad<__nv_bfloat16>(v, a, maps, dw, stream));
}

// The row kernel's shapes: 3x3 filters with padding 1 (stride 1: the output keeps the image size)
// and rows of at most 64 pixels, or for several rows a step fewer than 32.
bool wgrad_rows_apply(const igemm::WgradArgs& a, WgradVariant v) {
  return same_size_3x3(a) && igemm::wgrad_rows_take(a.Q, v == WgradVariant::RowBlocks);
}

// The fastest wgrad variant for (device, shape, dtype, prologue), timed on first use; during a
// capture, untimed: the row kernel on 3x3 layers with rows of more than 32 pixels, else the
// 128-pixel-step tile 128 wide where K allows it, else 64 wide (the fastest on ResNet-50's 3x3
// layers, RESULTS.md).
WgradVariant choose_wgrad_variant(CudaState& st, const igemm::WgradArgs& a, void* dw, DType dt, const Tensor& x,
                                  const Tensor& dy) {
  static std::mutex mutex;
  static auto* chosen = new std::map<std::array<int, 12>, WgradVariant>();  // never destroyed
  const std::array<int, 12> key{st.device, a.N, a.H, a.W, a.C, a.K, a.R, a.S, a.pad_h, a.pad_w, static_cast<int>(dt),
                                a.in.gamma != nullptr};
  auto dividing_k = [&] {  // the variants whose tile width divides K and that take the shape
    std::vector<WgradVariant> vs;
    for (int i = 0; i < igemm::kWgradVariants; ++i) {
      const auto v = static_cast<WgradVariant>(i);
      if (a.K % igemm::wgrad_tile_cols(v) == 0 && (!igemm::is_wgrad_rows(v) || wgrad_rows_apply(a, v)))
        vs.push_back(v);
    }
    return vs;
  };
  if (const int forced = forced_wgrad_variant(); forced >= 0) {
    const std::vector<WgradVariant> vs = dividing_k();
    return vs[std::min<std::size_t>(static_cast<std::size_t>(forced), vs.size() - 1)];
  }
  return timed_choice(
      st, mutex, *chosen, key,
      wgrad_rows_apply(a, WgradVariant::Rows) && a.Q > 32 ? WgradVariant::Rows
      : a.K % 128 == 0                ? WgradVariant::P128A2N128
                                      : WgradVariant::P128A2N64,
      dividing_k,
      [&](WgradVariant v) { launch_wgrad(st, v, a, dw, dt); }, [] {}, igemm::wgrad_variant_name,
      [&] {
        return "implicit-GEMM wgrad tile for x " + shape_str(x.shape()) + " dy " + shape_str(dy.shape()) + " " +
               dtype_name(dt) + (a.in.gamma != nullptr ? " with prologue" : "");
      });
}

}  // namespace

bool implicit_gemm_forward_applies(int device, const Tensor& x, const Tensor& w, const Tensor& y,
                                   const ops::Conv2dParams& p, bool with_stats, bool with_prologue) {
  if (ops::deterministic() || compute_capability(device) != 90) return false;
  const DType dt = x.dtype();
  if ((dt != DType::F16 && dt != DType::BF16) || w.dtype() != dt || y.dtype() != dt) return false;
  if (x.ndim() != 4 || w.ndim() != 4 || y.ndim() != 4) return false;
  const std::int64_t C = x.dim(3), K = w.dim(0), R = w.dim(1), S = w.dim(2);
  if (C % 64 != 0 || K % 64 != 0 || w.dim(3) != C || y.dim(3) != K) return false;
  if (p.stride_h != 1 || p.stride_w != 1 || p.pad_h < 0 || p.pad_w < 0 || p.pad_h >= R || p.pad_w >= S) return false;
  if (R > 64 || S > 64) return false;  // the im2col box corners are 8-bit
  if (with_stats && K > igemm::kMaxStatsChannels) return false;
  if (with_prologue && C > igemm::kMaxPrologueChannels) return false;
  if (!aligned16(x.data()) || !aligned16(w.data()) || !aligned16(y.data())) return false;
  // 32-bit indices: output rows, and the reduction length of one filter row; output positions
  // packed 16 bits each (the prologue's padding test).
  return y.numel() / K < (std::int64_t(1) << 31) && R * S * C < (std::int64_t(1) << 31) && y.dim(1) < 32768 &&
         y.dim(2) < 32768 && x.numel() > 0 && y.numel() > 0;
}

void implicit_gemm_forward(CudaState& st, const Tensor& x, const Tensor& w, Tensor& y, const ops::Conv2dParams& p,
                           const ImplicitGemmExtras& extras) {
  const bool with_stats = extras.sums != nullptr || extras.batch_stats != nullptr || extras.through != nullptr;
  if ((extras.sums != nullptr) + (extras.batch_stats != nullptr) + (extras.through != nullptr) > 1)
    DSTRAIN_THROW(ErrorCode::Internal,
                  "implicit-GEMM convolution: the sums, the batch statistics or the BatchNorm backward, one of them");
  if (!implicit_gemm_forward_applies(st.device, x, w, y, p, with_stats, extras.chained_input != nullptr))
    DSTRAIN_THROW(ErrorCode::Internal, "implicit-GEMM convolution called for a shape it does not handle");
  if ((reinterpret_cast<std::uintptr_t>(extras.bias_relu) & 7u) != 0)
    DSTRAIN_THROW(ErrorCode::Internal, "implicit-GEMM convolution: bias unaligned");
  float* sums = extras.sums;
  unsigned* count = nullptr;
  if (extras.batch_stats != nullptr || extras.through != nullptr) {
    // The state's accumulators: the sums, their squares, then the count of CTAs done.
    static_assert(2 * igemm::kMaxStatsChannels * sizeof(float) + sizeof(unsigned) <=
                  CudaState::kZeroedAccumulatorBytes);
    sums = static_cast<float*>(st.ensure_zeroed_accumulators());
    count = reinterpret_cast<unsigned*>(sums + 2 * igemm::kMaxStatsChannels);
  }
  igemm::ConvForwardArgs a = args_of(x, w, y, p, sums);
  if (const ImplicitGemmBatchStats* b = extras.batch_stats; b != nullptr)
    a.finish = {count, b->eps, b->momentum, b->save_mean, b->save_invstd, b->running_mean, b->running_var};
  if (const DgradThroughBatchNorm* th = extras.through; th != nullptr) {
    const ops::ChainedInput& in = *th->in;
    a.finish.count = count;
    a.bwd = {th->x->data(),
             in.gamma->data_as<float>(),
             in.beta->data_as<float>(),
             in.save_mean->data_as<float>(),
             in.save_invstd->data_as<float>(),
             in.dgamma->data_as<float>(),
             in.dbeta->data_as<float>()};
  }
  if (const ops::ChainedInput* in = extras.chained_input; in != nullptr)
    a.in = {in->gamma->data_as<float>(), in->beta->data_as<float>(), in->save_mean->data_as<float>(),
            in->save_invstd->data_as<float>()};
  a.bias = extras.bias_relu;
  if (!igemm::extras_supported(a))
    DSTRAIN_THROW(ErrorCode::Internal,
                  "implicit-GEMM convolution: sums, prologue or batch statistics given in part, or extras in a "
                  "combination it is not built with (the prologue only with the sums, bias + ReLU and the BatchNorm "
                  "backward only alone)");
  launch(st, choose_variant(st, a, x.dtype(), x, w), a, x.dtype());
}

bool implicit_gemm_dgrad_applies(int device, const Tensor& dy, const Tensor& w, const Tensor& dx,
                                 const ops::Conv2dParams& p, const DgradThroughBatchNorm* through) {
  if (ops::deterministic() || compute_capability(device) != 90 || w.ndim() != 4 || dy.ndim() != 4 ||
      dx.ndim() != 4 || p.pad_h < 0 || p.pad_w < 0 || p.pad_h >= w.dim(1) || p.pad_w >= w.dim(2))
    return false;
  // The rotated filters [C, R, S, K] have w's element count and dtype; only their shape matters here.
  const Tensor rotated = Tensor::wrap(const_cast<void*>(w.data()), {w.dim(3), w.dim(1), w.dim(2), w.dim(0)},
                                      w.dtype(), w.device());
  if (through != nullptr) {
    const Tensor& x = *through->x;
    const ops::ChainedInput& in = *through->in;
    if (!chained_input_fits(in, dx.dim(3), true)) return false;
    if (x.shape() != dx.shape() || x.dtype() != dx.dtype() || !aligned16(x.data())) return false;
  }
  return implicit_gemm_forward_applies(device, dy, rotated, dx, dgrad_params(w, p), through != nullptr);
}

void implicit_gemm_dgrad(CudaState& st, const Tensor& dy, const Tensor& w, Tensor& dx, const ops::Conv2dParams& p,
                         const DgradThroughBatchNorm* through) {
  if (!implicit_gemm_dgrad_applies(st.device, dy, w, dx, p, through))
    DSTRAIN_THROW(ErrorCode::Internal, "implicit-GEMM dgrad called for a shape it does not handle");
  const int K = static_cast<int>(w.dim(0)), R = static_cast<int>(w.dim(1)), S = static_cast<int>(w.dim(2)),
            C = static_cast<int>(w.dim(3));
  void* rot = st.ensure_workspace(static_cast<std::size_t>(w.nbytes()));
  // K and C are multiples of 64 (implicit_gemm_forward_applies), the elements 16-bit.
  const dim3 grid(static_cast<unsigned>(C / 64), static_cast<unsigned>(K / 64), static_cast<unsigned>(R * S));
  rotate_filters_kernel<<<grid, dim3(32, 8), 0, st.cuda_stream()>>>(static_cast<const std::uint16_t*>(w.data()),
                                                                      static_cast<std::uint16_t*>(rot), K, R * S, C);
  DSTRAIN_CUDA_CHECK_LAUNCH();
  const Tensor rotated = Tensor::wrap(rot, {C, R, S, K}, w.dtype(), w.device());
  ImplicitGemmExtras extras;
  extras.through = through;
  implicit_gemm_forward(st, dy, rotated, dx, dgrad_params(w, p), extras);
}

}  // namespace dstrain::kernels::cuda

namespace dstrain::kernels::cuda {

bool implicit_gemm_wgrad_applies(int device, const Tensor& x, const Tensor& dy, const Tensor& dw,
                                 const ops::Conv2dParams& p, const ops::ChainedInput* in) {
  if (dw.ndim() != 4 || !implicit_gemm_forward_applies(device, x, dw, dy, p, false, false)) return false;
  return in == nullptr || chained_input_fits(*in, x.dim(3), false);
}

void implicit_gemm_wgrad(CudaState& st, const Tensor& x, const Tensor& dy, Tensor& dw, const ops::Conv2dParams& p,
                         const ops::ChainedInput* in) {
  if (!implicit_gemm_wgrad_applies(st.device, x, dy, dw, p, in))
    DSTRAIN_THROW(ErrorCode::Internal, "implicit-GEMM wgrad called for a shape it does not handle");
  igemm::WgradArgs a{};
  a.x = x.data();
  a.dy = dy.data();
  set_conv_shape(a, x, dw, dy, p);
  if (in != nullptr)
    a.in = {in->gamma->data_as<float>(), in->beta->data_as<float>(), in->save_mean->data_as<float>(),
            in->save_invstd->data_as<float>()};
  a.work = static_cast<float*>(st.ensure_workspace(sizeof(float) * static_cast<std::size_t>(dw.numel())));
  launch_wgrad(st, choose_wgrad_variant(st, a, dw.data(), x.dtype(), x, dy), a, dw.data(), x.dtype());
}

}  // namespace dstrain::kernels::cuda
