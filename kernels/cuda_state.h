// CudaState: what a CUDA Context owns. Included only by CUDA translation units in kernels/.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <cstddef>
#include <cstdint>
#include <vector>

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
  // Set when a scratch buffer was handed out while the stream was being captured into a CUDA
  // graph: the graph holds its address, so growing it later keeps the old buffer (in `retired`,
  // freed with the state) instead of freeing it under the graph.
  bool scratch_in_graph = false;
  std::vector<void*> retired;
  // kZeroedAccumulatorBytes of device memory, zeroed when made, that every kernel using it leaves
  // zeroed again: accumulators that need no memset before each use (the implicit GEMM's
  // statistics finished in its last CTA). Null until first use.
  static constexpr std::size_t kZeroedAccumulatorBytes = 16384;
  void* zeroed_accumulators = nullptr;
  // A second stream on the same device for work independent of the main stream's (a layer's wgrad
  // beside its dgrad): its own scratch, the main state's handles (cuDNN's stream is switched to it
  // while it works). Made on first use by run_beside; null until then.
  CudaState* side = nullptr;
  bool owns_handles = true;  // false for a side state
  Event fork, join;          // main -> side before the side's work, side -> main after it

  cudaStream_t cuda_stream() const { return reinterpret_cast<cudaStream_t>(stream.handle()); }
  // Grows the workspace to at least `bytes` (synchronising the stream first when it reallocates).
  // While the stream is being captured into a CUDA graph a buffer cannot grow (that would need an
  // allocation and a synchronisation inside the capture): Unsupported, asking for a run of the
  // same work before the capture.
  void* ensure_workspace(std::size_t bytes);
  // The same for the activation scratch.
  void* ensure_activations(std::size_t bytes);
  // zeroed_accumulators, made on first use (Unsupported while the stream is being captured).
  void* ensure_zeroed_accumulators();
  // False only where ensure_zeroed_accumulators would refuse: not yet made, during a capture.
  bool zeroed_accumulators_available() const;
};

// The side state of `st` (made on first use), or null when DSTRAIN_SIDE_STREAM=0: then run_beside
// runs both parts on the main stream, one after the other.
CudaState* side_state(CudaState& st);

// Points the shared cuDNN handle at `to`'s stream for its lifetime, then back at `from`'s.
class CudnnStreamSwitch {
 public:
  CudnnStreamSwitch(const CudaState& from, const CudaState& to);
  ~CudnnStreamSwitch();
  CudnnStreamSwitch(const CudnnStreamSwitch&) = delete;
  CudnnStreamSwitch& operator=(const CudnnStreamSwitch&) = delete;

 private:
  const CudaState& from_;
};

// Makes the main stream wait for the side stream's work so far (also when unwinding: the side
// may still write buffers the caller frees or reuses).
class SideJoin {
 public:
  SideJoin(CudaState& st, CudaState& side) : st_(st), side_(side) {}
  ~SideJoin();
  SideJoin(const SideJoin&) = delete;
  SideJoin& operator=(const SideJoin&) = delete;

 private:
  CudaState& st_;
  CudaState& side_;
};

// side_work(CudaState&) on the side stream, after all work queued on st so far, while main_work()
// queues on st's stream; st's stream then waits for both. Where there is no side state, both run
// on st in turn.
template <class SideWork, class MainWork>
void run_beside(CudaState& st, SideWork side_work, MainWork main_work) {
  CudaState* side = side_state(st);
  if (side == nullptr) {
    side_work(st);
    main_work();
    return;
  }
  st.fork.record(st.stream.handle());
  st.fork.wait(side->stream.handle());
  SideJoin join(st, *side);
  {
    CudnnStreamSwitch on_side(st, *side);
    side_work(*side);
  }
  main_work();
}

// True while `stream` is being captured into a CUDA graph: nothing may be timed or synchronised,
// and no timed choice is made (the first way runs, untimed, and nothing is remembered).
bool capturing(cudaStream_t stream);

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
