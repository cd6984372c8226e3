#include "dstrain/device.h"

#include "kernels/cuda_api.h"

namespace dstrain {

std::string Device::str() const {
  return kind == DeviceKind::Cuda ? "cuda:" + std::to_string(index) : std::string("cpu");
}

int cuda_device_count() { return kernels::cuda_device_count(); }
bool cuda_available() { return cuda_device_count() > 0; }

}  // namespace dstrain
