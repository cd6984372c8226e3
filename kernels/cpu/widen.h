// The CPU path of fp16 / bf16: widen inputs to fp32, run the fp32 reference, round each output
// once. Shared by libdstrain/src/ops.cpp and the CPU kernels that take low-precision tensors.
#pragma once
#include <cstddef>

#include "dstrain/dtype.h"
#include "dstrain/tensor.h"

namespace dstrain::kernels::cpu {

// An fp32 tensor with t's values: a view when t is fp32 already, else a widened copy.
inline Tensor widened(const Tensor& t) {
  if (t.dtype() == DType::F32) return Tensor::wrap(const_cast<void*>(t.data()), t.shape(), DType::F32, t.device());
  Tensor f = Tensor::empty(t.shape(), DType::F32, t.device());
  convert_host(t.data(), t.dtype(), f.data(), DType::F32, static_cast<std::size_t>(t.numel()));
  return f;
}

// Where the fp32 reference writes an output: t itself when fp32, else a scratch tensor to be
// rounded into t afterwards.
inline Tensor f32_output(Tensor& t) {
  if (t.dtype() == DType::F32) return Tensor::wrap(t.data(), t.shape(), DType::F32, t.device());
  return Tensor::empty(t.shape(), DType::F32, t.device());
}

}  // namespace dstrain::kernels::cpu
