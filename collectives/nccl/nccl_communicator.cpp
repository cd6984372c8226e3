// The NCCL communicator: device buffers, collectives issued on the context's stream.
//
// No hangs: the communicator is created non-blocking (ncclConfig_t blocking = 0), so creation,
// split and every call are polled with ncclCommGetAsyncError until a deadline. A watchdog thread
// per communicator follows each issued collective through an event recorded after it; when a
// collective does not complete within the timeout, or NCCL reports an asynchronous error, the
// watchdog aborts the NCCL communicator (ncclCommAbort, separate from destroy), which releases
// the kernels waiting for peers. The next call, or check_health(), raises the error naming the
// operation.
#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "collectives/collectives.h"
#include "dstrain/error.h"
#include "kernels/cuda_check.h"

#define DSTRAIN_NCCL_CHECK(expr)                                                                    \
  do {                                                                                              \
    ncclResult_t dstrain_status_ = (expr);                                                          \
    if (dstrain_status_ != ncclSuccess && dstrain_status_ != ncclInProgress) {                      \
      const char* dstrain_last_ = ncclGetLastError(nullptr);                                        \
      ::dstrain::detail::throw_error(::dstrain::ErrorCode::Nccl,                                    \
                                     std::string(#expr " failed: ") + ncclGetErrorString(dstrain_status_) + \
                                         (dstrain_last_ && *dstrain_last_ ? std::string(" (") + dstrain_last_ + ")" \
                                                                          : std::string()),         \
                                     __FILE__, __LINE__, static_cast<long>(dstrain_status_));       \
    }                                                                                               \
  } while (0)

namespace dstrain::collectives {

namespace {

using Clock = std::chrono::steady_clock;

ncclDataType_t nccl_type(DType dt) {
  switch (dt) {
    case DType::F32: return ncclFloat32;
    case DType::F16: return ncclFloat16;
    case DType::BF16: return ncclBfloat16;
    case DType::I32: return ncclInt32;
    default:
      DSTRAIN_THROW(ErrorCode::Unsupported, std::string("NCCL reductions of ") + dtype_name(dt));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Avg: return ncclAvg;
    case ReduceOp::Max: return ncclMax;
    case ReduceOp::Min: return ncclMin;
  }
  return ncclSum;
}

std::string nccl_error_text(ncclResult_t status) {
  std::string text = ncclGetErrorString(status);
  const char* last = ncclGetLastError(nullptr);
  if (last && *last) text += std::string(" (") + last + ")";
  return text;
}

ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

// Polls a non-blocking communicator until its last call finished. Returns the final status, or
// ncclInProgress when the deadline passed first.
ncclResult_t poll_until_done(ncclComm_t comm, Clock::time_point deadline) {
  for (int polls = 0;; ++polls) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t status = ncclCommGetAsyncError(comm, &state);
    if (status != ncclSuccess) return status;
    if (state != ncclInProgress) return state;
    if (Clock::now() >= deadline) return ncclInProgress;
    if (polls < 1000)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

class NcclCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm`, an initialised (non-blocking) NCCL communicator.
  NcclCommunicator(ncclComm_t comm, int device, double timeout_s, Communicator* host)
      : comm_(comm), device_(device), host_(host) {
    timeout_s_ = timeout_s;
    DSTRAIN_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
    DSTRAIN_NCCL_CHECK(ncclCommCount(comm_, &size_));
    debug_ = debug_collectives_from_env() && host_ != nullptr;
    watchdog_ = std::thread([this] { watch(); });
  }

  static std::unique_ptr<NcclCommunicator> create(const std::vector<char>& id_bytes, int rank, int size, int device,
                                                  double timeout_s, Communicator* host) {
    DSTRAIN_CHECK(id_bytes.size() == sizeof(ncclUniqueId), "malformed NCCL unique id");
    ncclUniqueId id;
    std::memcpy(&id, id_bytes.data(), sizeof(id));
    DSTRAIN_CUDA_CHECK(cudaSetDevice(device));
    ncclConfig_t config = nonblocking_config();
    ncclComm_t comm = nullptr;
    const auto deadline = deadline_after(timeout_s);
    DSTRAIN_NCCL_CHECK(ncclCommInitRankConfig(&comm, size, id, rank, &config));
    const ncclResult_t state = poll_until_done(comm, deadline);
    if (state != ncclSuccess) {
      ncclCommAbort(comm);
      if (state == ncclInProgress)
        DSTRAIN_THROW(ErrorCode::Timeout, "NCCL initialisation of rank " + std::to_string(rank) + " of " +
                                              std::to_string(size) + " on cuda:" + std::to_string(device) +
                                              " did not complete within " + std::to_string(timeout_s) +
                                              " s: not every rank arrived");
      DSTRAIN_THROW(ErrorCode::Nccl, "NCCL initialisation of rank " + std::to_string(rank) + " of " +
                                         std::to_string(size) + " failed: " + nccl_error_text(state));
    }
    return std::make_unique<NcclCommunicator>(comm, device, timeout_s, host);
  }

  ~NcclCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    if (!aborted_) {
      // Finalize flushes outstanding work; bounded by the timeout, else abort.
      ncclResult_t status = ncclCommFinalize(comm_);
      if (status == ncclSuccess || status == ncclInProgress) status = poll_until_done(comm_, deadline_after(timeout_s_));
      if (status == ncclSuccess) {
        status = ncclCommDestroy(comm_);
        if (status != ncclSuccess) detail::log_warning("ncclCommDestroy failed: " + nccl_error_text(status));
      } else {
        detail::log_warning(name() + ": finalize did not complete (" +
                            (status == ncclInProgress ? std::string("timeout") : nccl_error_text(status)) +
                            "), aborting it");
        ncclCommAbort(comm_);
      }
    }
    for (auto& p : pending_) cudaEventDestroy(p.event);
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "nccl"; }
  std::string name() const override {
    return "nccl communicator (rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ", cuda:" +
           std::to_string(device_) + ")";
  }
  Device device() const override { return Device::cuda(device_); }

  void allreduce(Tensor& t, ReduceOp op, Context& ctx) override {
    check(t, ctx, "allreduce");
    const CallFingerprint f = begin(CollectiveKind::Allreduce, t.dtype(), static_cast<int>(op), -1, t.numel());
    issue(f, ctx, [&](cudaStream_t s) {
      return ncclAllReduce(t.data(), t.data(), static_cast<std::size_t>(t.numel()), nccl_type(t.dtype()),
                           nccl_op(op), comm_, s);
    });
  }

  void broadcast(Tensor& t, int root, Context& ctx) override {
    check(t, ctx, "broadcast");
    DSTRAIN_CHECK(root >= 0 && root < size_, "broadcast root " + std::to_string(root) + " out of range");
    const CallFingerprint f = begin(CollectiveKind::Broadcast, t.dtype(), -1, root, t.numel());
    issue(f, ctx, [&](cudaStream_t s) { return ncclBroadcast(t.data(), t.data(), t.nbytes(), ncclUint8, root, comm_, s); });
  }

  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op, Context& ctx) override {
    check_equal_chunks(in, out, size_, device(), "reduce_scatter");
    check(out, ctx, "reduce_scatter");
    const CallFingerprint f = begin(CollectiveKind::ReduceScatter, in.dtype(), static_cast<int>(op), -1, out.numel());
    issue(f, ctx, [&](cudaStream_t s) {
      return ncclReduceScatter(in.data(), out.data(), static_cast<std::size_t>(out.numel()), nccl_type(in.dtype()),
                               nccl_op(op), comm_, s);
    });
  }

  void all_gather(const Tensor& in, Tensor& out, Context& ctx) override {
    check_equal_chunks(out, in, size_, device(), "all_gather");
    check(out, ctx, "all_gather");
    const CallFingerprint f = begin(CollectiveKind::AllGather, in.dtype(), -1, -1, in.numel());
    // Bytes: any dtype gathers.
    issue(f, ctx, [&](cudaStream_t s) { return ncclAllGather(in.data(), out.data(), in.nbytes(), ncclUint8, comm_, s); });
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    DSTRAIN_CHECK(color >= 0, "split color must be >= 0, got " + std::to_string(color));
    const CallFingerprint f = begin(CollectiveKind::Split, DType::I32, -1, -1, 0);
    std::unique_ptr<Communicator> host_child = host_ ? host_->split(color, key) : nullptr;
    ncclConfig_t config = nonblocking_config();
    ncclComm_t child = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      throw_if_failed();
      const ncclResult_t status = ncclCommSplit(comm_, color, key, &child, &config);
      if (status != ncclSuccess && status != ncclInProgress)
        fail_locked(describe_call(f), ErrorCode::Nccl, "failed: " + nccl_error_text(status));
      const auto deadline = deadline_after(timeout_s_);
      ncclResult_t state = poll_until_done(comm_, deadline);
      if (state == ncclSuccess && child) state = poll_until_done(child, deadline);
      if (state != ncclSuccess) {
        if (child) ncclCommAbort(child);
        fail_locked(describe_call(f), state == ncclInProgress ? ErrorCode::Timeout : ErrorCode::Nccl,
                    state == ncclInProgress ? "did not complete within " + std::to_string(timeout_s_) + " s"
                                            : nccl_error_text(state));
      }
    }
    auto result = std::make_unique<NcclCommunicator>(child, device_, timeout_s_, host_child.get());
    result->owned_host_ = std::move(host_child);
    return result;
  }

  void check_health() override {
    std::lock_guard<std::mutex> lock(mutex_);
    throw_if_failed();
  }

 private:
  struct Pending {
    cudaEvent_t event;
    std::string what;
    Clock::time_point deadline;
  };

  void check(const Tensor& t, const Context& ctx, const char* what) const {
    DSTRAIN_CHECK(t.device() == Device::cuda(device_),
                  std::string("NCCL ") + what + " buffer on " + t.device().str() + ", communicator on cuda:" +
                      std::to_string(device_));
    DSTRAIN_CHECK(ctx.device() == Device::cuda(device_), std::string("NCCL ") + what + " on a context of " +
                                                             ctx.device().str());
  }

  CallFingerprint begin(CollectiveKind kind, DType dt, int op, int root, std::int64_t count) {
    check_health();
    CallFingerprint f;
    f.operation = static_cast<std::int32_t>(kind);
    f.dtype = static_cast<std::int32_t>(dt);
    f.op = op;
    f.root = root;
    f.count = count;
    f.call = ++calls_;
    if (debug_) check_fingerprints(*host_, f, name());
    return f;
  }

  // Enqueues one NCCL call, waits (bounded) until the non-blocking communicator accepted it, and
  // hands an event recorded after it to the watchdog.
  template <class Call>
  void issue(const CallFingerprint& f, Context& ctx, Call&& call) {
    auto stream = reinterpret_cast<cudaStream_t>(ctx.stream());
    const std::string what = describe_call(f);
    cudaEvent_t event = nullptr;
    // Under the lock throughout: the watchdog must not abort (and free) comm_ while it is in use.
    std::lock_guard<std::mutex> lock(mutex_);
    throw_if_failed();
    const ncclResult_t status = call(stream);
    if (status != ncclSuccess && status != ncclInProgress)
      fail_locked(what, ErrorCode::Nccl, "failed to enqueue: " + nccl_error_text(status));
    const ncclResult_t state = poll_until_done(comm_, deadline_after(timeout_s_));
    if (state != ncclSuccess)
      fail_locked(what, state == ncclInProgress ? ErrorCode::Timeout : ErrorCode::Nccl,
                  state == ncclInProgress ? "was not accepted within " + std::to_string(timeout_s_) + " s"
                                          : nccl_error_text(state));
    if (!free_events_.empty()) {
      event = free_events_.back();
      free_events_.pop_back();
    } else {
      DSTRAIN_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    }
    const cudaError_t recorded = cudaEventRecord(event, stream);
    if (recorded != cudaSuccess) {
      free_events_.push_back(event);
      DSTRAIN_CUDA_CHECK(recorded);
    }
    pending_.push_back({event, what, deadline_after(timeout_s_)});
    wake_.notify_all();
  }

  void throw_if_failed() {
    if (!failure_.empty()) detail::throw_error(failure_code_, failure_, __FILE__, __LINE__);
  }

  // Records the failure, aborts the NCCL communicator and raises. Caller holds mutex_.
  [[noreturn]] void fail_locked(const std::string& what, ErrorCode code, const std::string& why) {
    record_failure_locked(what, code, why);
    throw_if_failed();
    DSTRAIN_THROW(code, failure_);  // not reached
  }

  void record_failure_locked(const std::string& what, ErrorCode code, const std::string& why) {
    if (!failure_.empty()) return;
    failure_code_ = code;
    failure_ = what + " on " + name() + " " + why + "; the NCCL communicator was aborted";
    if (!aborted_) {
      aborted_ = true;
      const ncclResult_t status = ncclCommAbort(comm_);
      if (status != ncclSuccess) detail::log_warning("ncclCommAbort failed: " + nccl_error_text(status));
    }
  }

  // The watchdog: completion of each issued collective, the deadline, and NCCL's async errors.
  void watch() {
    cudaSetDevice(device_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stop_ && !aborted_) {
      wake_.wait_for(lock, std::chrono::milliseconds(pending_.empty() ? 500 : 20));
      if (stop_ || aborted_) break;
      ncclResult_t async = ncclSuccess;
      if (ncclCommGetAsyncError(comm_, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress) {
        record_failure_locked(pending_.empty() ? "a collective" : pending_.front().what, ErrorCode::Nccl,
                              "failed asynchronously: " + nccl_error_text(async));
        break;
      }
      while (!pending_.empty()) {
        Pending& p = pending_.front();
        const cudaError_t q = cudaEventQuery(p.event);
        if (q == cudaSuccess) {
          free_events_.push_back(p.event);
          pending_.pop_front();
          continue;
        }
        if (q != cudaErrorNotReady) {
          record_failure_locked(p.what, ErrorCode::Cuda, std::string("failed on the device: ") + cudaGetErrorString(q));
        } else if (Clock::now() >= p.deadline) {
          std::ostringstream why;
          why << "did not complete within " << timeout_s_
              << " s (a peer did not arrive, or its GPU stalled)";
          record_failure_locked(p.what, ErrorCode::Timeout, why.str());
        }
        break;
      }
    }
  }

  ncclComm_t comm_ = nullptr;
  int rank_ = 0, size_ = 1, device_ = 0;
  Communicator* host_ = nullptr;                // fingerprints for DSTRAIN_DEBUG_COLLECTIVES
  std::unique_ptr<Communicator> owned_host_;    // the host split that matches a split of this one
  bool debug_ = false;
  std::int64_t calls_ = 0;

  std::mutex mutex_;  // guards everything below, and NCCL calls against the watchdog's abort
  std::condition_variable wake_;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  std::string failure_;
  ErrorCode failure_code_ = ErrorCode::Nccl;
  bool aborted_ = false;
  bool stop_ = false;
  std::thread watchdog_;  // last: starts after everything it reads is constructed
};

}  // namespace

std::vector<char> nccl_unique_id() {
  ncclUniqueId id;
  DSTRAIN_NCCL_CHECK(ncclGetUniqueId(&id));
  std::vector<char> bytes(sizeof(id));
  std::memcpy(bytes.data(), &id, sizeof(id));
  return bytes;
}

std::unique_ptr<Communicator> make_nccl_communicator(const std::vector<char>& unique_id, int rank, int size,
                                                     int device, double timeout_s, Communicator* host) {
  return NcclCommunicator::create(unique_id, rank, size, device, timeout_s, host);
}

}  // namespace dstrain::collectives
