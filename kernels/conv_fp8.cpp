// FP8 convolution forward on sm_90: E4M3 x E4M3 through a cuDNN graph (conv_graphs.h,
// ConvGraph::ForwardFp8), fp32 accumulation, both descales applied in the epilogue, bf16 out.
// cuDNN offers FP8 convolutions only through its graph API.
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "amp_cuda.h"
#include "conv_graphs.h"
#include "cuda_check.h"
#include "cuda_state.h"

namespace dstrain::kernels::cuda {

bool amp_conv2d_forward_fp8(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& x_scale_inv,
                            const Tensor& w_scale_inv, Tensor& y, const ops::Conv2dParams& p) {
  CudaState& st = ctx.cuda_state();
  DeviceGuard guard(st.device);
  cudnn_graph::TunedPlan* plan = conv_graph_plan(st, ConvGraph::ForwardFp8, x, w, y, p, {x.data(), w.data(), y.data()});
  if (plan == nullptr) return false;
  // The descales may be views at any offset of an Fp8Meta's state: copied to 16-byte aligned
  // slots after the plan's workspace, as Hopper's FP8 kernels read them with vector loads.
  const std::size_t ws = (static_cast<std::size_t>(plan->workspace_bytes()) + 255) & ~std::size_t(255);
  char* base = static_cast<char*>(st.ensure_workspace(ws + 32));
  float* descale = reinterpret_cast<float*>(base + ws);
  cudaStream_t stream = st.cuda_stream();
  DSTRAIN_CUDA_CHECK(cudaMemcpyAsync(descale, x_scale_inv.data(), sizeof(float), cudaMemcpyDeviceToDevice, stream));
  DSTRAIN_CUDA_CHECK(
      cudaMemcpyAsync(descale + 4, w_scale_inv.data(), sizeof(float), cudaMemcpyDeviceToDevice, stream));
  plan->execute(st.cudnn, stream, {kUidX, kUidW, kUidY, kUidDescaleX, kUidDescaleW},
                {const_cast<void*>(x.data()), const_cast<void*>(w.data()), y.data(), descale, descale + 4},
                plan->workspace_bytes() > 0 ? base : nullptr);
  return true;
}

}  // namespace dstrain::kernels::cuda
