// amp::Policy: which dtype each kind of op computes in, for mixed-precision training.
//   fp32(): everything in fp32 (the default; bit-identical to a network built without a policy).
//   fp16() / bf16(): convolutions, linear layers and activations stored in the low type (fp32
//   accumulation inside the ops); BatchNorm statistics and parameters, softmax/loss, reductions
//   and optimizer math stay fp32. Master weights and their gradients (Parameter::value / grad)
//   are fp32 in every policy: layers keep a low-precision working copy of their weights.
//   fp16 needs loss scaling (amp::GradScaler); bf16 has fp32's range and does not.
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
  // "fp32", "fp16" or "bf16"; anything else raises InvalidArgument.
  static Policy parse(const std::string& name);

  DType compute_dtype(OpKind kind) const;
  // The dtype activations are stored in (fp32 for fp32()).
  DType activation_dtype() const { return low_; }
  bool low_precision() const { return low_ != DType::F32; }
  bool needs_loss_scaling() const { return low_ == DType::F16; }
  const char* name() const { return dtype_name(low_); }

  bool operator==(const Policy& o) const { return low_ == o.low_; }
  bool operator!=(const Policy& o) const { return low_ != o.low_; }

 private:
  explicit Policy(DType low) : low_(low) {}
  DType low_ = DType::F32;
};

}  // namespace dstrain::amp
