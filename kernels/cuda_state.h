// CudaState: what a CUDA Context owns. Included only by CUDA translation units in kernels/.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <cstddef>
#include <cstdint>

#include "dstrain/device.h"

namespace dstrain::kernels {

struct CudaState {
  int device = 0;
  Stream stream;
  cudnnHandle_t cudnn = nullptr;
  cublasLtHandle_t cublaslt = nullptr;
  void* workspace = nullptr;  // shared scratch for cuDNN and cuBLASLt on this stream
  std::size_t workspace_bytes = 0;
  // Scratch of activation size for ops that must materialise an intermediate tensor while they
  // also call cuDNN (which may grow `workspace`): a chained layer's activated input, say.
  void* activations = nullptr;
  std::size_t activations_bytes = 0;

  cudaStream_t cuda_stream() const { return reinterpret_cast<cudaStream_t>(stream.handle()); }
  // Grows the workspace to at least `bytes` (synchronising the stream first when it reallocates).
  void* ensure_workspace(std::size_t bytes);
  // The same for the activation scratch.
  void* ensure_activations(std::size_t bytes);
};

// Multiprocessors of a device (asked once per device ordinal), for grids sized to the chip.
int sm_count(int device);

// Compute capability of a device as 10 * major + minor (asked once per device ordinal).
int compute_capability(int device);

// Whether dstrain's own kernels are launched overlapped with the kernel before them
// (overlapped_launch.cuh): on sm_90 and newer, unless DSTRAIN_OVERLAP_LAUNCHES=0 (for A/B timing).
bool overlap_launches(int device);

// True when p is 16-byte aligned: what the vectorised kernels, cuDNN's graph plans and the
// tensor memory accelerator need.
inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

}  // namespace dstrain::kernels
