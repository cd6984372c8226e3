// CPU reference of global average pooling [N,H,W,C] -> [N,C], fp32 (sums in double).
#include <cstdint>
#include <vector>

#include "ops_cpu.h"

namespace dstrain::kernels::cpu {

void global_avgpool_forward(Context&, const Tensor& x, Tensor& y) {
  const std::int64_t N = x.dim(0), HW = x.dim(1) * x.dim(2), C = x.dim(3);
  const float* xp = x.data_as<float>();
  float* yp = y.data_as<float>();
  std::vector<double> acc(C);
  const double inv = HW > 0 ? 1.0 / static_cast<double>(HW) : 0.0;
  for (std::int64_t n = 0; n < N; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const float* xn = xp + n * HW * C;
    for (std::int64_t i = 0; i < HW; ++i) {
      const float* xr = xn + i * C;
      for (std::int64_t c = 0; c < C; ++c) acc[c] += xr[c];
    }
    for (std::int64_t c = 0; c < C; ++c) yp[n * C + c] = static_cast<float>(acc[c] * inv);
  }
}

void global_avgpool_backward(Context&, const Tensor& dy, Tensor& dx) {
  const std::int64_t N = dx.dim(0), HW = dx.dim(1) * dx.dim(2), C = dx.dim(3);
  const float* dyp = dy.data_as<float>();
  float* dxp = dx.data_as<float>();
  const float inv = HW > 0 ? static_cast<float>(1.0 / static_cast<double>(HW)) : 0.0f;
  for (std::int64_t n = 0; n < N; ++n) {
    const float* g = dyp + n * C;
    float* dxn = dxp + n * HW * C;
    for (std::int64_t i = 0; i < HW; ++i) {
      float* o = dxn + i * C;
      for (std::int64_t c = 0; c < C; ++c) o[c] = g[c] * inv;
    }
  }
}

}  // namespace dstrain::kernels::cpu
