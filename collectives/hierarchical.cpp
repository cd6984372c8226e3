// Hierarchical AllReduce: reduce-scatter inside each node, AllReduce of the shard among the
// ranks of the same local rank on all nodes, all-gather inside each node. Each byte crosses the
// network once per node instead of once per rank.
#include <string>

#include "collectives/collectives.h"
#include "dstrain/error.h"

namespace dstrain::collectives {

namespace {

Tensor view_of(Tensor& t, std::int64_t offset, std::int64_t count) {
  auto* base = static_cast<char*>(t.data()) + offset * static_cast<std::int64_t>(dtype_size(t.dtype()));
  return Tensor::wrap(base, {count}, t.dtype(), t.device());
}

// x /= ranks on host memory, in fp32, rounded back once.
void divide_host(Tensor& t, int ranks) {
  const float d = static_cast<float>(ranks);
  const std::int64_t n = t.numel();
  switch (t.dtype()) {
    case DType::F32: {
      float* p = t.data_as<float>();
      for (std::int64_t i = 0; i < n; ++i) p[i] /= d;
      break;
    }
    case DType::F16: {
      auto* p = t.data_as<std::uint16_t>();
      for (std::int64_t i = 0; i < n; ++i) p[i] = float_to_fp16(fp16_to_float(p[i]) / d);
      break;
    }
    case DType::BF16: {
      auto* p = t.data_as<std::uint16_t>();
      for (std::int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(bf16_to_float(p[i]) / d);
      break;
    }
    default:
      DSTRAIN_THROW(ErrorCode::InvalidArgument,
                    std::string("hierarchical Avg needs a floating buffer, got ") + dtype_name(t.dtype()));
  }
}

class HierarchicalCommunicator final : public Communicator {
 public:
  HierarchicalCommunicator(Communicator& world, int node, int local_rank)
      : rank_(world.rank()), size_(world.size()), device_(world.device()) {
    DSTRAIN_CHECK(node >= 0 && local_rank >= 0, "hierarchical communicator: node " + std::to_string(node) +
                                                    ", local rank " + std::to_string(local_rank));
    timeout_s_ = world.timeout();
    // Every rank makes the same three splits in the same order.
    intra_ = world.split(node, local_rank);
    inter_ = world.split(local_rank, node);
    flat_ = world.split(0, world.rank());
    // Equal nodes: intra size x inter size == world size on every rank. Agreed by all ranks so
    // that none goes on alone.
    const bool even = intra_->size() * inter_->size() == size_;
    Tensor flag = Tensor::empty({1}, DType::I32, Device::cpu());
    *flag.data_as<std::int32_t>() = even ? 1 : 0;
    Context cpu = Context::cpu();
    if (flat_->device().is_cuda()) {
      Tensor on_device = flag.to(flat_->device());
      Context ctx = Context::for_device(flat_->device());
      flat_->allreduce(on_device, ReduceOp::Min, ctx);
      flag.copy_from(on_device);
    } else {
      flat_->allreduce(flag, ReduceOp::Min, cpu);
    }
    if (*flag.data_as<std::int32_t>() != 1)
      DSTRAIN_THROW(ErrorCode::InvalidArgument,
                    "hierarchical communicator needs the same number of ranks on every node; rank " +
                        std::to_string(rank_) + " has " + std::to_string(intra_->size()) + " on its node and " +
                        std::to_string(inter_->size()) + " nodes, for " + std::to_string(size_) + " ranks");
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "hierarchical"; }
  std::string name() const override {
    return "hierarchical communicator (rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ": " +
           std::to_string(inter_->size()) + " nodes of " + std::to_string(intra_->size()) + " over " +
           intra_->backend() + ")";
  }
  Device device() const override { return device_; }

  // The multiple of the local size goes the hierarchical way; the remainder (fewer elements than
  // ranks on a node) is reduced over all ranks at once. Avg on the host sums all the way and
  // divides once by the world size; on devices each level averages (NCCL Avg).
  void allreduce(Tensor& t, ReduceOp op, Context& ctx) override {
    DSTRAIN_CHECK(t.device() == device_,
                  "hierarchical allreduce buffer on " + t.device().str() + ", communicator on " + device_.str());
    // One level of one rank: the other level is the whole job (and NCCL 2.28 was seen to return
    // wrong values in the last elements of a one-rank Avg reduce-scatter of 2^20 + 3 values).
    if (intra_->size() == 1) return inter_->allreduce(t, op, ctx);
    if (inter_->size() == 1) return intra_->allreduce(t, op, ctx);
    const std::int64_t local = intra_->size();
    const std::int64_t main = t.numel() / local * local;
    const std::int64_t rest = t.numel() - main;
    if (main > 0) {
      const bool host_avg = op == ReduceOp::Avg && !device_.is_cuda();
      const ReduceOp level_op = host_avg ? ReduceOp::Sum : op;
      Tensor body = view_of(t, 0, main);
      shard_.resize({main / local}, t.dtype(), device_);
      intra_->reduce_scatter(body, shard_, level_op, ctx);
      inter_->allreduce(shard_, level_op, ctx);
      if (host_avg) divide_host(shard_, size_);
      intra_->all_gather(shard_, body, ctx);
    }
    if (rest > 0) {
      Tensor tail = view_of(t, main, rest);
      flat_->allreduce(tail, op, ctx);
    }
  }

  void broadcast(Tensor& t, int root, Context& ctx) override { flat_->broadcast(t, root, ctx); }
  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op, Context& ctx) override {
    flat_->reduce_scatter(in, out, op, ctx);
  }
  void all_gather(const Tensor& in, Tensor& out, Context& ctx) override { flat_->all_gather(in, out, ctx); }
  // A flat communicator of the chosen ranks (split of all ranks here).
  std::unique_ptr<Communicator> split(int color, int key) override { return flat_->split(color, key); }

  void set_timeout(double seconds) override {
    Communicator::set_timeout(seconds);
    for (Communicator* c : {intra_.get(), inter_.get(), flat_.get()}) c->set_timeout(seconds);
  }
  void check_health() override {
    for (Communicator* c : {intra_.get(), inter_.get(), flat_.get()}) c->check_health();
  }

 private:
  int rank_, size_;
  Device device_;
  std::unique_ptr<Communicator> intra_, inter_, flat_;
  Tensor shard_;  // this rank's part of the node's sum, reused across calls
};

}  // namespace

std::unique_ptr<Communicator> make_hierarchical_communicator(Communicator& world, int node, int local_rank) {
  return std::make_unique<HierarchicalCommunicator>(world, node, local_rank);
}

}  // namespace dstrain::collectives
