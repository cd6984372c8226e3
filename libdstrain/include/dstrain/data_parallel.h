// DataParallel: keeps the replicas of a model identical across ranks.
// Construction broadcasts rank 0's parameters and buffers (so every rank starts from the same
// state) and moves every gradient into one flat buffer. BatchNorm statistics stay per rank, as
// in PyTorch DDP.
//
// Two ways to synchronise gradients:
//  - after backward: reduce_gradients() / average_gradients(), one AllReduce over the whole buffer;
//  - overlapped with backward: pass grad_ready_hook() to nn::Sequential::backward and call
//    finish() before the optimizer step. The flat buffer is laid out in reverse parameter order
//    (the order backward produces gradients) and cut into buckets (first 1 MiB, then 25 MiB, as
//    PyTorch DDP); a bucket's AllReduce starts as soon as its last gradient is reported. On a GPU
//    it runs on a communication stream of its own, ordered after the compute stream with events
//    (no device-wide sync); on the CPU it runs at once on the calling thread, because MPI
//    collectives there are blocking and the CPU is busy with backward anyway.
//
//   dstrain::DataParallel ddp(rt, model, {.bucket_mb = 25, .compression = dstrain::GradCompression::Bf16});
//   model.backward(ctx, dlogits, ddp.grad_ready_hook());
//   ddp.finish();      // every bucket reduced; the compute stream waits for them
//   opt.step(ctx);
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "dstrain/nn.h"
#include "dstrain/runtime.h"

namespace dstrain {

enum class GradCompression { None, Fp16, Bf16 };

struct BucketOptions {
  double bucket_mb = 25.0;       // MiB of fp32 gradients per bucket
  double first_bucket_mb = 1.0;  // the first bucket (last layers) is small so it starts early
  // Reduce each bucket in fp16/bf16 (cast, AllReduce, cast back): half the traffic, rounding
  // error of the low-precision type.
  GradCompression compression = GradCompression::None;
  // false: sum over ranks (the loss is already scaled by 1 / global batch, as reduce_gradients);
  // true: average (per-rank mean losses over equal shards, as average_gradients).
  bool average = false;
};

// A contiguous slice of the flat gradient buffer.
struct GradientBucket {
  std::int64_t offset = 0;  // in elements
  std::int64_t numel = 0;
  std::vector<nn::Parameter*> params;  // in the order they sit in the bucket (reverse model order)
};

class DataParallel {
 public:
  DataParallel(Runtime& runtime, nn::Layer& model, const BucketOptions& options = {});
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // Sums the gradients of all ranks in place, one AllReduce over the whole buffer. Each rank's
  // loss must already be scaled so that the sum is the gradient of the global mean
  // (grad_scale = 1 / global batch size); this keeps shards of unequal size exact.
  void reduce_gradients();
  // Averages instead (equal shards, per-rank mean losses).
  void average_gradients();

  // Overlapped path. Reports that p's gradient is written (on the compute stream); when it is
  // the last of its bucket the bucket's AllReduce starts (buckets start in index order, so all
  // ranks issue the same collectives in the same order).
  void grad_ready(nn::Parameter& p);
  // The callback for nn::Sequential::backward(ctx, dy, hook). Valid while this object lives.
  std::function<void(nn::Parameter&)> grad_ready_hook();
  // Starts any bucket not yet started, makes the compute stream wait for all of them, and ends
  // the step. A parameter reported twice, never reported, or not of this model raises
  // InvalidArgument naming it (after every bucket was reduced, so ranks stay in step).
  void finish();

  std::int64_t gradient_count() const { return flat_grads_.numel(); }
  Tensor& flat_gradients() { return flat_grads_; }
  const BucketOptions& options() const { return options_; }
  const std::vector<GradientBucket>& buckets() const { return buckets_; }
  // Bucket indices in the order their AllReduce started during the last finished step.
  const std::vector<int>& last_issue_order() const { return last_issue_order_; }
  // Per bucket: when its AllReduce was issued, in microseconds relative to the finish() call
  // of the last step (negative: while backward was still running, i.e. overlapped).
  const std::vector<double>& last_issue_offsets_us() const { return last_issue_offsets_us_; }

  struct CommState;  // comm stream, events and scratch (CUDA only)

 private:
  void sync(ReduceOp op);
  void start_bucket(int b);
  void reset_step();

  Runtime& runtime_;
  BucketOptions options_;
  Tensor flat_grads_;
  Tensor scratch_;  // low-precision copy of flat_grads_ when compressing
  std::vector<nn::Parameter*> params_;  // model order
  std::unordered_map<const nn::Parameter*, std::size_t> index_of_;
  std::vector<int> bucket_of_param_;    // by model order index
  std::vector<GradientBucket> buckets_;
  std::unique_ptr<CommState> comm_state_;

  // Per step.
  std::vector<int> reports_;           // by model order index
  std::vector<int> pending_in_bucket_;
  std::vector<char> bucket_started_;
  int next_bucket_ = 0;
  std::vector<std::string> unknown_params_;
  std::vector<int> issue_order_;
  std::vector<double> issue_times_us_;
  std::vector<int> last_issue_order_;
  std::vector<double> last_issue_offsets_us_;
};

}  // namespace dstrain
