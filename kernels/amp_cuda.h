// CUDA implementations of dstrain::amp: multi-tensor kernels in kernels/amp.cu, cuBLASLt GEMMs
// in kernels/fp8_gemm.cu. All work is issued on ctx.stream(), asynchronously.
#pragma once
#include <vector>

#include "dstrain/amp.h"

namespace dstrain::kernels::cuda {
#include "amp_list.inc"
}  // namespace dstrain::kernels::cuda
