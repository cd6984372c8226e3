// Context: the device an op runs on, with its stream and library handles (cuDNN, cuBLASLt,
// workspace) for CUDA. Every op takes one. A CPU context is free to create.
#pragma once
#include <memory>

#include "dstrain/device.h"

namespace dstrain {

namespace kernels {
struct CudaState;
struct CudaStateDeleter {
  void operator()(CudaState* s) const noexcept;
};
}  // namespace kernels

class Context {
 public:
  static Context cpu();
  // Creates a stream and cuDNN/cuBLASLt handles on `device`.
  static Context cuda(int device);
  // CUDA if a GPU is visible, else the CPU.
  static Context for_device(Device device);

  ~Context();
  Context(Context&&) noexcept;
  Context& operator=(Context&&) noexcept;
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  Device device() const { return device_; }
  bool is_cuda() const { return device_.is_cuda(); }
  // The stream ops are issued on (nullptr for the CPU).
  StreamHandle stream() const;
  // Waits for all work issued on this context (no-op on the CPU).
  void synchronize() const;
  kernels::CudaState& cuda_state() const;  // CUDA contexts only

 private:
  Context() = default;
  Device device_{};
  std::unique_ptr<kernels::CudaState, kernels::CudaStateDeleter> cuda_;
};

}  // namespace dstrain
