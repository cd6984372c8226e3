// Implicit-GEMM convolution backward filter (wgrad) on Hopper tensor cores (wgmma), NHWC
// fp16/bf16, stride 1.
//
// GEMM view: dw[k, j] = sum over output pixels m of a[m, j] * dy[m, k], where j = (r, s, c) is a
// filter position in KRSC order and a[m, (r, s, c)] = x[n, p + r - pad_h, q + s - pad_w, c], zero
// outside the image; optionally a chained input's relu(x * scale + shift), still zero there. The
// kernel computes D[j, k] = sum_m a[m, j] dy[m, k], D = dw^T. The j rows come in "atoms" of 64:
// one filter tap by 64 channels, which one im2col copy (TMA) stages per step of 64 or 128 pixels,
// in the layout of the forward kernel (a row per pixel, 128 swizzled bytes of channels). wgmma
// reads that tile transposed as its A operand, from shared memory (M-major) or, with the prologue,
// through registers (ldmatrix.trans, then the BatchNorm and ReLU), and dy's pixels x columns as
// its B operand, N-major, from shared memory.
//
// The reduction over N * P * Q pixels is long and D is small: the tiles of D (kTileAtoms atoms x
// kTileCols columns) times their pixel steps are shared out among the CTAs (WgradWalk), at most
// one per multiprocessor. Each CTA adds its partial tiles into an fp32 workspace [R S C, K] with
// atomics; a second kernel writes dw = D^T in dw's type. One
// producer thread issues the copies; with the prologue, a second producer warp marks per step
// which of its pixels each atom reads inside the image (the im2col copy reads zeros elsewhere, and
// relu(0 * scale + shift) need not be zero). Two consumer warpgroups multiply, each its own atoms
// (or, kSplitN, the same atoms and its own columns).
//
// Requirements (checked by the host side, implicit_gemm_conv.cu): C % 64 == 0, K % kTileCols == 0,
// 16-byte aligned x and dy, stride 1, padding < filter size. Compiled for sm_90a only.
#pragma once
#include "implicit_gemm_conv_kernels.cuh"

namespace dstrain::kernels::cuda::igemm {

struct WgradArgs {
  const void* x;   // [N, H, W, C]
  const void* dy;  // [N, P, Q, K]
  float* work;     // [R S C, K] fp32, zeroed before the launch: receives D
  InputBatchNorm in;  // gamma null: no prologue
  int N, H, W, C, K, R, S, P, Q, pad_h, pad_w;
  int M;       // N * P * Q
  int steps;   // ceil(M / kStepPixels): pixel steps of the reduction
  int chunks;  // ranges of steps (1 <= chunks <= steps), see WgradWalk
  int ctas;    // the grid, at most tiles x steps
};

struct WgradTensorMaps {
  CUtensorMap x;   // im2col over [N, H, W, C]: 64 channels x a step's pixels per copy
  CUtensorMap dy;  // tiled over [M, K]: 64 columns x a step's pixels per copy
};

// BN columns and kMAtoms atoms per consumer group; kSplitN: the groups take the same atoms and
// their own BN columns (a tile of kMAtoms atoms x 2 BN), else their own atoms and the same columns
// (2 kMAtoms atoms x BN). A step reduces over kStepPixels pixels (64 or 128: one copy per atom).
template <int BN_, int kMAtoms_, bool kSplitN_, int kStages_, int kStepPixels_>
struct WgradConfig {
  static constexpr int BN = BN_, kMAtoms = kMAtoms_, kStages = kStages_, kStepPixels = kStepPixels_;
  static constexpr bool kSplitN = kSplitN_;
  static constexpr int kSlices = kStepPixels / 16;       // k16 slices of a step
  static constexpr int kMaskWords = kStepPixels / 32;    // 32-bit words of an atom's pixel mask
  static constexpr int kAtomBytes = kStepPixels * kRowBytes;  // pixels x 64 channels (or 64 columns of dy)
  static constexpr int kTileAtoms = kSplitN ? kMAtoms : 2 * kMAtoms;
  static constexpr int kTileCols = kSplitN ? 2 * BN : BN;
  static constexpr int kABytes = kTileAtoms * kAtomBytes;
  static constexpr int kBBytes = kTileCols / 64 * kAtomBytes;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kMaskOffset = kStages * kStageBytes;  // per stage, a pixel mask per atom
  static constexpr int kBarrierOffset = kMaskOffset + kStages * kTileAtoms * kMaskWords * 4;
  static constexpr int kBytes = kBarrierOffset + 2 * kStages * 8 + 1024;  // + alignment slack
  static_assert(BN % 64 == 0 && BN <= 256, "BN: 64, 128 or 256");
  static_assert(kStepPixels == 64 || kStepPixels == 128, "steps of 64 or 128 pixels");
  static_assert(kBytes <= 227 * 1024, "more shared memory than a CTA can have");
  // One CTA per multiprocessor: 168 registers a thread at launch; the producers keep 56.
  static constexpr int kProducerRegs = 56;
  static constexpr int kConsumerRegs = (168 * kThreads - 128 * kProducerRegs) / 256 / 8 * 8;
};

// The two packed copies of a channel's prologue constant in T (one rounding, as the forward's).
template <typename T>
__device__ __forceinline__ std::uint32_t packed_twice(float v) {
  const typename MmaType<T>::pair p = MmaType<T>::make(v, v);
  std::uint32_t out;
  memcpy(&out, &p, 4);
  return out;
}

// A CTA's share of the work. The pixel steps are cut into `chunks` ranges; the work is one
// sequence of (chunk, tile, step), chunk-major, cut into equal contiguous shares, one per CTA.
// With tiles x chunks CTAs each takes one tile over one chunk, and the CTAs of a chunk read the
// same pixels at the same time (their x and dy are read from memory once, then hit in L2); with
// one chunk every CTA has the same number of steps whatever the tile count. A share that crosses
// from one (chunk, tile) to the next has two segments or more.
struct WgradSegment {
  int tile, first_step, steps;
};
struct WgradWalk {
  long long next, end, total;
  int tiles, steps, chunks;
  __device__ WgradWalk(const WgradArgs& a, int tiles_) : tiles(tiles_), steps(a.steps), chunks(a.chunks) {
    total = static_cast<long long>(tiles) * steps;
    next = total * blockIdx.x / gridDim.x;
    end = total * (blockIdx.x + 1) / gridDim.x;
  }
  __device__ int chunk_start(int i) const { return static_cast<int>(static_cast<long long>(i) * steps / chunks); }
  __device__ bool take(WgradSegment& seg) {
    if (next >= end) return false;
    int i = static_cast<int>(next * chunks / total);  // chunk i starts at tiles * chunk_start(i)
    while (i + 1 < chunks && static_cast<long long>(tiles) * chunk_start(i + 1) <= next) ++i;
    while (i > 0 && static_cast<long long>(tiles) * chunk_start(i) > next) --i;
    const int first = chunk_start(i), len = chunk_start(i + 1) - first;
    const long long within = next - static_cast<long long>(tiles) * first;
    seg.tile = static_cast<int>(within / len);
    const int offset = static_cast<int>(within - static_cast<long long>(seg.tile) * len);
    seg.first_step = first + offset;
    seg.steps = static_cast<int>(min(static_cast<long long>(len - offset), end - next));
    next += seg.steps;
    return true;
  }
};

template <typename T, typename Cfg, bool kPrologue>
__global__ void __launch_bounds__(kThreads, 1) conv_wgrad_kernel(WgradArgs a, const __grid_constant__ WgradTensorMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = Cfg::BN, kMAtoms = Cfg::kMAtoms, kStages = Cfg::kStages, kTileAtoms = Cfg::kTileAtoms;
  constexpr int kAtomBytes = Cfg::kAtomBytes, kStepPixels = Cfg::kStepPixels, kSlices = Cfg::kSlices;
  constexpr int kMaskWords = Cfg::kMaskWords;
  using Traits = MmaType<T>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = sm90::align_1024(smem_raw);
  const std::uint32_t smem_base = sm90::smem_addr(smem);
  const std::uint32_t full_bar = smem_base + Cfg::kBarrierOffset;  // kStages barriers, 8 bytes each
  const std::uint32_t empty_bar = full_bar + 8 * kStages;
  const std::uint32_t* masks = reinterpret_cast<const std::uint32_t*>(smem + Cfg::kMaskOffset);

  const int tid = threadIdx.x;
  const int c_blocks = a.C / 64;
  const int atoms = a.R * a.S * c_blocks;
  const int n_tiles = a.K / Cfg::kTileCols;
  const int tiles = (atoms + kTileAtoms - 1) / kTileAtoms * n_tiles;
  const int pq = a.P * a.Q;
  // A tile's first atom and column, and its atoms that exist (the last row of tiles may be short).
  auto tile_atom0 = [&](int tile) { return tile / n_tiles * kTileAtoms; };
  auto tile_col0 = [&](int tile) { return tile % n_tiles * Cfg::kTileCols; };
  auto atoms_in = [&](int tile) { return min(kTileAtoms, atoms - tile_atom0(tile)); };

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      // The copies' arrival with the stage's byte count, and with the prologue the masks' warp.
      sm90::mbar_init(full_bar + 8 * s, kPrologue ? 2 : 1);
      sm90::mbar_init(empty_bar + 8 * s, 2);  // one thread of each consumer group (`signals`)
    }
    sm90::mbar_init_fence();
  }
  __syncthreads();

  WgradWalk walk(a, tiles);
  WgradSegment seg;
  if (tid >= 256) {
    sm90::release_registers<Cfg::kProducerRegs>();
    if (tid == 256) {
      // Step s covers pixels m = kStepPixels s on; the im2col copy of atom (tap r s, channel block
      // cb) walks kStepPixels filter windows from that pixel's, each read at offset (r, s).
      int g = 0;  // pipeline step, continuous across segments
      while (walk.take(seg)) {
        const int atom0 = tile_atom0(seg.tile), col0 = tile_col0(seg.tile), tile_atoms = atoms_in(seg.tile);
        for (int i = 0; i < seg.steps; ++i, ++g) {
          const int stage = g % kStages;
          sm90::mbar_wait(empty_bar + 8 * stage, ((g / kStages) & 1) ^ 1);
          const int m = (seg.first_step + i) * kStepPixels;
          const int n = m / pq, rem = m - n * pq;
          const int p = rem / a.Q, q = rem - p * a.Q;
          const std::uint32_t dst = smem_base + stage * Cfg::kStageBytes;
          sm90::mbar_arrive_expect_tx(full_bar + 8 * stage,
                                      static_cast<std::uint32_t>(tile_atoms * kAtomBytes + Cfg::kBBytes));
          for (int at = 0; at < tile_atoms; ++at) {
            const int jb = atom0 + at, tap = jb / c_blocks, cb = jb - tap * c_blocks;
            const int r = tap / a.S, s = tap - r * a.S;
            sm90::tma_load_im2col_4d(dst + at * kAtomBytes, &maps.x, cb * 64, q - a.pad_w, p - a.pad_h, n,
                                     static_cast<std::uint16_t>(s), static_cast<std::uint16_t>(r),
                                     full_bar + 8 * stage);
          }
          for (int b = 0; b < Cfg::kTileCols / 64; ++b)
            sm90::tma_load_2d(dst + Cfg::kABytes + b * kAtomBytes, &maps.dy, col0 + 64 * b, m, full_bar + 8 * stage);
        }
      }
    } else if (kPrologue && tid / 32 == 9) {
      // The masks: bit i % 32 of atom at's word i / 32 is set where pixel kStepPixels s + i exists
      // and its input pixel for the atom's tap lies inside the image.
      const int lane = tid % 32;
      std::uint32_t* out = reinterpret_cast<std::uint32_t*>(smem + Cfg::kMaskOffset);
      int g = 0;
      while (walk.take(seg)) {
        const int atom0 = tile_atom0(seg.tile), tile_atoms = atoms_in(seg.tile);
        for (int i = 0; i < seg.steps; ++i, ++g) {
          const int stage = g % kStages;
          sm90::mbar_wait(empty_bar + 8 * stage, ((g / kStages) & 1) ^ 1);
          int ph[kMaskWords], qw[kMaskWords];
          bool exists[kMaskWords];
#pragma unroll
          for (int h = 0; h < kMaskWords; ++h) {
            const int m = (seg.first_step + i) * kStepPixels + lane + 32 * h;
            const int rem = m % pq;
            ph[h] = rem / a.Q;
            qw[h] = rem - ph[h] * a.Q;
            exists[h] = m < a.M;
          }
          for (int at = 0; at < tile_atoms; ++at) {
            const int tap = (atom0 + at) / c_blocks, r = tap / a.S, s = tap - r * a.S;
#pragma unroll
            for (int h = 0; h < kMaskWords; ++h) {
              const int ih = ph[h] + r - a.pad_h, iw = qw[h] + s - a.pad_w;
              const std::uint32_t word =
                  __ballot_sync(0xffffffffu, exists[h] && static_cast<unsigned>(ih) < static_cast<unsigned>(a.H) &&
                                                 static_cast<unsigned>(iw) < static_cast<unsigned>(a.W));
              if (lane == 0) out[(stage * kTileAtoms + at) * kMaskWords + h] = word;
            }
          }
          __syncwarp();
          if (lane == 0) sm90::mbar_arrive(full_bar + 8 * stage);
        }
      }
    }
    return;
  }
  sm90::claim_registers<Cfg::kConsumerRegs>();

  // The group index through a shuffle: the compiler then knows it is the same across the warp, and
  // the multiplies that depend on it (a group's share of a tile) are not in a divergent branch,
  // where it would serialize every wgmma of the kernel.
  const int cw = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int t = tid % 128, warp = t / 32, lane = t % 32;
  // One thread of the group releases a stage once its wait for the multiplies returns (a
  // warpgroup's multiply completes for its four warps together): not 128 arrivals on one word.
  const bool signals = t == 0;
  const int group_atom0 = Cfg::kSplitN ? 0 : cw * kMAtoms;  // this group's first atom in a tile
  const int group_col0 = Cfg::kSplitN ? cw * BN : 0;        // and its first column
  // ldmatrix.trans addresses: lane l gives row (pixel) 8 (l / 16) + l % 8 of a k16 slice's 16,
  // 16-byte chunk (channels) 2 warp + (l / 8) % 2, swizzled with the row % 8 = l % 8; a slice is
  // 16 rows (2048 bytes) on.
  const std::uint32_t ldm_off =
      static_cast<std::uint32_t>((8 * (lane >> 4) + (lane & 7)) * kRowBytes +
                                 (((2 * warp + ((lane >> 3) & 1)) ^ (lane & 7)) << 4));
  float acc[kMAtoms][BN / 2];
  [[maybe_unused]] std::uint32_t frag[2][kMAtoms][kSlices][4];
  // Prologue constants of this thread's two channels per atom (fragment rows 16 warp + lane / 4
  // and + 8), two copies each in T.
  [[maybe_unused]] std::uint32_t scale[kMAtoms][2], shift[kMAtoms][2];
  int g = 0;  // pipeline step of the segment's first step
  while (walk.take(seg)) {
    const int atom0 = tile_atom0(seg.tile), col0 = tile_col0(seg.tile);
    const int my_atoms = max(0, min(kMAtoms, atoms_in(seg.tile) - group_atom0));  // uniform per group
    if constexpr (kPrologue) {
#pragma unroll
      for (int am = 0; am < kMAtoms; ++am)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int jb = atom0 + group_atom0 + am;
          const int c = (jb % c_blocks) * 64 + warp * 16 + lane / 4 + 8 * h;
          bn::ScaleShift k{0.0f, 0.0f};
          if (am < my_atoms)
            k = bn::prologue_scale_shift(__ldg(a.in.gamma + c), __ldg(a.in.beta + c), __ldg(a.in.mean + c),
                                         __ldg(a.in.invstd + c));
          scale[am][h] = packed_twice<T>(k.scale);
          shift[am][h] = packed_twice<T>(k.shift);
        }
    }
    // The wait for a step's operands; with the prologue also its A fragments through registers
    // (without, wgmma reads A from shared memory, M-major).
    auto load_fragments = [&](auto set, int i) {
      [[maybe_unused]] constexpr int S = decltype(set)::value;
      const int stage = (g + i) % kStages;
      sm90::mbar_wait(full_bar + 8 * stage, ((g + i) / kStages) & 1);
      if constexpr (kPrologue) {
        const std::uint32_t a_tile = smem_base + stage * Cfg::kStageBytes + group_atom0 * kAtomBytes + ldm_off;
#pragma unroll
        for (int am = 0; am < kMAtoms; ++am) {
          if (am >= my_atoms) break;
          const std::uint32_t* mask = masks + (stage * kTileAtoms + group_atom0 + am) * kMaskWords;
#pragma unroll
          for (int kk = 0; kk < kSlices; ++kk) {
            std::uint32_t(&f)[4] = frag[S][am][kk];
            sm90::ldmatrix_x4_trans(f, a_tile + am * kAtomBytes + kk * 16 * kRowBytes);
            // Registers 0, 1: pixels 16 kk + 2 (lane % 4) and + 1; registers 2, 3: the same + 8.
            const std::uint32_t word = mask[kk / 2] >> (16 * (kk % 2) + 2 * (lane & 3));
            const std::uint32_t b0 = word & 3u, b1 = (word >> 8) & 3u;
            const std::uint32_t keep0 = (b0 & 1u ? 0xffffu : 0u) | (b0 & 2u ? 0xffff0000u : 0u);
            const std::uint32_t keep1 = (b1 & 1u ? 0xffffu : 0u) | (b1 & 2u ? 0xffff0000u : 0u);
            f[0] = bn_relu_pair<T>(f[0], scale[am][0], shift[am][0]) & keep0;
            f[1] = bn_relu_pair<T>(f[1], scale[am][1], shift[am][1]) & keep0;
            f[2] = bn_relu_pair<T>(f[2], scale[am][0], shift[am][0]) & keep1;
            f[3] = bn_relu_pair<T>(f[3], scale[am][1], shift[am][1]) & keep1;
          }
        }
      }
    };
    // One step: its multiplies are issued; the step before is waited for (its stage may be
    // refilled, and its fragment set is the next step's), then the next step's fragments load
    // while these multiplies run.
    auto step = [&](auto set, int i) {
      constexpr int S = decltype(set)::value;
      const int stage = (g + i) % kStages;
      const std::uint32_t b_tile =
          smem_base + stage * Cfg::kStageBytes + Cfg::kABytes + group_col0 / 64 * kAtomBytes;
      [[maybe_unused]] const std::uint32_t a_tile = smem_base + stage * Cfg::kStageBytes + group_atom0 * kAtomBytes;
#pragma unroll
      for (int am = 0; am < kMAtoms; ++am) sm90::fence_accumulators(acc[am]);
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kSlices; ++kk)
#pragma unroll
        for (int am = 0; am < kMAtoms; ++am)
          if (am < my_atoms) {
            const std::uint64_t desc_b = sm90::desc_mn_sw128(b_tile + kk * 16 * kRowBytes, kAtomBytes);
            if constexpr (kPrologue)
              sm90::WgmmaRS<BN, typename Traits::type, 1>::mma(acc[am], frag[S][am][kk], desc_b, i > 0 || kk > 0);
            else
              sm90::Wgmma<BN, typename Traits::type, 1>::mma(
                  acc[am], sm90::desc_mn_sw128(a_tile + am * kAtomBytes + kk * 16 * kRowBytes, kAtomBytes), desc_b,
                  i > 0 || kk > 0);
          }
      sm90::wgmma_commit();
#pragma unroll
      for (int am = 0; am < kMAtoms; ++am) sm90::fence_accumulators(acc[am]);
      sm90::wgmma_wait<1>();
#pragma unroll
      for (int am = 0; am < kMAtoms; ++am) sm90::fence_accumulators(acc[am]);
      if (signals && i > 0) sm90::mbar_arrive(empty_bar + 8 * ((g + i - 1) % kStages));
      if (i + 1 < seg.steps) load_fragments(std::integral_constant<int, 1 - S>{}, i + 1);
    };
    load_fragments(std::integral_constant<int, 0>{}, 0);
    for (int i = 0; i < seg.steps; i += 2) {
      step(std::integral_constant<int, 0>{}, i);
      if (i + 1 < seg.steps) step(std::integral_constant<int, 1>{}, i + 1);
    }
    sm90::wgmma_wait<0>();
#pragma unroll
    for (int am = 0; am < kMAtoms; ++am) sm90::fence_accumulators(acc[am]);
    if (signals) sm90::mbar_arrive(empty_bar + 8 * ((g + seg.steps - 1) % kStages));
    g += seg.steps;

    // D's rows j = 64 atom + 16 warp + lane / 4 (and + 8), columns 8 jn + 2 (lane % 4) and + 1.
#pragma unroll
    for (int am = 0; am < kMAtoms; ++am) {
      if (am >= my_atoms) break;
      const std::size_t row = static_cast<std::size_t>(atom0 + group_atom0 + am) * 64 + warp * 16 + lane / 4;
      float* out = a.work + row * a.K + col0 + group_col0 + 2 * (lane & 3);
#pragma unroll
      for (int jn = 0; jn < BN / 8; ++jn) {
        atomicAdd(reinterpret_cast<float2*>(out + 8 * jn), make_float2(acc[am][4 * jn], acc[am][4 * jn + 1]));
        atomicAdd(reinterpret_cast<float2*>(out + 8 * static_cast<std::size_t>(a.K) + 8 * jn),
                  make_float2(acc[am][4 * jn + 2], acc[am][4 * jn + 3]));
      }
    }
  }
#endif
}

// dw[k, j] = D[j, k] in dw's type: 32 x 32 tiles through shared memory.
template <typename T>
__global__ void wgrad_store_kernel(const float* work, T* dw, int rows, int K) {
  __shared__ float tile[32][33];
  const int j0 = static_cast<int>(blockIdx.x) * 32, k0 = static_cast<int>(blockIdx.y) * 32;
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  for (int i = ty; i < 32; i += 8)
    if (j0 + i < rows && k0 + tx < K) tile[i][tx] = work[static_cast<std::size_t>(j0 + i) * K + k0 + tx];
  __syncthreads();
  for (int i = ty; i < 32; i += 8)
    if (k0 + i < K && j0 + tx < rows) dw[static_cast<std::size_t>(k0 + i) * rows + j0 + tx] = static_cast<T>(tile[tx][i]);
}

// The wgrad variants by their tile (atoms x columns), the split of the two groups and the pixels
// of a step (P128: 128; else 64); Rows: the 3x3 kernel of implicit_gemm_wgrad_rows_kernels.cuh,
// all nine taps of 64 x 64 channels, a row of the image a step.
enum class WgradVariant : int { A2N64 = 0, A4N64, A2N128, A4N128, A1N256, P128A2N64, P128A4N64, P128A2N128, Rows, RowBlocks };
constexpr int kWgradVariants = 10;
// The row kernel's variants (implicit_gemm_wgrad_rows_kernels.cuh): one output row a step, or
// several rows of a narrow image.
inline bool is_wgrad_rows(WgradVariant v) { return v == WgradVariant::Rows || v == WgradVariant::RowBlocks; }
using WgradA2N64 = WgradConfig<64, 1, false, 8, 64>;
using WgradA4N64 = WgradConfig<64, 2, false, 5, 64>;
using WgradA2N128 = WgradConfig<128, 1, false, 6, 64>;
using WgradA4N128 = WgradConfig<128, 2, false, 4, 64>;
using WgradA1N256 = WgradConfig<128, 1, true, 5, 64>;
using WgradP128A2N64 = WgradConfig<64, 1, false, 4, 128>;
using WgradP128A4N64 = WgradConfig<64, 2, false, 2, 128>;
using WgradP128A2N128 = WgradConfig<128, 1, false, 3, 128>;

// Calls f with a value of variant v's configuration type (in the order of WgradVariant).
template <typename F>
auto with_wgrad_config(WgradVariant v, F&& f) {
  return with_config_at<WgradA2N64, WgradA4N64, WgradA2N128, WgradA4N128, WgradA1N256, WgradP128A2N64, WgradP128A4N64,
                        WgradP128A2N128>(static_cast<int>(v), std::forward<F>(f));
}

inline int wgrad_tile_atoms(WgradVariant v) {
  if (is_wgrad_rows(v)) return 9;
  return with_wgrad_config(v, [](auto c) { return decltype(c)::kTileAtoms; });
}
inline int wgrad_tile_cols(WgradVariant v) {
  if (is_wgrad_rows(v)) return 64;
  return with_wgrad_config(v, [](auto c) { return decltype(c)::kTileCols; });
}
inline int wgrad_step_pixels(WgradVariant v) {
  return with_wgrad_config(v, [](auto c) { return decltype(c)::kStepPixels; });
}
// "128x64": a tile's rows of D (filter positions) by its columns (output channels); ", 128-pixel
// steps" where a step is not 64.
inline std::string wgrad_variant_name(WgradVariant v) {
  if (v == WgradVariant::Rows) return "576x64, a row a step";
  if (v == WgradVariant::RowBlocks) return "576x64, rows a step";
  return std::to_string(64 * wgrad_tile_atoms(v)) + "x" + std::to_string(wgrad_tile_cols(v)) +
         (wgrad_step_pixels(v) != 64 ? ", " + std::to_string(wgrad_step_pixels(v)) + "-pixel steps" : "");
}
inline int wgrad_tiles(WgradVariant v, const WgradArgs& a) {
  if (is_wgrad_rows(v)) return a.C / 64 * (a.K / 64);
  const int atoms = a.R * a.S * a.C / 64;
  return (atoms + wgrad_tile_atoms(v) - 1) / wgrad_tile_atoms(v) * (a.K / wgrad_tile_cols(v));
}

// Launches variant v on a.ctas CTAs (the caller zeroes a.work first), then the store
// of dw. T = __half or __nv_bfloat16; maps from make_wgrad_tensor_maps<T>.
template <typename T>
cudaError_t conv_wgrad(WgradVariant v, const WgradArgs& a, const WgradTensorMaps& maps, void* dw, cudaStream_t stream) {
  const cudaError_t launched = with_wgrad_config(v, [&](auto c) {
    using Cfg = decltype(c);
    return launch_plain_or_prologue<conv_wgrad_kernel<T, Cfg, false>, conv_wgrad_kernel<T, Cfg, true>, Cfg::kBytes>(
        a.in.gamma != nullptr, static_cast<unsigned>(a.ctas), kThreads, stream, a, maps);
  });
  if (launched != cudaSuccess) return launched;
  const int rows = a.R * a.S * a.C;
  wgrad_store_kernel<T><<<dim3(static_cast<unsigned>((rows + 31) / 32), static_cast<unsigned>((a.K + 31) / 32)),
                          dim3(32, 8), 0, stream>>>(a.work, static_cast<T*>(dw), rows, a.K);
  return cudaGetLastError();
}

// The tensor maps of variant v: x through im2col and dy tiled, a step's pixels per box.
// cudaErrorNotSupported when the driver offers no encoder or refuses the shape.
template <typename T>
cudaError_t make_wgrad_tensor_maps(const WgradArgs& a, WgradVariant v, WgradTensorMaps& maps) {
  const int pixels = wgrad_step_pixels(v);
  if (const cudaError_t e = make_im2col_map<T>(maps.x, a.x, a.N, a.H, a.W, a.C, a.R, a.S, a.pad_h, a.pad_w, pixels);
      e != cudaSuccess)
    return e;
  return make_tiled_map<T>(maps.dy, a.dy, static_cast<std::uint64_t>(a.M), static_cast<std::uint64_t>(a.K), pixels, 64,
                           CU_TENSOR_MAP_L2_PROMOTION_L2_128B);
}

}  // namespace dstrain::kernels::cuda::igemm
