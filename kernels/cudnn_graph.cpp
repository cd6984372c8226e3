#include "cudnn_graph.h"

#include <algorithm>
#include <string>
#include <utility>

#include "cuda_check.h"
#include "cuda_state.h"
#include "dstrain/device.h"
#include "dstrain/error.h"

// cuDNN 9.19 marks the handle attributes of graphs and plans deprecated; cuDNN 9.14 (the GPU
// machines) still reads them, so they are set, and the warning is silenced here only.
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif

namespace dstrain::kernels::cudnn_graph {

namespace {

[[noreturn]] void fail(const std::string& what, cudnnStatus_t s, const char* file, int line) {
  detail::throw_error(ErrorCode::Cudnn, what + ": " + cudnnGetErrorString(s), file, line, static_cast<long>(s));
}

}  // namespace

Descriptor::Descriptor(cudnnBackendDescriptorType_t type) {
  const cudnnStatus_t s = cudnnBackendCreateDescriptor(type, &desc_);
  if (s != CUDNN_STATUS_SUCCESS)
    fail("cudnnBackendCreateDescriptor(" + std::to_string(static_cast<int>(type)) + ")", s, __FILE__, __LINE__);
}

Descriptor::~Descriptor() {
  if (desc_ != nullptr) cudnnBackendDestroyDescriptor(desc_);
}

Descriptor::Descriptor(Descriptor&& other) noexcept : desc_(other.desc_) { other.desc_ = nullptr; }

Descriptor& Descriptor::operator=(Descriptor&& other) noexcept {
  if (this != &other) {
    if (desc_ != nullptr) cudnnBackendDestroyDescriptor(desc_);
    desc_ = other.desc_;
    other.desc_ = nullptr;
  }
  return *this;
}

Descriptor& Descriptor::set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, std::int64_t count,
                            const void* values) {
  const cudnnStatus_t s = cudnnBackendSetAttribute(desc_, name, type, count, values);
  if (s != CUDNN_STATUS_SUCCESS)
    fail("cudnnBackendSetAttribute(attribute " + std::to_string(static_cast<int>(name)) + ")", s, __FILE__,
         __LINE__);
  return *this;
}

Descriptor& Descriptor::set_i64(cudnnBackendAttributeName_t name, std::int64_t v) {
  return set(name, CUDNN_TYPE_INT64, 1, &v);
}

Descriptor& Descriptor::set_i64s(cudnnBackendAttributeName_t name, const std::vector<std::int64_t>& v) {
  return set(name, CUDNN_TYPE_INT64, static_cast<std::int64_t>(v.size()), v.data());
}

Descriptor& Descriptor::set_dtype(cudnnBackendAttributeName_t name, cudnnDataType_t v) {
  return set(name, CUDNN_TYPE_DATA_TYPE, 1, &v);
}

Descriptor& Descriptor::set_float(cudnnBackendAttributeName_t name, float v) {
  return set(name, CUDNN_TYPE_FLOAT, 1, &v);
}

Descriptor& Descriptor::set_desc(cudnnBackendAttributeName_t name, const Descriptor& d) {
  cudnnBackendDescriptor_t raw = d.get();
  return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw);
}

Descriptor& Descriptor::finalize(const char* what) {
  const cudnnStatus_t s = cudnnBackendFinalize(desc_);
  if (s != CUDNN_STATUS_SUCCESS) fail(std::string("cudnnBackendFinalize(") + what + ")", s, __FILE__, __LINE__);
  return *this;
}

cudnnStatus_t Descriptor::try_finalize() { return cudnnBackendFinalize(desc_); }

Descriptor tensor_nhwc(std::int64_t uid, cudnnDataType_t dtype, std::int64_t n, std::int64_t c, std::int64_t h,
                       std::int64_t w, bool is_virtual) {
  Descriptor t(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
  const bool virt = is_virtual;
  t.set_dtype(CUDNN_ATTR_TENSOR_DATA_TYPE, dtype)
      .set_i64s(CUDNN_ATTR_TENSOR_DIMENSIONS, {n, c, h, w})
      .set_i64s(CUDNN_ATTR_TENSOR_STRIDES, {h * w * c, 1, w * c, c})
      .set_i64(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid)
      .set_i64(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16)
      .set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &virt)
      .finalize("tensor");
  return t;
}

Descriptor tensor_channels(std::int64_t uid, cudnnDataType_t dtype, std::int64_t c, bool is_virtual) {
  return tensor_nhwc(uid, dtype, 1, c, 1, 1, is_virtual);
}

Descriptor convolution(std::int64_t stride_h, std::int64_t stride_w, std::int64_t pad_h, std::int64_t pad_w) {
  Descriptor d(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR);
  const cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
  d.set_dtype(CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_DATA_FLOAT)
      .set(CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, 1, &mode)
      .set_i64(CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, 2)
      .set_i64s(CUDNN_ATTR_CONVOLUTION_DILATIONS, {1, 1})
      .set_i64s(CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, {stride_h, stride_w})
      .set_i64s(CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, {pad_h, pad_w})
      .set_i64s(CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, {pad_h, pad_w})
      .finalize("convolution");
  return d;
}

Descriptor conv_forward_op(const Descriptor& x, const Descriptor& w, const Descriptor& y, const Descriptor& conv) {
  Descriptor op(CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR);
  op.set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, x)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, w)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, y)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC, conv)
      .set_float(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, 1.0f)
      .set_float(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, 0.0f)
      .finalize("convolution forward");
  return op;
}

Descriptor conv_backward_data_op(const Descriptor& dy, const Descriptor& w, const Descriptor& dx,
                                 const Descriptor& conv) {
  Descriptor op(CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR);
  op.set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY, dy)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W, w)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX, dx)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC, conv)
      .set_float(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA, 1.0f)
      .set_float(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA, 0.0f)
      .finalize("convolution backward data");
  return op;
}

Descriptor conv_backward_filter_op(const Descriptor& x, const Descriptor& dy, const Descriptor& dw,
                                   const Descriptor& conv) {
  Descriptor op(CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR);
  op.set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X, x)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY, dy)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW, dw)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC, conv)
      .set_float(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA, 1.0f)
      .set_float(CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA, 0.0f)
      .finalize("convolution backward filter");
  return op;
}

Descriptor pointwise_op(cudnnPointwiseMode_t mode, const Descriptor& x, const Descriptor* b, const Descriptor& y,
                        float alpha2) {
  Descriptor pw(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
  pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode)
      .set_dtype(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_DATA_FLOAT)
      .finalize("pointwise");
  Descriptor op(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
  op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw).set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
  if (b != nullptr) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
  if (alpha2 != 1.0f) op.set_float(CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, alpha2);
  op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y).finalize("pointwise operation");
  return op;  // the finalized operation keeps what it needs of `pw`
}

Descriptor relu_backward_op(const Descriptor& dy, const Descriptor& x, const Descriptor& dx) {
  Descriptor pw(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
  const cudnnPointwiseMode_t mode = CUDNN_POINTWISE_RELU_BWD;
  pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode)
      .set_dtype(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_DATA_FLOAT)
      .finalize("pointwise relu backward");
  Descriptor op(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
  op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw)
      .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_DYDESC, dy)
      .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x)
      .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_DXDESC, dx)
      .finalize("relu backward operation");
  return op;
}

Descriptor bn_backward_weights_op(const BnBackwardWeightTensors& t) {
  Descriptor op(CUDNN_BACKEND_OPERATION_BN_BWD_WEIGHTS_DESCRIPTOR);
  op.set_dtype(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_MATH_PREC, CUDNN_DATA_FLOAT)
      .set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_MEAN_DESC, *t.mean)
      .set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_INVSTD_DESC, *t.invstd)
      .set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_BN_SCALE_DESC, *t.gamma)
      .set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_X_DESC, *t.x)
      .set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DY_DESC, *t.dy)
      .set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DBN_SCALE_DESC, *t.dgamma)
      .set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DBN_BIAS_DESC, *t.dbeta)
      .set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_DY_SCALE_DESC, *t.eq_dy)
      .set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_X_SCALE_DESC, *t.eq_x)
      .set_desc(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_BIAS, *t.eq_bias)
      .finalize("batchnorm backward weights");
  return op;
}

Descriptor genstats_op(const Descriptor& x, const Descriptor& sum, const Descriptor& sqsum) {
  Descriptor op(CUDNN_BACKEND_OPERATION_GEN_STATS_DESCRIPTOR);
  const cudnnGenStatsMode_t mode = CUDNN_GENSTATS_SUM_SQSUM;
  op.set(CUDNN_ATTR_OPERATION_GENSTATS_MODE, CUDNN_TYPE_GENSTATS_MODE, 1, &mode)
      .set_dtype(CUDNN_ATTR_OPERATION_GENSTATS_MATH_PREC, CUDNN_DATA_FLOAT)
      .set_desc(CUDNN_ATTR_OPERATION_GENSTATS_XDESC, x)
      .set_desc(CUDNN_ATTR_OPERATION_GENSTATS_SUMDESC, sum)
      .set_desc(CUDNN_ATTR_OPERATION_GENSTATS_SQSUMDESC, sqsum)
      .finalize("genstats");
  return op;
}

std::shared_ptr<Graph> Graph::build(cudnnHandle_t handle, std::vector<Descriptor> tensors,
                                    std::vector<Descriptor> ops, std::string* why_not) {
  std::shared_ptr<Graph> graph(new Graph());
  graph->tensors_ = std::move(tensors);
  graph->ops_ = std::move(ops);
  std::vector<cudnnBackendDescriptor_t> raw_ops;
  for (const Descriptor& op : graph->ops_) raw_ops.push_back(op.get());
  graph->graph_ = std::make_unique<Descriptor>(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
  graph->graph_->set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle)
      .set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<std::int64_t>(raw_ops.size()),
           raw_ops.data());
  const cudnnStatus_t s = graph->graph_->try_finalize();
  if (s != CUDNN_STATUS_SUCCESS) {
    if (why_not) *why_not = std::string("operation graph refused: ") + cudnnGetErrorString(s);
    return nullptr;
  }
  return graph;
}

std::vector<std::unique_ptr<Plan>> Plan::build_all(cudnnHandle_t handle, const std::shared_ptr<Graph>& graph,
                                                   int max_plans, std::string* why_not) {
  std::vector<std::unique_ptr<Plan>> plans;
  Descriptor heuristics(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
  const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
  heuristics.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph->descriptor())
      .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
  cudnnStatus_t s = heuristics.try_finalize();
  if (s != CUDNN_STATUS_SUCCESS) {
    if (why_not) *why_not = std::string("heuristics refused the graph: ") + cudnnGetErrorString(s);
    return plans;
  }
  std::int64_t count = 0;
  DSTRAIN_CUDNN_CHECK(cudnnBackendGetAttribute(heuristics.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                               CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
  std::vector<Descriptor> configs;
  std::vector<cudnnBackendDescriptor_t> raw_configs;
  for (std::int64_t i = 0; i < count; ++i) {
    configs.emplace_back(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
    raw_configs.push_back(configs.back().get());
  }
  std::int64_t returned = 0;
  if (count > 0)
    DSTRAIN_CUDNN_CHECK(cudnnBackendGetAttribute(heuristics.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                 CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &returned,
                                                 raw_configs.data()));
  std::string last = "no engine offered";
  for (std::int64_t i = 0; i < returned && static_cast<int>(plans.size()) < max_plans; ++i) {
    auto candidate = std::make_unique<Descriptor>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
    candidate->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle)
        .set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, configs[static_cast<std::size_t>(i)]);
    s = candidate->try_finalize();
    if (s != CUDNN_STATUS_SUCCESS) {
      last = std::string("engine config ") + std::to_string(i) + ": " + cudnnGetErrorString(s);
      continue;
    }
    std::unique_ptr<Plan> plan(new Plan());
    std::int64_t n = 0;
    DSTRAIN_CUDNN_CHECK(cudnnBackendGetAttribute(candidate->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                                 CUDNN_TYPE_INT64, 1, &n, &plan->workspace_bytes_));
    plan->graph_ = graph;
    plan->engine_config_ = std::make_unique<Descriptor>(std::move(configs[static_cast<std::size_t>(i)]));
    plan->plan_ = std::move(candidate);
    plans.push_back(std::move(plan));
  }
  if (plans.empty() && why_not)
    *why_not = "no execution plan among " + std::to_string(returned) + " engine configs (" + last + ")";
  return plans;
}

void Plan::execute(cudnnHandle_t handle, const std::vector<std::int64_t>& uids, const std::vector<void*>& pointers,
                   void* workspace) const {
  DSTRAIN_CHECK(uids.size() == pointers.size(), "cudnn graph: one pointer per tensor");
  Descriptor pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, static_cast<std::int64_t>(uids.size()), uids.data())
      .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, static_cast<std::int64_t>(pointers.size()),
           pointers.data())
      .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace)
      .finalize("variant pack");
  DSTRAIN_CUDNN_CHECK(cudnnBackendExecute(handle, plan_->get(), pack.get()));
}

}  // namespace dstrain::kernels::cudnn_graph

namespace dstrain::kernels::cudnn_graph {

TunedPlan::TunedPlan(std::vector<std::unique_ptr<Plan>> candidates) : candidates_(std::move(candidates)) {
  DSTRAIN_CHECK(!candidates_.empty(), "cudnn graph: a tuned plan needs at least one candidate");
  for (const auto& c : candidates_) workspace_bytes_ = std::max(workspace_bytes_, c->workspace_bytes());
  if (candidates_.size() == 1) chosen_.store(0);
}

void TunedPlan::execute(cudnnHandle_t handle, cudaStream_t stream, const std::vector<std::int64_t>& uids,
                        const std::vector<void*>& pointers, void* workspace) {
  if (chosen_.load() < 0 && capturing(stream)) {
    // Inside a CUDA graph capture nothing can be timed: the heuristic's first plan, untimed and
    // not remembered, so that a later run outside the capture still tunes.
    candidates_.front()->execute(handle, uids, pointers, workspace);
    return;
  }
  tune(handle, stream, uids, pointers, workspace);
  candidates_[static_cast<std::size_t>(chosen_.load())]->execute(handle, uids, pointers, workspace);
}

float time_calls_ms(cudaStream_t stream, int runs, const std::function<void()>& fn) {
  int device = 0;
  DSTRAIN_CUDA_CHECK(cudaGetDevice(&device));
  Event start = Event::create(device), stop = Event::create(device);
  fn();
  start.record(stream);
  for (int r = 0; r < runs; ++r) fn();
  stop.record(stream);
  stop.synchronize();
  return stop.elapsed_ms(start);
}

void TunedPlan::tune(cudnnHandle_t handle, cudaStream_t stream, const std::vector<std::int64_t>& uids,
                     const std::vector<void*>& pointers, void* workspace) {
  if (chosen_.load() >= 0) return;
  std::lock_guard<std::mutex> lock(tune_mutex_);
  if (chosen_.load() >= 0) return;
  float best = -1.0f;
  int best_index = 0;
  for (std::size_t i = 0; i < candidates_.size(); ++i) {
    const float ms = time_calls_ms(stream, 3, [&] { candidates_[i]->execute(handle, uids, pointers, workspace); });
    if (best < 0.0f || ms < best) {
      best = ms;
      best_index = static_cast<int>(i);
    }
  }
  chosen_.store(best_index);
}

}  // namespace dstrain::kernels::cudnn_graph
