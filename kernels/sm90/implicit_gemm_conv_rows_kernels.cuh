// The forward of a 3x3 convolution (stride 1, padding 1) with 64 input channels, two output rows
// at a time, on Hopper tensor cores (wgmma), NHWC fp16/bf16; through implicit_gemm_dgrad (the
// forward on rotated filters) also the backward data of such a layer with 64 output channels.
//
// y[n, p, q, k] = sum over r, s, c of x[n, p + r - 1, q + s - 1, c] * w[k, r, s, c]. The im2col
// kernel (implicit_gemm_conv_kernels.cuh) copies each input pixel from L2 once per filter tap,
// nine times on a 3x3 layer. Here a CTA keeps the nine taps of one 64-wide block of filters in
// shared memory for its whole life and streams the image: a step is output rows p and p + 1 of
// one image, and one copy brings input rows p - 1 to p + 2, 64 pixels each from w = -1 (zeros
// outside the image). The product is transposed: D[k, pixel] += W_rs[k, c] * X[pixel, c], M = 64
// filters, N = 128 pixels (the two rows, each padded to 64), K = 64 channels a tap. Tap (r, s)
// reads staged rows r and r + 1 from pixel s on: the same staged pixels at an offset of r rows and
// s pixels (128 bytes a pixel), so that every staged pixel serves all nine taps. Output pixels
// q >= Q read whatever follows their row; they are never stored nor counted.
// - Two consumer warpgroups take the CTA's steps in turn, each its own stage, and stage their
//   output transposed (stmatrix.trans) for one bulk store of the two rows (pixels past Q and rows
//   past P are not written). A group starts waiting for a step only once the other holds the step
//   before, so that the two never wait a whole ring apart on one stage (where a phase parity
//   would be ambiguous).
// - Copies: the producer issues the filters' and the first stages' copies; every later stage is
//   refilled by the consumer group that has just multiplied it, so that the whole producer
//   warpgroup is free for the work beside the multiplies.
// - Statistics: each thread sums its two filters' stored values over all its steps in registers,
//   added to the global sums once at the end (and finished there, StatsFinish).
// - The BatchNorm backward (the dgrad of a chained layer, OutputBatchNormBackward): the producer
//   warpgroup reads each staged output with x's values there and sums g and g (x - mean), beside
//   the consumers' next multiplies (a group's staging is handed to it and back through two
//   barriers). Each thread takes one 16-byte chunk (8 channels) of every sixteenth pixel; x's
//   chunks are loaded a step ahead.
// - Prologue (a chained input's BatchNorm + ReLU): the producer warpgroup applies relu(x * scale +
//   shift) once to each staged pixel inside the image, before the consumers read the stage (two
//   warps could not keep up with the multiplies).
// Requirements (checked by implicit_gemm_conv.cu): R = S = 3, pad 1, stride 1, C = 64,
// K % 64 == 0, W <= kMaxConvRowsWidth, 16-byte aligned tensors. Compiled for sm_90a only.
#pragma once
#include "implicit_gemm_conv_kernels.cuh"

namespace dstrain::kernels::cuda::igemm {

struct ConvRowsLayout {
  static constexpr int kPixels = 64;  // a staged row: pixels w = -1 to 62
  static constexpr int kOutRows = 2;  // output rows a step
  static constexpr int kInRows = kOutRows + 2;
  static constexpr int kN = kOutRows * kPixels;
  static constexpr int kTapBytes = 64 * kRowBytes;  // one tap's 64 filters x 64 channels
  static constexpr int kStageBytes = kInRows * kPixels * kRowBytes;
  static constexpr int kStages = 3;
  static constexpr int kStageOffset = 9 * kTapBytes;
  // Tap (2, 2) on the last stage reads two pixels past its end (into output columns never stored).
  static constexpr int kOutOffset = kStageOffset + kStages * kStageBytes + 1024;
  static constexpr int kOutBytes = kN * kRowBytes;  // one consumer group's staged output
  // Barriers: the filters, per stage full and ready (after the prologue), then per consumer group
  // its staged output ready and free (the BatchNorm backward's sums).
  static constexpr int kBarrierOffset = kOutOffset + 2 * kOutBytes;
  static constexpr int kBarriers = 1 + 2 * kStages + 4;
  // The producer warpgroup's threads, which apply the prologue or sum the BatchNorm backward.
  static constexpr int kWorkers = 128;
  // The BatchNorm backward's sums per producer warp, added up at the end: 128 floats each.
  static constexpr int kPartialOffset = kBarrierOffset + 8 * kBarriers;
  static constexpr int kBytes = kPartialOffset + kWorkers / 32 * 128 * 4 + 1024;  // + alignment slack
  static_assert(kBytes <= 227 * 1024, "more shared memory than a CTA can have");
  // Registers after the hand-over (168 a thread at launch): the producer warpgroup (the copies and
  // the prologue) keeps 56, the consumers take the rest. Not with the BatchNorm backward, whose
  // summing warps need the launch's 168 (fewer spill, ptxas -v).
  static constexpr int kProducerRegs = 56;
  static constexpr int kConsumerRegs = (65536 - 128 * kProducerRegs) / 256 / 8 * 8;
};
// The widest image: a staged row holds pixels -1 to 62, and output pixel q reads up to q + 1.
constexpr int kMaxConvRowsWidth = ConvRowsLayout::kPixels - 2;

// The steps of one CTA: CTA b takes filter block b % k_blocks and the steps b / k_blocks +
// l * per_block (the grid is a multiple of k_blocks); a step is output rows p0, p0 + 1 of image n.
struct ConvRowsSteps {
  int kb, first, per_block, per_image, count;

  __device__ explicit ConvRowsSteps(const ConvForwardArgs& a) {
    const int k_blocks = a.K / 64;
    per_block = static_cast<int>(gridDim.x) / k_blocks;
    kb = static_cast<int>(blockIdx.x) % k_blocks;
    first = static_cast<int>(blockIdx.x) / k_blocks;
    per_image = (a.P + 1) / 2;
    const int total = a.N * per_image;
    count = first < total ? (total - first + per_block - 1) / per_block : 0;
  }
  __device__ void at(int l, int& n, int& p0) const {
    const int j = first + l * per_block;
    n = j / per_image;
    p0 = 2 * (j - n * per_image);
  }
};

// A CTA's steps in order, l = 0, 1, ...: image n and first output row p0 of the step at hand, and
// next() moves to the following one without a division (steps lie per_block = whole * per_image +
// rest apart).
struct ConvRowsStepWalk {
  int n, p0, whole, rest2, per_image2;

  __device__ explicit ConvRowsStepWalk(const ConvRowsSteps& steps)
      : whole(steps.per_block / steps.per_image),
        rest2(2 * (steps.per_block - whole * steps.per_image)),
        per_image2(2 * steps.per_image) {
    steps.at(0, n, p0);
  }
  __device__ void next() {
    n += whole;
    p0 += rest2;
    if (p0 >= per_image2) {
      p0 -= per_image2;
      ++n;
    }
  }
};

// A chained input's prologue, by the producer warpgroup's thread i: relu(x * scale + shift) in
// place on each staged input pixel inside the image, once stage `full` has landed; then `ready`.
// Thread i takes 16-byte chunk i % 8 of the staged pixels i / 8 + 16 u: the swizzle puts the same 8
// channels there in each of them. The loop is lean, as the consumers wait for it: which pixels lie
// inside the image is known per thread, shared memory is read and written through 32-bit
// addresses, and pixels outside are skipped by predicated stores rather than branches.
template <typename T>
__device__ __forceinline__ void apply_rows_prologue(ConvForwardArgs a, ConvRowsSteps steps,
                                                    unsigned char* smem, std::uint32_t full, std::uint32_t ready,
                                                    int i) {
  using L = ConvRowsLayout;
  constexpr int kEach = L::kInRows * L::kPixels / 16, kPerRow = L::kPixels / 16, kGroup = 4;
  const int chunk = i % 8, line0 = i / 8, lane = static_cast<int>(threadIdx.x) % 32;
  const int channel8 = 8 * (chunk ^ (line0 % 8));
  std::uint32_t scale[4], shift[4];
  load_prologue_pairs<T>(a.in, channel8, scale, shift);
  // Thread i's staged pixels are lines line0 + 16 u: input row u / kPerRow, column
  // w = line0 + 16 (u % kPerRow) - 1. Bit u: that column lies inside the image.
  unsigned in_columns = 0;
#pragma unroll
  for (int u = 0; u < kEach; ++u)
    if (static_cast<unsigned>(line0 + 16 * (u % kPerRow) - 1) < static_cast<unsigned>(a.W)) in_columns |= 1u << u;
  const std::uint32_t thread_base = sm90::smem_addr(smem) + L::kStageOffset + line0 * kRowBytes + chunk * 16;
  ConvRowsStepWalk step(steps);
  for (int l = 0; l < steps.count; ++l, step.next()) {
    const int stage = l % L::kStages;
    // The pixels inside the image: their column and their row h = p0 - 1 + u / kPerRow.
    unsigned inside = in_columns;
#pragma unroll
    for (int r = 0; r < L::kInRows; ++r)
      if (static_cast<unsigned>(step.p0 - 1 + r) >= static_cast<unsigned>(a.H))
        inside &= ~(((1u << kPerRow) - 1) << (kPerRow * r));
    const std::uint32_t staged = thread_base + stage * L::kStageBytes;
    sm90::mbar_wait(full + 8 * stage, static_cast<std::uint32_t>((l / L::kStages) & 1));
    // kGroup pixels at a time: their loads, then their predicated stores (no branches).
#pragma unroll
    for (int u0 = 0; u0 < kEach; u0 += kGroup) {
      uint4 v[kGroup];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) v[u] = sm90::ld_shared_v4(staged + (u0 + u) * 16 * kRowBytes);
#pragma unroll
      for (int u = 0; u < kGroup; ++u)
        sm90::st_shared_v4_if((inside >> (u0 + u)) & 1u, staged + (u0 + u) * 16 * kRowBytes,
                              bn_relu_vector<T>(v[u], scale, shift));
    }
    sm90::fence_proxy_async();  // the writes, before wgmma reads the stage
    __syncwarp();
    if (lane == 0) sm90::mbar_arrive(ready + 8 * stage);
  }
}

// For a pair of channels (x2: their two x, x its value in fp32; sign2 and threshold2:
// bn::relu_threshold of each, low channel in the low half): sum += g and gx += g x for each channel
// where the pixel is inside and x passes the ReLU, sign * x >= threshold, both channels in one
// half-precision compare. The additions are predicated (no select of g or 0, no branch).
// PAIR: the PTX type of two packed T, "f16x2" or "bf16x2".
#define DSTRAIN_ADD_WHERE_RELU_PASSES(PAIR)                                                                  \
  asm("{\n.reg .pred in, p, q;\n.reg .b32 s;\nsetp.ne.u32 in, %4, 0;\nmul.rn." PAIR " s, %5, %6;\n"           \
      "setp.ge.and." PAIR " p|q, s, %7, in;\n@p add.f32 %0, %0, %8;\n@p fma.rn.f32 %2, %8, %10, %2;\n"          \
      "@q add.f32 %1, %1, %9;\n@q fma.rn.f32 %3, %9, %11, %3;\n}\n"                                             \
      : "+f"(sum0), "+f"(sum1), "+f"(gx0), "+f"(gx1)                                                           \
      : "r"(static_cast<unsigned>(inside)), "r"(x2), "r"(sign2), "r"(threshold2), "f"(g.x), "f"(g.y), "f"(x.x), \
        "f"(x.y))
template <typename T>
__device__ __forceinline__ void add_where_relu_passes(bool inside, std::uint32_t x2, std::uint32_t sign2,
                                                      std::uint32_t threshold2, float2 g, float2 x, float& sum0,
                                                      float& sum1, float& gx0, float& gx1) {
  if constexpr (std::is_same_v<T, __half>)
    DSTRAIN_ADD_WHERE_RELU_PASSES("f16x2");
  else
    DSTRAIN_ADD_WHERE_RELU_PASSES("bf16x2");
}
#undef DSTRAIN_ADD_WHERE_RELU_PASSES

// BatchNorm's backward sums (the dgrad of a chained layer), by the producer warpgroup's thread i:
// for each step, once a consumer group's staged output is ready (out_ready), the sums of g and
// g (x - mean) per channel, where g = the stored value where v = bn(x) > 0; then out_free. These
// warps bound the kernel, so the step's pixels are shared out evenly and the loop is lean: thread i
// takes channels 8 (i % 8) on of the step's pixels v = i / 8 + 16 u in order (output row v / Q,
// pixel v % Q); where each lies in the staging (its chunk swizzled with the staged pixel % 8) is
// worked out once; x's address is a base and a stride, and the steps follow one another without
// a division; two steps a turn, each with its own registers for x; no branches over the pixels;
// v > 0 tested as x against a threshold per channel (bn_relu_mask.h: the same x pass), two
// channels a compare; g (x - mean) summed as g x, less mean times the sum of g at the end. At the
// end the four warps' sums meet in shared memory (`partial`), and each thread adds one of the
// block's 128 sums to a.sum or a.sqsum.
template <typename T>
__device__ __forceinline__ void sum_rows_bn_backward(ConvForwardArgs a, ConvRowsSteps steps,
                                                     const unsigned char* smem, std::uint32_t out_ready,
                                                     std::uint32_t out_free, int i) {
  using L = ConvRowsLayout;
  using Traits = MmaType<T>;
  constexpr int kPixelsApart = L::kWorkers / 8, kEach = L::kN / kPixelsApart;
  const int chunk = i % 8, v0 = i / 8, lane = static_cast<int>(threadIdx.x) % 32, kb = steps.kb;
  float mean[8], sum[8], gx[8];  // gx: the sums of g x, then of g (x - mean) = g x - mean g
  std::uint32_t sign2[4], threshold2[4];  // channels 2 h and 2 h + 1: which x pass the ReLU
#pragma unroll
  for (int h = 0; h < 4; ++h) {
    bn::ReluThreshold t[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int e = 2 * h + k, c = kb * 64 + 8 * chunk + e;
      mean[e] = __ldg(a.bwd.mean + c);
      t[k] = bn::relu_threshold(mean[e], __ldg(a.bwd.gamma + c) * __ldg(a.bwd.invstd + c), __ldg(a.bwd.beta + c),
                                Traits::kInfBits, [](std::uint16_t b) { return Traits::of_bits(b); });
      sum[e] = gx[e] = 0.0f;
    }
    sign2[h] = t[0].sign | static_cast<std::uint32_t>(t[1].sign) << 16;
    threshold2[h] = t[0].threshold | static_cast<std::uint32_t>(t[1].threshold) << 16;
  }
  // Bit u: pixel u lies in the step's first output row (in_first) or in one of its two (in_both).
  unsigned in_first = 0, in_both = 0;
  std::uint32_t staged_at[kEach];  // pixel u's chunk in a group's staging
#pragma unroll
  for (int u = 0; u < kEach; ++u) {
    const int v = v0 + kPixelsApart * u, row = v < a.Q ? 0 : 1;
    if (v < a.Q) in_first |= 1u << u;
    if (v < 2 * a.Q) in_both |= 1u << u;
    // Pixels past the step's two rows read staged pixel 0 instead (in bounds, never added).
    const int staged_pixel = v < 2 * a.Q ? row * L::kPixels + v - row * a.Q : 0;
    staged_at[u] = static_cast<std::uint32_t>(staged_pixel * kRowBytes + ((chunk ^ (staged_pixel % 8)) << 4));
  }
  const std::size_t pixel_stride = static_cast<std::size_t>(kPixelsApart) * a.K;  // elements
  const std::size_t row_stride = static_cast<std::size_t>(a.Q) * a.K;
  const T* x_thread = static_cast<const T*>(a.bwd.x) + static_cast<std::size_t>(v0) * a.K + kb * 64 + 8 * chunk;
  // x's chunks of the next step's pixels inside the image (xs keeps its values elsewhere, never
  // read); returns which those are. The steps are loaded in order.
  ConvRowsStepWalk step(steps);
  auto load_next_x = [&](uint4(&xs)[kEach]) -> unsigned {
    const unsigned inside = step.p0 + 1 < a.P ? in_both : in_first;
    const T* at = x_thread + (static_cast<std::size_t>(step.n) * a.P + step.p0) * row_stride;
#pragma unroll
    for (int u = 0; u < kEach; ++u, at += pixel_stride)
      if ((inside >> u) & 1u) xs[u] = __ldg(reinterpret_cast<const uint4*>(at));
    step.next();
    return inside;
  };
  const std::uint32_t staging = sm90::smem_addr(smem) + L::kOutOffset;
  // Pixels v0 + 16 (kEach - 1) lie past the step for every thread where 2 Q <= 16 (kEach - 1), as
  // at 56 x 56: then the steps take a loop without them (the same for the whole block).
  const bool last_used = 2 * a.Q > kPixelsApart * (kEach - 1);
  // The sums of step l (by consumer group g = l % 2) from x's chunks xs, over the first kSlots
  // (an integral_constant) of the thread's kEach pixels.
  auto sum_step = [&](auto slots, int l, int g, const uint4(&xs)[kEach], unsigned inside) {
    constexpr int kSlots = decltype(slots)::value;
    sm90::mbar_wait(out_ready + 8 * g, static_cast<std::uint32_t>((l / 2) & 1));
    const std::uint32_t staged = staging + g * L::kOutBytes;
    // Every pixel's chunk is read (the staging holds them all; those outside the image hold
    // whatever the consumers left there), and a pixel adds only where it is inside and v > 0: no
    // branches, so the loads and the sums of all pixels interleave.
    uint4 gs[kSlots];
#pragma unroll
    for (int u = 0; u < kSlots; ++u) gs[u] = sm90::ld_shared_v4(staged + staged_at[u]);
#pragma unroll
    for (int u = 0; u < kSlots; ++u) {
      const bool in = (inside >> u) & 1u;
      const std::uint32_t xw[4] = {xs[u].x, xs[u].y, xs[u].z, xs[u].w};
      const std::uint32_t gw[4] = {gs[u].x, gs[u].y, gs[u].z, gs[u].w};
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        typename Traits::pair xp, gp;
        memcpy(&xp, &xw[h], 4);
        memcpy(&gp, &gw[h], 4);
        const float2 xv = Traits::back(xp), gv = Traits::back(gp);
        const int e = 2 * h;
        add_where_relu_passes<T>(in, xw[h], sign2[h], threshold2[h], gv, xv, sum[e], sum[e + 1], gx[e], gx[e + 1]);
      }
    }
    __syncwarp();
    if (lane == 0) sm90::mbar_arrive(out_free + 8 * g);
  };
  auto sum_step_of = [&](int l, int g, const uint4(&xs)[kEach], unsigned inside) {
    if (last_used)
      sum_step(std::integral_constant<int, kEach>{}, l, g, xs, inside);
    else
      sum_step(std::integral_constant<int, kEach - 1>{}, l, g, xs, inside);
  };
  // Two steps a turn, each with its own chunks (no copies between them): the next step's chunks
  // are loaded before this step's sums, a whole step ahead of their use. Step l goes to group l % 2.
  uint4 xs_even[kEach], xs_odd[kEach];
#pragma unroll
  for (int u = 0; u < kEach; ++u) xs_even[u] = xs_odd[u] = make_uint4(0u, 0u, 0u, 0u);  // never read unset
  unsigned inside_even = steps.count > 0 ? load_next_x(xs_even) : 0u, inside_odd = 0u;
  for (int l = 0; l < steps.count; l += 2) {
    if (l + 1 < steps.count) inside_odd = load_next_x(xs_odd);
    sum_step_of(l, 0, xs_even, inside_even);
    if (l + 1 == steps.count) break;
    if (l + 2 < steps.count) inside_even = load_next_x(xs_even);
    sum_step_of(l + 1, 1, xs_odd, inside_odd);
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    gx[e] = fmaf(-mean[e], sum[e], gx[e]);  // each thread's own sums, before they meet
#pragma unroll
    for (int m = 8; m <= 16; m <<= 1) {  // the four lanes of the warp with this chunk
      sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], m);
      gx[e] += __shfl_xor_sync(0xffffffffu, gx[e], m);
    }
  }
  // partial[warp][0, 64): the sums of the block's 64 channels; [64, 128): of g (x - mean).
  float* partial = reinterpret_cast<float*>(const_cast<unsigned char*>(smem) + L::kPartialOffset);
  const int warp = i / 32;
  if (lane < 8)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      partial[warp * 128 + 8 * chunk + e] = sum[e];
      partial[warp * 128 + 64 + 8 * chunk + e] = gx[e];
    }
  sm90::named_barrier_sync(6, L::kWorkers);
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < L::kWorkers / 32; ++w) total += partial[w * 128 + i];
  atomicAdd(i < 64 ? a.sum + kb * 64 + i : a.sqsum + kb * 64 + (i - 64), total);
}

template <typename T, Epilogue kEpi, bool kPrologue>
__global__ void __launch_bounds__(kThreads, 1)
    conv_rows_kernel(ConvForwardArgs a, const __grid_constant__ ConvTensorMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  wait_then_release_next_kernel();  // launched overlapped with the previous kernel's tail
  using L = ConvRowsLayout;
  using Traits = MmaType<T>;
  constexpr int kStages = L::kStages;
  constexpr bool kStats = kEpi == Epilogue::Stats, kBnBackward = kEpi == Epilogue::BnBackward;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = sm90::align_1024(smem_raw);
  const std::uint32_t smem_base = sm90::smem_addr(smem);
  const std::uint32_t w_full = smem_base + L::kBarrierOffset;
  const std::uint32_t full = w_full + 8, ready = full + 8 * kStages;
  const std::uint32_t out_ready = ready + 8 * kStages, out_free = out_ready + 16;  // per consumer group
  auto parity = [](int l) { return static_cast<std::uint32_t>((l / kStages) & 1); };

  const int tid = threadIdx.x;
  const ConvRowsSteps steps(a);
  const int kb = steps.kb, my_steps = steps.count;
  // Step l's input rows into stage l % kStages: the first stages' by the producer, each later one
  // by the consumer group that has just multiplied the stage's previous step.
  auto load_step = [&](int l) {
    const int stage = l % kStages;
    int n, p0;
    steps.at(l, n, p0);
    sm90::mbar_arrive_expect_tx(full + 8 * stage, L::kStageBytes);
    sm90::tma_load_4d(smem_base + L::kStageOffset + stage * L::kStageBytes, &maps.x, 0, -1, p0 - 1, n,
                      full + 8 * stage);
  };
  if (tid == 0) {
    sm90::mbar_init(w_full, 1);
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(full + 8 * s, 1);
      sm90::mbar_init(ready + 8 * s, L::kWorkers / 32);  // each prologue warp
    }
    for (int g = 0; g < 2; ++g) {
      sm90::mbar_init(out_ready + 8 * g, 1);                // one thread of the group
      sm90::mbar_init(out_free + 8 * g, L::kWorkers / 32);  // each summing warp
    }
    sm90::mbar_init_fence();
  }
  __syncthreads();

  if (tid >= 256) {
    if constexpr (!kBnBackward) sm90::release_registers<L::kProducerRegs>();
    if (tid == 256) {
      sm90::mbar_arrive_expect_tx(w_full, 9 * L::kTapBytes);
      for (int tap = 0; tap < 9; ++tap)
        sm90::tma_load_2d(smem_base + tap * L::kTapBytes, &maps.w, tap * kBK, kb * 64, w_full);
      for (int l = 0; l < kStages && l < my_steps; ++l) load_step(l);
    }
    __syncwarp();
    if constexpr (kPrologue) {
      apply_rows_prologue<T>(a, steps, smem, full, ready, tid - 256);
    } else if constexpr (kBnBackward) {
      sum_rows_bn_backward<T>(a, steps, smem, out_ready, out_free, tid - 256);
      // The sums are in: the consumers may finish (finish_statistics fences after this barrier,
      // before its count, as a grid barrier does for the writes of a whole block).
      sm90::named_barrier_arrive(7, 256 + L::kWorkers);
    }
    return;
  }

  // Consumers: group cw takes the CTA's steps cw, cw + 2, ...
  if constexpr (!kBnBackward) sm90::claim_registers<L::kConsumerRegs>();
  const int cw = __shfl_sync(0xffffffffu, tid / 128, 0);  // known uniform across the warp
  const int t = tid % 128, warp = t / 32, lane = t % 32;
  const int k_lo = 16 * warp + lane / 4;  // this thread's filters k_lo and k_lo + 8 of the block
  [[maybe_unused]] float bias_lo = 0.0f, bias_hi = 0.0f;
  if constexpr (kEpi == Epilogue::BiasRelu) {
    bias_lo = __ldg(a.bias + kb * 64 + k_lo);
    bias_hi = __ldg(a.bias + kb * 64 + k_lo + 8);
  }
  [[maybe_unused]] float sum_lo = 0.0f, sum_hi = 0.0f, sq_lo = 0.0f, sq_hi = 0.0f;
  const std::uint32_t out = smem_base + L::kOutOffset + cw * L::kOutBytes;
  // stmatrix.trans addresses: lane l gives stored row l % 8 (a pixel) of matrix l / 8, which holds
  // pixels 8 (l / 16) on of the pair of column groups and filter chunk 2 warp + (l / 8) % 2;
  // chunks swizzled with the pixel % 8 = l % 8.
  const int ri = lane % 8, mi = lane / 8;
  const std::uint32_t st_addr =
      out + static_cast<std::uint32_t>((8 * (mi >> 1) + ri) * kRowBytes + (((2 * warp + (mi & 1)) ^ ri) << 4));
  float acc[L::kN / 2];
  sm90::mbar_wait(w_full, 0);
  for (int l = cw; l < my_steps; l += 2) {
    const int stage = l % kStages;
    if (l > 0) sm90::named_barrier_sync(4 + cw, 256);  // the other group holds step l - 1
    sm90::mbar_wait((kPrologue ? ready : full) + 8 * stage, parity(l));
    if (l + 1 < my_steps) sm90::named_barrier_arrive(4 + (cw ^ 1), 256);
    const std::uint32_t x0 = smem_base + L::kStageOffset + stage * L::kStageBytes;
    sm90::fence_accumulators(acc);
    sm90::wgmma_fence();
#pragma unroll
    for (int r = 0; r < 3; ++r)
#pragma unroll
      for (int s = 0; s < 3; ++s)
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk) {
          const std::uint32_t b = x0 + (r * L::kPixels + s) * kRowBytes + 32 * kk;
          sm90::Wgmma<L::kN, typename Traits::type>::mma(
              acc, sm90::desc_k_sw128(smem_base + (3 * r + s) * L::kTapBytes + 32 * kk), sm90::desc_k_sw128(b),
              r + s + kk > 0);
        }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_accumulators(acc);
    if (t == 0 && l + kStages < my_steps) load_step(l + kStages);  // the stage's reads are done

    int n, p0;
    steps.at(l, n, p0);
    const bool second_row = p0 + 1 < a.P;
    if (t == 0) {
      sm90::bulk_wait_read();  // the group's last store has read the staging area
      if (kBnBackward && l >= 2)  // and so have the summing warps
        sm90::mbar_wait(out_free + 8 * cw, static_cast<std::uint32_t>((l / 2 - 1) & 1));
    }
    group_barrier(cw);
#pragma unroll
    for (int jp = 0; jp < L::kN / 16; ++jp) {  // column groups 2 jp and 2 jp + 1 (8 pixels each)
      std::uint32_t frag[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * jp + h;
        float v0 = acc[4 * j], v1 = acc[4 * j + 1], v2 = acc[4 * j + 2], v3 = acc[4 * j + 3];
        if constexpr (kEpi == Epilogue::BiasRelu) {
          v0 = fmaxf(v0 + bias_lo, 0.0f);
          v1 = fmaxf(v1 + bias_lo, 0.0f);
          v2 = fmaxf(v2 + bias_hi, 0.0f);
          v3 = fmaxf(v3 + bias_hi, 0.0f);
        }
        const typename Traits::pair lo = Traits::make(v0, v1), hi = Traits::make(v2, v3);
        memcpy(&frag[2 * h], &lo, 4);
        memcpy(&frag[2 * h + 1], &hi, 4);
        if constexpr (kStats) {  // of the stored (rounded) values, over the image's pixels only
          const float2 fl = Traits::back(lo), fh = Traits::back(hi);
          const int q = (8 * j) % L::kPixels + 2 * (lane % 4);
          const bool row = j < L::kN / 16 || second_row;
          const bool ok0 = row & (q < a.Q), ok1 = row & (q + 1 < a.Q);
          if (ok0) {  // predicated adds, no selects
            sum_lo += fl.x;
            sq_lo = fmaf(fl.x, fl.x, sq_lo);
            sum_hi += fh.x;
            sq_hi = fmaf(fh.x, fh.x, sq_hi);
          }
          if (ok1) {
            sum_lo += fl.y;
            sq_lo = fmaf(fl.y, fl.y, sq_lo);
            sum_hi += fh.y;
            sq_hi = fmaf(fh.y, fh.y, sq_hi);
          }
        }
      }
      sm90::stmatrix_x4_trans(st_addr + jp * 16 * kRowBytes, frag[0], frag[1], frag[2], frag[3]);
    }
    sm90::fence_proxy_async();  // the bulk store reads what stmatrix wrote
    group_barrier(cw);
    if (t == 0) {
      sm90::tma_store_4d(&maps.y, kb * 64, 0, p0, n, out);
      sm90::bulk_commit();
      if constexpr (kBnBackward) sm90::mbar_arrive(out_ready + 8 * cw);
    }
  }
  if (t == 0) sm90::bulk_wait();  // the staging area must outlive the stores
  if constexpr (kStats) {
#pragma unroll
    for (int m = 1; m <= 2; m <<= 1) {  // the four lanes that share a filter pair
      sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, m);
      sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, m);
      sq_lo += __shfl_xor_sync(0xffffffffu, sq_lo, m);
      sq_hi += __shfl_xor_sync(0xffffffffu, sq_hi, m);
    }
    if (lane % 4 == 0) {
      const int k = kb * 64 + k_lo;
      atomicAdd(a.sum + k, sum_lo);
      atomicAdd(a.sum + k + 8, sum_hi);
      atomicAdd(a.sqsum + k, sq_lo);
      atomicAdd(a.sqsum + k + 8, sq_hi);
    }
    if (a.finish.count != nullptr) finish_statistics<false>(a, tid);
  }
  if constexpr (kBnBackward) {
    sm90::named_barrier_sync(7, 256 + L::kWorkers);  // the summing warps' sums are in
    if (a.finish.count != nullptr) finish_statistics<true>(a, tid);
  }
#endif
}

// Launches kKernel on `ctas` CTAs (allow_shared_memory first).
template <auto kKernel>
cudaError_t launch_conv_rows(const ConvForwardArgs& a, const ConvTensorMaps& maps, int ctas, cudaStream_t stream) {
  if (const cudaError_t e = allow_shared_memory<kKernel, ConvRowsLayout::kBytes>(); e != cudaSuccess) return e;
  return launch_overlapped(a.overlap_launch, stream, kKernel, dim3(static_cast<unsigned>(ctas)), dim3(kThreads),
                           ConvRowsLayout::kBytes, a, maps);
}

// Launches the kernel for the extras in `a` (extras_supported's combinations) on `ctas` CTAs, a multiple of K / 64; maps from make_conv_rows_tensor_maps<T>.
template <typename T>
cudaError_t conv_rows_forward(const ConvForwardArgs& a, const ConvTensorMaps& maps, int ctas, cudaStream_t stream) {
  if (!extras_supported(a)) return cudaErrorInvalidValue;
  if (a.bwd.x != nullptr)
    return launch_conv_rows<conv_rows_kernel<T, Epilogue::BnBackward, false>>(a, maps, ctas, stream);
  if (a.in.gamma != nullptr) return launch_conv_rows<conv_rows_kernel<T, Epilogue::Stats, true>>(a, maps, ctas, stream);
  if (a.sum != nullptr) return launch_conv_rows<conv_rows_kernel<T, Epilogue::Stats, false>>(a, maps, ctas, stream);
  if (a.bias != nullptr) return launch_conv_rows<conv_rows_kernel<T, Epilogue::BiasRelu, false>>(a, maps, ctas, stream);
  return launch_conv_rows<conv_rows_kernel<T, Epilogue::Store, false>>(a, maps, ctas, stream);
}

// x as [N, H, W, 64] in boxes of a step's input rows x 64 pixels; the filters as [K, 9 * 64] in
// 64 x 64 boxes; y as [N, P, Q, K] in boxes of 64 filters x 64 pixels x the step's output rows.
template <typename T>
cudaError_t make_conv_rows_tensor_maps(const ConvForwardArgs& a, ConvTensorMaps& maps) {
  using L = ConvRowsLayout;
  if (const cudaError_t e = make_tiled_4d_map<T>(maps.x, a.x, a.N, a.H, a.W, a.C, L::kPixels, L::kInRows);
      e != cudaSuccess)
    return e;
  if (const cudaError_t e = make_tiled_map<T>(maps.w, a.w, static_cast<std::uint64_t>(a.K),
                                              static_cast<std::uint64_t>(9) * a.C, 64, kBK,
                                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
      e != cudaSuccess)
    return e;
  return make_tiled_4d_map<T>(maps.y, a.y, a.N, a.P, a.Q, a.K, L::kPixels, L::kOutRows);
}

}  // namespace dstrain::kernels::cuda::igemm
