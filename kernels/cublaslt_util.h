// What every cuBLASLt caller in kernels/ shares: RAII for the descriptors of one call, pointer
// alignment for the heuristic's minimum-alignment preferences, and the preference itself.
// Included only by CUDA translation units in kernels/.
#pragma once
#include <cublasLt.h>

#include <cstddef>
#include <cstdint>

#include "cuda_check.h"

namespace dstrain::kernels::cuda {

// Workspace offered to cuBLASLt's algorithms.
constexpr std::size_t kMaxLtWorkspace = std::size_t(32) << 20;

struct LtMatmulDesc {
  cublasLtMatmulDesc_t d = nullptr;
  LtMatmulDesc() = default;
  LtMatmulDesc(const LtMatmulDesc&) = delete;
  LtMatmulDesc& operator=(const LtMatmulDesc&) = delete;
  ~LtMatmulDesc() {
    if (d) cublasLtMatmulDescDestroy(d);
  }
};
struct LtLayout {
  cublasLtMatrixLayout_t l = nullptr;
  LtLayout() = default;
  LtLayout(const LtLayout&) = delete;
  LtLayout& operator=(const LtLayout&) = delete;
  ~LtLayout() {
    if (l) cublasLtMatrixLayoutDestroy(l);
  }
};
struct LtPreference {
  cublasLtMatmulPreference_t p = nullptr;
  LtPreference() = default;
  LtPreference(const LtPreference&) = delete;
  LtPreference& operator=(const LtPreference&) = delete;
  ~LtPreference() {
    if (p) cublasLtMatmulPreferenceDestroy(p);
  }
};

// The largest power of two up to 256 that divides the address.
inline int lt_alignment(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  int align = 256;
  while (align > 1 && (a % static_cast<std::uintptr_t>(align)) != 0) align /= 2;
  return align;
}

// Fills `pref` (empty): at most kMaxLtWorkspace of workspace, and algorithms that accept
// cuBLASLt's A, B and C/D at these alignments (bytes).
inline void lt_preference(LtPreference& pref, int align_a, int align_b, int align_cd) {
  DSTRAIN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.p));
  const std::uint64_t max_ws = kMaxLtWorkspace;
  DSTRAIN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                            &max_ws, sizeof(max_ws)));
  const std::uint32_t a = static_cast<std::uint32_t>(align_a), b = static_cast<std::uint32_t>(align_b),
                      cd = static_cast<std::uint32_t>(align_cd);
  DSTRAIN_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a, sizeof(a)));
  DSTRAIN_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &b, sizeof(b)));
  DSTRAIN_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &cd, sizeof(cd)));
  DSTRAIN_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &cd, sizeof(cd)));
}

}  // namespace dstrain::kernels::cuda
