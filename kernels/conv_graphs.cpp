#include "conv_graphs.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda_check.h"
#include "dstrain/error.h"

namespace dstrain::kernels::cuda {

namespace {

constexpr int kCandidatePlans = 4;  // the heuristics' first few: timed once, the fastest kept

using GraphKey = std::array<std::int64_t, 15>;

struct GraphCache {
  std::mutex mutex;
  std::map<GraphKey, std::unique_ptr<cudnn_graph::TunedPlan>> plans;  // null: no plan for the shape
};

GraphCache& graph_cache() {
  static auto* cache = new GraphCache();  // never destroyed: plans may be in use until process exit
  return *cache;
}

const char* graphs_setting() {
  const char* env = std::getenv("DSTRAIN_CONV_GRAPHS");
  return env == nullptr ? "" : env;
}

bool graphs_enabled() {
  static const bool enabled = std::string(graphs_setting()) != "0";
  return enabled;
}


const char* graph_name(ConvGraph kind) {
  switch (kind) {
    case ConvGraph::Forward: return "conv2d_forward";
    case ConvGraph::BackwardData: return "conv2d_backward_data";
    case ConvGraph::BackwardFilter: return "conv2d_backward_filter";
    case ConvGraph::ForwardGenStats: return "conv_bn_relu (convolution with GenStats)";
    case ConvGraph::ForwardFp8: return "conv2d_forward_fp8";
    case ConvGraph::ForwardBnReluGenStats: return "chained conv_bn_relu forward (BN + ReLU prologue, GenStats)";
    case ConvGraph::BackwardFilterBnRelu: return "chained conv_bn_relu backward filter (BN + ReLU prologue)";
    case ConvGraph::BackwardDataDreluBnBwd: return "chained conv_bn_relu backward data (dReLU + BN backward weights)";
    default: return "conv_bias_relu (convolution + bias + ReLU)";
  }
}

// The prologue a = relu(x * InScale + InShift) over tensors[0] (x): appends its tensors and
// operations and returns the index of a (virtual, fp32) in `tensors`.
std::size_t add_bn_relu_prologue(std::vector<cudnn_graph::Descriptor>& tensors,
                                 std::vector<cudnn_graph::Descriptor>& ops, cudnnDataType_t scale_dtype,
                                 const Tensor& x) {
  namespace g = cudnn_graph;
  enum : std::int64_t { kUidScaled = 110, kUidShifted = 111, kUidActivated = 112 };
  const std::int64_t n = x.dim(0), c = x.dim(3), h = x.dim(1), wd = x.dim(2);
  const std::size_t base = tensors.size();
  tensors.push_back(g::tensor_channels(kUidInScale, scale_dtype, c));
  tensors.push_back(g::tensor_channels(kUidInShift, scale_dtype, c));
  tensors.push_back(g::tensor_nhwc(kUidScaled, CUDNN_DATA_FLOAT, n, c, h, wd, /*is_virtual=*/true));
  tensors.push_back(g::tensor_nhwc(kUidShifted, CUDNN_DATA_FLOAT, n, c, h, wd, /*is_virtual=*/true));
  tensors.push_back(g::tensor_nhwc(kUidActivated, CUDNN_DATA_FLOAT, n, c, h, wd, /*is_virtual=*/true));
  ops.push_back(g::pointwise_op(CUDNN_POINTWISE_MUL, tensors[0], &tensors[base], tensors[base + 2]));
  ops.push_back(g::pointwise_op(CUDNN_POINTWISE_ADD, tensors[base + 2], &tensors[base + 1], tensors[base + 3]));
  ops.push_back(g::pointwise_op(CUDNN_POINTWISE_RELU_FWD, tensors[base + 3], nullptr, tensors[base + 4]));
  return base + 4;
}

std::unique_ptr<cudnn_graph::TunedPlan> build(cudnnHandle_t h, ConvGraph kind, const Tensor& x, const Tensor& w,
                                              const Tensor& y, const ops::Conv2dParams& p,
                                              PrologueScaleType scale_type, std::string* why_not) {
  namespace g = cudnn_graph;
  const cudnnDataType_t io = x.dtype() == DType::F16      ? CUDNN_DATA_HALF
                             : x.dtype() == DType::F8E4M3 ? CUDNN_DATA_FP8_E4M3
                                                          : CUDNN_DATA_BFLOAT16;
  const std::int64_t n = y.dim(0), k = y.dim(3), ho = y.dim(1), wo = y.dim(2);
  std::vector<g::Descriptor> tensors, ops;
  tensors.push_back(g::tensor_nhwc(kUidX, io, x.dim(0), x.dim(3), x.dim(1), x.dim(2)));  // 0
  tensors.push_back(g::tensor_nhwc(kUidW, io, w.dim(0), w.dim(3), w.dim(1), w.dim(2)));  // 1
  g::Descriptor conv = g::convolution(p.stride_h, p.stride_w, p.pad_h, p.pad_w);
  enum : std::int64_t { kUidConvOut = 100, kUidBiased = 101 };  // virtual tensors
  switch (kind) {
    case ConvGraph::Forward:
      tensors.push_back(g::tensor_nhwc(kUidY, io, n, k, ho, wo));
      ops.push_back(g::conv_forward_op(tensors[0], tensors[1], tensors[2], conv));
      break;
    case ConvGraph::BackwardData:
      tensors.push_back(g::tensor_nhwc(kUidY, io, n, k, ho, wo));
      ops.push_back(g::conv_backward_data_op(tensors[2], tensors[1], tensors[0], conv));
      break;
    case ConvGraph::BackwardFilter:
      tensors.push_back(g::tensor_nhwc(kUidY, io, n, k, ho, wo));
      ops.push_back(g::conv_backward_filter_op(tensors[0], tensors[2], tensors[1], conv));
      break;
    case ConvGraph::ForwardGenStats:
      tensors.push_back(g::tensor_nhwc(kUidY, io, n, k, ho, wo));
      tensors.push_back(g::tensor_channels(kUidSum, CUDNN_DATA_FLOAT, k));
      tensors.push_back(g::tensor_channels(kUidSqSum, CUDNN_DATA_FLOAT, k));
      ops.push_back(g::conv_forward_op(tensors[0], tensors[1], tensors[2], conv));
      ops.push_back(g::genstats_op(tensors[2], tensors[3], tensors[4]));
      break;
    case ConvGraph::ForwardFp8:
      tensors.push_back(g::tensor_nhwc(kUidConvOut, CUDNN_DATA_FLOAT, n, k, ho, wo, /*is_virtual=*/true));  // 2
      tensors.push_back(g::tensor_nhwc(kUidDescaleX, CUDNN_DATA_FLOAT, 1, 1, 1, 1));                          // 3
      tensors.push_back(g::tensor_nhwc(kUidBiased, CUDNN_DATA_FLOAT, n, k, ho, wo, /*is_virtual=*/true));   // 4
      tensors.push_back(g::tensor_nhwc(kUidDescaleW, CUDNN_DATA_FLOAT, 1, 1, 1, 1));                          // 5
      tensors.push_back(g::tensor_nhwc(kUidY, CUDNN_DATA_BFLOAT16, n, k, ho, wo));                            // 6
      ops.push_back(g::conv_forward_op(tensors[0], tensors[1], tensors[2], conv));
      ops.push_back(g::pointwise_op(CUDNN_POINTWISE_MUL, tensors[2], &tensors[3], tensors[4]));
      ops.push_back(g::pointwise_op(CUDNN_POINTWISE_MUL, tensors[4], &tensors[5], tensors[6]));
      break;
    case ConvGraph::ForwardBiasRelu:
      tensors.push_back(g::tensor_nhwc(kUidConvOut, CUDNN_DATA_FLOAT, n, k, ho, wo, /*is_virtual=*/true));
      tensors.push_back(
          g::tensor_channels(kUidBias, scale_type == PrologueScaleType::Activation ? io : CUDNN_DATA_FLOAT, k));
      tensors.push_back(g::tensor_nhwc(kUidBiased, CUDNN_DATA_FLOAT, n, k, ho, wo, /*is_virtual=*/true));
      tensors.push_back(g::tensor_nhwc(kUidY, io, n, k, ho, wo));
      ops.push_back(g::conv_forward_op(tensors[0], tensors[1], tensors[2], conv));
      ops.push_back(g::pointwise_op(CUDNN_POINTWISE_ADD, tensors[2], &tensors[3], tensors[4]));
      ops.push_back(g::pointwise_op(CUDNN_POINTWISE_RELU_FWD, tensors[4], nullptr, tensors[5]));
      break;
    case ConvGraph::ForwardBnReluGenStats: {
      const std::size_t a = add_bn_relu_prologue(tensors, ops, scale_type == PrologueScaleType::Float ? CUDNN_DATA_FLOAT : io, x);
      tensors.push_back(g::tensor_nhwc(kUidY, io, n, k, ho, wo));
      tensors.push_back(g::tensor_channels(kUidSum, CUDNN_DATA_FLOAT, k));
      tensors.push_back(g::tensor_channels(kUidSqSum, CUDNN_DATA_FLOAT, k));
      const std::size_t t = tensors.size();
      ops.push_back(g::conv_forward_op(tensors[a], tensors[1], tensors[t - 3], conv));
      ops.push_back(g::genstats_op(tensors[t - 3], tensors[t - 2], tensors[t - 1]));
      break;
    }
    case ConvGraph::BackwardFilterBnRelu: {
      const std::size_t a = add_bn_relu_prologue(tensors, ops, scale_type == PrologueScaleType::Float ? CUDNN_DATA_FLOAT : io, x);
      tensors.push_back(g::tensor_nhwc(kUidY, io, n, k, ho, wo));
      ops.push_back(g::conv_backward_filter_op(tensors[a], tensors.back(), tensors[1], conv));
      break;
    }
    case ConvGraph::BackwardDataDreluBnBwd: {
      // tensors[0] is the output here: the gradient through the ReLU, in x's dtype.
      enum : std::int64_t { kUidDgradOut = 120, kUidCentered = 121, kUidNormed = 122, kUidScaledN = 123,
                            kUidPreact = 124 };
      const std::int64_t c = x.dim(3), hi = x.dim(1), wi = x.dim(2), ni = x.dim(0);
      tensors.push_back(g::tensor_nhwc(kUidY, io, n, k, ho, wo));                                        // 2 dy
      tensors.push_back(g::tensor_nhwc(kUidInX, io, ni, c, hi, wi));                                     // 3
      for (std::int64_t uid : {kUidInMean, kUidInInvstd, kUidInGamma, kUidInBeta, kUidInDgamma, kUidInDbeta,
                               kUidEqDy, kUidEqX, kUidEqBias})
        tensors.push_back(g::tensor_channels(uid, CUDNN_DATA_FLOAT, c));                                 // 4..12
      for (std::int64_t uid : {kUidDgradOut, kUidCentered, kUidNormed, kUidScaledN, kUidPreact})
        tensors.push_back(g::tensor_nhwc(uid, CUDNN_DATA_FLOAT, ni, c, hi, wi, /*is_virtual=*/true));    // 13..17
      ops.push_back(g::conv_backward_data_op(tensors[2], tensors[1], tensors[13], conv));
      ops.push_back(g::pointwise_op(CUDNN_POINTWISE_ADD, tensors[3], &tensors[4], tensors[14], -1.0f));
      ops.push_back(g::pointwise_op(CUDNN_POINTWISE_MUL, tensors[14], &tensors[5], tensors[15]));
      ops.push_back(g::pointwise_op(CUDNN_POINTWISE_MUL, tensors[15], &tensors[6], tensors[16]));
      ops.push_back(g::pointwise_op(CUDNN_POINTWISE_ADD, tensors[16], &tensors[7], tensors[17]));
      ops.push_back(g::relu_backward_op(tensors[13], tensors[17], tensors[0]));
      ops.push_back(g::bn_backward_weights_op({&tensors[3], &tensors[4], &tensors[5], &tensors[6], &tensors[0],
                                               &tensors[8], &tensors[9], &tensors[10], &tensors[11], &tensors[12]}));
      break;
    }
  }
  tensors.push_back(std::move(conv));
  std::shared_ptr<g::Graph> graph = g::Graph::build(h, std::move(tensors), std::move(ops), why_not);
  if (!graph) return nullptr;
  // The runtime-fused graphs of chained layers vary more between configurations: more are timed.
  const bool chained = kind == ConvGraph::ForwardBnReluGenStats || kind == ConvGraph::BackwardFilterBnRelu ||
                       kind == ConvGraph::BackwardDataDreluBnBwd;
  std::vector<std::unique_ptr<g::Plan>> plans =
      g::Plan::build_all(h, graph, chained ? 2 * kCandidatePlans : kCandidatePlans, why_not);
  if (plans.empty()) return nullptr;
  return std::make_unique<g::TunedPlan>(std::move(plans));
}

}  // namespace

bool conv_graphs_forced() {
  static const bool forced = std::string(graphs_setting()) == "force";
  return forced;
}

cudnn_graph::TunedPlan* conv_graph_plan(CudaState& st, ConvGraph kind, const Tensor& x, const Tensor& w,
                                        const Tensor& y, const ops::Conv2dParams& p,
                                        std::initializer_list<const void*> data, PrologueScaleType scale_type) {
  if (x.dtype() == DType::F32 || ops::deterministic() || !graphs_enabled()) return nullptr;
  if (x.numel() == 0 || w.numel() == 0 || y.numel() == 0) return nullptr;
  for (const void* ptr : data)
    if (!aligned16(ptr)) return nullptr;
  const GraphKey key{st.device, static_cast<int>(kind), x.dim(0), x.dim(1), x.dim(2), x.dim(3), w.dim(0), w.dim(1),
                     w.dim(2), p.stride_h, p.stride_w, p.pad_h, p.pad_w, static_cast<std::int64_t>(x.dtype()),
                     static_cast<std::int64_t>(scale_type)};
  GraphCache& cache = graph_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    auto it = cache.plans.find(key);
    if (it != cache.plans.end()) return it->second.get();
  }
  // No plan is built inside a CUDA graph capture (building may load kernels and time candidates):
  // the op takes its other way there, and a later run outside the capture builds the plan.
  if (capturing(st.cuda_stream())) return nullptr;
  const bool prologue = kind == ConvGraph::ForwardBnReluGenStats || kind == ConvGraph::BackwardFilterBnRelu;
  const bool bias_graph = kind == ConvGraph::ForwardBiasRelu;
  std::string why;
  std::unique_ptr<cudnn_graph::TunedPlan> plan;
  try {
    plan = build(st.cudnn, kind, x, w, y, p, scale_type, &why);  // outside the lock: may take a while
  } catch (const Error& e) {
    if (e.code() != ErrorCode::Cudnn) throw;
    why = e.what();  // a descriptor cuDNN refuses for this shape: no graph plan
  }
  if (!plan)
    detail::log_warning(std::string(graph_name(kind)) + ": cuDNN offers no graph plan for x " +
                        shape_str(x.shape()) + " w " + shape_str(w.shape()) + " stride " +
                        std::to_string(p.stride_h) + " " + dtype_name(x.dtype()) + " (" + why + "); " +
                        (prologue && scale_type == PrologueScaleType::Activation
                             ? "trying fp32 prologue scales"
                             : bias_graph && scale_type == PrologueScaleType::Activation
                                   ? "trying the bias in fp32"
                                   : "the separate kernels are used"));
  std::lock_guard<std::mutex> lock(cache.mutex);
  auto ins = cache.plans.emplace(key, std::move(plan));  // another thread may have won: keep its plan
  return ins.first->second.get();
}

namespace {

struct SpeedChoices {
  std::mutex mutex;
  std::map<std::array<std::int64_t, 15>, std::size_t> fastest;
};

// DSTRAIN_FORCE_CHOICE=i: -1 when unset.
long forced_choice() {
  static const long forced = [] {
    const char* env = std::getenv("DSTRAIN_FORCE_CHOICE");
    if (env == nullptr || *env == '\0') return -1L;
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (*end != '\0' || v < 0)
      DSTRAIN_THROW(ErrorCode::InvalidArgument,
                    std::string("DSTRAIN_FORCE_CHOICE must be a candidate index (0, 1, 2...), not '") + env + "'");
    return v;
  }();
  return forced;
}

}  // namespace

bool choices_logged() {
  static const bool logged = std::getenv("DSTRAIN_LOG_CHOICES") != nullptr;
  return logged;
}

std::size_t fastest_way(CudaState& st, Site site, const Tensor& x, const Tensor& w, const ops::Conv2dParams& p,
                        const std::vector<Way>& ways) {
  if (ways.empty()) DSTRAIN_THROW(ErrorCode::Internal, "fastest_way: no way offered");
  if (const long forced = forced_choice(); forced >= 0)
    return std::min<std::size_t>(static_cast<std::size_t>(forced), ways.size() - 1);
  static auto* choices = new SpeedChoices();  // never destroyed, as the plan caches
  const std::array<std::int64_t, 15> key{st.device, static_cast<std::int64_t>(site), x.dim(0), x.dim(1), x.dim(2),
                                         x.dim(3), w.dim(0), w.dim(1), w.dim(2), p.stride_h, p.stride_w, p.pad_h,
                                         p.pad_w, static_cast<std::int64_t>(x.dtype()),
                                         static_cast<std::int64_t>(ways.size())};
  {
    std::lock_guard<std::mutex> lock(choices->mutex);
    auto it = choices->fastest.find(key);
    if (it != choices->fastest.end()) return it->second;
  }
  // Nothing can be timed inside a CUDA graph capture: the first way, untimed and not remembered,
  // so that a later run outside the capture still times them.
  if (capturing(st.cuda_stream())) return 0;
  // Timed outside the lock: a way may make choices of its own (a convolution inside).
  std::vector<float> ms;
  for (const Way& way : ways) ms.push_back(cudnn_graph::time_calls_ms(st.cuda_stream(), 3, way.run) / 3.0f);
  const std::size_t best = static_cast<std::size_t>(std::min_element(ms.begin(), ms.end()) - ms.begin());
  if (choices_logged()) {
    static const char* const sites[] = {"training statistics",  "chained forward", "chained wgrad",
                                        "1x1 forward",          "1x1 conv + bias + ReLU",
                                        "convolution forward",  "conv + bias + ReLU",
                                        "backward data",        "conv gradients",  "layer gradients",
                                        "chained gradients", "backward filter"};
    std::string times;
    for (std::size_t i = 0; i < ways.size(); ++i)
      times += (i > 0 ? " / " : "") + std::string(ways[i].name) + " " + std::to_string(ms[i]);
    detail::log_warning(std::string("choice ") + sites[static_cast<int>(site)] + " for x " + shape_str(x.shape()) +
                        " w " + shape_str(w.shape()) + " " + dtype_name(x.dtype()) + ": " + times + " ms");
  }
  std::lock_guard<std::mutex> lock(choices->mutex);
  return choices->fastest.emplace(key, best).first->second;  // another thread may have won
}

void run_cudnn_or_own(CudaState& st, Site site, const Tensor& x, const Tensor& w, const ops::Conv2dParams& p,
                      bool own_applies, const std::function<void()>& with_cudnn,
                      const std::function<void()>& with_own) {
  if (site != Site::Forward && site != Site::ForwardBiasRelu && site != Site::BackwardData &&
      site != Site::BackwardFilter)
    DSTRAIN_THROW(ErrorCode::Internal, "run_cudnn_or_own: not a site of cuDNN against the implicit GEMM");
  if (own_applies && fastest_way(st, site, x, w, p, {{"cuDNN", with_cudnn}, {"implicit GEMM", with_own}}) == 1)
    with_own();
  else
    with_cudnn();
}

}  // namespace dstrain::kernels::cuda
