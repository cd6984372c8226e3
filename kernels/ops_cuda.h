// CUDA implementations of dstrain::ops, one file per op in kernels/<op>.cu (cuDNN for
// convolutions, cuBLASLt for linear layers). All work is issued on ctx.stream(), asynchronously.
#pragma once
#include "dstrain/ops.h"

namespace dstrain::kernels::cuda {
#include "op_list.inc"
}  // namespace dstrain::kernels::cuda
