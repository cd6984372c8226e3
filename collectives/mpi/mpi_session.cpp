// MPI bootstrap and the host communicator.
//
// No rank waits forever: a small collective is nonblocking (MPI_Iallreduce, ...) and polled
// with MPI_Test until it completes or its timeout passes; a large one first meets all ranks in a
// polled MPI_Ibarrier with the timeout, then runs MPI's blocking collective. Once every rank has
// arrived the blocking call cannot wait forever (a rank that dies inside it ends the job through
// the launcher), and for large buffers the blocking algorithms are 2-3x faster than the
// nonblocking ones, which also progress only while polled. To name the ranks that did not
// arrive, a rank that times out asks every peer, over a private duplicate communicator, which
// call it is in; peers answer while they themselves wait inside a collective of this
// communicator. Nothing is exchanged on the normal path (a waiting rank only probes for
// questions after 1 ms), so a collective costs what MPI's own nonblocking one costs.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <deque>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "collectives/collectives.h"
#include "dstrain/error.h"

#define DSTRAIN_MPI_CHECK(expr)                                                                      \
  do {                                                                                               \
    int dstrain_status_ = (expr);                                                                    \
    if (dstrain_status_ != MPI_SUCCESS) {                                                            \
      char dstrain_msg_[MPI_MAX_ERROR_STRING];                                                       \
      int dstrain_len_ = 0;                                                                          \
      MPI_Error_string(dstrain_status_, dstrain_msg_, &dstrain_len_);                                \
      ::dstrain::detail::throw_error(::dstrain::ErrorCode::Mpi,                                      \
                                     std::string(#expr " failed: ") + std::string(dstrain_msg_, dstrain_len_), \
                                     __FILE__, __LINE__, dstrain_status_);                           \
    }                                                                                                \
  } while (0)

namespace dstrain::collectives {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::string format_seconds(double s) {
  std::ostringstream out;
  out.precision(s < 10 ? 2 : 1);
  out << std::fixed << s << " s";
  return out.str();
}

// Polls a request: spins for the first microseconds (small messages complete there), then
// yields (so that a peer sharing the core runs when ranks outnumber cores), and after seconds of
// waiting sleeps briefly so that a long wait leaves the core to others. Nonblocking MPI
// collectives progress only inside MPI_Test, so polling stays frequent while a transfer may
// still be running.
class Poller {
 public:
  explicit Poller(Clock::time_point start) : start_(start) {}
  void pause() {
    const auto waited = Clock::now() - start_;
    if (waited < std::chrono::microseconds(50)) return;
    if (waited < std::chrono::seconds(5))
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(100));
  }

 private:
  Clock::time_point start_;
};

// Waits for one request of the bootstrap (no peer questions), raising Timeout after timeout_s.
void wait_simple(MPI_Request& request, double timeout_s, const std::string& what, int rank) {
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration<double>(timeout_s);
  Poller poller(start);
  for (;;) {
    int done = 0;
    DSTRAIN_MPI_CHECK(MPI_Test(&request, &done, MPI_STATUS_IGNORE));
    if (done) return;
    if (Clock::now() >= deadline)
      DSTRAIN_THROW(ErrorCode::Timeout, what + " timed out: rank " + std::to_string(rank) + " waited " +
                                            format_seconds(seconds_between(start, Clock::now())) +
                                            " for the other ranks (timeout " + format_seconds(timeout_s) + ")");
    poller.pause();
  }
}

// ---- fp16 and bf16 reductions: each pairwise step in fp32, rounded back to the narrow type ----
struct AddF {
  float operator()(float a, float b) const { return a + b; }
};
struct MaxF {
  float operator()(float a, float b) const { return (a > b || std::isnan(a)) ? a : b; }
};
struct MinF {
  float operator()(float a, float b) const { return (a < b || std::isnan(a)) ? a : b; }
};

template <float (*ToFloat)(std::uint16_t), std::uint16_t (*FromFloat)(float), class Combine>
void narrow_reduce(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const std::uint16_t*>(in);
  auto* b = static_cast<std::uint16_t*>(inout);
  const Combine combine;
  for (int i = 0; i < *len; ++i) b[i] = FromFloat(combine(ToFloat(a[i]), ToFloat(b[i])));
}

// The user-defined MPI_Ops of one communicator: [fp16, bf16] x [sum, max, min].
class NarrowOps {
 public:
  NarrowOps() {
    MPI_User_function* fns[2][3] = {
        {narrow_reduce<fp16_to_float, float_to_fp16, AddF>, narrow_reduce<fp16_to_float, float_to_fp16, MaxF>,
         narrow_reduce<fp16_to_float, float_to_fp16, MinF>},
        {narrow_reduce<bf16_to_float, float_to_bf16, AddF>, narrow_reduce<bf16_to_float, float_to_bf16, MaxF>,
         narrow_reduce<bf16_to_float, float_to_bf16, MinF>}};
    for (int t = 0; t < 2; ++t)
      for (int o = 0; o < 3; ++o) DSTRAIN_MPI_CHECK(MPI_Op_create(fns[t][o], /*commute=*/1, &ops_[t][o]));
  }
  ~NarrowOps() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (auto& row : ops_)
      for (auto& op : row)
        if (op != MPI_OP_NULL) MPI_Op_free(&op);
  }
  NarrowOps(const NarrowOps&) = delete;
  NarrowOps& operator=(const NarrowOps&) = delete;
  MPI_Op get(DType dt, ReduceOp op) const {
    const int t = dt == DType::F16 ? 0 : 1;
    const int o = op == ReduceOp::Max ? 1 : op == ReduceOp::Min ? 2 : 0;
    return ops_[t][o];
  }

 private:
  MPI_Op ops_[2][3] = {{MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL}, {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL}};
};

bool is_narrow_float(DType dt) { return dt == DType::F16 || dt == DType::BF16; }

MPI_Datatype mpi_type(DType dt) {
  switch (dt) {
    case DType::F32: return MPI_FLOAT;
    case DType::I32: return MPI_INT;
    case DType::F16:
    case DType::BF16: return MPI_UINT16_T;  // reduced by NarrowOps
    default:
      DSTRAIN_THROW(ErrorCode::Unsupported,
                    std::string("MPI collectives take fp32, fp16, bf16 or i32 host buffers, got ") + dtype_name(dt));
  }
}

MPI_Op predefined_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg: return MPI_SUM;
    case ReduceOp::Max: return MPI_MAX;
    case ReduceOp::Min: return MPI_MIN;
  }
  return MPI_SUM;
}

// Divides n elements by `ranks` after a Sum: Avg.
void divide_in_place(void* data, DType dt, std::int64_t n, int ranks) {
  const float d = static_cast<float>(ranks);
  if (dt == DType::F32) {
    float* p = static_cast<float*>(data);
    for (std::int64_t i = 0; i < n; ++i) p[i] /= d;
  } else {
    auto* p = static_cast<std::uint16_t*>(data);
    if (dt == DType::F16)
      for (std::int64_t i = 0; i < n; ++i) p[i] = float_to_fp16(fp16_to_float(p[i]) / d);
    else
      for (std::int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(bf16_to_float(p[i]) / d);
  }
}

// Counts above INT_MAX are sent in pieces: MPI takes int counts.
constexpr std::int64_t kMaxChunk = 1 << 30;
// From this many bytes a collective is a polled rendezvous then MPI's blocking call.
constexpr std::size_t kBlockingFromBytes = std::size_t{1} << 16;

constexpr int kQueryTag = 7001;  // "which call are you in?"
constexpr int kReplyTag = 7002;  // CallState

// What a rank reports when asked: the call it is waiting in.
struct CallState {
  CallFingerprint call;
};

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm`.
  MpiCommunicator(MPI_Comm comm, double timeout_s) : comm_(comm) {
    timeout_s_ = timeout_s;
    DSTRAIN_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    DSTRAIN_MPI_CHECK(MPI_Comm_size(comm_, &size_));
    MPI_Request request;
    DSTRAIN_MPI_CHECK(MPI_Comm_idup(comm_, &ctrl_, &request));
    wait_simple(request, timeout_s_, "creating " + name(), rank_);
    debug_ = debug_collectives_from_env();
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (auto& reply : pending_replies_)
      if (reply.request != MPI_REQUEST_NULL) MPI_Request_free(&reply.request);
    if (ctrl_ != MPI_COMM_NULL) MPI_Comm_free(&ctrl_);
    MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "mpi"; }
  Device device() const override { return Device::cpu(); }

  void allreduce(Tensor& t, ReduceOp op, Context&) override {
    check_host(t, "allreduce");
    check_reducible(t.dtype(), op, "allreduce");
    begin(CollectiveKind::Allreduce, t.dtype(), op, -1, t.numel());
    allreduce_pieces(t.data(), t.dtype(), t.numel(), op);
    if (op == ReduceOp::Avg) divide_in_place(t.data(), t.dtype(), t.numel(), size_);
  }

  void broadcast(Tensor& t, int root, Context&) override {
    check_host(t, "broadcast");
    DSTRAIN_CHECK(root >= 0 && root < size_, "broadcast root " + std::to_string(root) + " out of range");
    begin(CollectiveKind::Broadcast, t.dtype(), std::nullopt, root, t.numel());
    broadcast_bytes(t.data(), t.nbytes(), root);
  }

  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op, Context&) override {
    check_equal_chunks(in, out, size_, Device::cpu(), "reduce_scatter");
    check_reducible(in.dtype(), op, "reduce_scatter");
    begin(CollectiveKind::ReduceScatter, in.dtype(), op, -1, out.numel());
    const std::int64_t k = out.numel();
    if (k == 0) return;
    if (in.numel() <= INT_MAX) {
      const MPI_Datatype type = mpi_type(in.dtype());
      const MPI_Op mop = mpi_op(in.dtype(), op);
      if (arrive(in.nbytes())) {
        DSTRAIN_MPI_CHECK(MPI_Reduce_scatter_block(in.data(), out.data(), static_cast<int>(k), type, mop, comm_));
      } else {
        MPI_Request request;
        DSTRAIN_MPI_CHECK(
            MPI_Ireduce_scatter_block(in.data(), out.data(), static_cast<int>(k), type, mop, comm_, &request));
        wait(request);
      }
    } else {
      // Beyond int counts: AllReduce a copy in pieces and keep this rank's chunk.
      Tensor all = in.to(Device::cpu());
      allreduce_pieces(all.data(), all.dtype(), all.numel(), op);
      std::memcpy(out.data(), static_cast<const char*>(all.data()) + rank_ * out.nbytes(), out.nbytes());
    }
    if (op == ReduceOp::Avg) divide_in_place(out.data(), out.dtype(), k, size_);
  }

  void all_gather(const Tensor& in, Tensor& out, Context&) override {
    check_equal_chunks(out, in, size_, Device::cpu(), "all_gather");
    begin(CollectiveKind::AllGather, in.dtype(), std::nullopt, -1, in.numel());
    const std::int64_t k = in.numel();
    if (k == 0) return;
    if (out.nbytes() <= static_cast<std::size_t>(INT_MAX)) {
      // Bytes: any dtype gathers.
      const int n = static_cast<int>(in.nbytes());
      if (arrive(out.nbytes())) {
        DSTRAIN_MPI_CHECK(MPI_Allgather(in.data(), n, MPI_BYTE, out.data(), n, MPI_BYTE, comm_));
      } else {
        MPI_Request request;
        DSTRAIN_MPI_CHECK(MPI_Iallgather(in.data(), n, MPI_BYTE, out.data(), n, MPI_BYTE, comm_, &request));
        wait(request);
      }
    } else {
      // Beyond int counts: each rank broadcasts its chunk, in pieces.
      auto* base = static_cast<char*>(out.data());
      std::memcpy(base + rank_ * in.nbytes(), in.data(), in.nbytes());
      for (int r = 0; r < size_; ++r) broadcast_bytes(base + r * in.nbytes(), in.nbytes(), r);
    }
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    DSTRAIN_CHECK(color >= 0, "split color must be >= 0, got " + std::to_string(color));
    begin(CollectiveKind::Split, DType::I32, std::nullopt, -1, 0);
    // MPI_Comm_split blocks: first make sure that every rank has arrived.
    MPI_Request request;
    DSTRAIN_MPI_CHECK(MPI_Ibarrier(comm_, &request));
    wait(request);
    MPI_Comm child;
    DSTRAIN_MPI_CHECK(MPI_Comm_split(comm_, color, key, &child));
    return std::make_unique<MpiCommunicator>(child, timeout_s_);
  }

 private:
  void check_host(const Tensor& t, const char* what) const {
    DSTRAIN_CHECK(!t.is_cuda(), std::string("MPI ") + what + " needs a host buffer, got one on " + t.device().str());
  }
  static void check_reducible(DType dt, ReduceOp op, const char* what) {
    mpi_type(dt);  // raises Unsupported for other dtypes
    if (op == ReduceOp::Avg)
      DSTRAIN_CHECK(dt != DType::I32, std::string(what) + " Avg needs a floating buffer (fp32, fp16 or bf16)");
  }
  MPI_Op mpi_op(DType dt, ReduceOp op) const {
    return is_narrow_float(dt) ? narrow_ops_.get(dt, op) : predefined_op(op);
  }

  void allreduce_pieces(void* data, DType dt, std::int64_t n, ReduceOp op) {
    auto* base = static_cast<char*>(data);
    const std::size_t elem = dtype_size(dt);
    for (std::int64_t off = 0; off < n; off += kMaxChunk) {
      const int count = static_cast<int>(std::min<std::int64_t>(kMaxChunk, n - off));
      if (arrive(count * elem)) {
        DSTRAIN_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, base + off * elem, count, mpi_type(dt), mpi_op(dt, op), comm_));
        continue;
      }
      MPI_Request request;
      DSTRAIN_MPI_CHECK(
          MPI_Iallreduce(MPI_IN_PLACE, base + off * elem, count, mpi_type(dt), mpi_op(dt, op), comm_, &request));
      wait(request);
    }
  }

  void broadcast_bytes(void* data, std::size_t nbytes, int root) {
    auto* base = static_cast<char*>(data);
    for (std::size_t off = 0; off < nbytes; off += kMaxChunk) {
      const int n = static_cast<int>(std::min<std::size_t>(kMaxChunk, nbytes - off));
      if (arrive(static_cast<std::size_t>(n))) {
        DSTRAIN_MPI_CHECK(MPI_Bcast(base + off, n, MPI_BYTE, root, comm_));
        continue;
      }
      MPI_Request request;
      DSTRAIN_MPI_CHECK(MPI_Ibcast(base + off, n, MPI_BYTE, root, comm_, &request));
      wait(request);
    }
  }

  // For a message of `bytes` from kBlockingFromBytes on: waits (with the timeout) until every rank
  // has arrived and returns true, so that the caller may use MPI's blocking collective.
  bool arrive(std::size_t bytes) {
    if (bytes < kBlockingFromBytes) return false;
    MPI_Request request;
    DSTRAIN_MPI_CHECK(MPI_Ibarrier(comm_, &request));
    wait(request);
    return true;
  }

  // Numbers the call, remembers it for peers' questions and, with DSTRAIN_DEBUG_COLLECTIVES,
  // checks that every rank is about to make the same call.
  void begin(CollectiveKind kind, DType dt, std::optional<ReduceOp> op, int root, std::int64_t count) {
    if (!broken_.empty())
      DSTRAIN_THROW(ErrorCode::Timeout, name() + " is unusable after an earlier failure: " + broken_);
    CallFingerprint f;
    f.operation = static_cast<std::int32_t>(kind);
    f.dtype = static_cast<std::int32_t>(dt);
    f.op = op ? static_cast<std::int32_t>(*op) : -1;
    f.root = root;
    f.count = count;
    f.call = ++calls_;
    current_.call = f;
    if (debug_) check_same_call(f);
  }

  void check_same_call(const CallFingerprint& mine) {
    std::vector<CallFingerprint> all(static_cast<std::size_t>(size_));
    MPI_Request request;
    DSTRAIN_MPI_CHECK(MPI_Iallgather(&mine, sizeof(mine), MPI_BYTE, all.data(), sizeof(mine), MPI_BYTE, ctrl_,
                                     &request));
    wait(request, " (DSTRAIN_DEBUG_COLLECTIVES fingerprint exchange)");
    const std::string mismatch = fingerprint_mismatch(all);
    if (!mismatch.empty()) {
      broken_ = "collective mismatch: " + mismatch;
      DSTRAIN_THROW(ErrorCode::InvalidArgument, "collective mismatch on " + name() + ": " + mismatch);
    }
  }

  // Polls `request` until it completes or the timeout passes; on a timeout asks the peers where
  // they are and raises Timeout naming the call and the ranks that did not arrive.
  void wait(MPI_Request& request, const char* phase = "") {
    const auto start = Clock::now();
    const auto deadline = start + std::chrono::duration<double>(timeout_s_);
    Poller poller(start);
    for (;;) {
      int done = 0;
      DSTRAIN_MPI_CHECK(MPI_Test(&request, &done, MPI_STATUS_IGNORE));
      if (done) return;
      const auto now = Clock::now();
      if (now - start > std::chrono::milliseconds(1)) answer_questions();
      if (now >= deadline) fail_timeout(start, phase);
      poller.pause();
    }
  }

  // Answers peers that timed out and ask which call this rank is in.
  void answer_questions() {
    for (;;) {
      int flag = 0;
      MPI_Status status;
      DSTRAIN_MPI_CHECK(MPI_Iprobe(MPI_ANY_SOURCE, kQueryTag, ctrl_, &flag, &status));
      if (!flag) break;
      std::int64_t their_call = 0;
      DSTRAIN_MPI_CHECK(MPI_Recv(&their_call, 1, MPI_INT64_T, status.MPI_SOURCE, kQueryTag, ctrl_, MPI_STATUS_IGNORE));
      pending_replies_.push_back({current_, MPI_REQUEST_NULL});
      PendingReply& reply = pending_replies_.back();
      DSTRAIN_MPI_CHECK(MPI_Isend(&reply.state, sizeof(CallState), MPI_BYTE, status.MPI_SOURCE, kReplyTag, ctrl_,
                                  &reply.request));
    }
    while (!pending_replies_.empty()) {
      int done = 0;
      DSTRAIN_MPI_CHECK(MPI_Test(&pending_replies_.front().request, &done, MPI_STATUS_IGNORE));
      if (!done) break;
      pending_replies_.pop_front();
    }
  }

  [[noreturn]] void fail_timeout(Clock::time_point start, const char* phase) {
    const double waited = seconds_between(start, Clock::now());
    const std::string call = describe_call(current_.call);
    const std::string peers = ask_peers();
    std::ostringstream msg;
    msg << call << phase << " on " << name() << " timed out: rank " << rank_ << " waited " << format_seconds(waited)
        << " (timeout " << format_seconds(timeout_s_) << "); " << peers;
    broken_ = msg.str();
    DSTRAIN_THROW(ErrorCode::Timeout, broken_);
  }

  // Asks every peer which call it is in, for a short while, and describes who did not arrive.
  std::string ask_peers() {
    const double grace_s = std::min(5.0, std::max(0.5, 0.05 * timeout_s_));
    std::vector<MPI_Request> sends(static_cast<std::size_t>(size_), MPI_REQUEST_NULL);
    std::vector<MPI_Request> recvs(static_cast<std::size_t>(size_), MPI_REQUEST_NULL);
    std::vector<CallState> replies(static_cast<std::size_t>(size_));
    query_call_ = current_.call.call;
    for (int p = 0; p < size_; ++p) {
      if (p == rank_) continue;
      DSTRAIN_MPI_CHECK(MPI_Irecv(&replies[p], sizeof(CallState), MPI_BYTE, p, kReplyTag, ctrl_, &recvs[p]));
      DSTRAIN_MPI_CHECK(MPI_Isend(&query_call_, 1, MPI_INT64_T, p, kQueryTag, ctrl_, &sends[p]));
    }
    const auto deadline = Clock::now() + std::chrono::duration<double>(grace_s);
    std::vector<bool> answered(static_cast<std::size_t>(size_), false);
    answered[rank_] = true;
    int missing = size_ - 1;
    while (missing > 0 && Clock::now() < deadline) {
      for (int p = 0; p < size_; ++p) {
        if (answered[p]) continue;
        int done = 0;
        DSTRAIN_MPI_CHECK(MPI_Test(&recvs[p], &done, MPI_STATUS_IGNORE));
        if (done) answered[p] = true, --missing;
      }
      answer_questions();  // peers that time out too ask us at the same time
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    for (int p = 0; p < size_; ++p) {
      if (p == rank_) continue;
      if (!answered[p]) {  // a cancelled receive completes locally
        MPI_Cancel(&recvs[p]);
        MPI_Wait(&recvs[p], MPI_STATUS_IGNORE);
      }
      if (sends[p] != MPI_REQUEST_NULL) MPI_Request_free(&sends[p]);
    }
    std::vector<int> arrived, silent;
    std::vector<std::pair<int, std::string>> elsewhere;
    for (int p = 0; p < size_; ++p) {
      if (p == rank_ || (answered[p] && replies[p].call == current_.call))
        arrived.push_back(p);
      else if (answered[p])
        elsewhere.push_back({p, describe_call(replies[p].call)});
      else
        silent.push_back(p);
    }
    auto list = [](const std::vector<int>& ranks) {
      std::string s;
      for (std::size_t i = 0; i < ranks.size(); ++i) s += (i ? "," : "") + std::to_string(ranks[i]);
      return s;
    };
    std::ostringstream out;
    out << "ranks that did not arrive: ";
    if (silent.empty() && elsewhere.empty()) out << "none known (all answered from this call)";
    if (!silent.empty())
      out << (silent.size() > 1 ? "ranks " : "rank ") << list(silent) << " (no answer within "
          << format_seconds(grace_s) << ": outside any collective of this communicator: busy, finished or dead)";
    for (std::size_t i = 0; i < elsewhere.size(); ++i)
      out << (i || !silent.empty() ? "; " : "") << "rank " << elsewhere[i].first << " (waiting in "
          << elsewhere[i].second << ")";
    out << "; arrived: " << (arrived.size() > 1 ? "ranks " : "rank ") << list(arrived);
    return out.str();
  }

  struct PendingReply {
    CallState state;
    MPI_Request request;
  };

  MPI_Comm comm_;
  MPI_Comm ctrl_ = MPI_COMM_NULL;  // questions about where a rank is, and debug fingerprints
  int rank_ = 0, size_ = 1;
  NarrowOps narrow_ops_;
  std::int64_t calls_ = 0;
  CallState current_;
  std::int64_t query_call_ = 0;  // buffer of the questions sent on a timeout (sends are never waited for)
  bool debug_ = false;
  std::string broken_;  // set by a timeout or mismatch: later calls raise
  std::deque<PendingReply> pending_replies_;  // deque: Isend buffers must not move
};

class OpenMpiSession final : public MpiSession {
 public:
  OpenMpiSession(int& argc, char**& argv) {
    int initialized = 0;
    DSTRAIN_MPI_CHECK(MPI_Initialized(&initialized));
    if (!initialized) {
      int provided = 0;
      DSTRAIN_MPI_CHECK(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided));
      owns_mpi_ = true;
    }
    // Errors come back as codes (turned into dstrain::Error) instead of aborting the job.
    DSTRAIN_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    MPI_Request request;
    DSTRAIN_MPI_CHECK(MPI_Comm_idup(MPI_COMM_WORLD, &comm_, &request));
    DSTRAIN_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &info_.rank));
    wait_simple(request, timeout_s_, "MPI bootstrap (duplicating MPI_COMM_WORLD)", info_.rank);
    DSTRAIN_MPI_CHECK(MPI_Comm_size(comm_, &info_.size));
    // MPI_Comm_split_type blocks: first make sure that every rank has arrived.
    barrier("MPI bootstrap (rendezvous of all ranks)");
    MPI_Comm local;
    DSTRAIN_MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, info_.rank, MPI_INFO_NULL, &local));
    try {
      DSTRAIN_MPI_CHECK(MPI_Comm_rank(local, &info_.local_rank));
      DSTRAIN_MPI_CHECK(MPI_Comm_size(local, &info_.local_size));
      // One leader per node (local rank 0) counts the nodes; a node's index is the number of
      // leaders of lower world rank (an exclusive scan), which the leader hands to its node.
      int leader = info_.local_rank == 0 ? 1 : 0;
      MPI_Request request_count, request_scan, request_node;
      DSTRAIN_MPI_CHECK(MPI_Iallreduce(&leader, &info_.node_count, 1, MPI_INT, MPI_SUM, comm_, &request_count));
      wait_simple(request_count, timeout_s_, "MPI bootstrap (counting nodes)", info_.rank);
      int leaders_below = 0;
      DSTRAIN_MPI_CHECK(MPI_Iexscan(&leader, &leaders_below, 1, MPI_INT, MPI_SUM, comm_, &request_scan));
      wait_simple(request_scan, timeout_s_, "MPI bootstrap (numbering nodes)", info_.rank);
      if (info_.rank == 0) leaders_below = 0;  // MPI_Exscan leaves rank 0's result undefined
      int node_of_leader = leader ? leaders_below : INT_MAX;
      DSTRAIN_MPI_CHECK(MPI_Iallreduce(&node_of_leader, &info_.node, 1, MPI_INT, MPI_MIN, local, &request_node));
      wait_simple(request_node, timeout_s_, "MPI bootstrap (numbering nodes)", info_.rank);
    } catch (...) {
      MPI_Comm_free(&local);
      throw;
    }
    MPI_Comm_free(&local);
  }

  ~OpenMpiSession() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    MPI_Comm_free(&comm_);
    if (owns_mpi_) MPI_Finalize();
  }

  ProcessInfo info() const override { return info_; }

  std::unique_ptr<Communicator> make_host_communicator() override {
    MPI_Comm dup;
    MPI_Request request;
    DSTRAIN_MPI_CHECK(MPI_Comm_idup(comm_, &dup, &request));
    wait_simple(request, timeout_s_, "creating an MPI host communicator", info_.rank);
    return std::make_unique<MpiCommunicator>(dup, timeout_s_);
  }

  void broadcast_bytes(std::vector<char>& bytes, int root) override {
    int n = static_cast<int>(bytes.size());
    MPI_Request request;
    DSTRAIN_MPI_CHECK(MPI_Ibcast(&n, 1, MPI_INT, root, comm_, &request));
    wait_simple(request, timeout_s_, "broadcast of the byte count from rank " + std::to_string(root), info_.rank);
    bytes.resize(static_cast<std::size_t>(n));
    DSTRAIN_MPI_CHECK(MPI_Ibcast(bytes.data(), n, MPI_BYTE, root, comm_, &request));
    wait_simple(request, timeout_s_, "broadcast of " + std::to_string(n) + " bytes from rank " + std::to_string(root),
                info_.rank);
  }

  bool all_equal_u64(std::uint64_t value) override {
    std::uint64_t lo = 0, hi = 0;
    MPI_Request requests[2];
    DSTRAIN_MPI_CHECK(MPI_Iallreduce(&value, &lo, 1, MPI_UINT64_T, MPI_MIN, comm_, &requests[0]));
    wait_simple(requests[0], timeout_s_, "all_ranks_equal (min)", info_.rank);
    DSTRAIN_MPI_CHECK(MPI_Iallreduce(&value, &hi, 1, MPI_UINT64_T, MPI_MAX, comm_, &requests[1]));
    wait_simple(requests[1], timeout_s_, "all_ranks_equal (max)", info_.rank);
    return lo == hi;
  }

  void allreduce_sum_f64(double* values, int n) override {
    MPI_Request request;
    DSTRAIN_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, values, n, MPI_DOUBLE, MPI_SUM, comm_, &request));
    wait_simple(request, timeout_s_, "host allreduce of " + std::to_string(n) + " fp64", info_.rank);
  }

  void barrier() override { barrier("barrier"); }

  void abort(int exit_code) noexcept override { MPI_Abort(MPI_COMM_WORLD, exit_code); }

  void set_timeout(double seconds) override {
    DSTRAIN_CHECK(seconds > 0, "timeout must be positive, got " + std::to_string(seconds));
    timeout_s_ = seconds;
  }

 private:
  void barrier(const std::string& what) {
    MPI_Request request;
    DSTRAIN_MPI_CHECK(MPI_Ibarrier(comm_, &request));
    wait_simple(request, timeout_s_, what, info_.rank);
  }
  void allreduce_ints(const int* in, int* out, int n, MPI_Op op, const std::string& what) {
    MPI_Request request;
    DSTRAIN_MPI_CHECK(MPI_Iallreduce(in, out, n, MPI_INT, op, comm_, &request));
    wait_simple(request, timeout_s_, what, info_.rank);
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  ProcessInfo info_;
  bool owns_mpi_ = false;
  double timeout_s_ = default_collective_timeout_s();
};

}  // namespace

std::unique_ptr<MpiSession> start_mpi_session(int& argc, char**& argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized && !launched_by_mpi_launcher()) return nullptr;
  return std::make_unique<OpenMpiSession>(argc, argv);
}

}  // namespace dstrain::collectives
