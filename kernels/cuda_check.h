// Check macros for CUDA-side status codes; each raises dstrain::Error with the backend's code,
// its message and file:line. Included only by CUDA translation units.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <string>

#include "dstrain/error.h"

#define DSTRAIN_CUDA_CHECK(expr)                                                               \
  do {                                                                                         \
    cudaError_t dstrain_status_ = (expr);                                                      \
    if (dstrain_status_ != cudaSuccess)                                                        \
      ::dstrain::detail::throw_error(::dstrain::ErrorCode::Cuda,                               \
                                     std::string(#expr " failed: ") +                          \
                                         cudaGetErrorString(dstrain_status_),                  \
                                     __FILE__, __LINE__, static_cast<long>(dstrain_status_));  \
  } while (0)

#define DSTRAIN_CUDNN_CHECK(expr)                                                              \
  do {                                                                                         \
    cudnnStatus_t dstrain_status_ = (expr);                                                    \
    if (dstrain_status_ != CUDNN_STATUS_SUCCESS)                                               \
      ::dstrain::detail::throw_error(::dstrain::ErrorCode::Cudnn,                              \
                                     std::string(#expr " failed: ") +                          \
                                         cudnnGetErrorString(dstrain_status_),                 \
                                     __FILE__, __LINE__, static_cast<long>(dstrain_status_));  \
  } while (0)

#define DSTRAIN_CUBLAS_CHECK(expr)                                                             \
  do {                                                                                         \
    cublasStatus_t dstrain_status_ = (expr);                                                   \
    if (dstrain_status_ != CUBLAS_STATUS_SUCCESS)                                              \
      ::dstrain::detail::throw_error(::dstrain::ErrorCode::Cublas,                             \
                                     std::string(#expr " failed: status ") +                   \
                                         std::to_string(static_cast<int>(dstrain_status_)),    \
                                     __FILE__, __LINE__, static_cast<long>(dstrain_status_));  \
  } while (0)

// After a kernel launch: reports launch-configuration errors at once (not sticky faults).
#define DSTRAIN_CUDA_CHECK_LAUNCH() DSTRAIN_CUDA_CHECK(cudaGetLastError())
