// MPI bootstrap and the host communicator.
#include <mpi.h>

#include <cstring>
#include <string>
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

MPI_Datatype mpi_type(DType dt) {
  switch (dt) {
    case DType::F32: return MPI_FLOAT;
    case DType::I32: return MPI_INT;
    default:
      DSTRAIN_THROW(ErrorCode::Unsupported,
                    std::string("MPI collectives take fp32 or i32 host buffers, got ") + dtype_name(dt));
  }
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg: return MPI_SUM;
    case ReduceOp::Max: return MPI_MAX;
    case ReduceOp::Min: return MPI_MIN;
  }
  return MPI_SUM;
}

// Counts above INT_MAX are sent in pieces: MPI takes int counts.
constexpr std::int64_t kMaxChunk = 1 << 30;

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    DSTRAIN_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    DSTRAIN_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "mpi"; }
  Device device() const override { return Device::cpu(); }

  void allreduce(Tensor& t, ReduceOp op, Context&) override {
    check_host(t, "allreduce");
    const MPI_Datatype type = mpi_type(t.dtype());
    auto* base = static_cast<char*>(t.data());
    const std::size_t elem = dtype_size(t.dtype());
    for (std::int64_t off = 0; off < t.numel(); off += kMaxChunk) {
      const int n = static_cast<int>(std::min<std::int64_t>(kMaxChunk, t.numel() - off));
      DSTRAIN_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, base + off * elem, n, type, mpi_op(op), comm_));
    }
    if (op == ReduceOp::Avg) {
      DSTRAIN_CHECK(t.dtype() == DType::F32, "Avg needs an fp32 buffer");
      const float inv = 1.0f / static_cast<float>(size_);
      float* p = t.data_as<float>();
      for (std::int64_t i = 0; i < t.numel(); ++i) p[i] *= inv;
    }
  }

  void broadcast(Tensor& t, int root, Context&) override {
    check_host(t, "broadcast");
    DSTRAIN_CHECK(root >= 0 && root < size_, "broadcast root " + std::to_string(root) + " out of range");
    auto* base = static_cast<char*>(t.data());
    for (std::size_t off = 0; off < t.nbytes(); off += kMaxChunk) {
      const int n = static_cast<int>(std::min<std::size_t>(kMaxChunk, t.nbytes() - off));
      DSTRAIN_MPI_CHECK(MPI_Bcast(base + off, n, MPI_BYTE, root, comm_));
    }
  }

 private:
  void check_host(const Tensor& t, const char* what) const {
    DSTRAIN_CHECK(!t.is_cuda(), std::string("MPI ") + what + " needs a host buffer, got one on " + t.device().str());
  }
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
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
    DSTRAIN_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm_));
    DSTRAIN_MPI_CHECK(MPI_Comm_rank(comm_, &info_.rank));
    DSTRAIN_MPI_CHECK(MPI_Comm_size(comm_, &info_.size));
    MPI_Comm local;
    DSTRAIN_MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, info_.rank, MPI_INFO_NULL, &local));
    DSTRAIN_MPI_CHECK(MPI_Comm_rank(local, &info_.local_rank));
    DSTRAIN_MPI_CHECK(MPI_Comm_size(local, &info_.local_size));
    MPI_Comm_free(&local);
    // One leader per node (local rank 0) counts the nodes.
    int leader = info_.local_rank == 0 ? 1 : 0;
    DSTRAIN_MPI_CHECK(MPI_Allreduce(&leader, &info_.node_count, 1, MPI_INT, MPI_SUM, comm_));
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
    DSTRAIN_MPI_CHECK(MPI_Comm_dup(comm_, &dup));
    return std::make_unique<MpiCommunicator>(dup);
  }

  void broadcast_bytes(std::vector<char>& bytes, int root) override {
    int n = static_cast<int>(bytes.size());
    DSTRAIN_MPI_CHECK(MPI_Bcast(&n, 1, MPI_INT, root, comm_));
    bytes.resize(static_cast<std::size_t>(n));
    DSTRAIN_MPI_CHECK(MPI_Bcast(bytes.data(), n, MPI_BYTE, root, comm_));
  }

  bool all_equal_u64(std::uint64_t value) override {
    std::uint64_t lo = 0, hi = 0;
    DSTRAIN_MPI_CHECK(MPI_Allreduce(&value, &lo, 1, MPI_UINT64_T, MPI_MIN, comm_));
    DSTRAIN_MPI_CHECK(MPI_Allreduce(&value, &hi, 1, MPI_UINT64_T, MPI_MAX, comm_));
    return lo == hi;
  }

  void allreduce_sum_f64(double* values, int n) override {
    DSTRAIN_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, values, n, MPI_DOUBLE, MPI_SUM, comm_));
  }

  void barrier() override { DSTRAIN_MPI_CHECK(MPI_Barrier(comm_)); }

  void abort(int exit_code) noexcept override { MPI_Abort(MPI_COMM_WORLD, exit_code); }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  ProcessInfo info_;
  bool owns_mpi_ = false;
};

}  // namespace

std::unique_ptr<MpiSession> start_mpi_session(int& argc, char**& argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized && !launched_by_mpi_launcher()) return nullptr;
  return std::make_unique<OpenMpiSession>(argc, argv);
}

}  // namespace dstrain::collectives
