// Internal factories for communicators and the MPI bootstrap, behind plain C++ declarations so
// that libdstrain/src includes no MPI or NCCL header.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dstrain/comm.h"

namespace dstrain::collectives {

// A job of one rank: every collective leaves the data as it is (Avg of one value is itself).
std::unique_ptr<Communicator> make_self_communicator(Device device);

// Hierarchical AllReduce over `world`: ranks with the same `node` form an intra-node
// communicator (ordered by local_rank), ranks with the same local_rank one inter-node
// communicator. allreduce = intra-node reduce-scatter, inter-node AllReduce of the shard,
// intra-node all-gather; the other collectives go to a communicator split from `world`. Every
// node must hold the same number of ranks. Collective over `world` (used only while constructing).
std::unique_ptr<Communicator> make_hierarchical_communicator(Communicator& world, int node, int local_rank);

// Checks the equal-chunk contract of reduce_scatter (chunked = in) or all_gather (chunked = out):
// same dtype, chunked.numel() == size * other.numel(), same device as `device`, no overlap.
void check_equal_chunks(const Tensor& chunked, const Tensor& other, int size, Device device, const char* what);

// What a rank is about to call, compared across ranks when DSTRAIN_DEBUG_COLLECTIVES=1.
struct CallFingerprint {
  std::int32_t operation = 0;  // CollectiveKind
  std::int32_t dtype = 0;
  std::int32_t op = 0;    // ReduceOp, or -1
  std::int32_t root = -1;
  std::int64_t count = 0;
  std::int64_t call = 0;  // number of the call on this communicator, from 1
  bool operator==(const CallFingerprint& o) const {
    return operation == o.operation && dtype == o.dtype && op == o.op && root == o.root && count == o.count &&
           call == o.call;
  }
};
enum class CollectiveKind : std::int32_t { Allreduce, Broadcast, ReduceScatter, AllGather, Split, Barrier };
const char* collective_kind_name(CollectiveKind kind);
// "allreduce sum of 1234 fp32 (call #57)".
std::string describe_call(const CallFingerprint& f);
// True when DSTRAIN_DEBUG_COLLECTIVES is set to something other than "" or "0".
bool debug_collectives_from_env();
// Empty when every rank's fingerprint is the same; else which ranks called what.
std::string fingerprint_mismatch(const std::vector<CallFingerprint>& per_rank);
// Exchanges `mine` over the host communicator `host` (an i32 all_gather, with host's timeout)
// and raises InvalidArgument naming `where` and the ranks and what each called on a mismatch.
void check_fingerprints(Communicator& host, const CallFingerprint& mine, const std::string& where);

// The MPI side of a job. Constructed only when MPI is built in; initialises MPI if the process
// was started by a launcher and MPI is not yet initialised, and finalises only what it started.
struct ProcessInfo {
  int rank = 0, size = 1, local_rank = 0, local_size = 1, node_count = 1;
  int node = 0;  // index of this rank's node, 0..node_count-1
};
// The node of this rank for the hierarchical communicator: DSTRAIN_SIMULATE_NODES=K (tests) puts
// ranks into K simulated nodes of consecutive ranks (size must be a multiple of K); otherwise
// `info`'s node and local rank.
void hierarchical_placement(const ProcessInfo& info, int& node, int& local_rank);
bool launched_by_mpi_launcher();  // OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK, ... in the environment

class MpiSession {
 public:
  virtual ~MpiSession() = default;
  virtual ProcessInfo info() const = 0;
  virtual std::unique_ptr<Communicator> make_host_communicator() = 0;  // over a dup of MPI_COMM_WORLD
  virtual void broadcast_bytes(std::vector<char>& bytes, int root) = 0;
  virtual bool all_equal_u64(std::uint64_t value) = 0;
  virtual void allreduce_sum_f64(double* values, int n) = 0;
  virtual void barrier() = 0;
  virtual void abort(int exit_code) noexcept = 0;  // MPI_Abort on the world communicator
  // The session's own exchanges (broadcast_bytes, ...) and the communicators it makes from now on
  // raise Error(Timeout) after this many seconds.
  virtual void set_timeout(double seconds) = 0;
};
// Returns null when the build has no MPI.
std::unique_ptr<MpiSession> start_mpi_session(int& argc, char**& argv);

// NCCL (CUDA builds only; otherwise these raise Unsupported). Initialisation is non-blocking and
// gives up after timeout_s. A watchdog thread aborts the NCCL communicator when a collective does
// not complete within the timeout or NCCL reports an asynchronous error; the next call raises.
// `host` (may be null; must outlive the communicator) carries the DSTRAIN_DEBUG_COLLECTIVES
// fingerprint exchange.
std::vector<char> nccl_unique_id();
std::unique_ptr<Communicator> make_nccl_communicator(const std::vector<char>& unique_id, int rank, int size,
                                                     int device, double timeout_s = default_collective_timeout_s(),
                                                     Communicator* host = nullptr);

}  // namespace dstrain::collectives
