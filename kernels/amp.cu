// Mixed-precision kernels (dstrain/amp.h): multi-tensor unscale + inf/NaN check, loss-scale
// update, fused SGD and AdamW over fp32 master weights, FP8 cast with amax, FP8 scale update.
//
// Multi-tensor launches follow PyTorch's multi_tensor_apply: the tensors' pointers and sizes
// travel in the kernel's parameters (a table under the classic 4 KiB limit: 198 tensors for an
// in-place op, fewer for deeper ops, more tensors take more launches), each tensor is cut into
// chunks of kChunk elements, and blocks walk the chunks grid-stride, finding a chunk's tensor by
// binary search over the chunks' prefix sums. No table is uploaded, so a step needs no host
// synchronisation and no device allocation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "amp_cuda.h"
#include "cuda_check.h"
#include "cuda_state.h"
#include "sgd_math.cuh"

namespace dstrain::kernels::cuda {

namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;                    // float4 loads in flight per thread
constexpr std::int64_t kChunk = 16384;     // elements per chunk (a multiple of 4)
constexpr int kTableBytes = 3968;          // leaves room for the scalar arguments in 4 KiB

template <int kDepth>
struct TensorTable {
  static constexpr int kMax = (kTableBytes - 8) / (8 * kDepth + 8 + 4);
  void* ptr[kDepth][kMax];
  std::int64_t numel[kMax];
  int chunk_start[kMax + 1];  // chunk_start[t]: first chunk of tensor t; [count]: total chunks
  int count;
};
static_assert(sizeof(TensorTable<1>) <= kTableBytes, "table over the parameter budget");
static_assert(sizeof(TensorTable<5>) <= kTableBytes, "table over the parameter budget");
static_assert(TensorTable<1>::kMax >= 161, "a ResNet-50's gradients must fit one unscale launch");

// Fills tables of at most kMax tensors each (empty tensors left out) and calls launch(table, vec)
// for each, where vec says every pointer of column d in that table is aligned to align[d] bytes
// (16 for fp32 columns read as float4, 8 for 16-bit columns written 4 at a time).
template <int kDepth, class Launch>
void for_each_table(const std::vector<std::vector<void*>>& columns, const std::array<unsigned, kDepth>& align,
                    const std::vector<std::int64_t>& numel, Launch launch) {
  TensorTable<kDepth> table{};
  bool vec = true;
  auto flush = [&] {
    if (table.count > 0) launch(table, vec);
    table = TensorTable<kDepth>{};
    vec = true;
  };
  for (std::size_t t = 0; t < numel.size(); ++t) {
    if (numel[t] == 0) continue;
    const std::int64_t chunks = (numel[t] + kChunk - 1) / kChunk;
    DSTRAIN_CHECK(chunks <= (std::int64_t(1) << 30), "tensor too large for one multi-tensor launch");
    if (table.count == TensorTable<kDepth>::kMax ||
        static_cast<std::int64_t>(table.chunk_start[table.count]) + chunks > (std::int64_t(1) << 30))
      flush();
    const int i = table.count;
    for (int d = 0; d < kDepth; ++d) {
      void* p = columns[static_cast<std::size_t>(d)][t];
      table.ptr[d][i] = p;
      if (p != nullptr && (reinterpret_cast<std::uintptr_t>(p) % align[static_cast<std::size_t>(d)]) != 0)
        vec = false;
    }
    table.numel[i] = numel[t];
    table.chunk_start[i + 1] = table.chunk_start[i] + static_cast<int>(chunks);
    table.count = i + 1;
  }
  flush();
}

// About one block per chunk, as multi_tensor_apply does: the hardware keeps every SM full and
// short blocks balance uneven tensors. The cap only bounds absurd grids (blocks then loop).
int grid_for_chunks(int chunks, int device) { return std::max(1, std::min(chunks, sm_count(device) * 32)); }

// The tensor holding chunk c (largest t with chunk_start[t] <= c).
template <int kDepth>
__device__ __forceinline__ int tensor_of_chunk(const TensorTable<kDepth>& table, int c) {
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.chunk_start[mid] <= c)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// ---- unscale + check ----

__device__ __forceinline__ float unscale1(float g, float inv_scale, bool& found) {
  found |= !isfinite(g);
  return g * inv_scale;
}

__global__ void __launch_bounds__(kThreads, 2)
    unscale_kernel(TensorTable<1> table, bool vec, float* __restrict__ state) {
  const float inv_scale = 1.0f / state[0];
  bool found = false;
  const int total = table.chunk_start[table.count];
  for (int c = blockIdx.x; c < total; c += gridDim.x) {
    const int t = tensor_of_chunk(table, c);
    const std::int64_t begin = static_cast<std::int64_t>(c - table.chunk_start[t]) * kChunk;
    const std::int64_t end = min(begin + kChunk, table.numel[t]);
    float* g = static_cast<float*>(table.ptr[0][t]) + begin;
    const std::int64_t len = end - begin;
    const std::int64_t n4 = vec ? len / 4 : 0;
    float4* g4 = reinterpret_cast<float4*>(g);
    for (std::int64_t i = threadIdx.x; i < n4; i += kThreads * kIlp) {
      float4 v[kIlp];
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        const std::int64_t k = i + j * kThreads;
        if (k < n4) v[j] = g4[k];
      }
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        const std::int64_t k = i + j * kThreads;
        if (k < n4) {
          v[j].x = unscale1(v[j].x, inv_scale, found);
          v[j].y = unscale1(v[j].y, inv_scale, found);
          v[j].z = unscale1(v[j].z, inv_scale, found);
          v[j].w = unscale1(v[j].w, inv_scale, found);
          g4[k] = v[j];
        }
      }
    }
    for (std::int64_t i = 4 * n4 + threadIdx.x; i < len; i += kThreads) g[i] = unscale1(g[i], inv_scale, found);
  }
  // Any thread's find sets the flag; only ever set here (a benign identical store).
  if (__syncthreads_or(found) && threadIdx.x == 0) state[1] = 1.0f;
}

__global__ void scaler_update_kernel(float* state, float growth_factor, float backoff_factor, float growth_interval) {
  if (state[1] != 0.0f) {
    state[0] *= backoff_factor;
    state[2] = 0.0f;
  } else {
    const float successful = state[2] + 1.0f;
    if (successful >= growth_interval) {
      const float grown = state[0] * growth_factor;
      if (isfinite(grown)) state[0] = grown;
      state[2] = 0.0f;
    } else {
      state[2] = successful;
    }
  }
  state[1] = 0.0f;
}

// ---- optimizers ----

enum class LowPrecision { None, F16, BF16 };

template <LowPrecision L>
__device__ __forceinline__ std::uint16_t to_low(float v) {
  if constexpr (L == LowPrecision::F16)
    return __half_as_ushort(__float2half_rn(v));
  else
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// base null: this tensor has no low-precision copy.
template <LowPrecision L>
__device__ __forceinline__ void store_low4(void* base, std::int64_t k, const float4& p) {
  if constexpr (L != LowPrecision::None) {
    if (base == nullptr) return;
    uint2 packed;
    packed.x = static_cast<unsigned>(to_low<L>(p.x)) | (static_cast<unsigned>(to_low<L>(p.y)) << 16);
    packed.y = static_cast<unsigned>(to_low<L>(p.z)) | (static_cast<unsigned>(to_low<L>(p.w)) << 16);
    reinterpret_cast<uint2*>(base)[k] = packed;
  }
}

template <LowPrecision L>
__device__ __forceinline__ void store_low1(void* base, std::int64_t i, float p) {
  if constexpr (L != LowPrecision::None)
    if (base != nullptr) static_cast<std::uint16_t*>(base)[i] = to_low<L>(p);
}

// Table columns: param, grad, momentum buffer (null without momentum), low-precision copy.
template <bool kMomentum, LowPrecision L>
__global__ void __launch_bounds__(kThreads, 2)
    sgd_kernel(TensorTable<4> table, bool vec, SgdArgs a, const float* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int total = table.chunk_start[table.count];
  for (int c = blockIdx.x; c < total; c += gridDim.x) {
    const int t = tensor_of_chunk(table, c);
    const std::int64_t begin = static_cast<std::int64_t>(c - table.chunk_start[t]) * kChunk;
    const std::int64_t len = min(begin + kChunk, table.numel[t]) - begin;
    float* p = static_cast<float*>(table.ptr[0][t]) + begin;
    const float* g = static_cast<const float*>(table.ptr[1][t]) + begin;
    float* b = kMomentum ? static_cast<float*>(table.ptr[2][t]) + begin : nullptr;
    void* lp = L != LowPrecision::None && table.ptr[3][t] != nullptr
                   ? static_cast<std::uint16_t*>(table.ptr[3][t]) + begin
                   : nullptr;
    const std::int64_t n4 = vec ? len / 4 : 0;
    for (std::int64_t k = threadIdx.x; k < n4; k += kThreads) {
      float4 pv = reinterpret_cast<float4*>(p)[k];
      const float4 gv = reinterpret_cast<const float4*>(g)[k];
      float4 bv = kMomentum ? reinterpret_cast<float4*>(b)[k] : make_float4(0.f, 0.f, 0.f, 0.f);
      sgd1<kMomentum>(pv.x, gv.x, bv.x, a);
      sgd1<kMomentum>(pv.y, gv.y, bv.y, a);
      sgd1<kMomentum>(pv.z, gv.z, bv.z, a);
      sgd1<kMomentum>(pv.w, gv.w, bv.w, a);
      reinterpret_cast<float4*>(p)[k] = pv;
      if (kMomentum) reinterpret_cast<float4*>(b)[k] = bv;
      store_low4<L>(lp, k, pv);
    }
    for (std::int64_t i = 4 * n4 + threadIdx.x; i < len; i += kThreads) {
      float pv = p[i];
      float bv = kMomentum ? b[i] : 0.0f;
      sgd1<kMomentum>(pv, g[i], bv, a);
      p[i] = pv;
      if (kMomentum) b[i] = bv;
      store_low1<L>(lp, i, pv);
    }
  }
}

struct AdamArgs {
  float lr, beta1, beta2, eps, weight_decay;
};

struct AdamStep {
  float step_size, bias_correction2_sqrt, decay;
};

// Every rounding spelled out (no contraction left to the compiler), so that each instantiation
// of the kernel (with or without working copies, vector or scalar path) gives the same bits.
__device__ __forceinline__ void adam1(float& p, float g, float& m, float& v, const AdamArgs& a, const AdamStep& s) {
  p = __fmul_rn(p, s.decay);
  m = __fmaf_rn(a.beta1, m, __fmul_rn(1.0f - a.beta1, g));
  v = __fmaf_rn(a.beta2, v, __fmul_rn(__fmul_rn(1.0f - a.beta2, g), g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bias_correction2_sqrt), a.eps);
  p = __fmaf_rn(-s.step_size, __fdiv_rn(m, denom), p);
}

// Table columns: param, grad, exp_avg, exp_avg_sq, low-precision copy. `step` is the count of
// steps taken so far; this one is step + 1 (adamw_step_kernel advances it afterwards).
template <LowPrecision L>
__global__ void __launch_bounds__(kThreads, 2) adamw_kernel(TensorTable<5> table, bool vec, AdamArgs a,
                                                         const std::int32_t* __restrict__ step,
                                                         const float* __restrict__ found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float t_step = static_cast<float>(*step + 1);
  AdamStep s;
  s.step_size = a.lr / (1.0f - powf(a.beta1, t_step));
  s.bias_correction2_sqrt = sqrtf(1.0f - powf(a.beta2, t_step));
  s.decay = 1.0f - a.lr * a.weight_decay;
  const int total = table.chunk_start[table.count];
  for (int c = blockIdx.x; c < total; c += gridDim.x) {
    const int t = tensor_of_chunk(table, c);
    const std::int64_t begin = static_cast<std::int64_t>(c - table.chunk_start[t]) * kChunk;
    const std::int64_t len = min(begin + kChunk, table.numel[t]) - begin;
    float* p = static_cast<float*>(table.ptr[0][t]) + begin;
    const float* g = static_cast<const float*>(table.ptr[1][t]) + begin;
    float* m = static_cast<float*>(table.ptr[2][t]) + begin;
    float* v = static_cast<float*>(table.ptr[3][t]) + begin;
    void* lp = L != LowPrecision::None && table.ptr[4][t] != nullptr
                   ? static_cast<std::uint16_t*>(table.ptr[4][t]) + begin
                   : nullptr;
    const std::int64_t n4 = vec ? len / 4 : 0;
    for (std::int64_t k = threadIdx.x; k < n4; k += kThreads) {
      float4 pv = reinterpret_cast<float4*>(p)[k];
      const float4 gv = reinterpret_cast<const float4*>(g)[k];
      float4 mv = reinterpret_cast<float4*>(m)[k];
      float4 vv = reinterpret_cast<float4*>(v)[k];
      adam1(pv.x, gv.x, mv.x, vv.x, a, s);
      adam1(pv.y, gv.y, mv.y, vv.y, a, s);
      adam1(pv.z, gv.z, mv.z, vv.z, a, s);
      adam1(pv.w, gv.w, mv.w, vv.w, a, s);
      reinterpret_cast<float4*>(p)[k] = pv;
      reinterpret_cast<float4*>(m)[k] = mv;
      reinterpret_cast<float4*>(v)[k] = vv;
      store_low4<L>(lp, k, pv);
    }
    for (std::int64_t i = 4 * n4 + threadIdx.x; i < len; i += kThreads) {
      float pv = p[i], mv = m[i], vv = v[i];
      adam1(pv, g[i], mv, vv, a, s);
      p[i] = pv;
      m[i] = mv;
      v[i] = vv;
      store_low1<L>(lp, i, pv);
    }
  }
}

__global__ void adamw_step_kernel(std::int32_t* step, const float* found_inf) {
  if (found_inf == nullptr || *found_inf == 0.0f) *step += 1;
}

// The dtype of the copies (null entries: parameters without one).
LowPrecision low_kind(const std::vector<Tensor*>* low_precision) {
  if (low_precision == nullptr) return LowPrecision::None;
  for (const Tensor* t : *low_precision)
    if (t != nullptr) return t->dtype() == DType::F16 ? LowPrecision::F16 : LowPrecision::BF16;
  return LowPrecision::None;
}

// Data pointers of the list; a null entry stays null.
std::vector<void*> data_column(const std::vector<Tensor*>& list) {
  std::vector<void*> out;
  out.reserve(list.size());
  for (Tensor* t : list) out.push_back(t != nullptr ? t->data() : nullptr);
  return out;
}

std::vector<std::int64_t> numel_column(const std::vector<Tensor*>& list) {
  std::vector<std::int64_t> out;
  out.reserve(list.size());
  for (const Tensor* t : list) out.push_back(t->numel());
  return out;
}

// ---- FP8 ----

__device__ __forceinline__ unsigned abs_bits(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }

// x * scale, saturated to the format's largest finite value (NaN stays NaN), rounded to fp8.
template <bool kE4M3>
__device__ __forceinline__ __nv_fp8_storage_t scaled_fp8(float x, float scale) {
  const float limit = kE4M3 ? 448.0f : 57344.0f;
  float v = x * scale;
  if (!isnan(v)) v = fminf(fmaxf(v, -limit), limit);
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, kE4M3 ? __NV_E4M3 : __NV_E5M2);
}

// Block max of |x| as bits (orders like the values for non-negative floats, NaN above inf),
// then one atomicMax per block into state[2], the amax (256 threads).
__device__ __forceinline__ void block_amax_into_state(unsigned amax, float* state) {
  amax = __reduce_max_sync(0xFFFFFFFFu, amax);
  __shared__ unsigned warp_max[8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = amax;
  __syncthreads();
  if (warp == 0) {
    amax = lane < static_cast<int>(blockDim.x >> 5) ? warp_max[lane] : 0u;
    amax = __reduce_max_sync(0xFFFFFFFFu, amax);
    if (lane == 0 && amax != 0u) atomicMax(reinterpret_cast<unsigned*>(state + 2), amax);
  }
}

template <class Src> __device__ __forceinline__ float load_float(const Src* p, std::int64_t i);
template <> __device__ __forceinline__ float load_float<float>(const float* p, std::int64_t i) { return p[i]; }
template <>
__device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p, std::int64_t i) {
  return __bfloat162float(p[i]);
}

template <class Src, bool kE4M3>
__global__ void __launch_bounds__(256)
    cast_fp8_kernel(const Src* __restrict__ src, __nv_fp8_storage_t* __restrict__ dst, std::int64_t n, float* state) {
  const float scale = state[0];
  unsigned amax = 0;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float x = load_float(src, i);
    amax = max(amax, abs_bits(x));
    dst[i] = scaled_fp8<kE4M3>(x, scale);
  }
  block_amax_into_state(amax, state);
}

__global__ void fp8_update_scale_kernel(float* state, int len, bool use_max, float fp8_max, float margin_factor) {
  float* history = state + 3;
  for (int i = len - 1; i > 0; --i) history[i] = history[i - 1];
  history[0] = state[2];
  float amax = history[0];
  if (use_max) {
    for (int i = 1; i < len; ++i) {
      if (isnan(amax)) break;
      if (isnan(history[i]) || history[i] > amax) amax = history[i];
    }
  }
  const float candidate = (fp8_max / amax) / margin_factor;
  if (amax > 0.0f && isfinite(amax) && isfinite(candidate) && candidate > 0.0f) {
    state[0] = candidate;
    state[1] = 1.0f / candidate;
  }
  state[2] = 0.0f;
}

__global__ void scale_by_kernel(float* __restrict__ t, const float* __restrict__ scale, std::int64_t n) {
  const float s = *scale;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    t[i] *= s;
}

}  // namespace

void amp_scale_by_loss_scale(Context& ctx, Tensor& t, const Tensor& scaler_state) {
  const std::int64_t n = t.numel();
  if (n == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const int blocks = static_cast<int>(std::clamp<std::int64_t>((n + 255) / 256, 1, 1024));
  scale_by_kernel<<<blocks, 256, 0, st.cuda_stream()>>>(t.data_as<float>(), scaler_state.data_as<float>(), n);
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

void amp_unscale_and_check(Context& ctx, const std::vector<Tensor*>& grads, Tensor& scaler_state) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  float* state = scaler_state.data_as<float>();
  for_each_table<1>({data_column(grads)}, {16u}, numel_column(grads), [&](const TensorTable<1>& table, bool vec) {
    unscale_kernel<<<grid_for_chunks(table.chunk_start[table.count], st.device), kThreads, 0, st.cuda_stream()>>>(
        table, vec, state);
    DSTRAIN_CUDA_CHECK_LAUNCH();
  });
}

void amp_scaler_update(Context& ctx, Tensor& scaler_state, const amp::GradScalerOptions& o) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  scaler_update_kernel<<<1, 1, 0, st.cuda_stream()>>>(scaler_state.data_as<float>(), o.growth_factor,
                                                      o.backoff_factor, static_cast<float>(o.growth_interval));
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

void amp_fused_sgd(Context& ctx, const std::vector<Tensor*>& params, const std::vector<Tensor*>& grads,
                   const std::vector<Tensor*>& momentum, const Tensor* found_inf,
                   const std::vector<Tensor*>* low_precision, const amp::FusedSGDOptions& o) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const bool use_momentum = o.momentum != 0.0f;
  const std::vector<void*> none(params.size(), nullptr);
  const std::vector<std::vector<void*>> columns{data_column(params), data_column(grads),
                                                use_momentum ? data_column(momentum) : none,
                                                low_precision ? data_column(*low_precision) : none};
  const SgdArgs a{o.lr, o.momentum, o.weight_decay, o.nesterov};
  const float* flag = found_inf ? found_inf->data_as<float>() : nullptr;
  const LowPrecision lp = low_kind(low_precision);
  for_each_table<4>(columns, {16u, 16u, 16u, 8u}, numel_column(params), [&](const TensorTable<4>& table, bool vec) {
    const int grid = grid_for_chunks(table.chunk_start[table.count], st.device);
    cudaStream_t s = st.cuda_stream();
    if (use_momentum) {
      if (lp == LowPrecision::None) sgd_kernel<true, LowPrecision::None><<<grid, kThreads, 0, s>>>(table, vec, a, flag);
      if (lp == LowPrecision::F16) sgd_kernel<true, LowPrecision::F16><<<grid, kThreads, 0, s>>>(table, vec, a, flag);
      if (lp == LowPrecision::BF16) sgd_kernel<true, LowPrecision::BF16><<<grid, kThreads, 0, s>>>(table, vec, a, flag);
    } else {
      if (lp == LowPrecision::None) sgd_kernel<false, LowPrecision::None><<<grid, kThreads, 0, s>>>(table, vec, a, flag);
      if (lp == LowPrecision::F16) sgd_kernel<false, LowPrecision::F16><<<grid, kThreads, 0, s>>>(table, vec, a, flag);
      if (lp == LowPrecision::BF16)
        sgd_kernel<false, LowPrecision::BF16><<<grid, kThreads, 0, s>>>(table, vec, a, flag);
    }
    DSTRAIN_CUDA_CHECK_LAUNCH();
  });
}

void amp_fused_adamw(Context& ctx, const std::vector<Tensor*>& params, const std::vector<Tensor*>& grads,
                     const std::vector<Tensor*>& exp_avg, const std::vector<Tensor*>& exp_avg_sq, Tensor& step,
                     const Tensor* found_inf, const std::vector<Tensor*>* low_precision,
                     const amp::FusedAdamWOptions& o) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  cudaStream_t s = st.cuda_stream();
  const std::vector<void*> none(params.size(), nullptr);
  const AdamArgs a{o.lr, o.beta1, o.beta2, o.eps, o.weight_decay};
  const float* flag = found_inf ? found_inf->data_as<float>() : nullptr;
  std::int32_t* step_ptr = step.data_as<std::int32_t>();
  const LowPrecision lp = low_kind(low_precision);
  for_each_table<5>({data_column(params), data_column(grads), data_column(exp_avg), data_column(exp_avg_sq),
                     low_precision ? data_column(*low_precision) : none},
                    {16u, 16u, 16u, 16u, 8u}, numel_column(params), [&](const TensorTable<5>& table, bool vec) {
                      const int grid = grid_for_chunks(table.chunk_start[table.count], st.device);
                      if (lp == LowPrecision::None)
                        adamw_kernel<LowPrecision::None><<<grid, kThreads, 0, s>>>(table, vec, a, step_ptr, flag);
                      if (lp == LowPrecision::F16)
                        adamw_kernel<LowPrecision::F16><<<grid, kThreads, 0, s>>>(table, vec, a, step_ptr, flag);
                      if (lp == LowPrecision::BF16)
                        adamw_kernel<LowPrecision::BF16><<<grid, kThreads, 0, s>>>(table, vec, a, step_ptr, flag);
                      DSTRAIN_CUDA_CHECK_LAUNCH();
                    });
  // After every table's launch has read the count: advance it unless the step was skipped.
  adamw_step_kernel<<<1, 1, 0, s>>>(step_ptr, flag);
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

void amp_cast_to_fp8(Context& ctx, const Tensor& src, Tensor& dst, Tensor& fp8_state) {
  const std::int64_t n = src.numel();
  if (n == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const int grid = static_cast<int>(std::clamp<std::int64_t>((n + 255) / 256, 1, sm_count(st.device) * 8));
  auto* out = static_cast<__nv_fp8_storage_t*>(dst.data());
  float* state = fp8_state.data_as<float>();
  cudaStream_t s = st.cuda_stream();
  const bool e4m3 = dst.dtype() == DType::F8E4M3;
  if (src.dtype() == DType::F32) {
    if (e4m3)
      cast_fp8_kernel<float, true><<<grid, 256, 0, s>>>(src.data_as<float>(), out, n, state);
    else
      cast_fp8_kernel<float, false><<<grid, 256, 0, s>>>(src.data_as<float>(), out, n, state);
  } else {
    const auto* in = static_cast<const __nv_bfloat16*>(src.data());
    if (e4m3)
      cast_fp8_kernel<__nv_bfloat16, true><<<grid, 256, 0, s>>>(in, out, n, state);
    else
      cast_fp8_kernel<__nv_bfloat16, false><<<grid, 256, 0, s>>>(in, out, n, state);
  }
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

void amp_fp8_update_scale(Context& ctx, Tensor& fp8_state, const amp::Fp8MetaOptions& o) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  fp8_update_scale_kernel<<<1, 1, 0, st.cuda_stream()>>>(fp8_state.data_as<float>(), o.history_len,
                                                         o.algo == amp::AmaxAlgo::Max, amp::fp8_max(o.format),
                                                         ldexpf(1.0f, o.margin));
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

namespace {

// One thread per dst element (grid-stride); padding elements are written as zero.
template <class Src, bool kE4M3>
__global__ void __launch_bounds__(256)
    cast_fp8_padded_kernel(const Src* __restrict__ src, std::int64_t rows, std::int64_t cols,
                           __nv_fp8_storage_t* __restrict__ dst, std::int64_t dst_rows, std::int64_t dst_cols,
                           bool transpose, float* state) {
  const float scale = state[0];
  unsigned amax = 0;
  const std::int64_t n = dst_rows * dst_cols;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::int64_t di = i / dst_cols, dj = i % dst_cols;
    const std::int64_t r = transpose ? dj : di, c = transpose ? di : dj;
    __nv_fp8_storage_t out = 0;
    if (r < rows && c < cols) {
      const float x = load_float(src, r * cols + c);
      amax = max(amax, abs_bits(x));
      out = scaled_fp8<kE4M3>(x, scale);
    }
    dst[i] = out;
  }
  block_amax_into_state(amax, state);
}

template <class Dst>
__global__ void crop_padded_kernel(const float* __restrict__ src, std::int64_t src_cols, Dst* __restrict__ dst,
                                   std::int64_t rows, std::int64_t cols, const float* __restrict__ bias) {
  const std::int64_t n = rows * cols;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::int64_t r = i / cols, c = i % cols;
    float v = src[r * src_cols + c];
    if (bias) v = __fadd_rn(v, bias[c]);
    if constexpr (std::is_same_v<Dst, float>)
      dst[i] = v;
    else
      dst[i] = __float2bfloat16_rn(v);
  }
}

// One thread per column, rows in order: the CPU reference's sum, bit for bit.
__global__ void column_sums_kernel(const float* __restrict__ src, std::int64_t rows, std::int64_t cols,
                                   float* __restrict__ dst) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float sum = 0.0f;
  for (std::int64_t r = 0; r < rows; ++r) sum = __fadd_rn(sum, src[r * cols + c]);
  dst[c] = sum;
}

int grid_for_elements(std::int64_t n, int device) {
  return static_cast<int>(std::clamp<std::int64_t>((n + 255) / 256, 1, sm_count(device) * 8));
}

}  // namespace

void amp_cast_to_fp8_padded(Context& ctx, const Tensor& src, Tensor& dst, Tensor& fp8_state, bool transpose) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const int grid = grid_for_elements(dst.numel(), st.device);
  auto* out = static_cast<__nv_fp8_storage_t*>(dst.data());
  float* state = fp8_state.data_as<float>();
  cudaStream_t s = st.cuda_stream();
  const std::int64_t rows = src.dim(0), cols = src.dim(1), dr = dst.dim(0), dc = dst.dim(1);
  const bool e4m3 = dst.dtype() == DType::F8E4M3;
  if (src.dtype() == DType::F32) {
    const float* in = src.data_as<float>();
    if (e4m3)
      cast_fp8_padded_kernel<float, true><<<grid, 256, 0, s>>>(in, rows, cols, out, dr, dc, transpose, state);
    else
      cast_fp8_padded_kernel<float, false><<<grid, 256, 0, s>>>(in, rows, cols, out, dr, dc, transpose, state);
  } else {
    const auto* in = static_cast<const __nv_bfloat16*>(src.data());
    if (e4m3)
      cast_fp8_padded_kernel<__nv_bfloat16, true><<<grid, 256, 0, s>>>(in, rows, cols, out, dr, dc, transpose, state);
    else
      cast_fp8_padded_kernel<__nv_bfloat16, false><<<grid, 256, 0, s>>>(in, rows, cols, out, dr, dc, transpose, state);
  }
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

void amp_crop_padded(Context& ctx, const Tensor& src, Tensor& dst, const Tensor* bias) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const int grid = grid_for_elements(dst.numel(), st.device);
  const float* b = bias ? bias->data_as<float>() : nullptr;
  cudaStream_t s = st.cuda_stream();
  if (dst.dtype() == DType::F32)
    crop_padded_kernel<float><<<grid, 256, 0, s>>>(src.data_as<float>(), src.dim(1), dst.data_as<float>(), dst.dim(0),
                                                   dst.dim(1), b);
  else
    crop_padded_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(src.data_as<float>(), src.dim(1),
                                                           static_cast<__nv_bfloat16*>(dst.data()), dst.dim(0),
                                                           dst.dim(1), b);
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

void amp_column_sums(Context& ctx, const Tensor& src, Tensor& dst) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const std::int64_t cols = src.dim(1);
  const int grid = static_cast<int>((cols + 255) / 256);
  column_sums_kernel<<<grid, 256, 0, st.cuda_stream()>>>(src.data_as<float>(), src.dim(0), cols,
                                                         dst.data_as<float>());
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

}  // namespace dstrain::kernels::cuda
