// FP8 and BF16 GEMMs through cuBLASLt: d[M,N] = a_scale_inv * b_scale_inv * a[M,K] b[N,K]^T,
// row-major with both operands K-contiguous (dstrain/amp.h).
//
// cuBLASLt is column-major: row-major d[M,N] is d^T[N,M] column-major with ld N, and
// d^T = b * a^T where b (row-major [N,K]) is read as a column-major [K,N] matrix with ld K and
// transposed, and a (row-major [M,K]) is a column-major [K,M] with ld K, not transposed. That is
// the "TN" layout (transa = T, transb = N) that FP8 needs on Hopper; cuBLASLt's A is our b and
// its B is our a, so A_SCALE_POINTER takes b's inverse scale and B_SCALE_POINTER a's.
//
// Scales are device scalars (CUBLASLT_MATMUL_DESC_{A,B}_SCALE_POINTER), so delayed scaling needs
// no host read. The amax of d comes from CUBLASLT_MATMUL_DESC_AMAX_D_POINTER when cuBLASLt offers
// an algorithm with it for the output type, else from a reduction kernel after the product.
// Algorithms come from cublasLtMatmulAlgoGetHeuristic, cached per shape, types and alignments.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "amp_cuda.h"
#include "cuda_check.h"
#include "cublaslt_util.h"
#include "cuda_state.h"

namespace dstrain::kernels::cuda {

namespace {

cudaDataType_t lt_type(DType dt) {
  switch (dt) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    case DType::F8E4M3: return CUDA_R_8F_E4M3;
    case DType::F8E5M2: return CUDA_R_8F_E5M2;
    default: DSTRAIN_THROW(ErrorCode::Unsupported, std::string("gemm: no cuBLASLt type for ") + dtype_name(dt));
  }
}

// device, dtypes a/b/d, M, N, K, fast accumulate, amax wanted, alignments a/b/d
using Key = std::tuple<int, int, int, int, std::int64_t, std::int64_t, std::int64_t, bool, bool, int, int, int>;
struct Choice {
  cublasLtMatmulAlgo_t algo;
  std::size_t workspace = 0;
  bool amax_in_lt = false;  // false: the amax kernel runs after the product
};

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}
std::map<Key, Choice>& cache() {
  static auto* c = new std::map<Key, Choice>();  // never destroyed: no teardown order issues
  return *c;
}

struct Problem {
  Problem() = default;
  Problem(const Problem&) = delete;
  Problem& operator=(const Problem&) = delete;
  LtMatmulDesc desc;
  LtLayout la, lb, lc, ld;
};

// Builds the descriptors; with_amax adds the AMAX_D pointer.
void describe(Problem& pr, const Tensor& a, const Tensor& b, Tensor& d, const amp::GemmOptions& o, bool fp8,
              bool with_amax) {
  const std::int64_t M = a.dim(0), K = a.dim(1), N = b.dim(0);
  DSTRAIN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&pr.desc.d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  DSTRAIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(pr.desc.d, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  DSTRAIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(pr.desc.d, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (fp8) {
    const void* lt_a_scale = o.b_scale_inv->data();  // cuBLASLt's A is our b
    const void* lt_b_scale = o.a_scale_inv->data();
    DSTRAIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(pr.desc.d, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                        &lt_a_scale, sizeof(lt_a_scale)));
    DSTRAIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(pr.desc.d, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                                        &lt_b_scale, sizeof(lt_b_scale)));
    const std::int8_t fast = o.fast_accumulate ? 1 : 0;
    DSTRAIN_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(pr.desc.d, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast)));
    if (with_amax) {
      void* amax = o.d_amax->data();
      DSTRAIN_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(pr.desc.d, CUBLASLT_MATMUL_DESC_AMAX_D_POINTER, &amax, sizeof(amax)));
    }
  }
  DSTRAIN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pr.la.l, lt_type(b.dtype()), static_cast<std::uint64_t>(K),
                                                  static_cast<std::uint64_t>(N), K));
  DSTRAIN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pr.lb.l, lt_type(a.dtype()), static_cast<std::uint64_t>(K),
                                                  static_cast<std::uint64_t>(M), K));
  // C is not read (beta = 0) but must be described: same type as D for bf16/fp32 outputs.
  DSTRAIN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pr.lc.l, lt_type(d.dtype()), static_cast<std::uint64_t>(N),
                                                  static_cast<std::uint64_t>(M), N));
  DSTRAIN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&pr.ld.l, lt_type(d.dtype()), static_cast<std::uint64_t>(N),
                                                  static_cast<std::uint64_t>(M), N));
}

// The first heuristic answer, or false when cuBLASLt offers none for these descriptors.
bool heuristic(CudaState& st, Problem& pr, int al_a, int al_b, int al_d, Choice& out) {
  LtPreference pref;
  lt_preference(pref, al_b, al_a, al_d);  // cuBLASLt's A is our b
  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(st.cublaslt, pr.desc.d, pr.la.l, pr.lb.l, pr.lc.l,
                                                               pr.ld.l, pref.p, 1, &result, &returned);
  // cuBLASLt answers INVALID_VALUE (not NOT_SUPPORTED) for some epilogue/type combinations it
  // does not offer, e.g. the amax of a bf16 D: the caller then tries without that attribute.
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE) return false;
  DSTRAIN_CUBLAS_CHECK(status);
  if (returned < 1 || result.state != CUBLAS_STATUS_SUCCESS) return false;
  out.algo = result.algo;
  out.workspace = result.workspaceSize;
  return true;
}

template <class T> __device__ __forceinline__ float as_float(T v);
template <> __device__ __forceinline__ float as_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float as_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// amax = max |d| (NaN wins), by the float bits of |d| (ordered as the values for non-negative
// floats); *amax must be zeroed first.
template <class T>
__global__ void amax_kernel(const T* __restrict__ d, std::int64_t n, float* amax) {
  unsigned m = 0;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    m = max(m, __float_as_uint(as_float(d[i])) & 0x7FFFFFFFu);
  m = __reduce_max_sync(0xFFFFFFFFu, m);
  __shared__ unsigned warp_max[8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < static_cast<int>(blockDim.x >> 5) ? warp_max[lane] : 0u;
    m = __reduce_max_sync(0xFFFFFFFFu, m);
    if (lane == 0 && m != 0u) atomicMax(reinterpret_cast<unsigned*>(amax), m);
  }
}

}  // namespace

void amp_gemm_nt(Context& ctx, const Tensor& a, const Tensor& b, Tensor& d, const amp::GemmOptions& o) {
  const std::int64_t M = a.dim(0), K = a.dim(1), N = b.dim(0);
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  cudaStream_t s = st.cuda_stream();
  const bool fp8 = a.dtype() == DType::F8E4M3 || a.dtype() == DType::F8E5M2;
  const bool want_amax = fp8 && o.d_amax != nullptr;
  const int al_a = lt_alignment(a.data()), al_b = lt_alignment(b.data()), al_d = lt_alignment(d.data());
  const Key key{st.device,
                static_cast<int>(a.dtype()),
                static_cast<int>(b.dtype()),
                static_cast<int>(d.dtype()),
                M,
                N,
                K,
                fp8 && o.fast_accumulate,
                want_amax,
                al_a,
                al_b,
                al_d};

  Choice choice{};
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    auto it = cache().find(key);
    if (it != cache().end()) {
      choice = it->second;
      cached = true;
    }
  }
  auto pr = std::make_unique<Problem>();
  describe(*pr, a, b, d, o, fp8, want_amax && (!cached || choice.amax_in_lt));
  if (!cached) {
    bool found = heuristic(st, *pr, al_a, al_b, al_d, choice);
    choice.amax_in_lt = want_amax && found;
    if (!found && want_amax) {  // no algorithm with the amax epilogue: compute it separately
      pr = std::make_unique<Problem>();
      describe(*pr, a, b, d, o, fp8, false);
      found = heuristic(st, *pr, al_a, al_b, al_d, choice);
    }
    if (!found)
      DSTRAIN_THROW(ErrorCode::Cublas, std::string("cuBLASLt found no algorithm for a ") + dtype_name(a.dtype()) +
                                           " x " + dtype_name(b.dtype()) + " -> " + dtype_name(d.dtype()) + " " +
                                           std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K) +
                                           " product");
    std::lock_guard<std::mutex> lock(cache_mutex());
    cache().emplace(key, choice);
  }

  // Scale factors that are not 16-byte aligned (views into an Fp8Meta's state) are copied to the
  // end of the workspace first: cuBLASLt's sm_90 FP8 kernels refuse such scale pointers at launch.
  const bool scales_aligned =
      !fp8 || (lt_alignment(o.a_scale_inv->data()) >= 16 && lt_alignment(o.b_scale_inv->data()) >= 16);
  const std::size_t ws_bytes = (choice.workspace + 255) / 256 * 256;
  const std::size_t ws_total = ws_bytes + (scales_aligned ? 0 : 256);
  void* ws = ws_total > 0 ? st.ensure_workspace(ws_total) : nullptr;
  if (!scales_aligned) {
    auto* scales = static_cast<char*>(ws) + ws_bytes;
    void* lt_a_scale = scales;        // cuBLASLt's A is our b
    void* lt_b_scale = scales + 128;
    DSTRAIN_CUDA_CHECK(cudaMemcpyAsync(lt_a_scale, o.b_scale_inv->data(), sizeof(float), cudaMemcpyDeviceToDevice, s));
    DSTRAIN_CUDA_CHECK(cudaMemcpyAsync(lt_b_scale, o.a_scale_inv->data(), sizeof(float), cudaMemcpyDeviceToDevice, s));
    DSTRAIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(pr->desc.d, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &lt_a_scale,
                                                        sizeof(lt_a_scale)));
    DSTRAIN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(pr->desc.d, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &lt_b_scale,
                                                        sizeof(lt_b_scale)));
  }
  const float alpha = 1.0f, beta = 0.0f;
  DSTRAIN_CUBLAS_CHECK(cublasLtMatmul(st.cublaslt, pr->desc.d, &alpha, b.data(), pr->la.l, a.data(), pr->lb.l, &beta,
                                      d.data(), pr->lc.l, d.data(), pr->ld.l, &choice.algo, ws, choice.workspace, s));
  if (want_amax && !choice.amax_in_lt) {
    DSTRAIN_CUDA_CHECK(cudaMemsetAsync(o.d_amax->data(), 0, sizeof(float), s));
    const std::int64_t n = M * N;
    const int grid = static_cast<int>(std::clamp<std::int64_t>((n + 255) / 256, 1, 2048));
    if (d.dtype() == DType::F32)
      amax_kernel<float><<<grid, 256, 0, s>>>(d.data_as<float>(), n, o.d_amax->data_as<float>());
    else
      amax_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(static_cast<const __nv_bfloat16*>(d.data()), n,
                                                       o.d_amax->data_as<float>());
    DSTRAIN_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace dstrain::kernels::cuda
