// Communicator: collectives among the ranks of a job. On GPUs it is NCCL (device buffers, issued
// on the context's stream); on the CPU it is MPI (host buffers, blocking); a job of one process
// without MPI gets a trivial one.
#pragma once
#include "dstrain/context.h"
#include "dstrain/tensor.h"

namespace dstrain {

enum class ReduceOp { Sum, Avg, Max, Min };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* backend() const = 0;  // "nccl", "mpi" or "self"
  // Where the buffers given to this communicator must live.
  virtual Device device() const = 0;
  // In place: every rank ends with the reduction of all ranks' `t` (same shape and dtype on all).
  virtual void allreduce(Tensor& t, ReduceOp op, Context& ctx) = 0;
  // In place: every rank ends with root's `t`.
  virtual void broadcast(Tensor& t, int root, Context& ctx) = 0;
};

}  // namespace dstrain
