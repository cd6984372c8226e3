// CPU reference of ReLU, fp32. NaN propagates forward, as torch.relu does.
#include <cstdint>

#include "ops_cpu.h"

namespace dstrain::kernels::cpu {

void relu_forward(Context&, const Tensor& x, Tensor& y) {
  const float* xp = x.data_as<float>();
  float* yp = y.data_as<float>();
  const std::int64_t n = x.numel();
  // x < 0 is false for NaN, so NaN passes through.
  for (std::int64_t i = 0; i < n; ++i) yp[i] = xp[i] < 0.0f ? 0.0f : xp[i];
}

void relu_backward(Context&, const Tensor& dy, const Tensor& y, Tensor& dx) {
  const float* dyp = dy.data_as<float>();
  const float* yp = y.data_as<float>();
  float* dxp = dx.data_as<float>();
  const std::int64_t n = dy.numel();
  for (std::int64_t i = 0; i < n; ++i) dxp[i] = yp[i] > 0.0f ? dyp[i] : 0.0f;
}

}  // namespace dstrain::kernels::cpu
