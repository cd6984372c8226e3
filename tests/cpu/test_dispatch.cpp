// DispatchCommunicator: which algorithm each AllReduce goes to (planner ranges, explicit choice,
// DSTRAIN_ALLREDUCE_ALGO, fallbacks to the base), with recording stand-ins for the base
// communicator, the peer-memory engine and the hierarchical communicator (no data is touched).
#include <catch2/catch.hpp>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "collectives/dispatch.h"
#include "dstrain/error.h"

using namespace dstrain;
using collectives::DispatchCommunicator;
using collectives::DispatchParts;

namespace {

struct Log {
  std::vector<std::string> calls;  // "<who> <what> <numel>"
};

class RecordingComm final : public Communicator {
 public:
  RecordingComm(std::string who, Log& log, Device device, const char* backend)
      : who_(std::move(who)), log_(log), device_(device), backend_(backend) {}
  int rank() const override { return 1; }
  int size() const override { return 4; }
  const char* backend() const override { return backend_; }
  Device device() const override { return device_; }
  void allreduce(Tensor& t, ReduceOp, Context&) override {
    log_.calls.push_back(who_ + " allreduce " + std::to_string(t.numel()));
  }
  void broadcast(Tensor& t, int, Context&) override {
    log_.calls.push_back(who_ + " broadcast " + std::to_string(t.numel()));
  }

 private:
  std::string who_;
  Log& log_;
  Device device_;
  const char* backend_;
};

class RecordingPeer final : public collectives::PeerAllreduce {
 public:
  RecordingPeer(Log& log, int rank, int size) : log_(log), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const override { return 0; }
  std::size_t max_bytes() const override { return std::size_t{1} << 20; }
  bool supports(std::size_t bytes, DType dtype, ReduceOp op) const override {
    return bytes <= max_bytes() && (dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16) &&
           (op == ReduceOp::Sum || op == ReduceOp::Avg);
  }
  using PeerAllreduce::allreduce;
  void allreduce(const void*, void*, std::size_t count, DType, ReduceOp, AllreduceAlgo algo, Context&) override {
    log_.calls.push_back(std::string("peer ") + allreduce_algo_name(algo) + " " + std::to_string(count));
  }
  void check_health() override {}

 private:
  Log& log_;
  int rank_, size_;
};

// oneshot below 64 KiB, twoshot below 1 MiB, NCCL above.
Plan gpu_plan() {
  Plan plan;
  plan.gpu_count = 4;
  plan.available = {AllreduceAlgo::Nccl, AllreduceAlgo::OneShot, AllreduceAlgo::TwoShot};
  plan.ranges = {{0, AllreduceAlgo::OneShot}, {64 << 10, AllreduceAlgo::TwoShot}, {1 << 20, AllreduceAlgo::Nccl}};
  return plan;
}

// A view of `numel` elements that nothing reads (the stand-ins only log sizes).
Tensor fake_tensor(std::int64_t numel, DType dt = DType::F32, Device device = Device::cuda(0)) {
  static char byte;
  return Tensor::wrap(&byte, {numel}, dt, device);
}

struct ScopedUnsetAlgoEnv {
  std::string saved;
  bool had = false;
  ScopedUnsetAlgoEnv() {
    if (const char* v = std::getenv("DSTRAIN_ALLREDUCE_ALGO")) had = true, saved = v;
    unsetenv("DSTRAIN_ALLREDUCE_ALGO");
  }
  ~ScopedUnsetAlgoEnv() {
    if (had) setenv("DSTRAIN_ALLREDUCE_ALGO", saved.c_str(), 1);
    else unsetenv("DSTRAIN_ALLREDUCE_ALGO");
  }
};

std::unique_ptr<DispatchCommunicator> gpu_dispatch(Log& log, bool with_hierarchical = false) {
  DispatchParts parts;
  parts.base = std::make_unique<RecordingComm>("nccl", log, Device::cuda(0), "nccl");
  parts.peer = std::make_unique<RecordingPeer>(log, 1, 4);
  if (with_hierarchical)
    parts.make_hierarchical = [&log](Communicator&) {
      return std::make_unique<RecordingComm>("hierarchical", log, Device::cuda(0), "hierarchical");
    };
  parts.plan = gpu_plan();
  return std::make_unique<DispatchCommunicator>(std::move(parts));
}

}  // namespace

TEST_CASE("dispatch: Auto follows the plan's size ranges and falls back to the base", "[allreduce-dispatch]") {
  ScopedUnsetAlgoEnv env;
  Log log;
  auto d = gpu_dispatch(log);
  Context ctx = Context::cpu();  // the stand-ins ignore the context
  CHECK(std::string(d->backend()) == "nccl");
  CHECK(d->algo_for(fake_tensor(1000), ReduceOp::Sum) == AllreduceAlgo::OneShot);             // 4 KB
  CHECK(d->algo_for(fake_tensor(32 << 10), ReduceOp::Avg) == AllreduceAlgo::TwoShot);         // 128 KiB
  CHECK(d->algo_for(fake_tensor(1 << 20), ReduceOp::Sum) == AllreduceAlgo::Nccl);             // 4 MiB
  CHECK(d->algo_for(fake_tensor(1000), ReduceOp::Max) == AllreduceAlgo::Nccl);                // op the kernels lack
  CHECK(d->algo_for(fake_tensor(1000, DType::I32), ReduceOp::Sum) == AllreduceAlgo::Nccl);    // dtype they lack
  CHECK(d->algo_for(fake_tensor(1000, DType::F32, Device::cpu()), ReduceOp::Sum) == AllreduceAlgo::Nccl);

  Tensor small = fake_tensor(1000), medium = fake_tensor(32 << 10), large = fake_tensor(1 << 20);
  d->allreduce(small, ReduceOp::Sum, ctx);
  d->allreduce(medium, ReduceOp::Sum, ctx);
  d->allreduce(large, ReduceOp::Sum, ctx);
  d->broadcast(small, 0, ctx);
  CHECK(log.calls == std::vector<std::string>{"peer oneshot 1000", "peer twoshot 32768", "nccl allreduce 1048576",
                                              "nccl broadcast 1000"});
}

TEST_CASE("dispatch: an explicit algorithm, and what cannot be carried", "[allreduce-dispatch]") {
  ScopedUnsetAlgoEnv env;
  Log log;
  auto d = gpu_dispatch(log);
  d->set_algo(AllreduceAlgo::TwoShot);
  CHECK(d->algo_for(fake_tensor(10), ReduceOp::Sum) == AllreduceAlgo::TwoShot);
  // Larger than the engine's buffer: the base takes it.
  CHECK(d->algo_for(fake_tensor(1 << 20), ReduceOp::Sum) == AllreduceAlgo::Nccl);
  d->set_algo(AllreduceAlgo::Nccl);
  CHECK(d->algo_for(fake_tensor(10), ReduceOp::Sum) == AllreduceAlgo::Nccl);
  // No means for these at all: refused, the previous choice stays.
  for (AllreduceAlgo a : {AllreduceAlgo::Mpi, AllreduceAlgo::Hierarchical}) {
    try {
      d->set_algo(a);
      FAIL(std::string("set_algo accepted ") + allreduce_algo_name(a));
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::Unsupported);
    }
  }
  CHECK(d->algo() == AllreduceAlgo::Nccl);

  Log log2;
  auto h = gpu_dispatch(log2, /*with_hierarchical=*/true);
  h->set_algo(AllreduceAlgo::Hierarchical);
  Tensor t = fake_tensor(77);
  Context ctx = Context::cpu();
  h->allreduce(t, ReduceOp::Sum, ctx);
  CHECK(log2.calls == std::vector<std::string>{"hierarchical allreduce 77"});
}

TEST_CASE("dispatch: DSTRAIN_ALLREDUCE_ALGO overrides the plan where it can run", "[allreduce-dispatch]") {
  ScopedUnsetAlgoEnv env;
  Log log;
  auto d = gpu_dispatch(log);
  setenv("DSTRAIN_ALLREDUCE_ALGO", "twoshot", 1);
  CHECK(d->algo_for(fake_tensor(1000), ReduceOp::Sum) == AllreduceAlgo::TwoShot);
  CHECK(d->algo_for(fake_tensor(1 << 20), ReduceOp::Sum) == AllreduceAlgo::Nccl);  // too large for the engine
  setenv("DSTRAIN_ALLREDUCE_ALGO", "oneshot", 1);
  CHECK(d->algo_for(fake_tensor(32 << 10), ReduceOp::Sum) == AllreduceAlgo::OneShot);
}

TEST_CASE("dispatch: a CPU base, mismatched parts", "[allreduce-dispatch]") {
  ScopedUnsetAlgoEnv env;
  Log log;
  DispatchParts parts;
  parts.base = std::make_unique<RecordingComm>("mpi", log, Device::cpu(), "mpi");
  parts.plan = make_plan(Topology());  // the CPU model
  DispatchCommunicator d(std::move(parts));
  CHECK(d.base_algo() == AllreduceAlgo::Mpi);
  CHECK(d.algo_for(fake_tensor(1000, DType::F32, Device::cpu()), ReduceOp::Sum) == AllreduceAlgo::Mpi);
  CHECK_THROWS_AS(d.set_algo(AllreduceAlgo::OneShot), Error);
  CHECK_THROWS_AS(d.set_algo(AllreduceAlgo::Nccl), Error);

  DispatchParts wrong;
  wrong.base = std::make_unique<RecordingComm>("nccl", log, Device::cuda(0), "nccl");
  wrong.peer = std::make_unique<RecordingPeer>(log, 2, 4);  // rank 2, base says rank 1
  CHECK_THROWS_AS(DispatchCommunicator(std::move(wrong)), Error);

  DispatchParts no_base;
  CHECK_THROWS_AS(DispatchCommunicator(std::move(no_base)), Error);
}
