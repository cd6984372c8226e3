// Programmatic dependent launch (sm_90 and newer) for dstrain's own kernels: a kernel launched
// this way may start while the kernel before it on the stream drains, so that its launch and block
// start-up overlap that kernel's tail instead of following it. Every kernel launched so calls
// wait_then_release_next_kernel() before it touches global memory.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace dstrain::kernels {

// Waits until the previous kernel on the stream has finished and its writes are visible, then lets
// the next kernel launch. Releasing early is safe: the next kernel waits here for this one's
// results in turn, and it can be scheduled only once every block of this one has started.
__device__ __forceinline__ void wait_then_release_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// `kernel` on `stream`, overlapped with the previous kernel's tail when `overlap` (see
// overlap_launches in cuda_state.h); the launch's own error, if any.
template <class... Params, class... Args>
cudaError_t launch_overlapped(bool overlap, cudaStream_t stream, void (*kernel)(Params...), dim3 grid, dim3 block,
                              std::size_t shared_bytes, Args... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = overlap ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

}  // namespace dstrain::kernels
