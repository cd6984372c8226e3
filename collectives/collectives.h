// Internal factories for communicators and the MPI bootstrap, behind plain C++ declarations so
// that libdstrain/src includes no MPI or NCCL header.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "dstrain/comm.h"

namespace dstrain::collectives {

// A job of one rank: every collective leaves the data as it is (Avg of one value is itself).
std::unique_ptr<Communicator> make_self_communicator(Device device);

// The MPI side of a job. Constructed only when MPI is built in; initialises MPI if the process
// was started by a launcher and MPI is not yet initialised, and finalises only what it started.
struct ProcessInfo {
  int rank = 0, size = 1, local_rank = 0, local_size = 1, node_count = 1;
};
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
};
// Returns null when the build has no MPI.
std::unique_ptr<MpiSession> start_mpi_session(int& argc, char**& argv);

// NCCL (CUDA builds only; otherwise these raise Unsupported).
std::vector<char> nccl_unique_id();
std::unique_ptr<Communicator> make_nccl_communicator(const std::vector<char>& unique_id, int rank, int size,
                                                     int device);

}  // namespace dstrain::collectives
