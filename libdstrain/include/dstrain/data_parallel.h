// DataParallel: keeps the replicas of a model identical across ranks.
// Construction broadcasts rank 0's parameters and buffers (so every rank starts from the same
// state) and moves every gradient into one flat buffer, so that averaging all gradients is one
// fused AllReduce per step (NCCL on GPUs, MPI on the CPU). BatchNorm statistics stay per rank,
// as in PyTorch DDP.
#pragma once
#include <vector>

#include "dstrain/nn.h"
#include "dstrain/runtime.h"

namespace dstrain {

class DataParallel {
 public:
  DataParallel(Runtime& runtime, nn::Layer& model);
  // Sums the gradients of all ranks in place. Each rank's loss must already be scaled so that
  // the sum is the gradient of the global mean (grad_scale = 1 / global batch size); this keeps
  // shards of unequal size exact.
  void reduce_gradients();
  // Averages instead (equal shards, per-rank mean losses).
  void average_gradients();
  std::int64_t gradient_count() const { return flat_grads_.numel(); }
  Tensor& flat_gradients() { return flat_grads_; }

 private:
  void sync(ReduceOp op);
  Runtime& runtime_;
  Tensor flat_grads_;
};

}  // namespace dstrain
