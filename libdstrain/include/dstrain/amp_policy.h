// amp::Policy: which dtype each kind of op computes in, for mixed-precision training.
//   fp32(): everything in fp32 (the default; bit-identical to a network built without a policy).
//   fp16() / bf16(): convolutions, linear layers and activations stored in the low type (fp32
//   accumulation inside the ops); BatchNorm statistics and parameters, softmax/loss, reductions
//   and optimizer math stay fp32. Master weights and their gradients (Parameter::value / grad)
//   are fp32 in every policy: layers keep a low-precision working copy of their weights.
//   fp16 needs loss scaling (amp::GradScaler); bf16 has fp32's range and does not.
//   fp8_hybrid() ("fp8"): as bf16 for activations and BatchNorm; convolution forwards in FP8
//   (E4M3 input and filter, bf16 output, through amp::conv2d_forward_fp8) where cuDNN offers a
//   plan for the shape, else bf16, and their backward in bf16; FP8 for the linear layer's three
//   GEMMs: forward with input and weight in E4M3, backward with the output gradient in E5M2
//   ("hybrid"). Each FP8 tensor is scaled per tensor by delayed scaling (amp::Fp8Meta). No loss
//   scaling.
#pragma once
#include <string>

#include "dstrain/dtype.h"

namespace dstrain::amp {

enum class OpKind { Conv, Linear, Activation, BatchNorm, Loss, Reduction, Optimizer };

class Policy {
 public:
  Policy() = default;  // fp32
  static Policy fp32() { return Policy(DType::F32); }
  static Policy fp16() { return Policy(DType::F16); }
  static Policy bf16() { return Policy(DType::BF16); }
  static Policy fp8_hybrid() { return Policy(DType::BF16, /*fp8_linear=*/true); }
  // "fp32", "fp16", "bf16" or "fp8"; anything else raises InvalidArgument.
  static Policy parse(const std::string& name);

  // F8E4M3 for OpKind::Linear under fp8_hybrid() (its gradients go through E5M2).
  DType compute_dtype(OpKind kind) const;
  // The dtype activations are stored in (fp32 for fp32()).
  DType activation_dtype() const { return low_; }
  bool low_precision() const { return low_ != DType::F32; }
  bool needs_loss_scaling() const { return low_ == DType::F16; }
  bool fp8_linear() const { return fp8_linear_; }
  // Convolution forwards in FP8 (E4M3) where cuDNN offers it: under fp8_hybrid().
  bool fp8_conv_forward() const { return fp8_linear_; }
  const char* name() const { return fp8_linear_ ? "fp8" : dtype_name(low_); }

  bool operator==(const Policy& o) const { return low_ == o.low_ && fp8_linear_ == o.fp8_linear_; }
  bool operator!=(const Policy& o) const { return !(*this == o); }

 private:
  explicit Policy(DType low, bool fp8_linear = false) : low_(low), fp8_linear_(fp8_linear) {}
  DType low_ = DType::F32;
  bool fp8_linear_ = false;
};

}  // namespace dstrain::amp
