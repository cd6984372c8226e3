// 2-D convolution (cross-correlation) on NHWC activations and KRSC filters (all fp32, or all
// fp16, or all bf16). fp16 and bf16 run as cuDNN graphs where conv_graphs.h offers a plan (its
// heuristics find faster kernels); fp32, deterministic mode, unaligned views and the rest go
// through cuDNN's legacy convolution API (cudnnConvolutionForward / BackwardData / BackwardFilter),
// which cuDNN 9 still ships (deprecated, hence the local warning suppression).
//
// Math: CUDNN_FMA_MATH. On Ampere and later, CUDNN_DEFAULT_MATH lets fp32 convolutions run on
// TF32 tensor cores (10-bit mantissa inputs); FMA_MATH restricts cuDNN to true fp32 kernels,
// which is what PyTorch selects when TF32 is disabled, so results match the CPU reference.
// fp16 and bf16 use CUDNN_TENSOR_OP_MATH with fp32 accumulation (compute type FLOAT), as
// PyTorch's autocast does.
//
// Algorithms come from cuDNN's heuristics (cudnnGet*Algorithm_v7: no benchmarking, no host
// synchronisation), once per (device, op, shape, params). The plan (descriptors + the ranked
// list of algorithms that fit) lives in a process-wide cache guarded by a mutex; descriptors are
// immutable once built, so several contexts may share a plan. If cuDNN refuses the chosen
// algorithm at launch (a NOT_SUPPORTED status), the next candidate is tried and remembered.
#include <cuda_runtime.h>
#include <cudnn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "conv_graphs.h"
#include "cuda_state.h"
#include "implicit_gemm_conv.h"
#include "ops_cuda.h"

#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
#ifdef __NVCC_DIAG_PRAGMA_SUPPORT__
#pragma nv_diag_suppress 1444  // "declared deprecated"
#pragma nv_diag_suppress 1215
#endif

namespace dstrain::kernels::cuda {

namespace {

constexpr std::size_t kMaxConvWorkspace = std::size_t(512) << 20;

enum class ConvOp : int { Forward = 0, BackwardData = 1, BackwardFilter = 2 };

const char* op_name(ConvOp op) {
  switch (op) {
    case ConvOp::Forward: return "conv2d_forward";
    case ConvOp::BackwardData: return "conv2d_backward_data";
    default: return "conv2d_backward_filter";
  }
}

struct ConvShape {
  int N, H, W, C, K, R, S, Ho, Wo;
};

struct Candidate {
  int algo;
  std::size_t workspace;
};

struct ConvPlan {
  cudnnTensorDescriptor_t x = nullptr;  // [N, C, H, W] in NHWC
  cudnnTensorDescriptor_t y = nullptr;  // [N, K, Ho, Wo] in NHWC
  cudnnFilterDescriptor_t w = nullptr;  // [K, C, R, S] in NHWC (KRSC)
  cudnnConvolutionDescriptor_t conv = nullptr;
  std::vector<Candidate> candidates;  // heuristic order
  std::atomic<std::size_t> current{0};

  ConvPlan() = default;
  ConvPlan(const ConvPlan&) = delete;
  ConvPlan& operator=(const ConvPlan&) = delete;
  ~ConvPlan() {
    if (conv) cudnnDestroyConvolutionDescriptor(conv);
    if (w) cudnnDestroyFilterDescriptor(w);
    if (y) cudnnDestroyTensorDescriptor(y);
    if (x) cudnnDestroyTensorDescriptor(x);
  }
};

using PlanKey = std::array<std::int64_t, 16>;

std::mutex& plan_mutex() {
  static std::mutex m;
  return m;
}
// Never destroyed: plans may be in use until process exit, and cuDNN may be unloaded first.
std::map<PlanKey, std::unique_ptr<ConvPlan>>& plan_cache() {
  static auto* cache = new std::map<PlanKey, std::unique_ptr<ConvPlan>>();
  return *cache;
}

// Statuses after which another algorithm may still work (cuDNN 9 groups codes by category).
bool worth_another_algorithm(cudnnStatus_t s) {
  const int category = CUDNN_STATUS_CATEGORY(static_cast<int>(s));
  return category == static_cast<int>(CUDNN_STATUS_NOT_SUPPORTED) ||
         category == static_cast<int>(CUDNN_STATUS_BAD_PARAM);
}

bool fp32_math(cudnnMathType_t m) { return m == CUDNN_FMA_MATH || m == CUDNN_DEFAULT_MATH; }

// fp16 / bf16 data may use tensor cores; fp32 data only true fp32 kernels (no TF32).
bool math_allowed(cudnnMathType_t m, DType dt) { return dt != DType::F32 || fp32_math(m); }

cudnnDataType_t cudnn_type(DType dt) {
  switch (dt) {
    case DType::F32: return CUDNN_DATA_FLOAT;
    case DType::F16: return CUDNN_DATA_HALF;
    case DType::BF16: return CUDNN_DATA_BFLOAT16;
    default:
      DSTRAIN_THROW(ErrorCode::InvalidArgument, std::string("conv2d: dtype ") + dtype_name(dt) + " is not supported");
  }
}

int to_int(std::int64_t v, const char* what) {
  DSTRAIN_CHECK(v >= 0 && v <= 0x7fffffff, std::string("conv2d: ") + what + " does not fit in an int");
  return static_cast<int>(v);
}

ConvShape shape_of(const Tensor& x_or_dx, const Tensor& w_or_dw, const Tensor& y_or_dy) {
  ConvShape s;
  s.N = to_int(x_or_dx.dim(0), "N");
  s.H = to_int(x_or_dx.dim(1), "H");
  s.W = to_int(x_or_dx.dim(2), "W");
  s.C = to_int(x_or_dx.dim(3), "C");
  s.K = to_int(w_or_dw.dim(0), "K");
  s.R = to_int(w_or_dw.dim(1), "R");
  s.S = to_int(w_or_dw.dim(2), "S");
  s.Ho = to_int(y_or_dy.dim(1), "Ho");
  s.Wo = to_int(y_or_dy.dim(2), "Wo");
  return s;
}

void build_descriptors(ConvPlan& plan, const ConvShape& s, const ops::Conv2dParams& p, DType dt) {
  const cudnnDataType_t data = cudnn_type(dt);
  DSTRAIN_CUDNN_CHECK(cudnnCreateTensorDescriptor(&plan.x));
  DSTRAIN_CUDNN_CHECK(cudnnCreateTensorDescriptor(&plan.y));
  DSTRAIN_CUDNN_CHECK(cudnnCreateFilterDescriptor(&plan.w));
  DSTRAIN_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&plan.conv));
  DSTRAIN_CUDNN_CHECK(
      cudnnSetTensor4dDescriptor(plan.x, CUDNN_TENSOR_NHWC, data, s.N, s.C, s.H, s.W));
  DSTRAIN_CUDNN_CHECK(
      cudnnSetTensor4dDescriptor(plan.y, CUDNN_TENSOR_NHWC, data, s.N, s.K, s.Ho, s.Wo));
  DSTRAIN_CUDNN_CHECK(
      cudnnSetFilter4dDescriptor(plan.w, data, CUDNN_TENSOR_NHWC, s.K, s.C, s.R, s.S));
  DSTRAIN_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(plan.conv, p.pad_h, p.pad_w, p.stride_h, p.stride_w, 1, 1,
                                                      CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
  DSTRAIN_CUDNN_CHECK(
      cudnnSetConvolutionMathType(plan.conv, dt == DType::F32 ? CUDNN_FMA_MATH : CUDNN_TENSOR_OP_MATH));
  int n = 0, c = 0, h = 0, w = 0;
  DSTRAIN_CUDNN_CHECK(cudnnGetConvolution2dForwardOutputDim(plan.conv, plan.x, plan.w, &n, &c, &h, &w));
  DSTRAIN_CHECK(n == s.N && c == s.K && h == s.Ho && w == s.Wo,
                "conv2d: cuDNN's output shape [" + std::to_string(n) + "," + std::to_string(h) + "," +
                    std::to_string(w) + "," + std::to_string(c) + "] differs from the tensor's");
}

// Ranked candidates from cuDNN's heuristics: supported, true fp32, workspace within bounds,
// each algorithm once.
// With deterministic algorithms on, only those cuDNN reports as deterministic.
template <class Perf, class WsFn>
void add_candidates(ConvPlan& plan, const std::vector<Perf>& perf, int returned, WsFn workspace_of,
                    bool deterministic_only, DType dt) {
  for (int i = 0; i < returned; ++i) {
    const Perf& r = perf[static_cast<std::size_t>(i)];
    if (r.status != CUDNN_STATUS_SUCCESS || !math_allowed(r.mathType, dt)) continue;
    if (deterministic_only && r.determinism != CUDNN_DETERMINISTIC) continue;
    const int algo = static_cast<int>(r.algo);
    bool seen = false;
    for (const Candidate& c : plan.candidates) seen = seen || c.algo == algo;
    if (seen) continue;
    std::size_t ws = 0;
    if (!workspace_of(r.algo, &ws)) continue;
    if (ws > kMaxConvWorkspace) continue;
    plan.candidates.push_back({algo, ws});
  }
}

std::unique_ptr<ConvPlan> build_plan(CudaState& st, ConvOp op, const ConvShape& s, const ops::Conv2dParams& p,
                                     bool det, DType dt) {
  auto plan = std::make_unique<ConvPlan>();
  build_descriptors(*plan, s, p, dt);
  cudnnHandle_t h = st.cudnn;
  int max_count = 0, returned = 0;
  switch (op) {
    case ConvOp::Forward: {
      DSTRAIN_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithmMaxCount(h, &max_count));
      std::vector<cudnnConvolutionFwdAlgoPerf_t> perf(static_cast<std::size_t>(std::max(max_count, 1)));
      DSTRAIN_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(h, plan->x, plan->w, plan->conv, plan->y,
                                                                 static_cast<int>(perf.size()), &returned,
                                                                 perf.data()));
      add_candidates(*plan, perf, returned, [&](cudnnConvolutionFwdAlgo_t a, std::size_t* ws) {
        return cudnnGetConvolutionForwardWorkspaceSize(h, plan->x, plan->w, plan->conv, plan->y, a, ws) ==
               CUDNN_STATUS_SUCCESS;
      }, det, dt);
      break;
    }
    case ConvOp::BackwardData: {
      DSTRAIN_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithmMaxCount(h, &max_count));
      std::vector<cudnnConvolutionBwdDataAlgoPerf_t> perf(static_cast<std::size_t>(std::max(max_count, 1)));
      DSTRAIN_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithm_v7(h, plan->w, plan->y, plan->conv, plan->x,
                                                                      static_cast<int>(perf.size()), &returned,
                                                                      perf.data()));
      add_candidates(*plan, perf, returned, [&](cudnnConvolutionBwdDataAlgo_t a, std::size_t* ws) {
        return cudnnGetConvolutionBackwardDataWorkspaceSize(h, plan->w, plan->y, plan->conv, plan->x, a, ws) ==
               CUDNN_STATUS_SUCCESS;
      }, det, dt);
      break;
    }
    case ConvOp::BackwardFilter: {
      DSTRAIN_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(h, &max_count));
      std::vector<cudnnConvolutionBwdFilterAlgoPerf_t> perf(static_cast<std::size_t>(std::max(max_count, 1)));
      DSTRAIN_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, plan->x, plan->y, plan->conv, plan->w,
                                                                        static_cast<int>(perf.size()), &returned,
                                                                        perf.data()));
      add_candidates(*plan, perf, returned, [&](cudnnConvolutionBwdFilterAlgo_t a, std::size_t* ws) {
        return cudnnGetConvolutionBackwardFilterWorkspaceSize(h, plan->x, plan->y, plan->conv, plan->w, a, ws) ==
               CUDNN_STATUS_SUCCESS;
      }, det, dt);
      break;
    }
  }
  if (plan->candidates.empty())
    DSTRAIN_THROW(ErrorCode::Cudnn, std::string(op_name(op)) + ": cuDNN offers no " + dtype_name(dt) +
                                        (dt == DType::F32 ? " (FMA)" : "") +
                                        (det ? " deterministic" : "") + " algorithm for N=" + std::to_string(s.N) +
                                        " H=" + std::to_string(s.H) + " W=" + std::to_string(s.W) +
                                        " C=" + std::to_string(s.C) + " K=" + std::to_string(s.K) +
                                        " R=" + std::to_string(s.R) + " S=" + std::to_string(s.S));
  return plan;
}


// `aligned`: whether every tensor is 16-byte aligned. Views into flat buffers (DataParallel's
// gradients) may not be, and some cuDNN engines refuse such pointers: separate plans keep the
// algorithm of the common, aligned case.
ConvPlan& get_plan(CudaState& st, ConvOp op, const ConvShape& s, const ops::Conv2dParams& p, bool aligned,
                   DType dt) {
  const PlanKey key{st.device, static_cast<int>(op), s.N, s.H, s.W, s.C, s.K, s.R, s.S,
                    p.stride_h, p.stride_w, p.pad_h, p.pad_w, aligned ? 1 : 0, ops::deterministic() ? 1 : 0,
                    static_cast<std::int64_t>(dt)};
  {
    std::lock_guard<std::mutex> lock(plan_mutex());
    auto it = plan_cache().find(key);
    if (it != plan_cache().end()) return *it->second;
  }
  std::unique_ptr<ConvPlan> plan = build_plan(st, op, s, p, key[14] != 0, dt);  // outside the lock: may take a while
  std::lock_guard<std::mutex> lock(plan_mutex());
  auto ins = plan_cache().emplace(key, std::move(plan));  // another thread may have won: keep its plan
  return *ins.first->second;
}

// Runs `launch(algo, workspace, bytes)` with the plan's current algorithm, moving on to the next
// candidate when cuDNN refuses one at launch (not supported / bad parameter for this algorithm).
template <class Launch>
void run_plan(CudaState& st, ConvPlan& plan, ConvOp op, Launch launch) {
  cudnnStatus_t last = CUDNN_STATUS_NOT_SUPPORTED;
  for (std::size_t i = plan.current.load(); i < plan.candidates.size(); ++i) {
    const Candidate& c = plan.candidates[i];
    void* ws = c.workspace > 0 ? st.ensure_workspace(c.workspace) : nullptr;
    last = launch(c.algo, ws, c.workspace);
    if (last == CUDNN_STATUS_SUCCESS) {
      if (i != plan.current.load()) plan.current.store(i);
      return;
    }
    if (!worth_another_algorithm(last)) break;
  }
  detail::throw_error(ErrorCode::Cudnn, std::string(op_name(op)) + " failed: " + cudnnGetErrorString(last),
                      __FILE__, __LINE__, static_cast<long>(last));
}

// Runs the op as a cuDNN graph when conv_graphs.h offers a plan; false: use the legacy API.
bool run_graph(CudaState& st, ConvGraph kind, const Tensor& x, const Tensor& w, const Tensor& y,
               const ops::Conv2dParams& p) {
  cudnn_graph::TunedPlan* plan = conv_graph_plan(st, kind, x, w, y, p, {x.data(), w.data(), y.data()});
  if (plan == nullptr) return false;
  void* ws = plan->workspace_bytes() > 0 ? st.ensure_workspace(static_cast<std::size_t>(plan->workspace_bytes()))
                                         : nullptr;
  plan->execute(st.cudnn, st.cuda_stream(), {kUidX, kUidW, kUidY},
                {const_cast<void*>(x.data()), const_cast<void*>(w.data()), const_cast<void*>(y.data())}, ws);
  return true;
}

}  // namespace

void conv2d_forward(Context& ctx, const Tensor& x, const Tensor& w, Tensor& y, const ops::Conv2dParams& p) {
  if (y.numel() == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  if (x.numel() == 0 || w.numel() == 0) {  // C == 0: an empty sum
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(y.data(), 0, y.nbytes(), st.cuda_stream()));
    return;
  }
  auto with_cudnn = [&] {
    if (run_graph(st, ConvGraph::Forward, x, w, y, p)) return;
    const ConvShape s = shape_of(x, w, y);
    ConvPlan& plan =
        get_plan(st, ConvOp::Forward, s, p, aligned16(x.data()) && aligned16(w.data()) && aligned16(y.data()),
                 x.dtype());
    const float alpha = 1.0f, beta = 0.0f;
    run_plan(st, plan, ConvOp::Forward, [&](int algo, void* ws, std::size_t bytes) {
      return cudnnConvolutionForward(st.cudnn, &alpha, plan.x, x.data(), plan.w, w.data(), plan.conv,
                                     static_cast<cudnnConvolutionFwdAlgo_t>(algo), ws, bytes, &beta, plan.y,
                                     y.data());
    });
  };
  // Where our implicit GEMM applies (Hopper, fp16/bf16, stride 1, C and K multiples of 64) it
  // competes with cuDNN; a 1x1 convolution is also a GEMM for cuBLASLt (which falls back to cuDNN
  // where it does not apply). The fastest for the shape is kept. In deterministic mode cuDNN's
  // deterministic choice stands.
  const bool own = implicit_gemm_forward_applies(st.device, x, w, y, p, false);
  auto with_own = [&] { implicit_gemm_forward(st, x, w, y, p); };
  if (pointwise_conv_applies(x, w, p) && !ops::deterministic()) {
    auto with_lt = [&] {
      if (!pointwise_conv_gemm(st, x, w, nullptr, y)) with_cudnn();
    };
    std::vector<Way> ways{{"cuBLASLt", with_lt}, {"cuDNN", with_cudnn}};
    if (own) ways.push_back({"implicit GEMM", with_own});
    ways[fastest_way(st, Site::PointwiseForward, x, w, p, ways)].run();
    return;
  }
  run_cudnn_or_own(st, Site::Forward, x, w, p, own, with_cudnn, with_own);
}

void conv2d_backward_data(Context& ctx, const Tensor& dy, const Tensor& w, Tensor& dx,
                          const ops::Conv2dParams& p) {
  if (dx.numel() == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  if (dy.numel() == 0 || w.numel() == 0) {
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(dx.data(), 0, dx.nbytes(), st.cuda_stream()));
    return;
  }
  auto with_cudnn = [&] {
    if (run_graph(st, ConvGraph::BackwardData, dx, w, dy, p)) return;
    const ConvShape s = shape_of(dx, w, dy);
    ConvPlan& plan =
        get_plan(st, ConvOp::BackwardData, s, p, aligned16(dy.data()) && aligned16(w.data()) && aligned16(dx.data()),
                 dy.dtype());
    const float alpha = 1.0f, beta = 0.0f;
    run_plan(st, plan, ConvOp::BackwardData, [&](int algo, void* ws, std::size_t bytes) {
      return cudnnConvolutionBackwardData(st.cudnn, &alpha, plan.w, w.data(), plan.y, dy.data(), plan.conv,
                                          static_cast<cudnnConvolutionBwdDataAlgo_t>(algo), ws, bytes, &beta,
                                          plan.x, dx.data());
    });
  };
  // Stride 1 with C and K multiples of 64 on Hopper: our implicit GEMM on rotated filters competes.
  auto with_own = [&] { implicit_gemm_dgrad(st, dy, w, dx, p); };
  run_cudnn_or_own(st, Site::BackwardData, dx, w, p, implicit_gemm_dgrad_applies(st.device, dy, w, dx, p),
                   with_cudnn, with_own);
}

void conv2d_backward_filter(Context& ctx, const Tensor& x, const Tensor& dy, Tensor& dw,
                            const ops::Conv2dParams& p) {
  conv2d_backward_filter_on(ctx.cuda_state(), x, dy, dw, p);
}

void conv2d_backward(Context& ctx, const Tensor& x, const Tensor& dy, const Tensor& w, Tensor* dx, Tensor& dw,
                     const ops::Conv2dParams& p) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  run_gradients(
      st, Site::Gradients, x, w, p, [&](CudaState& s) { conv2d_backward_filter_on(s, x, dy, dw, p); },
      [&] {
        if (dx != nullptr) cuda::conv2d_backward_data(ctx, dy, w, *dx, p);
      });
}

void conv2d_backward_filter_on(CudaState& st, const Tensor& x, const Tensor& dy, Tensor& dw,
                               const ops::Conv2dParams& p) {
  if (dw.numel() == 0) return;
  DeviceGuard guard(st.device);
  if (x.numel() == 0 || dy.numel() == 0) {
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(dw.data(), 0, dw.nbytes(), st.cuda_stream()));
    return;
  }
  auto with_cudnn = [&] {
    if (run_graph(st, ConvGraph::BackwardFilter, x, dw, dy, p)) return;
    const ConvShape s = shape_of(x, dw, dy);
    ConvPlan& plan =
        get_plan(st, ConvOp::BackwardFilter, s, p,
                 aligned16(x.data()) && aligned16(dy.data()) && aligned16(dw.data()), x.dtype());
    const float alpha = 1.0f, beta = 0.0f;
    run_plan(st, plan, ConvOp::BackwardFilter, [&](int algo, void* ws, std::size_t bytes) {
      return cudnnConvolutionBackwardFilter(st.cudnn, &alpha, plan.x, x.data(), plan.y, dy.data(), plan.conv,
                                            static_cast<cudnnConvolutionBwdFilterAlgo_t>(algo), ws, bytes, &beta,
                                            plan.w, dw.data());
    });
  };
  // Stride 1 with C and K multiples of 64 on Hopper: our implicit GEMM competes.
  auto with_own = [&] { implicit_gemm_wgrad(st, x, dy, dw, p); };
  run_cudnn_or_own(st, Site::BackwardFilter, x, dw, p, implicit_gemm_wgrad_applies(st.device, x, dy, dw, p),
                   with_cudnn, with_own);
}

}  // namespace dstrain::kernels::cuda

#if defined(__GNUC__) || defined(__clang__)
#pragma GCC diagnostic pop
#endif
