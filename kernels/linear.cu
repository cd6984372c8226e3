// Linear layer on row-major tensors through cuBLASLt (CUBLAS_COMPUTE_32F: fp32 accumulation; fp32
// operands get true fp32, no TF32), and a small column-sum kernel for the bias gradient.
// Operands x, w, dy (and dx) are all fp32, or all fp16, or all bf16; y and dw may be fp32 with
// fp16/bf16 operands (logits and master-weight gradients stay fp32); biases are fp32.
//
// cuBLASLt is column-major. A row-major [R, C] matrix is, read column-major, its transpose
// [C, R] with leading dimension C, so each product is computed transposed:
//   forward   y[N,O] = x[N,I] w[O,I]^T  <=>  y^T[O,N] = op_T(w^T[I,O]) * x^T[I,N]      (m=O, n=N, k=I)
//   dx        dx[N,I] = dy[N,O] w[O,I]  <=>  dx^T[I,N] = w^T[I,O] * dy^T[O,N]           (m=I, n=N, k=O)
//   dw        dw[O,I] = dy^T[O,N] x[N,I] <=> dw^T[I,O] = x^T[I,N] * op_T(dy^T[O,N])    (m=I, n=O, k=N)
// The forward bias is cuBLASLt's BIAS epilogue (a vector over the m = O rows of y^T) when the
// bias pointer is 16-byte aligned, else a broadcast kernel after the product.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "conv_graphs.h"
#include "cublaslt_util.h"
#include "cuda_check.h"
#include "cuda_state.h"
#include "elem_types.cuh"
#include "ops_cuda.h"

namespace dstrain::kernels::cuda {

namespace {

struct GemmSpec {
  cublasOperation_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
  std::int64_t m = 0, n = 0, k = 0;
  std::int64_t lda = 0, ldb = 0, ldd = 0;
  const void* A = nullptr;
  const void* B = nullptr;
  void* D = nullptr;
  const void* bias = nullptr;  // length m, via the BIAS epilogue
  bool relu = false;            // with bias: the RELU_BIAS epilogue
  bool bias_f32 = false;        // the bias is fp32 whatever D's dtype (else it has D's dtype)
  cudaDataType_t ab_type = CUDA_R_32F;  // A and B
  cudaDataType_t d_type = CUDA_R_32F;
};

using AlgoKey =
    std::tuple<int, int, int, std::int64_t, std::int64_t, std::int64_t, int, int, int, int, int, int, int>;

cudaDataType_t lt_type(DType dt) {
  switch (dt) {
    case DType::F32: return CUDA_R_32F;
    case DType::F16: return CUDA_R_16F;
    case DType::BF16: return CUDA_R_16BF;
    default: unsupported_activation_dtype(dt, "linear");
  }
}
struct AlgoChoice {
  cublasLtMatmulAlgo_t algo;
  std::size_t workspace = 0;
};

std::mutex& algo_mutex() {
  static std::mutex m;
  return m;
}
std::map<AlgoKey, AlgoChoice>& algo_cache() {
  static auto* cache = new std::map<AlgoKey, AlgoChoice>();  // never destroyed: no teardown order issues
  return *cache;
}

// The algorithm for a new (shape, epilogue, types, alignments): the fastest of the heuristic's
// first few, timed on the caller's buffers (D is written, nothing else). The heuristic's first
// answer is often not the fastest: for a 64->256 1x1 convolution with the RELU_BIAS epilogue it
// took 40% longer than the best of its eight. In deterministic mode the first answer is taken
// untimed (the same choice every run); inside a CUDA graph capture too (not remembered there).
AlgoChoice choose_algo(CudaState& st, const GemmSpec& g, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t la,
                       cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t ld, int al_a, int al_b, int al_d) {
  LtPreference pref;
  lt_preference(pref, al_a, al_b, al_d);
  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
  int returned = 0;
  DSTRAIN_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(st.cublaslt, desc, la, lb, ld, ld, pref.p, kCandidates,
                                                      results, &returned));
  std::vector<AlgoChoice> offered;
  for (int i = 0; i < returned; ++i)
    if (results[i].state == CUBLAS_STATUS_SUCCESS) offered.push_back({results[i].algo, results[i].workspaceSize});
  const std::string product = std::to_string(g.m) + "x" + std::to_string(g.n) + "x" + std::to_string(g.k);
  if (offered.empty()) DSTRAIN_THROW(ErrorCode::Cublas, "cuBLASLt found no algorithm for a " + product + " product");
  if (offered.size() == 1 || ops::deterministic() || capturing(st.cuda_stream())) return offered[0];

  // Ten calls each: the candidates of a memory-bound product are often within a few percent, and
  // three calls of a 70 us product did not tell them apart reliably.
  constexpr int kRuns = 10;
  const float alpha = 1.0f, beta = 0.0f;
  std::size_t best = 0;
  float best_ms = -1.0f;
  std::string times;
  for (std::size_t i = 0; i < offered.size(); ++i) {
    void* ws = offered[i].workspace > 0 ? st.ensure_workspace(offered[i].workspace) : nullptr;
    bool ran = true;
    const float ms = cudnn_graph::time_calls_ms(st.cuda_stream(), kRuns, [&] {
      ran = ran && cublasLtMatmul(st.cublaslt, desc, &alpha, g.A, la, g.B, lb, &beta, g.D, ld, g.D, ld,
                                  &offered[i].algo, ws, offered[i].workspace, st.cuda_stream()) ==
                       CUBLAS_STATUS_SUCCESS;
    });
    times += (times.empty() ? "" : " / ") + (ran ? std::to_string(ms / kRuns) : std::string("failed"));
    if (ran && (best_ms < 0.0f || ms < best_ms)) {
      best_ms = ms;
      best = i;
    }
  }
  if (best_ms < 0.0f) DSTRAIN_THROW(ErrorCode::Cublas, "no cuBLASLt algorithm ran for a " + product + " product");
  if (choices_logged())
    detail::log_warning("choice cuBLASLt algorithm for " + product +
                        (g.bias == nullptr ? "" : g.relu ? " RELU_BIAS" : " BIAS") + ": heuristic order " + times +
                        " ms; took #" + std::to_string(best));
  return offered[best];
}

// D = op(A) * op(B) (+ bias), fp32 compute, beta = 0 (D is not read).
void lt_gemm(CudaState& st, const GemmSpec& g) {
  LtMatmulDesc desc;
  DSTRAIN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc.d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  DSTRAIN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.d, CUBLASLT_MATMUL_DESC_TRANSA, &g.ta, sizeof(g.ta)));
  DSTRAIN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.d, CUBLASLT_MATMUL_DESC_TRANSB, &g.tb, sizeof(g.tb)));
  const cublasLtEpilogue_t epilogue = g.bias == nullptr ? CUBLASLT_EPILOGUE_DEFAULT
                                      : g.relu          ? CUBLASLT_EPILOGUE_RELU_BIAS
                                                        : CUBLASLT_EPILOGUE_BIAS;
  DSTRAIN_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(desc.d, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  if (g.bias != nullptr) {
    const void* bias = g.bias;
    DSTRAIN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(desc.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    if (g.bias_f32) {
      const cudaDataType_t bias_type = CUDA_R_32F;
      DSTRAIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc.d, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                                          sizeof(bias_type)));
    }
  }

  // Stored shapes (before op): A is m x k (N) or k x m (T); B is k x n (N) or n x k (T).
  const std::uint64_t a_rows = g.ta == CUBLAS_OP_N ? g.m : g.k, a_cols = g.ta == CUBLAS_OP_N ? g.k : g.m;
  const std::uint64_t b_rows = g.tb == CUBLAS_OP_N ? g.k : g.n, b_cols = g.tb == CUBLAS_OP_N ? g.n : g.k;
  LtLayout la, lb, ld;
  DSTRAIN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la.l, g.ab_type, a_rows, a_cols, g.lda));
  DSTRAIN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb.l, g.ab_type, b_rows, b_cols, g.ldb));
  DSTRAIN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&ld.l, g.d_type, g.m, g.n, g.ldd));

  const int al_a = lt_alignment(g.A), al_b = lt_alignment(g.B), al_d = lt_alignment(g.D);
  const AlgoKey key{st.device, static_cast<int>(g.ta), static_cast<int>(g.tb), g.m, g.n, g.k,
                    static_cast<int>(epilogue), al_a, al_b, al_d, g.bias != nullptr ? lt_alignment(g.bias) : 0,
                    static_cast<int>(g.ab_type), static_cast<int>(g.d_type)};
  AlgoChoice choice{};
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(algo_mutex());
    auto it = algo_cache().find(key);
    if (it != algo_cache().end()) {
      choice = it->second;
      found = true;
    }
  }
  if (!found) {
    choice = choose_algo(st, g, desc.d, la.l, lb.l, ld.l, al_a, al_b, al_d);
    // An untimed choice made inside a CUDA graph capture is not remembered: a later run times.
    if (!capturing(st.cuda_stream())) {
      std::lock_guard<std::mutex> lock(algo_mutex());
      algo_cache().emplace(key, choice);
    }
  }

  void* ws = choice.workspace > 0 ? st.ensure_workspace(choice.workspace) : nullptr;
  const float alpha = 1.0f, beta = 0.0f;
  DSTRAIN_CUBLAS_CHECK(cublasLtMatmul(st.cublaslt, desc.d, &alpha, g.A, la.l, g.B, lb.l, &beta, g.D, ld.l, g.D,
                                      ld.l, &choice.algo, ws, choice.workspace, st.cuda_stream()));
}

// y[rows, out] = x[rows, in] * w[out, in]^T for row-major tensors: in cuBLASLt's column-major
// terms D[out, rows] = op(w) * x, with w transposed.
GemmSpec x_times_w_transposed(const Tensor& x, const Tensor& w, Tensor& y, std::int64_t rows, std::int64_t in,
                              std::int64_t out) {
  GemmSpec g;
  g.ta = CUBLAS_OP_T;
  g.tb = CUBLAS_OP_N;
  g.m = out;
  g.n = rows;
  g.k = in;
  g.A = w.data();
  g.lda = in;
  g.B = x.data();
  g.ldb = in;
  g.D = y.data();
  g.ldd = out;
  g.ab_type = lt_type(x.dtype());
  g.d_type = lt_type(y.dtype());
  return g;
}

// y[r, o] += b[o] for a row-major [rows, cols] y.
template <class T>
__global__ void add_bias_kernel(T* __restrict__ y, const float* __restrict__ b, std::int64_t rows,
                                std::int64_t cols) {
  const std::int64_t total = rows * cols;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    y[i] = store_f<T>(load_f(y[i]) + b[i % cols]);
}

constexpr int kColX = 32, kColY = 16;

// db[o] = sum over rows of dy[r, o]. Block (32, 16) owns 32 columns and sums all rows.
template <class T>
__global__ void column_sum_kernel(const T* __restrict__ dy, float* __restrict__ db, std::int64_t rows,
                                  std::int64_t cols) {
  __shared__ float part[kColY][kColX];
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * kColX + threadIdx.x;
  float acc = 0.0f;
  if (c < cols)
    for (std::int64_t r = threadIdx.y; r < rows; r += kColY) acc += load_f(dy[r * cols + c]);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < kColY; ++j) s += part[j][threadIdx.x];
    db[c] = s;
  }
}

int grid_for(std::int64_t n, int threads) {
  return static_cast<int>(std::clamp<std::int64_t>((n + threads - 1) / threads, 1, 4096));
}


void add_bias(const Tensor& b, Tensor& y, std::int64_t rows, std::int64_t cols, cudaStream_t s) {
  DSTRAIN_DISPATCH_ACT_DTYPE(y.dtype(), "linear bias", {
    add_bias_kernel<T><<<grid_for(rows * cols, 256), 256, 0, s>>>(y.data_as<T>(), b.data_as<float>(), rows, cols);
  });
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

}  // namespace

bool pointwise_conv_applies(const Tensor& x, const Tensor& w, const ops::Conv2dParams& p) {
  return x.dtype() != DType::F32 && w.dim(1) == 1 && w.dim(2) == 1 && p.stride_h == 1 && p.stride_w == 1 &&
         p.pad_h == 0 && p.pad_w == 0 && x.numel() > 0 && w.numel() > 0;
}

namespace {

template <class T>
__global__ void bias_to_dtype_kernel(const float* __restrict__ b, T* __restrict__ out, std::int64_t n) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = store_f<T>(b[i]);
}

}  // namespace

bool pointwise_conv_gemm(CudaState& st, const Tensor& x, const Tensor& w, const Tensor* bias_relu, Tensor& y) {
  const std::int64_t C = x.dim(3), K = w.dim(0), rows = x.numel() / C;
  GemmSpec g = x_times_w_transposed(x, w, y, rows, C, K);  // y[rows, K] = x[rows, C] * w[K, C]^T
  // Variants cuBLASLt refused once (no algorithm) are not asked again: 0 no bias, 1 an fp32 bias,
  // 2 a bias in y's dtype.
  using RefusedKey = std::tuple<int, std::int64_t, std::int64_t, std::int64_t, int, int>;
  static auto* refused = new std::map<RefusedKey, bool>();
  static std::mutex refused_mutex;
  auto attempt = [&](int variant) {
    const RefusedKey key{st.device, rows, K, C, static_cast<int>(x.dtype()), variant};
    {
      std::lock_guard<std::mutex> lock(refused_mutex);
      if (refused->count(key) != 0) return false;
    }
    try {
      lt_gemm(st, g);
    } catch (const Error& e) {
      if (e.code() != ErrorCode::Cublas) throw;
      std::lock_guard<std::mutex> lock(refused_mutex);
      // An fp32 bias with a 16-bit output is refused by the cuBLASLt releases seen so far: an
      // expected step, said only when choices are logged.
      if (refused->emplace(key, true).second && (variant != 1 || choices_logged()))
        detail::log_warning(std::string("1x1 convolution as a cuBLASLt GEMM (") +
                            (variant == 0 ? "no bias" : variant == 1 ? "fp32 bias + ReLU" : "bias + ReLU") +
                            "): " + e.what() +
                            (variant == 1 ? "; trying the bias in the output's dtype" : "; cuDNN is used"));
      return false;
    }
    return true;
  };
  if (bias_relu == nullptr) return attempt(0);
  g.relu = true;
  g.bias = bias_relu->data();
  g.bias_f32 = bias_relu->dtype() == DType::F32;
  if (!g.bias_f32) return attempt(2);  // already in y's dtype
  if (attempt(1)) return true;
  // A bias in y's dtype (cuBLASLt's default for 16-bit outputs), converted into the activation
  // scratch (not the workspace, which the GEMM may grow).
  void* low_bias = st.ensure_activations(static_cast<std::size_t>(K) * dtype_size(y.dtype()));
  DSTRAIN_DISPATCH_ACT_DTYPE(y.dtype(), "conv_bias_relu bias", {
    bias_to_dtype_kernel<T><<<static_cast<unsigned>((K + 255) / 256), 256, 0, st.cuda_stream()>>>(
        bias_relu->data_as<float>(), static_cast<T*>(low_bias), K);
  });
  DSTRAIN_CUDA_CHECK_LAUNCH();
  g.bias = low_bias;
  g.bias_f32 = false;
  return attempt(2);
}

void linear_forward(Context& ctx, const Tensor& x, const Tensor& w, const Tensor* b, Tensor& y) {
  const std::int64_t N = x.dim(0), I = x.dim(1), O = w.dim(0);
  if (N == 0 || O == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  if (I == 0) {  // empty sum: y = b (or 0)
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(y.data(), 0, y.nbytes(), st.cuda_stream()));
    if (b != nullptr) add_bias(*b, y, N, O, st.cuda_stream());
    return;
  }
  // The epilogue's bias has D's dtype: an fp32 bias fits an fp32 y only.
  const bool bias_epilogue = b != nullptr && aligned16(b->data()) && y.dtype() == DType::F32;
  GemmSpec g = x_times_w_transposed(x, w, y, N, I, O);
  g.bias = bias_epilogue ? b->data() : nullptr;
  lt_gemm(st, g);
  if (b != nullptr && !bias_epilogue) add_bias(*b, y, N, O, st.cuda_stream());
}

void linear_backward(Context& ctx, const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx, Tensor& dw,
                     Tensor* db) {
  const std::int64_t N = x.dim(0), I = x.dim(1), O = w.dim(0);
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  cudaStream_t s = st.cuda_stream();

  if (dx != nullptr && N > 0 && I > 0) {
    if (O == 0) {
      DSTRAIN_CUDA_CHECK(cudaMemsetAsync(dx->data(), 0, dx->nbytes(), s));
    } else {
      GemmSpec g;
      g.ta = CUBLAS_OP_N;
      g.tb = CUBLAS_OP_N;
      g.m = I;
      g.n = N;
      g.k = O;
      g.A = w.data();
      g.lda = I;
      g.B = dy.data();
      g.ldb = O;
      g.D = dx->data();
      g.ldd = I;
      g.ab_type = lt_type(dy.dtype());
      g.d_type = lt_type(dx->dtype());
      lt_gemm(st, g);
    }
  }

  if (O > 0 && I > 0) {
    if (N == 0) {
      DSTRAIN_CUDA_CHECK(cudaMemsetAsync(dw.data(), 0, dw.nbytes(), s));
    } else {
      GemmSpec g;
      g.ta = CUBLAS_OP_N;
      g.tb = CUBLAS_OP_T;
      g.m = I;
      g.n = O;
      g.k = N;
      g.A = x.data();
      g.lda = I;
      g.B = dy.data();
      g.ldb = O;
      g.D = dw.data();
      g.ldd = I;
      g.ab_type = lt_type(x.dtype());
      g.d_type = lt_type(dw.dtype());
      lt_gemm(st, g);
    }
  }

  if (db != nullptr && O > 0) {
    const dim3 block(kColX, kColY);
    const std::int64_t blocks = (O + kColX - 1) / kColX;
    DSTRAIN_CHECK(blocks <= 0x7fffffff, "linear_backward: too many outputs");
    DSTRAIN_DISPATCH_ACT_DTYPE(dy.dtype(), "linear_backward", {
      column_sum_kernel<T><<<static_cast<unsigned>(blocks), block, 0, s>>>(dy.data_as<T>(), db->data_as<float>(), N,
                                                                           O);
    });
    DSTRAIN_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace dstrain::kernels::cuda
