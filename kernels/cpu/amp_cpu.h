// CPU references of dstrain::amp (kernels/cpu/amp.cpp): what every CUDA kernel of kernels/amp.cu
// and kernels/fp8_gemm.cu is tested against.
#pragma once
#include <vector>

#include "dstrain/amp.h"

namespace dstrain::kernels::cpu {
#include "../amp_list.inc"
}  // namespace dstrain::kernels::cpu
