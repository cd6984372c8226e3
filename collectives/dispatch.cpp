#include "collectives/dispatch.h"

#include <string>
#include <utility>

#include "dstrain/error.h"

namespace dstrain::collectives {

DispatchCommunicator::DispatchCommunicator(DispatchParts parts)
    : base_(std::move(parts.base)), peer_(std::move(parts.peer)), plan_(std::move(parts.plan)) {
  DSTRAIN_CHECK(base_ != nullptr, "a dispatch communicator needs a base communicator");
  base_algo_ = base_->device().is_cuda() ? AllreduceAlgo::Nccl : AllreduceAlgo::Mpi;
  if (peer_) {
    DSTRAIN_CHECK(peer_->size() == base_->size() && peer_->rank() == base_->rank(),
                  "the peer-memory engine's ranks (" + std::to_string(peer_->rank()) + " of " +
                      std::to_string(peer_->size()) + ") differ from the base communicator's (" +
                      std::to_string(base_->rank()) + " of " + std::to_string(base_->size()) + ")");
    DSTRAIN_CHECK(base_->device() == Device::cuda(peer_->device()),
                  "the peer-memory engine runs on cuda:" + std::to_string(peer_->device()) +
                      ", the base communicator on " + base_->device().str());
  }
  if (parts.make_hierarchical) hierarchical_ = parts.make_hierarchical(*base_);
  set_algo(parts.algo);
}

DispatchCommunicator::~DispatchCommunicator() = default;

std::string DispatchCommunicator::name() const {
  std::string extras;
  if (peer_) extras += "+peer";
  if (hierarchical_) extras += "+hierarchical";
  return base_->name() + (extras.empty() ? std::string() : " [" + extras.substr(1) + "]");
}

bool DispatchCommunicator::can_run(AllreduceAlgo algo) const {
  switch (algo) {
    case AllreduceAlgo::Auto: return true;
    case AllreduceAlgo::Nccl:
    case AllreduceAlgo::Mpi: return algo == base_algo_;
    case AllreduceAlgo::OneShot:
    case AllreduceAlgo::TwoShot: return peer_ != nullptr;
    case AllreduceAlgo::Hierarchical: return hierarchical_ != nullptr;
  }
  return false;
}

void DispatchCommunicator::set_algo(AllreduceAlgo algo) {
  if (!can_run(algo))
    DSTRAIN_THROW(ErrorCode::Unsupported,
                  std::string("AllReduce algorithm ") + allreduce_algo_name(algo) + " is not available on " + name() +
                      (algo == AllreduceAlgo::OneShot || algo == AllreduceAlgo::TwoShot
                           ? " (the peer-memory kernels need GPUs of one node, at most " +
                                 std::to_string(PeerAllreduce::kMaxRanks) + " ranks)"
                           : std::string()));
  algo_ = algo;
}

bool DispatchCommunicator::runs(AllreduceAlgo algo, std::size_t bytes, DType dtype, ReduceOp op) const {
  switch (algo) {
    case AllreduceAlgo::OneShot:
    case AllreduceAlgo::TwoShot: return peer_ && peer_->supports(bytes, dtype, op);
    case AllreduceAlgo::Auto: return false;
    default: return can_run(algo);
  }
}

AllreduceAlgo DispatchCommunicator::algo_for(std::size_t bytes, DType dtype, ReduceOp op) const {
  if (size() == 1) return base_algo_;
  if (algo_ == AllreduceAlgo::Auto && plan_.ranges.empty()) return base_algo_;  // no plan: the base alone
  const AllreduceAlgo wanted = algo_ != AllreduceAlgo::Auto ? algo_ : choose_allreduce_algo(plan_, bytes);
  return runs(wanted, bytes, dtype, op) ? wanted : base_algo_;
}

AllreduceAlgo DispatchCommunicator::algo_for(const Tensor& t, ReduceOp op) const {
  if (t.device() != device()) return base_algo_;  // the base raises the mismatch
  return algo_for(t.nbytes(), t.dtype(), op);
}

void DispatchCommunicator::allreduce(Tensor& t, ReduceOp op, Context& ctx) {
  const AllreduceAlgo algo = algo_for(t, op);
  switch (algo) {
    case AllreduceAlgo::OneShot:
    case AllreduceAlgo::TwoShot: peer_->allreduce(t, op, algo, ctx); return;
    case AllreduceAlgo::Hierarchical: hierarchical_->allreduce(t, op, ctx); return;
    default: base_->allreduce(t, op, ctx); return;
  }
}

void DispatchCommunicator::set_timeout(double seconds) {
  Communicator::set_timeout(seconds);
  base_->set_timeout(seconds);
  if (hierarchical_) hierarchical_->set_timeout(seconds);
}

void DispatchCommunicator::check_health() {
  base_->check_health();
  if (peer_) peer_->check_health();
  if (hierarchical_) hierarchical_->check_health();
}

std::unique_ptr<Communicator> make_gpu_dispatch(std::unique_ptr<Communicator> base, Communicator& host,
                                                const ProcessInfo& info, int device) {
  DispatchParts parts;
  parts.base = std::move(base);
  // Other nodes are taken to look like this one (the usual cluster of identical boxes), so that a
  // job over several nodes plans Hierarchical where the cost model prefers it.
  const Topology local = discover_topology();
  parts.plan = make_plan(info.node_count > 1
                             ? combine_nodes(std::vector<Topology>(static_cast<std::size_t>(info.node_count), local))
                             : local);
  if (info.node_count == 1 && info.size > 1 && info.size <= PeerAllreduce::kMaxRanks) {
    try {
      parts.peer = make_peer_allreduce(host, device);
    } catch (const Error& e) {
      // Every rank reaches the same verdict (the engine agrees on mapping failures).
      if (e.code() != ErrorCode::Unsupported) throw;
      if (info.rank == 0) detail::log_warning(std::string("AllReduce without peer-memory kernels: ") + e.what());
    }
  }
  if (info.node_count > 1)
    parts.make_hierarchical = [info](Communicator& world) {
      int node = 0, local_rank = 0;
      hierarchical_placement(info, node, local_rank);
      return make_hierarchical_communicator(world, node, local_rank);
    };
  return std::make_unique<DispatchCommunicator>(std::move(parts));
}

#ifndef DSTRAIN_HAVE_CUDA
std::unique_ptr<PeerAllreduce> make_peer_allreduce(Communicator&, int, const PeerAllreduceOptions&) {
  DSTRAIN_THROW(ErrorCode::Unsupported, "peer-memory AllReduce in a build without CUDA");
}
#endif

}  // namespace dstrain::collectives
