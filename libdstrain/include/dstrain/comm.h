// Communicator: collectives among the ranks of a job. On GPUs it is NCCL (device buffers, issued
// on the context's stream); on the CPU it is MPI (host buffers, blocking); a job of one process
// without MPI gets a trivial one.
//
// Every rank of a communicator must call the same collectives in the same order with the same
// counts, dtypes and roots. Nothing waits forever: a collective whose peers do not all arrive
// within timeout() seconds raises Error(Timeout) naming the operation, the rank, how long it
// waited and, where the backend can tell, the ranks that did not arrive. After a timeout or an
// asynchronous failure the communicator is broken: every later call raises again.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "dstrain/context.h"
#include "dstrain/tensor.h"

namespace dstrain {

enum class ReduceOp { Sum, Avg, Max, Min };
const char* reduce_op_name(ReduceOp op);  // "sum", "avg", "max", "min"

// Seconds a collective waits for its peers unless told otherwise: DSTRAIN_TIMEOUT_S when set
// (a positive number; anything else raises InvalidArgument), else 600.
double default_collective_timeout_s();

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* backend() const = 0;  // "nccl", "mpi", "self" or "hierarchical"
  // For messages: backend, rank and size, e.g. "mpi communicator (rank 2 of 4)".
  virtual std::string name() const;
  // Where the buffers given to this communicator must live.
  virtual Device device() const = 0;

  // In place: every rank ends with the reduction of all ranks' `t` (same shape and dtype on all).
  virtual void allreduce(Tensor& t, ReduceOp op, Context& ctx) = 0;
  // In place: every rank ends with root's `t`.
  virtual void broadcast(Tensor& t, int root, Context& ctx) = 0;
  // Equal chunks: `in` holds size() chunks of k = out.numel() elements (in.numel() == size() * k,
  // same dtype); rank r's `out` gets the reduction over all ranks of chunk r. `in` and `out` must
  // not overlap. k may be 0.
  virtual void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op, Context& ctx);
  // Equal chunks: every rank gives k = in.numel() elements; `out` (size() * k elements, same
  // dtype) gets rank r's `in` as chunk r on every rank. `in` and `out` must not overlap.
  virtual void all_gather(const Tensor& in, Tensor& out, Context& ctx);
  // Collective over this communicator: ranks that pass the same color (>= 0) form a new
  // communicator, ordered by key, then by rank here. The new one inherits the timeout.
  virtual std::unique_ptr<Communicator> split(int color, int key);

  // Seconds each collective waits for all peers before raising Error(Timeout); > 0.
  virtual void set_timeout(double seconds);
  double timeout() const { return timeout_s_; }
  // Raises the error of a collective that failed after it was issued (the NCCL watchdog found an
  // asynchronous error or a deadline passed); returns quietly when all is well.
  virtual void check_health() {}

 protected:
  double timeout_s_ = default_collective_timeout_s();
};

}  // namespace dstrain
