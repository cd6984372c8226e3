// CPU reference of PyTorch's SGD step (dampening 0), fp32.
#include <cstdint>

#include "ops_cpu.h"

namespace dstrain::kernels::cpu {

void sgd_step(Context&, Tensor& param, const Tensor& grad, Tensor& momentum_buf,
              const ops::SgdParams& p) {
  float* w = param.data_as<float>();
  const float* g = grad.data_as<float>();
  const std::int64_t n = param.numel();
  const float lr = p.lr, wd = p.weight_decay, mom = p.momentum;
  if (mom == 0.0f) {
    // PyTorch keeps no buffer without momentum; momentum_buf is left untouched.
    for (std::int64_t i = 0; i < n; ++i) w[i] -= lr * (g[i] + wd * w[i]);
    return;
  }
  float* buf = momentum_buf.data_as<float>();
  if (p.nesterov) {
    for (std::int64_t i = 0; i < n; ++i) {
      const float gi = g[i] + wd * w[i];
      buf[i] = mom * buf[i] + gi;
      w[i] -= lr * (gi + mom * buf[i]);
    }
  } else {
    for (std::int64_t i = 0; i < n; ++i) {
      const float gi = g[i] + wd * w[i];
      buf[i] = mom * buf[i] + gi;
      w[i] -= lr * buf[i];
    }
  }
}

}  // namespace dstrain::kernels::cpu
