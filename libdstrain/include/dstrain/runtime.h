// Runtime: the process's place in the job and what it computes with.
// Under mpirun (or another MPI launcher) it initialises MPI, learns rank, world size, local rank
// and node count, and takes one GPU per local rank when there are enough GPUs, else the CPU.
// Started without a launcher it is a job of one process. On GPUs the communicator is NCCL,
// built from an ncclUniqueId broadcast over MPI; on the CPU it is MPI.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "dstrain/comm.h"
#include "dstrain/context.h"

namespace dstrain {

enum class DevicePreference { Auto, Cpu, Cuda };
// "auto", "cpu", "cuda"; anything else raises InvalidArgument.
DevicePreference parse_device_preference(const std::string& text);

struct RuntimeOptions {
  // Auto: the GPU when every rank of a node can have its own, else the CPU. The environment
  // variable DSTRAIN_DEVICE (auto|cpu|cuda) overrides Auto.
  DevicePreference device = DevicePreference::Auto;
  // Seconds every collective and rendezvous waits for the other ranks before raising
  // Error(Timeout); 0: DSTRAIN_TIMEOUT_S if set, else 600.
  double timeout_s = 0;
};

class Runtime {
 public:
  static Runtime init(int& argc, char**& argv, const RuntimeOptions& options = {});
  ~Runtime();
  Runtime(Runtime&&) noexcept;
  Runtime& operator=(Runtime&&) noexcept;
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  int rank() const;
  int world_size() const;
  int local_rank() const;
  int local_size() const;
  int node_count() const;
  bool is_root() const { return rank() == 0; }
  bool launched_by_mpi() const;

  Device device() const;
  Context& context();
  // The gradient communicator: NCCL on GPUs, MPI (or self) on the CPU.
  Communicator& comm();
  // Host buffers among the same ranks, whatever the device: MPI under a launcher, else self.
  // Used for bootstrap exchanges (IPC handles, checkpoint agreement) beside a GPU communicator.
  Communicator& host_comm();

  // Host-side helpers over MPI (trivial for one process).
  bool all_ranks_equal(std::uint64_t value);      // true when every rank passed the same value
  void host_allreduce_sum(double* values, int n);  // in place
  void barrier();
  // Ends every rank of the job (MPI_Abort) when there is more than one, so that a rank that
  // failed does not leave the others waiting in a collective. Call after reporting the error.
  // With one rank it returns and the caller exits normally.
  void abort_job(int exit_code) noexcept;

  // One line: ranks, nodes, device, communicator backend.
  std::string describe() const;

  struct Impl;

 private:
  explicit Runtime(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dstrain
