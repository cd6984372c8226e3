// One element of PyTorch's SGD (dampening 0), shared by the per-tensor kernel (sgd.cu) and the
// fused multi-tensor optimizer (amp.cu): g = grad + wd * p; buf = momentum * buf + g;
// g = nesterov ? g + momentum * buf : buf; p -= lr * g.
#pragma once

namespace dstrain::kernels::cuda {

struct SgdArgs {
  float lr, momentum, weight_decay;
  bool nesterov;
};

template <bool kMomentum>
__device__ __forceinline__ void sgd1(float& p, float g, float& buf, const SgdArgs& a) {
  g = g + a.weight_decay * p;
  if (kMomentum) {
    buf = a.momentum * buf + g;
    g = a.nesterov ? g + a.momentum * buf : buf;
  }
  p = p - a.lr * g;
}

}  // namespace dstrain::kernels::cuda
