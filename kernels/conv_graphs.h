// The convolutions as cuDNN graphs (fp16/bf16): forward, backward data, backward filter, forward
// with per-channel GenStats, and forward + bias + ReLU. cuDNN's graph heuristics offer faster
// kernels than the legacy API's for most NHWC shapes; the few best plans are timed on first use
// and the fastest is kept (cudnn_graph::TunedPlan), cached per (device, graph, shape, dtype).
// Included only by CUDA translation units in kernels/.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

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
  // Chained layers: x is the raw convolution output of the layer before, whose BatchNorm and ReLU
  // are applied in the convolution's operand prologue: a = relu(x * InScale + InShift).
  // Forward: y = conv(a, w) with GenStats (Sum, SqSum) in the epilogue.
  ForwardBnReluGenStats = 6,
  // Backward filter: dw = wgrad(a, dy).
  BackwardFilterBnRelu = 7,
  // Backward data through the previous layer's ReLU and BatchNorm: dx = dgrad(dy, w) where
  // (InX - InMean) * InInvstd * InGamma + InBeta > 0, else 0; InDgamma, InDbeta and the EqDy, EqX,
  // EqBias coefficients from BatchNorm's backward weight terms over (InX, dx).
  BackwardDataDreluBnBwd = 8,
};

// The dtype of InScale / InShift in the prologue graphs: the activations' (fp16/bf16), the
// pattern cuDNN's fused engines document, or fp32; tried in this order. Also the dtype of the bias
// of the bias + ReLU graph.
enum class PrologueScaleType : int { Activation = 0, Float = 1 };

// Tensor UIDs: X is x or dx, W is w or dw, Y is y or dy (the GenStats graph's conv output, the
// bias graph's ReLU output); Sum / SqSum: fp32 [K] (GenStats); Bias: [K], fp32 or the activations'.
enum ConvGraphUid : std::int64_t {
  kUidX = 1,
  kUidW = 2,
  kUidY = 3,
  kUidSum = 4,
  kUidSqSum = 5,
  kUidBias = 6,
  kUidDescaleX = 7,
  kUidDescaleW = 8,
  kUidInScale = 9,
  kUidInShift = 10,
  kUidInX = 11,
  kUidInMean = 12,
  kUidInInvstd = 13,
  kUidInGamma = 14,
  kUidInBeta = 15,
  kUidInDgamma = 16,
  kUidInDbeta = 17,
  kUidEqDy = 18,
  kUidEqX = 19,
  kUidEqBias = 20,
};

// DSTRAIN_LOG_CHOICES set: each timed choice (graph or kernels, cuBLASLt algorithm...) is logged
// with its times.
bool choices_logged();

// DSTRAIN_CONV_GRAPHS=force: where a fused graph competes with separate kernels, the graph is
// taken without timing the two (for tests of the fused path). DSTRAIN_CONV_GRAPHS=0: no graphs.
bool conv_graphs_forced();

// The tuned plan, or null when the graph path does not apply: fp32 data (cuDNN's graph engines
// may use TF32), deterministic mode, DSTRAIN_CONV_GRAPHS=0, a pointer in `data` that is not
// 16-byte aligned, or no plan from cuDNN for the shape (logged once per shape).
// x: [N,H,W,C] (x or dx), w: [K,R,S,C] (w or dw), y: [N,Ho,Wo,K] (y or dy). `scale_type` only
// matters for the prologue graphs and the bias graph.
cudnn_graph::TunedPlan* conv_graph_plan(CudaState& st, ConvGraph kind, const Tensor& x, const Tensor& w,
                                        const Tensor& y, const ops::Conv2dParams& p,
                                        std::initializer_list<const void*> data,
                                        PrologueScaleType scale_type = PrologueScaleType::Activation);

// ops::conv2d_backward_filter on `st`'s stream and scratch (a side state's, say: cuda_state.h).
void conv2d_backward_filter_on(CudaState& st, const Tensor& x, const Tensor& dy, Tensor& dw,
                               const ops::Conv2dParams& p);

// A 1x1, stride-1, unpadded NHWC convolution is a GEMM: y[NHW, K] = x[NHW, C] * w[K, C]^T.
// pointwise_conv_applies: such a convolution, in fp16 or bf16 (fp32 stays on cuDNN's FMA kernels).
// pointwise_conv_gemm runs it through cuBLASLt, with bias ([K], fp32 or y's dtype) and ReLU in the epilogue when
// bias_relu is given; false (nothing written) when cuBLASLt offers no algorithm. In linear.cu.
bool pointwise_conv_applies(const Tensor& x, const Tensor& w, const ops::Conv2dParams& p);
bool pointwise_conv_gemm(CudaState& st, const Tensor& x, const Tensor& w, const Tensor* bias_relu, Tensor& y);

// Where several ways of computing the same outputs compete, all are timed when a (device, site,
// shape, dtype) is first seen and the fastest is kept: neither cuDNN's fused graphs nor its
// kernels are always the faster (GenStats in bf16 for some shapes, the runtime-fused prologue
// and epilogue graphs of chained layers for others; for 1x1 convolutions cuBLASLt's GEMMs and
// cuDNN's kernels each win some shapes; the implicit GEMM of implicit_gemm_conv.h others).
// Sites: the training forward's statistics (GenStats graph, or the convolution and one statistics
// pass, or the implicit GEMM with statistics in its epilogue; for a chained input, the prologue
// graph, or materialising the activation first); a chained input's wgrad (fused graph, separate
// kernels, or the implicit GEMM with the prologue) and, with the streams below, its dgrad (fused
// graph, separate kernels, or the implicit GEMM with BatchNorm's backward in its epilogue); a 1x1
// convolution forward and the inference conv + bias + ReLU (cuBLASLt, cuDNN, implicit GEMM); any
// other convolution forward, plain or with bias + ReLU, the backward data and the backward filter
// (cuDNN, implicit GEMM); dw and dx on one stream or on two (cuda_state.h: side stream), which
// helps where the two kernels leave each other room and hurts where they contend for memory (1x1
// 64->256 at 56x56, say).
enum class Site : std::int64_t {
  ForwardStats = 0,
  ChainedForwardStats = 1,
  ChainedWgrad = 2,
  PointwiseForward = 3,
  PointwiseBiasRelu = 4,
  Forward = 5,
  ForwardBiasRelu = 6,
  BackwardData = 7,
  Gradients = 8,         // a convolution's dw and dx: one stream, or dw on the side stream beside dx
  LayerGradients = 9,    // the same for a fused layer's backward
  ChainedGradients = 10,  // and for a chained layer's, with the way of its dgrad
  BackwardFilter = 11,    // cuDNN or the implicit GEMM
};

// One way of computing a site's outputs; the name is what DSTRAIN_LOG_CHOICES prints.
struct Way {
  const char* name;
  std::function<void()> run;
};

// Index of the way that was the fastest at the first call for this key (x, w, p, the dtype of x
// and the number of ways offered). Every way must write only its outputs and scratch: they all
// run here, before the caller's real call. DSTRAIN_FORCE_CHOICE=i takes way i (the last one if
// there are fewer) without timing, for tests of each path.
std::size_t fastest_way(CudaState& st, Site site, const Tensor& x, const Tensor& w, const ops::Conv2dParams& p,
                        const std::vector<Way>& ways);

// Runs with_own (our implicit GEMM) where own_applies and fastest_way found it faster than
// with_cudnn at `site`, else with_cudnn: the sites where only those two compete (Forward,
// ForwardBiasRelu, BackwardData, BackwardFilter).
void run_cudnn_or_own(CudaState& st, Site site, const Tensor& x, const Tensor& w, const ops::Conv2dParams& p,
                      bool own_applies, const std::function<void()>& with_cudnn,
                      const std::function<void()>& with_own);

// dw_work(CudaState&) and one of dx_ways: on st in turn, or dw on the side stream beside dx
// (run_beside). The pair that was the fastest at `site` when the shape was first seen runs: the
// way and the streams are chosen together, since a dx way that fills the device (a persistent
// kernel) can be the faster alone and the slower beside dw.
template <class DwWork>
void run_gradients(CudaState& st, Site site, const Tensor& x, const Tensor& w, const ops::Conv2dParams& p,
                   DwWork dw_work, const std::vector<Way>& dx_ways) {
  // No side stream is made inside a CUDA graph capture (and nothing is timed there: in turn).
  const bool beside_possible = !(st.side == nullptr && capturing(st.cuda_stream())) && side_state(st) != nullptr;
  std::vector<std::string> names;  // the pairs' names, for DSTRAIN_LOG_CHOICES
  names.reserve(2 * dx_ways.size());
  std::vector<Way> pairs;
  for (int beside = 0; beside < (beside_possible ? 2 : 1); ++beside)
    for (const Way& dx : dx_ways) {
      const char* streams = beside != 0 ? "two streams" : "one stream";
      names.push_back(dx_ways.size() == 1 ? streams : std::string(dx.name) + ", " + streams);
      const std::function<void()>& dx_run = dx.run;
      if (beside != 0)
        pairs.push_back({names.back().c_str(), [&st, &dw_work, &dx_run] { run_beside(st, dw_work, dx_run); }});
      else
        pairs.push_back({names.back().c_str(), [&st, &dw_work, &dx_run] {
                           dw_work(st);
                           dx_run();
                         }});
    }
  pairs[pairs.size() == 1 ? 0 : fastest_way(st, site, x, w, p, pairs)].run();
}

// The same with one dx way.
template <class DwWork, class DxWork>
void run_gradients(CudaState& st, Site site, const Tensor& x, const Tensor& w, const ops::Conv2dParams& p,
                   DwWork dw_work, DxWork dx_work) {
  run_gradients(st, site, x, w, p, dw_work, std::vector<Way>{{"dx", dx_work}});
}

}  // namespace dstrain::kernels::cuda
