// SGD step with momentum, Nesterov and weight decay, elementwise on fp32 (PyTorch semantics,
// dampening 0; see dstrain/ops.h). momentum_buf is neither read nor written when momentum is 0.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_check.h"
#include "cuda_state.h"
#include "ops_cuda.h"
#include "sgd_math.cuh"

namespace dstrain::kernels::cuda {

namespace {

constexpr int kThreads = 256;

int grid_for(std::int64_t n) {
  const std::int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::clamp<std::int64_t>(blocks, 1, 4096));
}


template <bool kMomentum>
__global__ void sgd_kernel(float* param, const float* grad, float* buf, std::int64_t n, std::int64_t n4,
                           SgdArgs a) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t tid = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float4* p4 = reinterpret_cast<float4*>(param);
  const float4* g4 = reinterpret_cast<const float4*>(grad);
  float4* b4 = reinterpret_cast<float4*>(buf);
  for (std::int64_t i = tid; i < n4; i += stride) {
    float4 p = p4[i];
    const float4 g = g4[i];
    float4 b = kMomentum ? b4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    sgd1<kMomentum>(p.x, g.x, b.x, a);
    sgd1<kMomentum>(p.y, g.y, b.y, a);
    sgd1<kMomentum>(p.z, g.z, b.z, a);
    sgd1<kMomentum>(p.w, g.w, b.w, a);
    p4[i] = p;
    if (kMomentum) b4[i] = b;
  }
  for (std::int64_t i = 4 * n4 + tid; i < n; i += stride) {
    float p = param[i];
    float b = kMomentum ? buf[i] : 0.0f;
    sgd1<kMomentum>(p, grad[i], b, a);
    param[i] = p;
    if (kMomentum) buf[i] = b;
  }
}

}  // namespace

void sgd_step(Context& ctx, Tensor& param, const Tensor& grad, Tensor& momentum_buf,
              const ops::SgdParams& p) {
  const std::int64_t n = param.numel();
  if (n == 0) return;
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  const SgdArgs a{p.lr, p.momentum, p.weight_decay, p.nesterov};
  float* pp = param.data_as<float>();
  const float* gp = grad.data_as<float>();
  if (p.momentum != 0.0f) {
    float* bp = momentum_buf.data_as<float>();
    const std::int64_t n4 = (aligned16(pp) && aligned16(gp) && aligned16(bp)) ? n / 4 : 0;
    sgd_kernel<true><<<grid_for(std::max<std::int64_t>(n4, n - 4 * n4)), kThreads, 0, st.cuda_stream()>>>(
        pp, gp, bp, n, n4, a);
  } else {
    const std::int64_t n4 = (aligned16(pp) && aligned16(gp)) ? n / 4 : 0;
    sgd_kernel<false><<<grid_for(std::max<std::int64_t>(n4, n - 4 * n4)), kThreads, 0, st.cuda_stream()>>>(
        pp, gp, nullptr, n, n4, a);
  }
  DSTRAIN_CUDA_CHECK_LAUNCH();
}

}  // namespace dstrain::kernels::cuda
