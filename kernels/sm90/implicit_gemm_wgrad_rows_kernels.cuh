// The backward filter (wgrad) of a 3x3 convolution with stride 1 and padding 1, one or a few output
// rows at a time, on Hopper tensor cores (wgmma), NHWC fp16/bf16.
//
// dw[k, r, s, c] = sum over n, p, q of dy[n, p, q, k] * x[n, p + r - 1, q + s - 1, c]. The im2col
// kernel (implicit_gemm_wgrad_kernels.cuh) copies x once per filter tap: nine copies of the input
// pass from L2 to the multiprocessors, which is what bounds it on the 3x3 layers. Here a CTA holds
// all nine taps of a 64 x 64 tile (output channels x input channels) and streams the rows of the
// image through shared memory: a step is one output row p, and it reads input rows p - 1, p, p + 1
// and dy's row p. Each input row is copied once and serves three steps; each of its pixels serves
// three taps.
// - Consumer warpgroup s (0, 1, 2) owns the taps (r, s) for r = 0, 1, 2: one m64n192 multiply per
//   k16 slice. Its A operand is dy's row shifted by s pixels, dy^T through registers
//   (ldmatrix.trans at shifted rows); its B operand is the three input rows p - 1, p, p + 1 as
//   three 64-column blocks, N-major from shared memory, kXBytes apart (the ring of rows keeps
//   copies of its first two slots after its end, so that three successive rows never wrap). The
//   GEMM's k index runs over the input row's pixels w, and tap s pairs w with dy's pixel
//   q = w - s + 1. The copies read zeros outside the image (rows p - 1 < 0 or p + 1 >= H, pixels
//   w >= W, dy's pixels q = -1 and q >= Q), so the borders need no masks. A row is padded to
//   kRowPixels.
// - Narrow images (W < 32) take kRows output rows a step, so that a step stays 64 pixels long: the
//   rows lie one after another in shared memory, each padded to kRowPixels >= W + 1 pixels, and
//   the GEMM's k index runs over all of them. Input row j's pixel w still pairs with dy's row j,
//   pixel w - s + 1: a shift by s crosses into the next row only where the input pixel is padding
//   (zero). dy's copy is then kRowPixels pixels a row from q = -1, with two zero pixels after the
//   last row; the ring keeps copies of its first kRows + 1 slots after its end.
// - With a chained input, two producer warps apply relu(x * scale + shift) to each input row in
//   shared memory once, after its copy and before any consumer reads it; outside the image it
//   stays zero.
// - The rows of N images are shared out among the CTAs as the im2col kernel shares its pixel steps
//   (WgradWalk, a step being one output row). Each CTA adds its tile into an fp32 workspace in dw's
//   layout [K, 3, 3, C] with 16-byte atomics, and a small kernel writes dw in its type.
//
// Requirements (checked by the host side, implicit_gemm_conv.cu): R = S = 3, pad 1, stride 1,
// Q <= 64, C % 64 == 0, K % 64 == 0, 16-byte aligned x and dy. Compiled for sm_90a only.
#pragma once
#include "implicit_gemm_wgrad_kernels.cuh"

namespace dstrain::kernels::cuda::igemm {

constexpr int kRowsThreads = 512;  // a producer warpgroup and three consumer warpgroups

// kRows output rows a step, each padded to kRowPixels pixels (a multiple of 8: 1024-byte slots).
template <int kRowPixels_, int kRows_>
struct WgradRowsConfig {
  static constexpr int kRowPixels = kRowPixels_, kRows = kRows_;
  static_assert(kRowPixels % 8 == 0 && kRowPixels * kRows % 16 == 0, "rows of whole swizzle atoms, whole k16 slices");
  static constexpr int kSlices = kRowPixels * kRows / 16;
  static constexpr int kXStages = kRows == 1 ? 8 : 4 * kRows, kDyStages = 6;
  // The ring of input rows has kRows + 1 more slots after its end, where the rows of its first
  // kRows + 1 slots are copied too: the kRows + 2 successive rows of a step then lie kXBytes apart,
  // and three of their stretches kXBytes apart are one operand of three 64-column blocks.
  static constexpr int kXSlots = kXStages + kRows + 1;
  static constexpr int kXBytes = kRowPixels * kRowBytes;  // one input row's 64 channels
  // dy's rows from q = -1: the shifts by s = 0, 1, 2 read their pixels from 2 - s on. One row is
  // copied kRowPixels + 2 pixels wide; several rows kRowPixels wide each (the stride of x's rows),
  // with two pixels after the last that stay zero.
  static constexpr int kDyBoxPixels = kRows == 1 ? kRowPixels + 2 : kRowPixels;
  static constexpr int kDyCopyBytes = kRows * kDyBoxPixels * kRowBytes;
  static constexpr int kDyBytes = (kDyCopyBytes + (kRows > 1 ? 2 * kRowBytes : 0) + 1023) / 1024 * 1024;  // 1024-aligned slots
  static constexpr int kDyOffset = kXSlots * kXBytes;
  static constexpr int kBarrierOffset = kDyOffset + kDyStages * kDyBytes;
  // x: full, ready (after the prologue), empty; dy: full, empty.
  static constexpr int kBytes = kBarrierOffset + 8 * (3 * kXStages + 2 * kDyStages) + 1024;
  static_assert(kBytes <= 227 * 1024, "more shared memory than a CTA can have");
  // 128 registers a thread at launch; the producers keep 56, the consumers take the rest.
  static constexpr int kProducerRegs = 56;
  static constexpr int kConsumerRegs = (128 * kRowsThreads - 128 * kProducerRegs) / 384 / 8 * 8;
};

// The CTA's steps in order, from its WgradWalk segments: output rows p to p + rows - 1 of image n.
// A run is a stretch of steps of one image inside one segment: its first step also needs input
// rows p - 1 and p, every step rows p + 1 to p + rows.
struct WgradRowStep {
  int tile, n, p;
  bool first_in_tile, last_in_tile, run_start, run_end;
};
// The steps of an image: its P output rows in groups of `rows`.
__host__ __device__ inline int wgrad_row_steps(int P, int rows) { return (P + rows - 1) / rows; }
struct WgradRowWalk {
  WgradWalk walk;
  WgradSegment seg{};
  int next_row = 0, end_row = 0, P, rows, steps_per_image;
  __device__ WgradRowWalk(const WgradArgs& a, int tiles, int rows_)
      : walk(a, tiles), P(a.P), rows(rows_), steps_per_image(wgrad_row_steps(a.P, rows_)) {}
  __device__ bool next(WgradRowStep& s) {
    s.first_in_tile = next_row >= end_row;
    if (s.first_in_tile) {
      if (!walk.take(seg)) return false;
      next_row = seg.first_step;
      end_row = seg.first_step + seg.steps;
    }
    s.tile = seg.tile;
    s.n = next_row / steps_per_image;
    s.p = (next_row - s.n * steps_per_image) * rows;
    ++next_row;
    s.last_in_tile = next_row >= end_row;
    s.run_start = s.first_in_tile || s.p == 0;
    s.run_end = s.last_in_tile || s.p + rows >= P;
    return true;
  }
};

template <typename T, typename Cfg, bool kPrologue>
__global__ void __launch_bounds__(kRowsThreads, 1)
    conv_wgrad_rows_kernel(WgradArgs a, const __grid_constant__ WgradTensorMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kSlices = Cfg::kSlices, kXStages = Cfg::kXStages, kDyStages = Cfg::kDyStages, kRows = Cfg::kRows;
  using Traits = MmaType<T>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = sm90::align_1024(smem_raw);
  const std::uint32_t smem_base = sm90::smem_addr(smem);
  const std::uint32_t x_full = smem_base + Cfg::kBarrierOffset;
  const std::uint32_t x_ready = x_full + 8 * kXStages;
  const std::uint32_t x_empty = x_ready + 8 * kXStages;
  const std::uint32_t dy_full = x_empty + 8 * kXStages;
  const std::uint32_t dy_empty = dy_full + 8 * kDyStages;
  auto x_slot = [&](int slot) { return smem_base + slot * Cfg::kXBytes; };
  auto dy_slot = [&](int g) { return smem_base + Cfg::kDyOffset + (g % kDyStages) * Cfg::kDyBytes; };
  auto bar = [](std::uint32_t first, int g, int stages) { return first + 8 * (g % stages); };
  auto parity = [](int g, int stages) { return static_cast<std::uint32_t>((g / stages) & 1); };

  const int tid = threadIdx.x;
  const int k_blocks = a.K / 64;
  const int tiles = a.C / 64 * k_blocks;
  if (tid == 0) {
    for (int i = 0; i < kXStages; ++i) {
      sm90::mbar_init(x_full + 8 * i, 1);
      sm90::mbar_init(x_ready + 8 * i, 2);  // the two prologue warps
      sm90::mbar_init(x_empty + 8 * i, 3);  // one thread of each consumer group (`signals`)
    }
    for (int i = 0; i < kDyStages; ++i) {
      sm90::mbar_init(dy_full + 8 * i, 1);
      sm90::mbar_init(dy_empty + 8 * i, 3);
    }
    sm90::mbar_init_fence();
  }
  if constexpr (kRows > 1)  // the two pixels after dy's last row in each slot
    for (int i = tid; i < kDyStages * 2 * kRowBytes / 16; i += kRowsThreads)
      *reinterpret_cast<uint4*>(smem + Cfg::kDyOffset + (i / (2 * kRowBytes / 16)) * Cfg::kDyBytes +
                                Cfg::kDyCopyBytes + (i % (2 * kRowBytes / 16)) * 16) = make_uint4(0, 0, 0, 0);
  __syncthreads();

  WgradRowWalk rows(a, tiles, kRows);
  WgradRowStep st;
  const int group = __shfl_sync(0xffffffffu, tid / 128, 0);  // known uniform across the warp
  if (group == 0) {
    sm90::release_registers<Cfg::kProducerRegs>();
    if (tid == 0) {
      // The copies, in the order the consumers need them: at a run's start input rows p - 1 and
      // p, then per step input rows p + 1 to p + kRows and dy's rows p to p + kRows - 1.
      int gx = 0, gd = 0;
      while (rows.next(st)) {
        const int c0 = st.tile / k_blocks * 64, k0 = st.tile % k_blocks * 64;
        auto load_x = [&](int h) {
          const int slot = gx % kXStages;
          sm90::mbar_wait(bar(x_empty, gx, kXStages), parity(gx, kXStages) ^ 1);
          const bool copied = slot <= kRows;  // also after the ring's end
          sm90::mbar_arrive_expect_tx(bar(x_full, gx, kXStages), (copied ? 2 : 1) * Cfg::kXBytes);
          sm90::tma_load_4d(x_slot(slot), &maps.x, c0, 0, h, st.n, bar(x_full, gx, kXStages));
          if (copied) sm90::tma_load_4d(x_slot(kXStages + slot), &maps.x, c0, 0, h, st.n, bar(x_full, gx, kXStages));
          ++gx;
        };
        if (st.run_start) {
          load_x(st.p - 1);
          load_x(st.p);
        }
        for (int j = 1; j <= kRows; ++j) load_x(st.p + j);
        sm90::mbar_wait(bar(dy_empty, gd, kDyStages), parity(gd, kDyStages) ^ 1);
        sm90::mbar_arrive_expect_tx(bar(dy_full, gd, kDyStages), Cfg::kDyCopyBytes);
        sm90::tma_load_4d(dy_slot(gd), &maps.dy, k0, -1, st.p, st.n, bar(dy_full, gd, kDyStages));
        ++gd;
      }
    } else if (kPrologue && tid >= 64) {
      // relu(x * scale + shift) in place. Thread i takes 16-byte chunk i % 8 of rows i / 8 + 8 u:
      // the swizzle puts the same 8 channels there in every such row.
      const int i = tid - 64, chunk = i % 8, row0 = i / 8, lane = tid % 32;
      const int channel8 = 8 * (chunk ^ row0);  // the chunk's first channel within the 64
      std::uint32_t scale[4], shift[4];
      int gx = 0;
      auto prologue = [&](int h) {
        sm90::mbar_wait(bar(x_full, gx, kXStages), parity(gx, kXStages));
        const int slot = gx % kXStages;
        if (static_cast<unsigned>(h) < static_cast<unsigned>(a.H)) {
          unsigned char* row = smem + slot * Cfg::kXBytes;
          unsigned char* copy = smem + (kXStages + slot) * Cfg::kXBytes;  // slots to kRows: the copy at the end
#pragma unroll
          for (int u = 0; u < Cfg::kRowPixels / 8; ++u) {
            const int w = row0 + 8 * u;
            if (w >= a.W) break;
            const int offset = w * kRowBytes + chunk * 16;
            const uint4 x = bn_relu_vector<T>(*reinterpret_cast<const uint4*>(row + offset), scale, shift);
            *reinterpret_cast<uint4*>(row + offset) = x;
            if (slot <= kRows) *reinterpret_cast<uint4*>(copy + offset) = x;
          }
        }
        sm90::fence_proxy_async();  // the writes, before wgmma reads the row
        __syncwarp();
        if (lane == 0) sm90::mbar_arrive(bar(x_ready, gx, kXStages));
        ++gx;
      };
      while (rows.next(st)) {
        if (st.first_in_tile) load_prologue_pairs<T>(a.in, st.tile / k_blocks * 64 + channel8, scale, shift);
        if (st.run_start) {
          prologue(st.p - 1);
          prologue(st.p);
        }
        for (int j = 1; j <= kRows; ++j) prologue(st.p + j);
      }
    }
    return;
  }
  sm90::claim_registers<Cfg::kConsumerRegs>();

  const int s = group - 1;  // the filter column of this group's taps
  const int t = tid % 128, warp = t / 32, lane = t % 32;
  // ldmatrix.trans addresses into dy's row: lane l gives pixel row 8 (l / 16) + l % 8 of a k16
  // slice, shifted by 2 - s, and the 16-byte chunk of output channels 16 warp + 8 ((l / 8) % 2),
  // swizzled with the row % 8. A slice is 16 rows (2048 bytes) on, the same swizzle.
  const int ldm_row = 8 * (lane >> 4) + (lane & 7) + 2 - s;
  const std::uint32_t ldm_off = static_cast<std::uint32_t>(
      ldm_row * kRowBytes + (((2 * warp + ((lane >> 3) & 1)) ^ (ldm_row & 7)) << 4));
  // Columns 64 r + c: dw[k, r, s, c] of the tile.
  float acc[96];
  std::uint32_t frag[kSlices][4];  // the step's A operand
  int gx = 0, gd = 0;
  // One thread of the group releases slots once its wait for the multiplies returns (a
  // warpgroup's multiply completes for its four warps together): not 128 arrivals on one word.
  const bool signals = t == 0;
  auto load_fragments = [&] {
    sm90::mbar_wait(bar(dy_full, gd, kDyStages), parity(gd, kDyStages));
    const std::uint32_t base = dy_slot(gd) + ldm_off;
#pragma unroll
    for (int kk = 0; kk < kSlices; ++kk) sm90::ldmatrix_x4_trans(frag[kk], base + kk * 16 * kRowBytes);
  };
  auto wait_x = [&](int g) {
    if constexpr (kPrologue)
      sm90::mbar_wait(bar(x_ready, g, kXStages), parity(g, kXStages));
    else
      sm90::mbar_wait(bar(x_full, g, kXStages), parity(g, kXStages));
  };

  if (!rows.next(st)) return;
  load_fragments();
  // One step: its multiplies are issued and waited for, its slots released, and the next step's
  // fragments loaded. False after the last step.
  auto step = [&] {
    if (st.run_start) {
      wait_x(gx);
      wait_x(gx + 1);
      gx += 2;
    }
    for (int j = 0; j < kRows; ++j) wait_x(gx + j);
    const int x0 = gx - 2;  // input rows p - 1 to p + kRows
    gx += kRows;
    sm90::fence_accumulators(acc);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kSlices; ++kk)
      sm90::WgmmaRS<192, typename Traits::type, 1>::mma(
          acc, frag[kk], sm90::desc_mn_sw128(x_slot(x0 % kXStages) + kk * 16 * kRowBytes, Cfg::kXBytes),
          !st.first_in_tile || kk > 0);
    sm90::wgmma_commit();
    sm90::fence_accumulators(acc);
    const WgradRowStep cur = st;
    const bool more = rows.next(st);
    // Each step waits for its own multiplies (the other two groups keep the tensor cores busy):
    // with one step's multiplies left in flight here the compiler serializes every wgmma. Then
    // its dy row and the input rows that no later step reads are released.
    sm90::wgmma_wait<0>();
    sm90::fence_accumulators(acc);
    if (signals) {
      sm90::mbar_arrive(bar(dy_empty, gd, kDyStages));
      for (int i = 0; i < (cur.run_end ? kRows + 2 : kRows); ++i) sm90::mbar_arrive(bar(x_empty, x0 + i, kXStages));
    }
    if (cur.last_in_tile) {
      // acc[4 jn + e]: row k0 + 16 warp + lane / 4 (+ 8 for e >= 2), column 8 jn + 2 (lane % 4)
      // (+ 1 for odd e), i.e. r = jn / 8 and c = c0 + 8 (jn % 8) + 2 (lane % 4). Lanes 2i and 2i + 1
      // trade halves so that each adds four successive channels of one row: the even lane row
      // lane / 4, the odd one row lane / 4 + 8.
      const int c0 = cur.tile / k_blocks * 64, k0 = cur.tile % k_blocks * 64;
      const bool odd = lane & 1;
      const std::size_t rsc = 9 * static_cast<std::size_t>(a.C);
      float* out = a.work + static_cast<std::size_t>(k0 + 16 * warp + lane / 4 + (odd ? 8 : 0)) * rsc +
                   static_cast<std::size_t>(s) * a.C + c0 + 2 * (lane & 2);
#pragma unroll
      for (int jn = 0; jn < 24; ++jn) {
        // Even lanes keep e = 0, 1 and send 2, 3; odd lanes the reverse.
        const float keep0 = odd ? acc[4 * jn + 2] : acc[4 * jn], keep1 = odd ? acc[4 * jn + 3] : acc[4 * jn + 1];
        const float send0 = odd ? acc[4 * jn] : acc[4 * jn + 2], send1 = odd ? acc[4 * jn + 1] : acc[4 * jn + 3];
        const float got0 = __shfl_xor_sync(0xffffffffu, send0, 1), got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
        const float4 v = odd ? make_float4(got0, got1, keep0, keep1) : make_float4(keep0, keep1, got0, got1);
        atomicAdd(reinterpret_cast<float4*>(out + static_cast<std::size_t>(jn / 8) * 3 * a.C + 8 * (jn % 8)), v);
      }
    }
    ++gd;
    if (more) load_fragments();
    return more;
  };
  while (step()) {
  }
#endif
}

// dw = work in dw's type (the workspace already has dw's layout).
template <typename T>
__global__ void wgrad_rows_store_kernel(const float* work, T* dw, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    dw[i] = static_cast<T>(work[i]);
}

// Whether the configurations below take rows of Q pixels: one row a step up to 64, several below 32.
inline bool wgrad_rows_take(int Q, bool several_rows) { return several_rows ? Q < 32 : Q <= 64; }

// Calls f with the configuration for rows of Q pixels, one row a step (Q <= 64: the row padded to
// 16, 32 or 64 pixels) or several (Q < 32: 64 pixels a step).
template <typename F>
auto with_wgrad_rows_config(int Q, bool several_rows, F&& f) {
  if (several_rows) {
    if (Q < 8) return f(WgradRowsConfig<8, 8>{});
    if (Q < 16) return f(WgradRowsConfig<16, 4>{});
    return f(WgradRowsConfig<32, 2>{});
  }
  if (Q <= 16) return f(WgradRowsConfig<16, 1>{});
  if (Q <= 32) return f(WgradRowsConfig<32, 1>{});
  return f(WgradRowsConfig<64, 1>{});
}
// The output rows of a step.
inline int wgrad_rows_per_step(int Q, bool several_rows) {
  return with_wgrad_rows_config(Q, several_rows, [](auto c) { return decltype(c)::kRows; });
}

// Launches the row kernel on a.ctas CTAs (the caller zeroes a.work first), then the store of dw.
template <typename T>
cudaError_t conv_wgrad_rows(const WgradArgs& a, bool several_rows, const WgradTensorMaps& maps, void* dw,
                            cudaStream_t stream) {
  const cudaError_t launched = with_wgrad_rows_config(a.Q, several_rows, [&](auto c) {
    using Cfg = decltype(c);
    return launch_plain_or_prologue<conv_wgrad_rows_kernel<T, Cfg, false>, conv_wgrad_rows_kernel<T, Cfg, true>,
                                    Cfg::kBytes>(a.in.gamma != nullptr, static_cast<unsigned>(a.ctas), kRowsThreads,
                                                 stream, a, maps);
  });
  if (launched != cudaSuccess) return launched;
  const std::size_t n = static_cast<std::size_t>(a.K) * 9 * a.C;
  wgrad_rows_store_kernel<T><<<static_cast<unsigned>(std::min<std::size_t>((n + 255) / 256, 1024)), 256, 0, stream>>>(
      a.work, static_cast<T*>(dw), n);
  return cudaGetLastError();
}

// x as [N, H, W, C] in boxes of 64 channels x a row's pixels; dy as [N, P, Q, K] in boxes of 64
// channels x a step's rows of its copy's pixels (from q = -1). Zeros outside.
template <typename T>
cudaError_t make_wgrad_rows_tensor_maps(const WgradArgs& a, bool several_rows, WgradTensorMaps& maps) {
  return with_wgrad_rows_config(a.Q, several_rows, [&](auto c) {
    using Cfg = decltype(c);
    if (const cudaError_t e = make_tiled_4d_map<T>(maps.x, a.x, a.N, a.H, a.W, a.C, Cfg::kRowPixels); e != cudaSuccess)
      return e;
    return make_tiled_4d_map<T>(maps.dy, a.dy, a.N, a.P, a.Q, a.K, Cfg::kDyBoxPixels, Cfg::kRows);
  });
}

}  // namespace dstrain::kernels::cuda::igemm
