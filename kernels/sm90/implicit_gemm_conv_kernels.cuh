// Implicit-GEMM convolution forward on Hopper tensor cores (wgmma), NHWC fp16/bf16, stride 1.
//
// GEMM view: y[m, k] = sum over (r, s, c) of x[n, p + r - pad_h, q + s - pad_w, c] * w[k, r, s, c],
// m = (n, p, q). A persistent CTA walks BM x BN tiles of y. One producer thread feeds a ring of
// shared-memory stages with the tensor memory accelerator (TMA): per step, BM input pixels x 64
// channels of one filter tap through an im2col tensor map (zeros outside the image), and BN filter
// rows x the same 64 channels through a tiled map, both in wgmma's 128-byte swizzled layout. The
// producer's warpgroup gives its registers to the two consumer warpgroups (setmaxnreg), which
// multiply with m64nBNk16 into fp32 accumulators, in one of two schedules:
// - cooperative: both groups work on the same tile, BM / 2 rows each;
// - ping-pong: each group takes every other tile of the CTA and the two take turns at the tensor
//   cores, so that one group's epilogue runs while the other multiplies.
// The producer runs ahead across tiles, so the next tile's loads overlap this tile's epilogue.
// Prologue (optional, a chained input's BatchNorm): the A operand goes through registers
// (ldmatrix, then relu(x * scale + shift) in the input type, zero on padding rows) into wgmma; a
// step's loads overlap the multiplies of the one or two steps before (Config::kPrologueSets).
// Epilogue: optionally relu(y + bias) (the inference conv + bias + ReLU); round to the output type
// into shared memory and bulk-store it with TMA (rows past M are not written); optionally add each
// column's sum and sum of squares (of the rounded values: the BatchNorm statistics of what is
// stored) into fp32 arrays, and optionally finish them into the batch statistics in the last CTA
// (StatsFinish), which saves a finalize kernel after the convolution.
//
// Requirements (checked by the host side, implicit_gemm_conv.cu): C % 64 == 0, K % BN == 0,
// 16-byte aligned x, w and y, stride 1, dilation 1, padding < filter size. Compiled for sm_90a
// only: elsewhere the kernel bodies are empty and never launched.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include "bn_stats.cuh"
#include "overlapped_launch.cuh"
#include "sm90_ptx.cuh"

namespace dstrain::kernels::cuda::igemm {

// The BatchNorm of a chained input, [C] fp32 each: x is the raw output of the layer before, whose
// BatchNorm and ReLU are applied to each input value as it enters the product: relu(x * scale[c] +
// shift[c]), scale and shift from bn::prologue_scale_shift rounded to x's type (one rounding, fused
// multiply-add in x's type), padding staying zero (a chained layer's prologue). gamma null: none.
struct InputBatchNorm {
  const float* gamma;
  const float* beta;
  const float* mean;
  const float* invstd;
};

// BatchNorm's batch statistics finished in the kernel (count null: not; the caller reads the sums).
// The CTA that adds its sums last derives save_mean, save_invstd and the running statistics ([K]
// fp32 each) from them over M rows, as the finalize kernels of conv_bn_relu.cu do (bn_stats.cuh),
// and zeroes the sums and the count: both must be zero before the launch, and are after it.
struct StatsFinish {
  unsigned* count;
  float eps, momentum;
  float* save_mean;
  float* save_invstd;
  float* running_mean;
  float* running_var;
};

// The dgrad of a layer whose input is chained (Epilogue::BnBackward): y is dL/da for the producer's
// activation a = relu(v), v = fma(x - mean, gamma * invstd, beta) of its raw output x ([M, K], y's
// type and shape). Instead of the statistics, the epilogue adds each column's sum g and sum
// g (x - mean), g = y as stored where v > 0, into sum and sqsum; with finish.count, the CTA that
// counts itself in last writes the producer's dbeta = sum g and dgamma = invstd * sum g (x - mean)
// ([K] fp32), as the finalize kernel of conv_bn_relu.cu does, and zeroes the sums and the count.
struct OutputBatchNormBackward {
  const void* x;  // null: not
  const float* gamma;
  const float* beta;
  const float* mean;
  const float* invstd;
  float* dgamma;
  float* dbeta;
};

struct ConvForwardArgs {
  const void* x;  // [N, H, W, C]
  const void* w;  // [K, R, S, C]
  void* y;        // [N, P, Q, K]
  float* sum;     // [K] or null: column sums of y are added here
  float* sqsum;   // [K] or null (given with sum): column sums of squares
  StatsFinish finish;  // with sum only
  OutputBatchNormBackward bwd;  // with sum only; finish.count then finishes dgamma and dbeta
  InputBatchNorm in;
  const float* bias;  // [K] or null: y = relu(conv + bias) (the inference epilogue)
  int N, H, W, C, K, R, S, P, Q, pad_h, pad_w;
  int M;  // N * P * Q
  // Launch overlapped with the previous kernel's tail (overlapped_launch.cuh); host side only.
  bool overlap_launch;
};

// Built on the host (make_tensor_maps), passed as a __grid_constant__ kernel parameter.
struct ConvTensorMaps {
  CUtensorMap x;  // im2col over [N, H, W, C]: 64 channels x BM pixels per copy
  CUtensorMap w;  // tiled over [K, R*S*C]: 64 x BN per copy
  CUtensorMap y;  // tiled over [M, K]: 64 x 64 per store
};

constexpr int kBK = 64;  // channels per step: one 128-byte swizzled row
// Two consumer warpgroups (threads 0-255) and one producer warpgroup (256-383), of which one thread
// issues the copies: a whole warpgroup so that it can hand its registers to the consumers.
constexpr int kThreads = 384;
constexpr int kRowBytes = kBK * 2;
constexpr int kMaxStatsChannels = 1024;
// The prologue keeps its per-channel scale and shift in shared memory, arranged per thread.
constexpr int kMaxPrologueChannels = 1024;
// Registers a consumer thread keeps, per m64 block of its tile, for everything but the accumulators
// and the BatchNorm backward's preloaded rows of x (Epilogue::BnBackward): what decides how many
// rows it preloads (fewer spill nothing, measured by ptxas -v).
constexpr int kRegsBesidePreload = 64;

// A kernel configuration: BN columns per tile, kMAtoms m64 blocks per consumer warpgroup and tile,
// kStages pipeline stages, kMinBlocks CTAs per multiprocessor, the ping-pong schedule or the
// cooperative one (a tile of 64 kMAtoms rows per group, or of 128 kMAtoms rows shared by both).
template <int BN_, int kMAtoms_, int kStages_, int kMinBlocks_, bool kPingPong_>
struct Config {
  static constexpr int BN = BN_, kMAtoms = kMAtoms_, kStages = kStages_, kMinBlocks = kMinBlocks_;
  static constexpr bool kPingPong = kPingPong_;
  static constexpr int kGroupRows = 64 * kMAtoms;  // output rows one consumer group multiplies per tile
  static constexpr int BM = kPingPong ? kGroupRows : 2 * kGroupRows;
  static constexpr int kABytes = BM * kRowBytes;
  static constexpr int kBBytes = BN * kRowBytes;
  static constexpr int kStageBytes = kABytes + kBBytes;
  // Each consumer warpgroup stages its kMAtoms x (BN / 64) output blocks of 64 x 64, swizzled as
  // the store's tensor map expects (16-byte chunk c of row r at chunk c ^ (r % 8)).
  static constexpr int kOutBlockBytes = 64 * 128;
  static constexpr int kOutBytesPerGroup = kMAtoms * (BN / 64) * kOutBlockBytes;
  static constexpr int kOutOffset = kStages * kStageBytes;
  static constexpr int kBarrierOffset = kOutOffset + 2 * kOutBytesPerGroup;
  static constexpr int kStatsOffset = kBarrierOffset + 2 * kStages * 8;
  static constexpr int kTableOffset = kStatsOffset + 2 * kMaxStatsChannels * 4;
  static constexpr int kBytes = kTableOffset + 4 * kMaxPrologueChannels + 1024;  // + alignment slack
  static_assert(BN % 64 == 0 && BN <= 256, "BN: 64, 128 or 256");
  static_assert(kBytes <= 227 * 1024, "more shared memory than a CTA can have");
  // Registers per thread after the hand-over. The CTA's pool is its launch allocation, the
  // __launch_bounds__ maximum (64K registers over kMinBlocks CTAs, in multiples of 8: 168 for one,
  // 80 for two); the 128 producer threads keep 40, the 256 consumer threads share the rest (232, 96).
  static constexpr int kLaunchRegs = 65536 / (kThreads * kMinBlocks) / 8 * 8;
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = (kLaunchRegs * kThreads - 128 * kProducerRegs) / 256 / 8 * 8;
  // The prologue's fragment sets do not fit beside 128 accumulators of two m64 blocks, nor in the
  // registers of two CTAs per multiprocessor: such configurations are not built with it.
  static constexpr bool kPrologueFits = kMinBlocks == 1 && !(kMAtoms == 2 && BN == 128);
  // Fragment sets of the prologue: three (a step's loads overlap the last two steps' multiplies)
  // where four or more stages leave the producer room while two steps are held, else two (one step
  // of multiplies in flight): three sets on three stages, or with two m64 blocks, measured slower.
  static constexpr int kPrologueSets = kStages >= 4 && kMAtoms == 1 ? 3 : 2;
};

// What the epilogue does with the accumulators besides storing them (a compile-time choice: the
// unused paths would cost registers).
enum class Epilogue : int { Store, Stats, BiasRelu, BnBackward };

template <typename T>
struct MmaType;
template <>
struct MmaType<__half> {
  using type = sm90::MmaF16;
  using pair = __half2;
  static constexpr CUtensorMapDataType kMapType = CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  static __device__ __forceinline__ pair make(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ float2 back(pair v) { return __half22float2(v); }
  // +infinity's bits, and a code's exact value (bn::relu_threshold).
  static constexpr std::uint16_t kInfBits = 0x7c00u;
  static __device__ __forceinline__ float of_bits(std::uint16_t b) { return __half2float(__ushort_as_half(b)); }
};
template <>
struct MmaType<__nv_bfloat16> {
  using type = sm90::MmaBF16;
  using pair = __nv_bfloat162;
  static constexpr CUtensorMapDataType kMapType = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  static __device__ __forceinline__ pair make(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ float2 back(pair v) { return __bfloat1622float2(v); }
  static constexpr std::uint16_t kInfBits = 0x7f80u;
  static __device__ __forceinline__ float of_bits(std::uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
};

// Synchronises the 128 threads of consumer warpgroup cw (named barriers 2 and 3; 1 is both groups).
__device__ __forceinline__ void group_barrier(int cw) {
  if (cw == 0)
    asm volatile("bar.sync 2, 128;\n" ::: "memory");
  else
    asm volatile("bar.sync 3, 128;\n" ::: "memory");
}

// Byte offset of element (row, col) in a warpgroup's staged output (row < 64 kMAtoms, col < BN).
template <typename Cfg>
__device__ __forceinline__ std::uint32_t out_offset(int row, int col) {
  const int atom = row / 64, r = row % 64, block = col / 64, byte = (col % 64) * 2;
  return static_cast<std::uint32_t>(((atom * (Cfg::BN / 64) + block) * 64 + r) * 128 +
                                    (((byte / 16) ^ (r % 8)) * 16) + byte % 16);
}

// relu(v * scale + shift) on two packed 16-bit values (one rounding: a fused multiply-add in T).
template <typename T>
__device__ __forceinline__ std::uint32_t bn_relu_pair(std::uint32_t v, std::uint32_t scale, std::uint32_t shift) {
  using Pair = typename MmaType<T>::pair;
  Pair x, sc, sh;
  memcpy(&x, &v, 4);
  memcpy(&sc, &scale, 4);
  memcpy(&sh, &shift, 4);
  const Pair y = __hmax2(__hfma2(x, sc, sh), MmaType<T>::make(0.0f, 0.0f));
  std::uint32_t out;
  memcpy(&out, &y, 4);
  return out;
}

// A chained input's scale and shift (bn::prologue_scale_shift, rounded to T) for channels c8 to
// c8 + 7: four pairs of each, as bn_relu_vector takes them.
template <typename T>
__device__ __forceinline__ void load_prologue_pairs(const InputBatchNorm& in, int c8, std::uint32_t (&scale)[4],
                                                    std::uint32_t (&shift)[4]) {
  using Pair = typename MmaType<T>::pair;
#pragma unroll
  for (int h = 0; h < 4; ++h) {
    bn::ScaleShift k[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = c8 + 2 * h + e;
      k[e] = bn::prologue_scale_shift(__ldg(in.gamma + c), __ldg(in.beta + c), __ldg(in.mean + c), __ldg(in.invstd + c));
    }
    const Pair sc = MmaType<T>::make(k[0].scale, k[1].scale);
    const Pair sh = MmaType<T>::make(k[0].shift, k[1].shift);
    memcpy(&scale[h], &sc, 4);
    memcpy(&shift[h], &sh, 4);
  }
}

// relu(x * scale + shift) on 8 channels in 16 bytes (bn_relu_pair on each pair).
template <typename T>
__device__ __forceinline__ uint4 bn_relu_vector(uint4 x, const std::uint32_t (&scale)[4],
                                                const std::uint32_t (&shift)[4]) {
  x.x = bn_relu_pair<T>(x.x, scale[0], shift[0]);
  x.y = bn_relu_pair<T>(x.y, scale[1], shift[1]);
  x.z = bn_relu_pair<T>(x.z, scale[2], shift[2]);
  x.w = bn_relu_pair<T>(x.w, scale[3], shift[3]);
  return x;
}

// StatsFinish, run by the 256 consumer threads of every CTA once its sums are added: the last CTA
// to count itself in (the fence orders every thread's additions before its CTA's count) reads the
// complete sums from L2 and writes the statistics.
// With Epilogue::BnBackward the sums become the producer's dbeta and dgamma instead.
template <bool kBnBackward>
__device__ __forceinline__ void finish_statistics(const ConvForwardArgs& a, int tid) {
  __threadfence();
  sm90::named_barrier_sync(1, 256);
  const bool counted_last = tid == 0 && atomicAdd(a.finish.count, 1u) == gridDim.x - 1;
  if (!sm90::named_barrier_sync_or(1, 256, counted_last)) return;
  __threadfence();
  for (int c = tid; c < a.K; c += 256) {
    if constexpr (kBnBackward) {
      a.bwd.dbeta[c] = __ldcg(a.sum + c);
      a.bwd.dgamma[c] = static_cast<float>(static_cast<double>(__ldcg(a.sqsum + c)) * a.bwd.invstd[c]);
    } else {
      const bn::BatchStats b = bn::batch_stats(__ldcg(a.sum + c), __ldcg(a.sqsum + c), 0.0, a.M);
      bn::write_batch_stats(b, c, a.M, a.finish.eps, a.finish.momentum, a.finish.save_mean, a.finish.save_invstd,
                            a.finish.running_mean, a.finish.running_var);
    }
    a.sum[c] = 0.0f;
    a.sqsum[c] = 0.0f;
  }
  if (tid == 0) *a.finish.count = 0u;
}

template <typename T, typename Cfg, Epilogue kEpi, bool kPrologue>
__global__ void __launch_bounds__(kThreads, Cfg::kMinBlocks)
    conv_forward_kernel(ConvForwardArgs a, const __grid_constant__ ConvTensorMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  wait_then_release_next_kernel();  // launched overlapped with the previous kernel's tail
  constexpr int BN = Cfg::BN, BM = Cfg::BM, kStages = Cfg::kStages, kMAtoms = Cfg::kMAtoms;
  constexpr int kGroupRows = Cfg::kGroupRows;
  // Per-column sums in the epilogue: of y and y^2 (Stats), or of g and g (x - mean) (BnBackward).
  constexpr bool kBnBackward = kEpi == Epilogue::BnBackward;
  constexpr bool kStats = kEpi == Epilogue::Stats || kBnBackward;
  using Traits = MmaType<T>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = sm90::align_1024(smem_raw);
  const std::uint32_t smem_base = sm90::smem_addr(smem);
  const std::uint32_t full_bar = smem_base + Cfg::kBarrierOffset;  // kStages barriers, 8 bytes each
  const std::uint32_t empty_bar = full_bar + 8 * kStages;
  float* s_sum = reinterpret_cast<float*>(smem + Cfg::kStatsOffset);  // [K]: this CTA's column sums
  float* s_sq = s_sum + kMaxStatsChannels;

  const int tid = threadIdx.x;
  const int c_steps = a.C / kBK;
  const int k_iters = a.R * a.S * c_steps;
  const int n_tiles = a.K / BN;
  const int tiles = (a.M + BM - 1) / BM * n_tiles;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(full_bar + 8 * s, 1);  // the producer's arrival with the stage's byte count
      // One arrival per group that multiplies the stage (see `signals`).
      sm90::mbar_init(empty_bar + 8 * s, Cfg::kPingPong ? 1 : 2);
    }
    sm90::mbar_init_fence();
  }
  if constexpr (kStats)
    for (int i = tid; i < a.K; i += kThreads) s_sum[i] = s_sq[i] = 0.0f;
  // The prologue's table: for channel step cs, lane % 4 = l and k16 slice kk, the four 32-bit words
  // that thread needs (scale pairs 32 cs + 8 kk + l and + 4, then the same shift pairs; a pair is
  // two channels' values in x's type), so that one 16-byte shared load per slice fetches them.
  std::uint32_t* table = reinterpret_cast<std::uint32_t*>(smem + Cfg::kTableOffset);
  if constexpr (kPrologue)
    for (int i = tid; i < c_steps * 64; i += kThreads) {
      const int j = i % 4, kk = i / 4 % 4, l = i / 16 % 4, cs = i / 64;
      const int c = 2 * (cs * 32 + 8 * kk + (j & 1) * 4 + l);
      const bn::ScaleShift k0 = bn::prologue_scale_shift(a.in.gamma[c], a.in.beta[c], a.in.mean[c], a.in.invstd[c]);
      const bn::ScaleShift k1 =
          bn::prologue_scale_shift(a.in.gamma[c + 1], a.in.beta[c + 1], a.in.mean[c + 1], a.in.invstd[c + 1]);
      const typename Traits::pair pair = j < 2 ? Traits::make(k0.scale, k1.scale) : Traits::make(k0.shift, k1.shift);
      memcpy(&table[i], &pair, 4);
    }
  __syncthreads();

  if (tid >= 256) {
    sm90::release_registers<Cfg::kProducerRegs>();
    // Producer: one thread. Tile row m0 starts at output pixel (n, p, q), whose filter window's
    // top-left input pixel is (p - pad_h, q - pad_w); the im2col copy walks BM such windows.
    if (tid == 256) {
      const int pq = a.P * a.Q;
      int g = 0;  // pipeline step, continuous across tiles
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int m0 = tile / n_tiles * BM, n0 = tile % n_tiles * BN;
        const int n = m0 / pq, rem = m0 - n * pq;
        const int p = rem / a.Q, q = rem - p * a.Q;
        for (int it = 0; it < k_iters; ++it, ++g) {
          const int stage = g % kStages;
          sm90::mbar_wait(empty_bar + 8 * stage, ((g / kStages) & 1) ^ 1);
          const int tap = it / c_steps, cs = it - tap * c_steps;
          const int r = tap / a.S, s = tap - r * a.S;
          const std::uint32_t dst = smem_base + stage * Cfg::kStageBytes;
          sm90::mbar_arrive_expect_tx(full_bar + 8 * stage, Cfg::kStageBytes);
          sm90::tma_load_im2col_4d(dst, &maps.x, cs * kBK, q - a.pad_w, p - a.pad_h, n, static_cast<std::uint16_t>(s),
                                   static_cast<std::uint16_t>(r), full_bar + 8 * stage);
          sm90::tma_load_2d(dst + Cfg::kABytes, &maps.w, tap * a.C + cs * kBK, n0, full_bar + 8 * stage);
        }
      }
    }
    return;
  }
  sm90::claim_registers<Cfg::kConsumerRegs>();

  // Consumers. Cooperative: warpgroup cw multiplies rows [kGroupRows cw, kGroupRows (cw + 1)) of
  // every tile of the CTA. Ping-pong: it multiplies all rows of every other tile (the CTA's tiles
  // cw, cw + 2, ...), and starts a tile's multiplies only once the other group has issued its
  // previous tile's (named barriers 4 and 5): the two then wait on the stage ring in the order
  // the producer fills it, never a whole ring ahead (where a phase parity would be ambiguous).
  const int cw = tid / 128;
  const int t = tid % 128, warp = t / 32, lane = t % 32;
  // One thread of the group releases a stage, once its wait for the multiplies returns: a
  // warpgroup's multiply completes for all four warps together, and every thread arriving would
  // queue 128 arrivals on one shared-memory word per stage.
  const bool signals = t == 0;
  const int row_off = Cfg::kPingPong ? 0 : cw * kGroupRows;  // this group's first row in a tile
  const int first_tile = blockIdx.x + (Cfg::kPingPong ? cw * static_cast<int>(gridDim.x) : 0);
  const int tile_step = (Cfg::kPingPong ? 2 : 1) * static_cast<int>(gridDim.x);
  const std::uint32_t out_base = Cfg::kOutOffset + cw * Cfg::kOutBytesPerGroup;  // from smem
  // Statistics: thread t sums column pair t % (BN / 2) over its share of the staged rows, in
  // registers while the tile's columns stay the same (one column block), else flushed per tile.
  constexpr int kPairs = BN / 2, kRowGroups = 128 / kPairs, kRowsPerGroup = kGroupRows / kRowGroups;
  const int stat_pair = t % kPairs, stat_rows = t / kPairs * kRowsPerGroup;
  float st_s0 = 0.0f, st_s1 = 0.0f, st_q0 = 0.0f, st_q1 = 0.0f;
  float acc[kMAtoms][BN / 2];
  // BnBackward: the first kPreRows of this thread's rows of x (the epilogue's), loaded into
  // registers when a tile begins so that their latency hides behind the tile's multiplies; as many
  // as the registers beside the accumulators allow. The epilogue loads the rest.
  constexpr int kPreRowsFit = (Cfg::kConsumerRegs - kRegsBesidePreload * kMAtoms - kMAtoms * BN / 2) / 8 * 8;
  constexpr int kPreRows = !kBnBackward || kPreRowsFit < 0     ? 0
                           : kPreRowsFit < kRowsPerGroup ? kPreRowsFit
                                                         : kRowsPerGroup;
  [[maybe_unused]] std::uint32_t x_pre[kPreRows > 0 ? kPreRows : 1];
  // BnBackward: this thread's column pair c, c + 1 of x from row `row` on, one 32-bit word a row.
  [[maybe_unused]] auto x_pairs = [&](int row, int c) {
    return reinterpret_cast<const std::uint32_t*>(static_cast<const T*>(a.bwd.x) + static_cast<std::size_t>(row) * a.K +
                                                  c);
  };
  [[maybe_unused]] auto x_pair = [&](const std::uint32_t* pairs, int i) {
    return __ldg(pairs + static_cast<std::size_t>(i) * (a.K / 2));
  };
  // Prologue (a chained input's BatchNorm + ReLU): the A operand goes through registers. Each
  // thread loads its fragments of the staged input rows with ldmatrix, applies relu(x * scale +
  // shift) to them (zero where the row is padding: the copy's zeros must stay zero) and hands them
  // to wgmma. Thread rows: per m64 block, 16 warp + lane / 4 and + 8 (pos: (p << 16) | q of their
  // output pixels, a value outside any image past M). kSets fragment sets rotate: a step's loads
  // wait only for the multiplies kSets - 1 steps before, and overlap the ones after.
  constexpr int kSets = kPrologue ? Cfg::kPrologueSets : 1;
  constexpr int kInFlight = kPrologue ? kSets - 1 : 1;  // steps of multiplies left running behind the issue
  int pos[kMAtoms][2];
  std::uint32_t frag[kSets][kBK / 16][kMAtoms][4];
  // ldmatrix addresses: lane l gives row 8 ((l / 8) % 2) + l % 8 of the warp's 16, 16-byte chunk
  // 2 kk + l / 16 of the 128-byte row, swizzled with row % 8 = l % 8.
  const std::uint32_t ldm_row = static_cast<std::uint32_t>((warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * kRowBytes);
  const uint4* my_table = reinterpret_cast<const uint4*>(table) + (lane & 3) * 4;
  // The filter tap and channel step of the next step to load, advanced without divisions.
  int ld_r = 0, ld_s = 0, ld_cs = 0;
  auto load_fragments = [&](auto set, int step) {
    constexpr int S = decltype(set)::value;
    const int stage = step % kStages;
    const int dh = ld_r - a.pad_h, dw = ld_s - a.pad_w;
    std::uint32_t keep[kMAtoms][2];
#pragma unroll
    for (int am = 0; am < kMAtoms; ++am)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ih = (pos[am][h] >> 16) + dh, iw = (pos[am][h] & 0xffff) + dw;
        keep[am][h] = static_cast<unsigned>(ih) < static_cast<unsigned>(a.H) &&
                              static_cast<unsigned>(iw) < static_cast<unsigned>(a.W)
                          ? 0xffffffffu
                          : 0u;
      }
    const uint4* consts = my_table + ld_cs * 16;
    if (++ld_cs == c_steps) {
      ld_cs = 0;
      if (++ld_s == a.S) {
        ld_s = 0;
        ++ld_r;
      }
    }
    const std::uint32_t a_tile = smem_base + stage * Cfg::kStageBytes + row_off * kRowBytes + ldm_row;
    sm90::mbar_wait(full_bar + 8 * stage, (step / kStages) & 1);
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      // Channel pairs of this thread: 16 kk + 2 (lane % 4) (registers 0, 1) and + 8 (2, 3).
      const uint4 c = consts[kk];  // scale lo, scale hi, shift lo, shift hi
      const std::uint32_t chunk = static_cast<std::uint32_t>(((2 * kk + (lane >> 4)) ^ (lane & 7)) << 4);
#pragma unroll
      for (int am = 0; am < kMAtoms; ++am) {
        std::uint32_t(&f)[4] = frag[S][kk][am];
        sm90::ldmatrix_x4(f, a_tile + am * 64 * kRowBytes + chunk);
        f[0] = bn_relu_pair<T>(f[0], c.x, c.z) & keep[am][0];
        f[1] = bn_relu_pair<T>(f[1], c.x, c.z) & keep[am][1];
        f[2] = bn_relu_pair<T>(f[2], c.y, c.w) & keep[am][0];
        f[3] = bn_relu_pair<T>(f[3], c.y, c.w) & keep[am][1];
      }
    }
  };
  int g = Cfg::kPingPong ? cw * k_iters : 0;  // pipeline step of this group's next multiply
  for (int tile = first_tile; tile < tiles; tile += tile_step) {
    const int m0 = tile / n_tiles * BM, n0 = tile % n_tiles * BN;
    if constexpr (Cfg::kPingPong)
      if (tile != blockIdx.x) sm90::named_barrier_sync(4 + cw, 256);  // the other group's turn ends
    if constexpr (kPreRows > 0) {
      const int first_row = m0 + row_off + stat_rows;
      const int rows = min(kRowsPerGroup, a.M - first_row);
      const std::uint32_t* xs = x_pairs(first_row, n0 + 2 * stat_pair);
#pragma unroll
      for (int i = 0; i < kPreRows; ++i)
        if (i < rows) x_pre[i] = x_pair(xs, i);
    }
    if constexpr (kPrologue) {
      const int pq = a.P * a.Q;
#pragma unroll
      for (int am = 0; am < kMAtoms; ++am)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = m0 + row_off + am * 64 + warp * 16 + lane / 4 + 8 * h;
          const int n = m / pq, rem = m - n * pq, p = rem / a.Q;
          pos[am][h] = m < a.M ? (p << 16) | (rem - p * a.Q) : 0x7fff << 16;
        }
      ld_r = ld_s = ld_cs = 0;
      load_fragments(std::integral_constant<int, 0>{}, g);
    }
    // One pipeline step: its multiplies are issued; the step kInFlight before is waited for (its
    // stage may be refilled, and its fragment set is the next step's); then (prologue) the next
    // step's fragments are loaded while the multiplies run.
    auto step = [&](auto set, int it) {
      [[maybe_unused]] constexpr int S = decltype(set)::value;
      const int stage = g % kStages;
      if constexpr (!kPrologue) sm90::mbar_wait(full_bar + 8 * stage, (g / kStages) & 1);
      [[maybe_unused]] const std::uint32_t a_tile = smem_base + stage * Cfg::kStageBytes + row_off * kRowBytes;
      const std::uint32_t b_tile = smem_base + stage * Cfg::kStageBytes + Cfg::kABytes;
#pragma unroll
      for (int am = 0; am < kMAtoms; ++am) sm90::fence_accumulators(acc[am]);
      sm90::wgmma_fence();
#pragma unroll
      for (int k = 0; k < kBK / 16; ++k)
#pragma unroll
        for (int am = 0; am < kMAtoms; ++am) {
          if constexpr (kPrologue)
            sm90::WgmmaRS<BN, typename Traits::type>::mma(acc[am], frag[S][k][am], sm90::desc_k_sw128(b_tile + 32 * k),
                                                          it > 0 || k > 0);
          else
            sm90::Wgmma<BN, typename Traits::type>::mma(acc[am], sm90::desc_k_sw128(a_tile + am * 64 * kRowBytes + 32 * k),
                                                        sm90::desc_k_sw128(b_tile + 32 * k), it > 0 || k > 0);
        }
      sm90::wgmma_commit();
#pragma unroll
      for (int am = 0; am < kMAtoms; ++am) sm90::fence_accumulators(acc[am]);
      if (it > 0 || kPrologue) {
        sm90::wgmma_wait<kInFlight>();
#pragma unroll
        for (int am = 0; am < kMAtoms; ++am) sm90::fence_accumulators(acc[am]);
        if (signals && it >= kInFlight) sm90::mbar_arrive(empty_bar + 8 * ((g - kInFlight) % kStages));
      }
      if constexpr (kPrologue)
        if (it + 1 < k_iters) load_fragments(std::integral_constant<int, (S + 1) % kSets>{}, g + 1);
    };
    int set = 0;
    for (int it = 0; it < k_iters; ++it, ++g) {
      if (set == 0) step(std::integral_constant<int, 0>{}, it);
      else if (set == 1) step(std::integral_constant<int, 1 % kSets>{}, it);
      else step(std::integral_constant<int, 2 % kSets>{}, it);
      set = set + 1 == kSets ? 0 : set + 1;
    }
    if constexpr (Cfg::kPingPong) {
      // Every stage of this tile has arrived: the other group may start on its next tile.
      if (tile + static_cast<int>(gridDim.x) < tiles) sm90::named_barrier_arrive(5 - cw, 256);
    }
    sm90::wgmma_wait<0>();
#pragma unroll
    for (int am = 0; am < kMAtoms; ++am) sm90::fence_accumulators(acc[am]);
    if (signals)
      for (int j = g - (k_iters < kInFlight ? k_iters : kInFlight); j < g; ++j)  // the steps not yet released
        sm90::mbar_arrive(empty_bar + 8 * (j % kStages));
    if constexpr (Cfg::kPingPong) g += k_iters;  // past the other group's tile

    // Epilogue. The previous tile's bulk stores must have read the staging area first.
    if (t == 0) sm90::bulk_wait_read();
    group_barrier(cw);
    // Fragment layout of m64nN: warp w holds rows 16 w + lane / 4 and 16 w + lane / 4 + 8 of an
    // m64 block; acc[4 j + e] is column 8 j + 2 (lane % 4) + (e & 1) of the first row (e < 2) or
    // of the second (e >= 2). The thread's indices are made opaque here: otherwise the compiler
    // hoists the BN / 4 staging addresses out of the tile loop and keeps them in registers beside
    // the accumulators, which then spill.
    int ep_warp = warp, ep_lane = lane;
    asm volatile("" : "+r"(ep_warp), "+r"(ep_lane));
#pragma unroll
    for (int am = 0; am < kMAtoms; ++am) {
      const int row_a = am * 64 + ep_warp * 16 + ep_lane / 4;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const int col = 8 * j + 2 * (ep_lane % 4);
        float v0 = acc[am][4 * j], v1 = acc[am][4 * j + 1], v2 = acc[am][4 * j + 2], v3 = acc[am][4 * j + 3];
        if constexpr (kEpi == Epilogue::BiasRelu) {
          const float2 b = __ldg(reinterpret_cast<const float2*>(a.bias + n0 + col));
          v0 = fmaxf(v0 + b.x, 0.0f);
          v1 = fmaxf(v1 + b.y, 0.0f);
          v2 = fmaxf(v2 + b.x, 0.0f);
          v3 = fmaxf(v3 + b.y, 0.0f);
        }
        *reinterpret_cast<typename Traits::pair*>(smem + out_base + out_offset<Cfg>(row_a, col)) = Traits::make(v0, v1);
        *reinterpret_cast<typename Traits::pair*>(smem + out_base + out_offset<Cfg>(row_a + 8, col)) =
            Traits::make(v2, v3);
      }
    }
    sm90::fence_proxy_async();  // the bulk store reads what the st.shared above wrote
    group_barrier(cw);
    const int grow = m0 + row_off;  // first output row of this warpgroup
    if (t == 0) {
#pragma unroll
      for (int am = 0; am < kMAtoms; ++am)
#pragma unroll
        for (int b = 0; b < BN / 64; ++b)
          sm90::tma_store_2d(&maps.y, n0 + 64 * b, grow + 64 * am,
                             smem_base + out_base + (am * (BN / 64) + b) * Cfg::kOutBlockBytes);
      sm90::bulk_commit();
    }
    if constexpr (kStats) {
      const int col = 2 * stat_pair;
      const int rows = min(kRowsPerGroup, a.M - grow - stat_rows);
      if constexpr (kBnBackward) {
        // g = y where v > 0 (the rounded values the store writes).
        const int c = n0 + col;
        const float mean0 = __ldg(a.bwd.mean + c), mean1 = __ldg(a.bwd.mean + c + 1);
        const float scale0 = __ldg(a.bwd.gamma + c) * __ldg(a.bwd.invstd + c);
        const float scale1 = __ldg(a.bwd.gamma + c + 1) * __ldg(a.bwd.invstd + c + 1);
        const float beta0 = __ldg(a.bwd.beta + c), beta1 = __ldg(a.bwd.beta + c + 1);
        auto add_row = [&](int i, std::uint32_t x_bits) {
          typename Traits::pair xp;
          memcpy(&xp, &x_bits, 4);
          const float2 xv = Traits::back(xp);
          const float2 gv = Traits::back(
              *reinterpret_cast<const typename Traits::pair*>(smem + out_base + out_offset<Cfg>(stat_rows + i, col)));
          const float g0 = bn::preactivation(xv.x, mean0, scale0, beta0) > 0.0f ? gv.x : 0.0f;
          const float g1 = bn::preactivation(xv.y, mean1, scale1, beta1) > 0.0f ? gv.y : 0.0f;
          st_s0 += g0;
          st_s1 += g1;
          st_q0 = fmaf(g0, xv.x - mean0, st_q0);
          st_q1 = fmaf(g1, xv.y - mean1, st_q1);
        };
#pragma unroll
        for (int i = 0; i < kPreRows; ++i)
          if (i < rows) add_row(i, x_pre[i]);
        // The rest in batches whose loads are all issued before the first use.
        // Fewer at a time where the accumulators leave fewer registers.
        const std::uint32_t* xs = x_pairs(grow + stat_rows, c);
        constexpr int kLoadBatch = BN * kMAtoms >= 256 ? 4 : 8;
        for (int i0 = kPreRows; i0 < rows; i0 += kLoadBatch) {
          std::uint32_t xr[kLoadBatch];
#pragma unroll
          for (int u = 0; u < kLoadBatch; ++u)
            if (i0 + u < rows) xr[u] = x_pair(xs, i0 + u);
#pragma unroll
          for (int u = 0; u < kLoadBatch; ++u)
            if (i0 + u < rows) add_row(i0 + u, xr[u]);
        }
      } else {
        for (int i = 0; i < rows; ++i) {
          const float2 v = Traits::back(
              *reinterpret_cast<const typename Traits::pair*>(smem + out_base + out_offset<Cfg>(stat_rows + i, col)));
          st_s0 += v.x;
          st_s1 += v.y;
          st_q0 += v.x * v.x;
          st_q1 += v.y * v.y;
        }
      }
      const bool last = tile + tile_step >= tiles;
      if (n_tiles > 1 || last) {
        atomicAdd(&s_sum[n0 + col], st_s0);
        atomicAdd(&s_sum[n0 + col + 1], st_s1);
        atomicAdd(&s_sq[n0 + col], st_q0);
        atomicAdd(&s_sq[n0 + col + 1], st_q1);
        st_s0 = st_s1 = st_q0 = st_q1 = 0.0f;
      }
    }
  }
  if (t == 0) sm90::bulk_wait();  // the staging area must outlive the stores
  if constexpr (kStats) {
    sm90::named_barrier_sync(1, 256);
    for (int i = tid; i < a.K; i += 256) {
      atomicAdd(&a.sum[i], s_sum[i]);
      atomicAdd(&a.sqsum[i], s_sq[i]);
    }
    if (a.finish.count != nullptr) finish_statistics<kBnBackward>(a, tid);
  }
#endif
}

// The kernel variants: the cooperative ones by their BM x BN tile, the ping-pong ones (P) by the
// tile of one consumer group.
enum class ForwardVariant : int {
  M128N64 = 0,
  M256N64,
  M128N128,
  M256N128,
  M128N256,
  P128N64,
  P64N128,
  P128N128,
  P64N256,
  // Not a tile configuration: the 3x3 kernel that streams the image two output rows at a time
  // (implicit_gemm_conv_rows_kernels.cuh), for 64 input channels and images up to 62 wide.
  Rows,
};
constexpr int kForwardVariants = 9;  // the tile configurations, M128N64 to P64N256
using CfgM128N64 = Config<64, 1, 3, 2, false>;
using CfgM256N64 = Config<64, 2, 4, 1, false>;
using CfgM128N128 = Config<128, 1, 4, 1, false>;
using CfgM256N128 = Config<128, 2, 3, 1, false>;
using CfgM128N256 = Config<256, 1, 3, 1, false>;
using CfgP128N64 = Config<64, 2, 6, 1, true>;
using CfgP64N128 = Config<128, 1, 6, 1, true>;
using CfgP128N128 = Config<128, 2, 4, 1, true>;
using CfgP64N256 = Config<256, 1, 3, 1, true>;

// Calls f with a value of the i-th of the configuration types (the last for any larger i).
template <typename First, typename... Rest, typename F>
auto with_config_at(int i, F&& f) {
  if constexpr (sizeof...(Rest) == 0) {
    return f(First{});
  } else {
    if (i <= 0) return f(First{});
    return with_config_at<Rest...>(i - 1, std::forward<F>(f));
  }
}

// Calls f with a value of variant v's configuration type: the one place that maps the two (in
// the order of ForwardVariant).
template <typename F>
auto with_config(ForwardVariant v, F&& f) {
  return with_config_at<CfgM128N64, CfgM256N64, CfgM128N128, CfgM256N128, CfgM128N256, CfgP128N64, CfgP64N128,
                        CfgP128N128, CfgP64N256>(static_cast<int>(v), std::forward<F>(f));
}

// Rows and columns of one tile of variant v, its schedule, and whether it is built with the
// prologue: tile variants only (the row kernel is not one; conv_forward and make_tensor_maps refuse
// it before asking).
inline int variant_bm(ForwardVariant v) {
  return with_config(v, [](auto c) { return decltype(c)::BM; });
}
inline int variant_bn(ForwardVariant v) {
  return with_config(v, [](auto c) { return decltype(c)::BN; });
}
inline bool variant_ping_pong(ForwardVariant v) {
  return with_config(v, [](auto c) { return decltype(c)::kPingPong; });
}
inline bool variant_has_prologue(ForwardVariant v) {
  return with_config(v, [](auto c) { return decltype(c)::kPrologueFits; });
}
// "128x64" for a cooperative tile, "ping-pong 128x64" for a ping-pong one (one group's tile).
inline std::string variant_name(ForwardVariant v) {
  if (v == ForwardVariant::Rows) return "64x128, two rows a step";
  return std::string(variant_ping_pong(v) ? "ping-pong " : "") + std::to_string(variant_bm(v)) + "x" +
         std::to_string(variant_bn(v));
}

// Raises kKernel's dynamic shared-memory limit to kBytes, once per device (one instance, and so
// one set of flags, per kernel).
template <auto kKernel, int kBytes>
cudaError_t allow_shared_memory() {
  static std::atomic<bool> opted_in[64];
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (!opted_in[device & 63].load(std::memory_order_acquire)) {
    if (const cudaError_t e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
        e != cudaSuccess)
      return e;
    opted_in[device & 63].store(true, std::memory_order_release);
  }
  return cudaSuccess;
}

// Launches kKernel with kBytes of dynamic shared memory (allow_shared_memory first).
template <auto kKernel, int kBytes, typename... Args>
cudaError_t launch_with_shared_memory(unsigned grid, unsigned threads, cudaStream_t stream, const Args&... args) {
  if (const cudaError_t e = allow_shared_memory<kKernel, kBytes>(); e != cudaSuccess) return e;
  kKernel<<<grid, threads, kBytes, stream>>>(args...);
  return cudaGetLastError();
}

// launch_with_shared_memory of kPrologue where a chained input's prologue is wanted, else of kPlain.
template <auto kPlain, auto kPrologue, int kBytes, typename... Args>
cudaError_t launch_plain_or_prologue(bool prologue, unsigned grid, unsigned threads, cudaStream_t stream,
                                     const Args&... args) {
  return prologue ? launch_with_shared_memory<kPrologue, kBytes>(grid, threads, stream, args...)
                  : launch_with_shared_memory<kPlain, kBytes>(grid, threads, stream, args...);
}

// Launches a built kernel on as many persistent CTAs as the device holds, at most one per tile.
template <typename T, typename Cfg, Epilogue kEpi, bool kPrologue>
cudaError_t launch_built(const ConvForwardArgs& a, const ConvTensorMaps& maps, cudaStream_t stream) {
  auto kernel = conv_forward_kernel<T, Cfg, kEpi, kPrologue>;
  // The shared-memory opt-in and the occupancy are per device: found once per device.
  static std::atomic<int> resident[64];  // CTAs resident on the whole device; 0 = not yet known
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  std::atomic<int>& slots = resident[device & 63];
  int ctas = slots.load(std::memory_order_acquire);
  if (ctas == 0) {
    if (const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kBytes);
        e != cudaSuccess)
      return e;
    int per_sm = 0, sms = 0;
    if (const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, Cfg::kBytes);
        e != cudaSuccess)
      return e;
    if (const cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device); e != cudaSuccess)
      return e;
    if (per_sm < 1) return cudaErrorInvalidConfiguration;
    ctas = per_sm * sms;
    slots.store(ctas, std::memory_order_release);
  }
  const int tiles = (a.M + Cfg::BM - 1) / Cfg::BM * (a.K / Cfg::BN);
  return launch_overlapped(a.overlap_launch, stream, kernel,
                           dim3(static_cast<unsigned>(tiles < ctas ? tiles : ctas)), dim3(kThreads), Cfg::kBytes, a,
                           maps);
}

template <typename T, typename Cfg, Epilogue kEpi, bool kPrologue>
cudaError_t launch_forward(const ConvForwardArgs& a, const ConvTensorMaps& maps, cudaStream_t stream) {
  if constexpr (kPrologue && !Cfg::kPrologueFits) {
    return cudaErrorInvalidValue;
  } else {
    return launch_built<T, Cfg, kEpi, kPrologue>(a, maps, stream);
  }
}

template <typename T, Epilogue kEpi, bool kPrologue>
cudaError_t conv_forward_variant(ForwardVariant v, const ConvForwardArgs& a, const ConvTensorMaps& maps,
                                 cudaStream_t stream) {
  return with_config(v, [&](auto c) { return launch_forward<T, decltype(c), kEpi, kPrologue>(a, maps, stream); });
}

// True for the combinations of extras the kernel is built with: none; statistics; statistics with
// the prologue (a chained layer's training forward, C <= kMaxPrologueChannels); bias + ReLU alone
// (inference); the BatchNorm backward's sums (a chained layer's dgrad).
// The sums may be finished in the kernel; the structs' pointers are all given.
inline bool extras_supported(const ConvForwardArgs& a) {
  const bool stats = a.sum != nullptr, prologue = a.in.gamma != nullptr, bias = a.bias != nullptr;
  const bool bwd = a.bwd.x != nullptr;
  const bool prologue_whole = a.in.beta != nullptr && a.in.mean != nullptr && a.in.invstd != nullptr;
  const bool finish = a.finish.count != nullptr;
  const bool finish_whole = bwd ? a.bwd.dgamma != nullptr && a.bwd.dbeta != nullptr
                                : a.finish.save_mean != nullptr && a.finish.save_invstd != nullptr &&
                                      a.finish.running_mean != nullptr && a.finish.running_var != nullptr;
  const bool bwd_whole = a.bwd.gamma != nullptr && a.bwd.beta != nullptr && a.bwd.mean != nullptr &&
                         a.bwd.invstd != nullptr;
  return (stats == (a.sqsum != nullptr)) && (!prologue || prologue_whole) && (!finish || (stats && finish_whole)) &&
         !(bias && (stats || prologue)) && !(prologue && !stats) && !(prologue && a.C > kMaxPrologueChannels) &&
         (!bwd || (bwd_whole && stats && !prologue));
}

// Launches variant v on T = __half or __nv_bfloat16 with maps from make_tensor_maps<T>(a, v). The
// caller checks the requirements above, K % variant_bn(v) == 0 and, with statistics,
// K <= kMaxStatsChannels; sum/sqsum must be zeroed by the caller when given (and finish.count
// with them); bias 8-byte aligned when given. cudaErrorInvalidValue for a combination of extras
// that extras_supported refuses, or a prologue on a variant without one.
template <typename T>
cudaError_t conv_forward(ForwardVariant v, const ConvForwardArgs& a, const ConvTensorMaps& maps, cudaStream_t stream) {
  if (!extras_supported(a) || v == ForwardVariant::Rows) return cudaErrorInvalidValue;  // rows: conv_rows_forward
  if (a.in.gamma != nullptr) {
    if (!variant_has_prologue(v)) return cudaErrorInvalidValue;
    return conv_forward_variant<T, Epilogue::Stats, true>(v, a, maps, stream);
  }
  if (a.bwd.x != nullptr) return conv_forward_variant<T, Epilogue::BnBackward, false>(v, a, maps, stream);
  if (a.sum != nullptr) return conv_forward_variant<T, Epilogue::Stats, false>(v, a, maps, stream);
  if (a.bias != nullptr) return conv_forward_variant<T, Epilogue::BiasRelu, false>(v, a, maps, stream);
  return conv_forward_variant<T, Epilogue::Store, false>(v, a, maps, stream);
}

// The driver's tensor-map encoders, found at run time (the library does not link libcuda); null
// members when the driver offers none.
struct MapEncoders {
  PFN_cuTensorMapEncodeIm2col_v12000 im2col = nullptr;
  PFN_cuTensorMapEncodeTiled_v12000 tiled = nullptr;
};
inline const MapEncoders& map_encoders() {
  static const MapEncoders found = [] {
    MapEncoders m;
    cudaDriverEntryPointQueryResult q1{}, q2{};
    void* f1 = nullptr;
    void* f2 = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeIm2col", &f1, 12000, cudaEnableDefault, &q1) != cudaSuccess ||
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f2, 12000, cudaEnableDefault, &q2) != cudaSuccess ||
        q1 != cudaDriverEntryPointSuccess || q2 != cudaDriverEntryPointSuccess)
      return m;
    m.im2col = reinterpret_cast<PFN_cuTensorMapEncodeIm2col_v12000>(f1);
    m.tiled = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f2);
    return m;
  }();
  return found;
}

// im2col over x [N, H, W, C]: 64 channels x `pixels` filter windows per copy, 128-byte swizzle,
// zeros outside the image. The box of window corners (the top-left input pixel of each output
// pixel), W first.
template <typename T>
cudaError_t make_im2col_map(CUtensorMap& map, const void* x, int N, int H, int W, int C, int R, int S, int pad_h,
                            int pad_w, int pixels) {
  const MapEncoders& enc = map_encoders();
  if (enc.im2col == nullptr) return cudaErrorNotSupported;
  const cuuint64_t e = sizeof(T);
  const cuuint32_t ones[4] = {1, 1, 1, 1};
  const cuuint64_t xdim[4] = {static_cast<cuuint64_t>(C), static_cast<cuuint64_t>(W), static_cast<cuuint64_t>(H),
                              static_cast<cuuint64_t>(N)};
  const cuuint64_t xstride[3] = {C * e, static_cast<cuuint64_t>(W) * C * e, static_cast<cuuint64_t>(H) * W * C * e};
  const int lower[2] = {-pad_w, -pad_h};
  const int upper[2] = {pad_w - (S - 1), pad_h - (R - 1)};
  if (enc.im2col(&map, MmaType<T>::kMapType, 4, const_cast<void*>(x), xdim, xstride, lower, upper, kBK,
                 static_cast<cuuint32_t>(pixels), ones, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                 CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return cudaErrorNotSupported;
  return cudaSuccess;
}

// A tiled map of `rank` dimensions (innermost first; byte strides of the outer ones), 128-byte
// swizzle, zeros read outside the tensor.
template <typename T>
cudaError_t make_swizzled_tiled_map(CUtensorMap& map, const void* data, cuuint32_t rank, const cuuint64_t* dim,
                                    const cuuint64_t* stride, const cuuint32_t* box,
                                    CUtensorMapL2promotion promotion) {
  const MapEncoders& enc = map_encoders();
  if (enc.tiled == nullptr) return cudaErrorNotSupported;
  const cuuint32_t ones[5] = {1, 1, 1, 1, 1};
  if (enc.tiled(&map, MmaType<T>::kMapType, rank, const_cast<void*>(data), dim, stride, box, ones,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, promotion,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return cudaErrorNotSupported;
  return cudaSuccess;
}

// A row-major [rows, cols] matrix in boxes of box_cols (64: 128 swizzled bytes) x box_rows; rows
// past the end read zeros and are not written.
template <typename T>
cudaError_t make_tiled_map(CUtensorMap& map, const void* data, std::uint64_t rows, std::uint64_t cols, int box_rows,
                           int box_cols, CUtensorMapL2promotion promotion) {
  const cuuint64_t dim[2] = {cols, rows};
  const cuuint64_t stride[1] = {cols * sizeof(T)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  return make_swizzled_tiled_map<T>(map, data, 2, dim, stride, box, promotion);
}

// An NHWC tensor [N, H, W, C] in boxes of 64 channels (128 swizzled bytes) x `pixels` pixels x
// `rows` rows; pixels and rows outside the tensor read zeros.
template <typename T>
cudaError_t make_tiled_4d_map(CUtensorMap& map, const void* data, int N, int H, int W, int C, int pixels,
                              int rows = 1) {
  const cuuint64_t e = sizeof(T);
  const cuuint64_t dim[4] = {static_cast<cuuint64_t>(C), static_cast<cuuint64_t>(W), static_cast<cuuint64_t>(H),
                             static_cast<cuuint64_t>(N)};
  const cuuint64_t stride[3] = {C * e, static_cast<cuuint64_t>(W) * C * e, static_cast<cuuint64_t>(H) * W * C * e};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(pixels), static_cast<cuuint32_t>(rows), 1};
  return make_swizzled_tiled_map<T>(map, data, 4, dim, stride, box, CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
}

// The tensor maps of variant v. cudaErrorNotSupported when the driver offers no encoder or refuses
// the shape.
template <typename T>
cudaError_t make_tensor_maps(const ConvForwardArgs& a, ForwardVariant v, ConvTensorMaps& maps) {
  if (v == ForwardVariant::Rows) return cudaErrorInvalidValue;  // make_conv_rows_tensor_maps
  if (const cudaError_t e =
          make_im2col_map<T>(maps.x, a.x, a.N, a.H, a.W, a.C, a.R, a.S, a.pad_h, a.pad_w, variant_bm(v));
      e != cudaSuccess)
    return e;
  const std::uint64_t rsc = static_cast<std::uint64_t>(a.R) * a.S * a.C;
  if (const cudaError_t e = make_tiled_map<T>(maps.w, a.w, static_cast<std::uint64_t>(a.K), rsc, variant_bn(v), kBK,
                                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
      e != cudaSuccess)
    return e;
  return make_tiled_map<T>(maps.y, a.y, static_cast<std::uint64_t>(a.M), static_cast<std::uint64_t>(a.K), 64, 64,
                           CU_TENSOR_MAP_L2_PROMOTION_NONE);
}

}  // namespace dstrain::kernels::cuda::igemm
