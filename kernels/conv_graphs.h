// The convolutions as cuDNN graphs (fp16/bf16): forward, backward data, backward filter, forward
// with per-channel GenStats, and forward + bias + ReLU. cuDNN's graph heuristics offer faster
// kernels than the legacy API's for most NHWC shapes; the few best plans are timed on first use
// and the fastest is kept (cudnn_graph::TunedPlan), cached per (device, graph, shape, dtype).
// Included only by CUDA translation units in kernels/.
#pragma once
#include <cstdint>
#include <initializer_list>

#include "cuda_state.h"
#include "cudnn_graph.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

namespace dstrain::kernels::cuda {

enum class ConvGraph : int {
  Forward = 0,
  BackwardData = 1,
  BackwardFilter = 2,
  ForwardGenStats = 3,
  ForwardBiasRelu = 4,
  // x, w E4M3; y (bf16) = conv(x, w) * descale_x * descale_w (fp32 device scalars).
  ForwardFp8 = 5,
};

// Tensor UIDs: X is x or dx, W is w or dw, Y is y or dy (the GenStats graph's conv output, the
// bias graph's ReLU output); Sum / SqSum: fp32 [K] (GenStats); Bias: fp32 [K].
enum ConvGraphUid : std::int64_t {
  kUidX = 1,
  kUidW = 2,
  kUidY = 3,
  kUidSum = 4,
  kUidSqSum = 5,
  kUidBias = 6,
  kUidDescaleX = 7,
  kUidDescaleW = 8,
};

// The tuned plan, or null when the graph path does not apply: fp32 data (cuDNN's graph engines
// may use TF32), deterministic mode, DSTRAIN_CONV_GRAPHS=0, a pointer in `data` that is not
// 16-byte aligned, or no plan from cuDNN for the shape (logged once per shape).
// x: [N,H,W,C] (x or dx), w: [K,R,S,C] (w or dw), y: [N,Ho,Wo,K] (y or dy).
cudnn_graph::TunedPlan* conv_graph_plan(CudaState& st, ConvGraph kind, const Tensor& x, const Tensor& w,
                                        const Tensor& y, const ops::Conv2dParams& p,
                                        std::initializer_list<const void*> data);

}  // namespace dstrain::kernels::cuda
