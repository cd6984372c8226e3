#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>
#include <string>

#include "collectives/collectives.h"
#include "dstrain/error.h"

namespace dstrain {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Avg: return "avg";
    case ReduceOp::Max: return "max";
    case ReduceOp::Min: return "min";
  }
  return "?";
}

double default_collective_timeout_s() {
  const char* env = std::getenv("DSTRAIN_TIMEOUT_S");
  if (!env || !*env) return 600.0;
  char* end = nullptr;
  const double seconds = std::strtod(env, &end);
  if (end == env || *end != '\0' || !(seconds > 0))
    DSTRAIN_THROW(ErrorCode::InvalidArgument,
                  std::string("DSTRAIN_TIMEOUT_S='") + env + "': expected a positive number of seconds");
  return seconds;
}

std::string Communicator::name() const {
  return std::string(backend()) + " communicator (rank " + std::to_string(rank()) + " of " +
         std::to_string(size()) + ")";
}

void Communicator::reduce_scatter(const Tensor&, Tensor&, ReduceOp, Context&) {
  DSTRAIN_THROW(ErrorCode::Unsupported, name() + " has no reduce_scatter");
}

void Communicator::all_gather(const Tensor&, Tensor&, Context&) {
  DSTRAIN_THROW(ErrorCode::Unsupported, name() + " has no all_gather");
}

std::unique_ptr<Communicator> Communicator::split(int, int) {
  DSTRAIN_THROW(ErrorCode::Unsupported, name() + " cannot split");
}

void Communicator::set_timeout(double seconds) {
  DSTRAIN_CHECK(seconds > 0, "collective timeout must be positive, got " + std::to_string(seconds));
  timeout_s_ = seconds;
}

}  // namespace dstrain

namespace dstrain::collectives {

namespace {
class SelfCommunicator final : public Communicator {
 public:
  explicit SelfCommunicator(Device device) : device_(device) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const char* backend() const override { return "self"; }
  Device device() const override { return device_; }
  void allreduce(Tensor& t, ReduceOp, Context&) override { check(t); }
  void broadcast(Tensor& t, int root, Context&) override {
    check(t);
    DSTRAIN_CHECK(root == 0, "broadcast root " + std::to_string(root) + " in a job of one rank");
  }
  // With one rank both are a copy of `in` into `out`.
  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp, Context&) override {
    check_equal_chunks(in, out, 1, device_, "reduce_scatter");
    if (out.numel() > 0) out.copy_from(in.view(out.shape()));
  }
  void all_gather(const Tensor& in, Tensor& out, Context&) override {
    check_equal_chunks(out, in, 1, device_, "all_gather");
    if (out.numel() > 0) out.copy_from(in.view(out.shape()));
  }
  std::unique_ptr<Communicator> split(int color, int) override {
    DSTRAIN_CHECK(color >= 0, "split color must be >= 0, got " + std::to_string(color));
    auto child = std::make_unique<SelfCommunicator>(device_);
    child->set_timeout(timeout());
    return child;
  }

 private:
  void check(const Tensor& t) const {
    DSTRAIN_CHECK(t.device() == device_, "collective buffer on " + t.device().str() + ", communicator on " +
                                             device_.str());
  }
  Device device_;
};

bool overlap(const Tensor& a, const Tensor& b) {
  if (a.nbytes() == 0 || b.nbytes() == 0) return false;
  const auto* a0 = static_cast<const char*>(a.data());
  const auto* b0 = static_cast<const char*>(b.data());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}
}  // namespace

std::unique_ptr<Communicator> make_self_communicator(Device device) {
  return std::make_unique<SelfCommunicator>(device);
}

void check_equal_chunks(const Tensor& chunked, const Tensor& other, int size, Device device, const char* what) {
  DSTRAIN_CHECK(chunked.dtype() == other.dtype(), std::string(what) + " of " + dtype_name(chunked.dtype()) +
                                                      " into " + dtype_name(other.dtype()) + ": dtypes differ");
  DSTRAIN_CHECK(chunked.numel() == static_cast<std::int64_t>(size) * other.numel(),
                std::string(what) + " takes equal chunks: " + std::to_string(chunked.numel()) + " elements for " +
                    std::to_string(size) + " ranks of " + std::to_string(other.numel()));
  DSTRAIN_CHECK(chunked.device() == device && other.device() == device,
                std::string(what) + " buffers on " + chunked.device().str() + " and " + other.device().str() +
                    ", communicator on " + device.str());
  DSTRAIN_CHECK(!overlap(chunked, other), std::string(what) + ": input and output overlap");
}

void hierarchical_placement(const ProcessInfo& info, int& node, int& local_rank) {
  const char* env = std::getenv("DSTRAIN_SIMULATE_NODES");
  if (!env || !*env) {
    node = info.node;
    local_rank = info.local_rank;
    return;
  }
  char* end = nullptr;
  const long nodes = std::strtol(env, &end, 10);
  DSTRAIN_CHECK(end != env && *end == '\0' && nodes >= 1 && nodes <= info.size && info.size % nodes == 0,
                std::string("DSTRAIN_SIMULATE_NODES='") + env + "': expected a divisor of the world size " +
                    std::to_string(info.size));
  const int per_node = info.size / static_cast<int>(nodes);
  node = info.rank / per_node;
  local_rank = info.rank % per_node;
}

const char* collective_kind_name(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::Allreduce: return "allreduce";
    case CollectiveKind::Broadcast: return "broadcast";
    case CollectiveKind::ReduceScatter: return "reduce_scatter";
    case CollectiveKind::AllGather: return "all_gather";
    case CollectiveKind::Split: return "split";
    case CollectiveKind::Barrier: return "barrier";
  }
  return "?";
}

std::string describe_call(const CallFingerprint& f) {
  std::ostringstream out;
  out << collective_kind_name(static_cast<CollectiveKind>(f.operation));
  if (f.op >= 0) out << ' ' << reduce_op_name(static_cast<ReduceOp>(f.op));
  const auto kind = static_cast<CollectiveKind>(f.operation);
  // Split (colors and keys differ by design) and barrier carry no count.
  if (kind != CollectiveKind::Split && kind != CollectiveKind::Barrier)
    out << " of " << f.count << ' ' << dtype_name(static_cast<DType>(f.dtype));
  if (kind == CollectiveKind::Broadcast) out << " from root " << f.root;
  out << " (call #" << f.call << ")";
  return out.str();
}

bool debug_collectives_from_env() {
  const char* env = std::getenv("DSTRAIN_DEBUG_COLLECTIVES");
  return env && *env && std::strcmp(env, "0") != 0;
}

std::string fingerprint_mismatch(const std::vector<CallFingerprint>& per_rank) {
  if (per_rank.empty()) return {};
  bool same = true;
  for (const auto& f : per_rank) same = same && f == per_rank.front();
  if (same) return {};
  // Group ranks by what they called, in order of first appearance.
  std::vector<std::pair<std::string, std::vector<int>>> groups;
  for (std::size_t r = 0; r < per_rank.size(); ++r) {
    const std::string call = describe_call(per_rank[r]);
    auto it = groups.begin();
    while (it != groups.end() && it->first != call) ++it;
    if (it == groups.end()) {
      groups.push_back({call, {}});
      it = groups.end() - 1;
    }
    it->second.push_back(static_cast<int>(r));
  }
  std::ostringstream out;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    out << (g ? "; " : "") << (groups[g].second.size() > 1 ? "ranks " : "rank ");
    for (std::size_t i = 0; i < groups[g].second.size(); ++i) out << (i ? "," : "") << groups[g].second[i];
    out << " called " << groups[g].first;
  }
  return out.str();
}

void check_fingerprints(Communicator& host, const CallFingerprint& mine, const std::string& where) {
  constexpr int kWords = sizeof(CallFingerprint) / sizeof(std::int32_t);
  static_assert(sizeof(CallFingerprint) % sizeof(std::int32_t) == 0, "fingerprint is a whole number of i32");
  Tensor in = Tensor::empty({kWords}, DType::I32, Device::cpu());
  Tensor all = Tensor::empty({kWords * host.size()}, DType::I32, Device::cpu());
  std::memcpy(in.data(), &mine, sizeof(mine));
  Context ctx = Context::cpu();
  host.all_gather(in, all, ctx);
  std::vector<CallFingerprint> per_rank(static_cast<std::size_t>(host.size()));
  std::memcpy(per_rank.data(), all.data(), per_rank.size() * sizeof(CallFingerprint));
  const std::string mismatch = fingerprint_mismatch(per_rank);
  if (!mismatch.empty())
    DSTRAIN_THROW(ErrorCode::InvalidArgument, "collective mismatch on " + where + " (seen by rank " +
                                                  std::to_string(host.rank()) + "): " + mismatch);
}

bool launched_by_mpi_launcher() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "PMI_RANK"})
    if (std::getenv(name)) return true;
  return false;
}

#ifndef DSTRAIN_HAVE_MPI
std::unique_ptr<MpiSession> start_mpi_session(int&, char**&) {
  if (launched_by_mpi_launcher())
    DSTRAIN_THROW(ErrorCode::Unsupported,
                  "started by an MPI launcher, but this dstrain was built without MPI (DSTRAIN_WITH_MPI=OFF)");
  return nullptr;
}
#endif

#ifndef DSTRAIN_HAVE_CUDA
std::vector<char> nccl_unique_id() { DSTRAIN_THROW(ErrorCode::Unsupported, "NCCL in a build without CUDA"); }
std::unique_ptr<Communicator> make_nccl_communicator(const std::vector<char>&, int, int, int, double,
                                                     Communicator*) {
  DSTRAIN_THROW(ErrorCode::Unsupported, "NCCL in a build without CUDA");
}
#endif

}  // namespace dstrain::collectives
