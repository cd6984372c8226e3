// The CUDA runtime services the core library needs, behind plain C++ declarations so that
// libdstrain/src never includes a CUDA header. Implemented in kernels/cuda_runtime.cpp, or by
// kernels/cpu/no_cuda.cpp (raising Unsupported) in a build without CUDA.
#pragma once
#include <cstddef>

#include "dstrain/device.h"

namespace dstrain::kernels {

struct CudaState;  // stream, cuDNN and cuBLASLt handles, workspace: see cuda_state.h

int cuda_device_count() noexcept;  // 0 when no driver or device
void* device_malloc(std::size_t bytes, int device);
void device_free(void* p) noexcept;
// Blocking copy; either side may be host or device memory (unified addressing).
void memcpy_any(void* dst, const void* src, std::size_t bytes);
void device_memset(void* dst, int byte, std::size_t bytes);
// Copy ordered on `stream` (host memory may be pageable: the call returns once it can be reused).
void memcpy_async(void* dst, const void* src, std::size_t bytes, StreamHandle stream);
void* host_pinned_malloc(std::size_t bytes);
void host_pinned_free(void* p) noexcept;

CudaState* create_cuda_state(int device);
void destroy_cuda_state(CudaState* s) noexcept;
StreamHandle cuda_state_stream(const CudaState* s);

}  // namespace dstrain::kernels
