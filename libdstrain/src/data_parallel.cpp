#include "dstrain/data_parallel.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <unordered_map>

#include "dstrain/error.h"
#include "dstrain/ops.h"

namespace dstrain {

namespace {

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::int64_t mib_to_elements(double mib) {
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(mib * 1024.0 * 1024.0 / sizeof(float)));
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

// On a GPU: a second context (own stream) on the same device for the AllReduces, and the events
// that order it against the compute stream.
struct DataParallel::CommState {
  Context ctx;
  Event grads_written;  // recorded on the compute stream when a bucket is complete
  Event comm_done;      // recorded on the comm stream at finish()
};

DataParallel::DataParallel(Runtime& runtime, nn::Layer& model, const BucketOptions& options)
    : runtime_(runtime), options_(options) {
  Communicator& comm = runtime.comm();
  Context& ctx = runtime.context();
  DSTRAIN_CHECK(options.bucket_mb > 0 && options.first_bucket_mb > 0,
                "DataParallel: bucket sizes must be positive, got bucket_mb " + std::to_string(options.bucket_mb) +
                    " first_bucket_mb " + std::to_string(options.first_bucket_mb));
  params_ = model.parameters();
  DSTRAIN_CHECK(!params_.empty(), "DataParallel over a model without parameters");
  std::int64_t total = 0;
  for (nn::Parameter* p : params_) {
    DSTRAIN_CHECK(p->value.device() == comm.device(),
                  "parameter " + p->name + " is on " + p->value.device().str() + " but the communicator works on " +
                      comm.device().str());
    DSTRAIN_CHECK(p->value.dtype() == DType::F32, "DataParallel: parameter " + p->name + " is not fp32");
    DSTRAIN_CHECK(index_of_.emplace(p, index_of_.size()).second, "DataParallel: parameter " + p->name + " listed twice");
    total += p->value.numel();
  }
  flat_grads_ = Tensor::zeros({total}, DType::F32, comm.device());

  // Reverse model order, cut as PyTorch DDP does: a bucket closes once it reaches its size.
  bucket_of_param_.assign(params_.size(), -1);
  auto* base = flat_grads_.data_as<float>();
  std::int64_t offset = 0;
  GradientBucket current;
  std::int64_t cap = mib_to_elements(options.first_bucket_mb);
  for (std::size_t k = params_.size(); k-- > 0;) {
    nn::Parameter* p = params_[k];
    p->grad = Tensor::wrap(base + offset, p->value.shape(), DType::F32, comm.device());
    if (current.params.empty()) current.offset = offset;
    current.params.push_back(p);
    current.numel += p->value.numel();
    bucket_of_param_[k] = static_cast<int>(buckets_.size());
    offset += p->value.numel();
    if (current.numel >= cap) {
      buckets_.push_back(std::move(current));
      current = GradientBucket();
      cap = mib_to_elements(options.bucket_mb);
    }
  }
  if (!current.params.empty()) buckets_.push_back(std::move(current));

  if (options.compression != GradCompression::None)
    scratch_ = Tensor::zeros({total}, options.compression == GradCompression::Fp16 ? DType::F16 : DType::BF16,
                             comm.device());
  if (comm.device().is_cuda()) {
    comm_state_ = std::make_unique<CommState>(CommState{Context::cuda(comm.device().index),
                                                        Event::create(comm.device().index, false),
                                                        Event::create(comm.device().index, false)});
  }

  for (nn::Parameter* p : params_) comm.broadcast(p->value, 0, ctx);
  for (Tensor* b : model.buffers()) comm.broadcast(*b, 0, ctx);
  ctx.synchronize();
  reset_step();
}

DataParallel::~DataParallel() {
  // An unfinished step may still have AllReduces on the comm stream that read the buffers.
  if (comm_state_) {
    try {
      comm_state_->ctx.synchronize();
    } catch (const std::exception& e) {
      detail::log_warning(std::string("DataParallel: waiting for the comm stream failed: ") + e.what());
    }
  }
}

void DataParallel::sync(ReduceOp op) {
  if (runtime_.world_size() == 1) return;
  runtime_.comm().allreduce(flat_grads_, op, runtime_.context());
}

void DataParallel::reduce_gradients() { sync(ReduceOp::Sum); }
void DataParallel::average_gradients() { sync(ReduceOp::Avg); }

void DataParallel::reset_step() {
  reports_.assign(params_.size(), 0);
  pending_in_bucket_.clear();
  for (const auto& b : buckets_) pending_in_bucket_.push_back(static_cast<int>(b.params.size()));
  bucket_started_.assign(buckets_.size(), 0);
  next_bucket_ = 0;
  unknown_params_.clear();
  issue_order_.clear();
  issue_times_us_.assign(buckets_.size(), 0.0);
}

std::function<void(nn::Parameter&)> DataParallel::grad_ready_hook() {
  return [this](nn::Parameter& p) { grad_ready(p); };
}

void DataParallel::grad_ready(nn::Parameter& p) {
  const auto it = index_of_.find(&p);
  if (it == index_of_.end()) {
    unknown_params_.push_back(p.name);
    return;
  }
  const std::size_t k = it->second;
  if (++reports_[k] > 1) return;  // reported twice: raised at finish()
  const int b = bucket_of_param_[k];
  if (--pending_in_bucket_[static_cast<std::size_t>(b)] > 0) return;
  // Buckets start in index order on every rank, whatever order they complete in.
  while (next_bucket_ < static_cast<int>(buckets_.size()) &&
         pending_in_bucket_[static_cast<std::size_t>(next_bucket_)] == 0)
    start_bucket(next_bucket_++);
}

void DataParallel::start_bucket(int b) {
  GradientBucket& bucket = buckets_[static_cast<std::size_t>(b)];
  bucket_started_[static_cast<std::size_t>(b)] = 1;
  issue_order_.push_back(b);
  issue_times_us_[static_cast<std::size_t>(b)] = now_us();
  // One rank still goes through the same steps (a copy for the communicator, rounding when
  // compressing), so a single-GPU run exercises and times the path of a multi-GPU one.
  Communicator& comm = runtime_.comm();
  Context* ctx = &runtime_.context();
  if (comm_state_) {
    // The comm stream starts once the compute stream has written this bucket's gradients.
    comm_state_->grads_written.record(runtime_.context().stream());
    comm_state_->grads_written.wait(comm_state_->ctx.stream());
    ctx = &comm_state_->ctx;
  }
  const ReduceOp op = options_.average ? ReduceOp::Avg : ReduceOp::Sum;
  Tensor slice = Tensor::wrap(flat_grads_.data_as<float>() + bucket.offset, {bucket.numel}, DType::F32,
                              flat_grads_.device());
  if (options_.compression == GradCompression::None) {
    comm.allreduce(slice, op, *ctx);
    return;
  }
  const std::size_t elem = dtype_size(scratch_.dtype());
  Tensor low = Tensor::wrap(static_cast<unsigned char*>(scratch_.data()) + static_cast<std::size_t>(bucket.offset) * elem,
                            {bucket.numel}, scratch_.dtype(), scratch_.device());
  ops::convert(*ctx, slice, low);
  comm.allreduce(low, op, *ctx);
  ops::convert(*ctx, low, slice);
}

void DataParallel::finish() {
  const double end_us = now_us();
  std::vector<std::string> missing, twice;
  for (std::size_t k = 0; k < params_.size(); ++k) {
    if (reports_[k] == 0) missing.push_back(params_[k]->name);
    if (reports_[k] > 1) twice.push_back(params_[k]->name);
  }
  // Every rank reduces every bucket, even after a reporting mistake, so that no rank is left
  // waiting in a collective the others never start.
  for (int b = next_bucket_; b < static_cast<int>(buckets_.size()); ++b) start_bucket(b);
  if (comm_state_) {
    comm_state_->comm_done.record(comm_state_->ctx.stream());
    comm_state_->comm_done.wait(runtime_.context().stream());
  }
  last_issue_order_ = issue_order_;
  last_issue_offsets_us_.assign(buckets_.size(), 0.0);
  for (std::size_t b = 0; b < buckets_.size(); ++b) last_issue_offsets_us_[b] = issue_times_us_[b] - end_us;
  std::vector<std::string> unknown = unknown_params_;
  reset_step();
  std::string problems;
  if (!missing.empty()) problems += " gradients never reported: " + join(missing) + ";";
  if (!twice.empty()) problems += " reported more than once: " + join(twice) + ";";
  if (!unknown.empty()) problems += " not parameters of this model: " + join(unknown) + ";";
  if (!problems.empty())
    DSTRAIN_THROW(ErrorCode::InvalidArgument,
                  "DataParallel::finish:" + problems + " every parameter must be reported exactly once per step");
}

}  // namespace dstrain
