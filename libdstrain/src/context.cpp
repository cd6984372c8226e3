#include "dstrain/context.h"

#include "dstrain/error.h"
#include "kernels/cuda_api.h"

namespace dstrain {

void kernels::CudaStateDeleter::operator()(CudaState* s) const noexcept { destroy_cuda_state(s); }

Context Context::cpu() { return Context(); }

Context Context::cuda(int device) {
  const int count = kernels::cuda_device_count();
  if (device < 0 || device >= count)
    DSTRAIN_THROW(ErrorCode::InvalidArgument,
                  "CUDA device " + std::to_string(device) + " requested, " + std::to_string(count) + " visible");
  Context ctx;
  ctx.device_ = Device::cuda(device);
  ctx.cuda_.reset(kernels::create_cuda_state(device));
  return ctx;
}

Context Context::for_device(Device device) { return device.is_cuda() ? cuda(device.index) : cpu(); }

Context::~Context() = default;
Context::Context(Context&&) noexcept = default;
Context& Context::operator=(Context&&) noexcept = default;

StreamHandle Context::stream() const { return cuda_ ? kernels::cuda_state_stream(cuda_.get()) : nullptr; }

void Context::synchronize() const {
  if (!cuda_) return;
  Event done = Event::create(device_.index, /*timing=*/false);
  done.record(stream());
  done.synchronize();
}

kernels::CudaState& Context::cuda_state() const {
  if (!cuda_) DSTRAIN_THROW(ErrorCode::InvalidArgument, "cuda_state() on a CPU context");
  return *cuda_;
}

}  // namespace dstrain
