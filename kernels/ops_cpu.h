// CPU (Eigen) implementations of dstrain::ops: the reference every CUDA op is tested against.
// One file per op in kernels/cpu/<op>.cpp. fp32 only unless an op says otherwise.
#pragma once
#include "dstrain/ops.h"

namespace dstrain::kernels::cpu {
#include "op_list.inc"
}  // namespace dstrain::kernels::cpu
