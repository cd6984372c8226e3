// A small C++ layer over cuDNN's backend graph API (cudnn_graph.h): RAII descriptors, the
// builders dstrain's fused ops need, and an execution plan chosen by cuDNN's heuristics.
// Included only by CUDA translation units in kernels/.
//
// Graphs describe NHWC tensors with cuDNN's logical NCHW dimension order and NHWC strides.
// Plans share their Graph (cuDNN keeps references to its descriptors) and are immutable once
// built, so several threads may execute them.
#pragma once
#include <cuda_runtime.h>
#include <cudnn.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace dstrain::kernels::cudnn_graph {

class Descriptor {
 public:
  explicit Descriptor(cudnnBackendDescriptorType_t type);
  ~Descriptor();
  Descriptor(Descriptor&& other) noexcept;
  Descriptor& operator=(Descriptor&& other) noexcept;
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;

  cudnnBackendDescriptor_t get() const { return desc_; }

  // Each raises Error(Cudnn) naming the attribute when cuDNN refuses it.
  Descriptor& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, std::int64_t count,
                  const void* values);
  Descriptor& set_i64(cudnnBackendAttributeName_t name, std::int64_t v);
  Descriptor& set_i64s(cudnnBackendAttributeName_t name, const std::vector<std::int64_t>& v);
  Descriptor& set_dtype(cudnnBackendAttributeName_t name, cudnnDataType_t v);
  Descriptor& set_float(cudnnBackendAttributeName_t name, float v);
  Descriptor& set_desc(cudnnBackendAttributeName_t name, const Descriptor& d);
  // Raises Error(Cudnn) with `what` and cuDNN's status.
  Descriptor& finalize(const char* what);
  // For descriptors whose refusal only means "not supported here" (execution plans).
  cudnnStatus_t try_finalize();

 private:
  cudnnBackendDescriptor_t desc_ = nullptr;
};

// A tensor of a graph: NHWC strides for 4-D dims given as logical [N, C, H, W].
// Virtual tensors live only inside the fused kernel; they take no pointer at execution.
Descriptor tensor_nhwc(std::int64_t uid, cudnnDataType_t dtype, std::int64_t n, std::int64_t c, std::int64_t h,
                       std::int64_t w, bool is_virtual = false);
// A per-channel vector [1, C, 1, 1].
Descriptor tensor_channels(std::int64_t uid, cudnnDataType_t dtype, std::int64_t c, bool is_virtual = false);

// 2-D cross-correlation with fp32 accumulation.
Descriptor convolution(std::int64_t stride_h, std::int64_t stride_w, std::int64_t pad_h, std::int64_t pad_w);
Descriptor conv_forward_op(const Descriptor& x, const Descriptor& w, const Descriptor& y, const Descriptor& conv);
Descriptor conv_backward_data_op(const Descriptor& dy, const Descriptor& w, const Descriptor& dx,
                                 const Descriptor& conv);
Descriptor conv_backward_filter_op(const Descriptor& x, const Descriptor& dy, const Descriptor& dw,
                                   const Descriptor& conv);
// y = mode(x) or mode(x, alpha2 * b), computed in fp32.
Descriptor pointwise_op(cudnnPointwiseMode_t mode, const Descriptor& x, const Descriptor* b, const Descriptor& y,
                        float alpha2 = 1.0f);
// dx = dy where x > 0, else 0.
Descriptor relu_backward_op(const Descriptor& dy, const Descriptor& x, const Descriptor& dx);
// BatchNorm backward's weight terms from x, its saved mean / invstd, gamma and dy: dgamma, dbeta
// and the coefficients of dx = eq_dy * dy + eq_x * x + eq_bias (all per-channel fp32).
struct BnBackwardWeightTensors {
  const Descriptor *x, *mean, *invstd, *gamma, *dy, *dgamma, *dbeta, *eq_dy, *eq_x, *eq_bias;
};
Descriptor bn_backward_weights_op(const BnBackwardWeightTensors& t);
// Per-channel sum and sum of squares of x.
Descriptor genstats_op(const Descriptor& x, const Descriptor& sum, const Descriptor& sqsum);

// A finalized operation graph with its tensors and operations (cuDNN keeps references to them).
class Graph {
 public:
  // Null with `why_not` set when cuDNN refuses the graph.
  static std::shared_ptr<Graph> build(cudnnHandle_t handle, std::vector<Descriptor> tensors,
                                      std::vector<Descriptor> ops, std::string* why_not);
  const Descriptor& descriptor() const { return *graph_; }

 private:
  Graph() = default;
  std::vector<Descriptor> tensors_, ops_;
  std::unique_ptr<Descriptor> graph_;
};

class Plan {
 public:
  // Up to `max_plans` execution plans for the graph, in cuDNN's heuristic order (mode A), each
  // one that cuDNN finalizes for this device. Empty, with `why_not` set, when none does.
  static std::vector<std::unique_ptr<Plan>> build_all(cudnnHandle_t handle, const std::shared_ptr<Graph>& graph,
                                                      int max_plans, std::string* why_not);

  std::int64_t workspace_bytes() const { return workspace_bytes_; }
  // Runs on the handle's stream. `uids` and `pointers` pair each non-virtual tensor with its data.
  void execute(cudnnHandle_t handle, const std::vector<std::int64_t>& uids, const std::vector<void*>& pointers,
               void* workspace) const;

 private:
  Plan() = default;
  std::shared_ptr<Graph> graph_;
  std::unique_ptr<Descriptor> engine_config_, plan_;
  std::int64_t workspace_bytes_ = 0;
};

// Milliseconds `runs` back-to-back calls of `fn` take on `stream`, after one untimed call (CUDA
// events on the current device; waits for the stream). For choosing between variants on first use.
float time_calls_ms(cudaStream_t stream, int runs, const std::function<void()>& fn);

// The fastest of a graph's candidate plans, measured once on the first execution (a few runs
// each, timed with CUDA events on the stream, which is synchronised then), and used from then on.
// Outputs must be pure functions of the inputs (no accumulation), since every candidate writes them.
class TunedPlan {
 public:
  explicit TunedPlan(std::vector<std::unique_ptr<Plan>> candidates);
  std::int64_t workspace_bytes() const { return workspace_bytes_; }
  // Times the candidates unless done already (runs each a few times on these buffers).
  void tune(cudnnHandle_t handle, cudaStream_t stream, const std::vector<std::int64_t>& uids,
            const std::vector<void*>& pointers, void* workspace);
  // tune(), then one run of the chosen plan.
  void execute(cudnnHandle_t handle, cudaStream_t stream, const std::vector<std::int64_t>& uids,
               const std::vector<void*>& pointers, void* workspace);

 private:
  std::vector<std::unique_ptr<Plan>> candidates_;
  std::mutex tune_mutex_;
  std::atomic<int> chosen_{-1};
  std::int64_t workspace_bytes_ = 0;
};

}  // namespace dstrain::kernels::cudnn_graph
