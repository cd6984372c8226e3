// DispatchCommunicator: one Communicator that carries each AllReduce out with the algorithm the
// planner (or the user) picks for its size: the base communicator's own (NCCL on GPUs, MPI on the
// CPU), the peer-memory kernels (one-shot, two-shot) among the ranks of a node, or the
// hierarchical composition across nodes. Every other collective goes to the base.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "collectives/collectives.h"
#include "collectives/nvlink/peer_allreduce.h"
#include "dstrain/allreduce_algo.h"
#include "dstrain/comm.h"
#include "dstrain/topology.h"

namespace dstrain::collectives {

struct DispatchParts {
  std::unique_ptr<Communicator> base;  // required
  // Optional: the peer-memory engine among the same ranks (all on one node, same order).
  std::unique_ptr<PeerAllreduce> peer;
  // Optional: builds the hierarchical communicator over the base (it must not outlive it).
  std::function<std::unique_ptr<Communicator>(Communicator& base)> make_hierarchical;
  // Auto's choices: choose_allreduce_algo(plan, bytes), which honours DSTRAIN_ALLREDUCE_ALGO.
  // A plan without size ranges leaves every AllReduce to the base.
  Plan plan;
  // Auto, or an algorithm to use for every AllReduce it can carry (see set_algo).
  AllreduceAlgo algo = AllreduceAlgo::Auto;
};

class DispatchCommunicator final : public Communicator {
 public:
  explicit DispatchCommunicator(DispatchParts parts);
  ~DispatchCommunicator() override;

  int rank() const override { return base_->rank(); }
  int size() const override { return base_->size(); }
  // The base's backend: the dispatch is an addition to it, not a new transport.
  const char* backend() const override { return base_->backend(); }
  std::string name() const override;
  Device device() const override { return base_->device(); }

  void allreduce(Tensor& t, ReduceOp op, Context& ctx) override;
  void broadcast(Tensor& t, int root, Context& ctx) override { base_->broadcast(t, root, ctx); }
  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op, Context& ctx) override {
    base_->reduce_scatter(in, out, op, ctx);
  }
  void all_gather(const Tensor& in, Tensor& out, Context& ctx) override { base_->all_gather(in, out, ctx); }
  std::unique_ptr<Communicator> split(int color, int key) override { return base_->split(color, key); }
  void set_timeout(double seconds) override;
  void check_health() override;

  // Auto: the planner decides per message. Another algorithm is used for every AllReduce it can
  // carry; messages it cannot (peer kernels: not fp32/fp16/bf16, Max/Min, or larger than the
  // engine's buffer) go to the base. An algorithm this communicator has no means for at all
  // raises Unsupported.
  void set_algo(AllreduceAlgo algo);
  AllreduceAlgo algo() const { return algo_; }
  // The algorithm allreduce() would use for `t` and `op`, never Auto.
  AllreduceAlgo algo_for(const Tensor& t, ReduceOp op) const;
  // The same for a message of `bytes` bytes of `dtype` on this communicator's device.
  AllreduceAlgo algo_for(std::size_t bytes, DType dtype, ReduceOp op) const;
  // Whether the communicator has the means for `algo` (Auto: always).
  bool can_run(AllreduceAlgo algo) const;
  // The base's own algorithm: Nccl for a GPU communicator, Mpi for a host one.
  AllreduceAlgo base_algo() const { return base_algo_; }
  const Plan& plan() const { return plan_; }
  PeerAllreduce* peer() const { return peer_.get(); }

 private:
  bool runs(AllreduceAlgo algo, std::size_t bytes, DType dtype, ReduceOp op) const;

  std::unique_ptr<Communicator> base_;
  std::unique_ptr<PeerAllreduce> peer_;
  std::unique_ptr<Communicator> hierarchical_;  // declared after base_: destroyed before it
  Plan plan_;
  AllreduceAlgo algo_ = AllreduceAlgo::Auto;
  AllreduceAlgo base_algo_;
};

// The GPU gradient communicator of a job of several ranks: `base` (NCCL) with the plan of the
// discovered topology, the peer-memory engine when all ranks share one node (skipped with a
// warning where CUDA IPC is not possible), and the hierarchical composition over `base` across
// nodes. Collective over `host` (all ranks, host buffers).
std::unique_ptr<Communicator> make_gpu_dispatch(std::unique_ptr<Communicator> base, Communicator& host,
                                                const ProcessInfo& info, int device);

}  // namespace dstrain::collectives
