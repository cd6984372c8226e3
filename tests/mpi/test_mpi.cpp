// Runs under mpirun -np 4: bootstrap, AllReduce and broadcast over MPI, DataParallel, and a
// short end-to-end data-parallel training run on the CPU.
#include <catch2/catch.hpp>
#include <mpi.h>

#include <cmath>
#include <dstrain/dstrain.h>
#include <fstream>
#include <random>

namespace {

dstrain::Runtime& runtime() {
  // One Runtime per process for all tests; MPI is already initialised by main (the Runtime
  // then neither initialises nor finalises it).
  static int argc = 0;
  static char** argv = nullptr;
  static dstrain::Runtime rt = [] {
    dstrain::RuntimeOptions o;
    o.device = dstrain::DevicePreference::Cpu;
    return dstrain::Runtime::init(argc, argv, o);
  }();
  return rt;
}

int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

}  // namespace

TEST_CASE("bootstrap sees the MPI job", "[mpi]") {
  auto& rt = runtime();
  CHECK(rt.launched_by_mpi());
  CHECK(rt.rank() == world_rank());
  CHECK(rt.world_size() == world_size());
  CHECK(rt.local_rank() >= 0);
  CHECK(rt.local_rank() < rt.local_size());
  CHECK(rt.node_count() == 1);  // the test runs on one machine
  CHECK(rt.device() == dstrain::Device::cpu());
  CHECK(std::string(rt.comm().backend()) == "mpi");
  CHECK(rt.comm().size() == rt.world_size());
  // local ranks are a permutation of 0..local_size-1 on one node
  int local = rt.local_rank(), sum = 0;
  MPI_Allreduce(&local, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  CHECK(sum == rt.local_size() * (rt.local_size() - 1) / 2);
}

TEST_CASE("allreduce sums, averages and takes extremes of fp32 and i32", "[mpi]") {
  auto& rt = runtime();
  const int n = rt.world_size(), r = rt.rank();
  for (std::int64_t count : {1, 3, 1000, 100003}) {
    std::vector<float> v(static_cast<std::size_t>(count));
    for (std::int64_t i = 0; i < count; ++i) v[i] = static_cast<float>((r + 1) * 0.5 + i % 7);
    auto expect_sum = [&](std::int64_t i) {
      double s = 0;
      for (int k = 0; k < n; ++k) s += (k + 1) * 0.5 + i % 7;
      return s;
    };
    auto t = dstrain::Tensor::from_vector({count}, v);
    rt.comm().allreduce(t, dstrain::ReduceOp::Sum, rt.context());
    auto got = t.to_host_floats();
    for (std::int64_t i = 0; i < count; ++i) REQUIRE(got[i] == Approx(expect_sum(i)));

    auto a = dstrain::Tensor::from_vector({count}, v);
    rt.comm().allreduce(a, dstrain::ReduceOp::Avg, rt.context());
    got = a.to_host_floats();
    for (std::int64_t i = 0; i < count; ++i) REQUIRE(got[i] == Approx(expect_sum(i) / n));

    auto m = dstrain::Tensor::from_vector({count}, v);
    rt.comm().allreduce(m, dstrain::ReduceOp::Max, rt.context());
    got = m.to_host_floats();
    for (std::int64_t i = 0; i < count; ++i) REQUIRE(got[i] == Approx(n * 0.5 + i % 7));
  }
  auto ti = dstrain::Tensor::empty({5}, dstrain::DType::I32, dstrain::Device::cpu());
  for (int i = 0; i < 5; ++i) ti.data_as<std::int32_t>()[i] = r * 10 + i;
  rt.comm().allreduce(ti, dstrain::ReduceOp::Min, rt.context());
  for (int i = 0; i < 5; ++i) CHECK(ti.data_as<std::int32_t>()[i] == i);
}

TEST_CASE("broadcast and host helpers", "[mpi]") {
  auto& rt = runtime();
  std::vector<float> v(257);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(rt.rank() * 1000 + i);
  auto t = dstrain::Tensor::from_vector({257}, v);
  const int root = rt.world_size() - 1;
  rt.comm().broadcast(t, root, rt.context());
  const auto got = t.to_host_floats();
  for (std::size_t i = 0; i < got.size(); ++i) REQUIRE(got[i] == static_cast<float>(root * 1000 + i));

  CHECK(rt.all_ranks_equal(42));
  CHECK_FALSE(rt.all_ranks_equal(rt.rank() == 0 ? 1 : 2));
  double sums[2] = {1.0, static_cast<double>(rt.rank())};
  rt.host_allreduce_sum(sums, 2);
  CHECK(sums[0] == rt.world_size());
  CHECK(sums[1] == rt.world_size() * (rt.world_size() - 1) / 2.0);
  CHECK_THROWS_AS(rt.comm().broadcast(t, rt.world_size(), rt.context()), dstrain::Error);
}

TEST_CASE("DataParallel broadcasts rank 0's state and sums gradients in one buffer", "[mpi]") {
  auto& rt = runtime();
  auto model = dstrain::models::small_cnn(dstrain::Device::cpu());
  dstrain::nn::init_parameters(*model, 1000 + rt.rank());  // deliberately different per rank
  CHECK_FALSE(rt.all_ranks_equal(dstrain::nn::parameter_hash(*model)));
  dstrain::DataParallel ddp(rt, *model);
  CHECK(rt.all_ranks_equal(dstrain::nn::parameter_hash(*model)));
  CHECK(ddp.gradient_count() == dstrain::nn::parameter_count(*model));
  // gradients are views into the flat buffer: writing one is seen by the reduction
  for (auto* p : model->parameters()) {
    float* g = p->grad.data_as<float>();
    for (std::int64_t i = 0; i < p->grad.numel(); ++i) g[i] = static_cast<float>(rt.rank() + 1);
  }
  ddp.reduce_gradients();
  const float expect = rt.world_size() * (rt.world_size() + 1) / 2.0f;
  for (auto* p : model->parameters()) {
    const float* g = p->grad.data_as<float>();
    for (std::int64_t i = 0; i < p->grad.numel(); ++i) REQUIRE(g[i] == expect);
  }
}

TEST_CASE("end to end: 4 CPU ranks train on a subset, the loss falls, replicas stay identical", "[mpi][e2e]") {
  auto& rt = runtime();
  std::ifstream probe(std::string(DSTRAIN_TEST_DATA_DIR) + "/train-images-idx3-ubyte.gz");
  REQUIRE(probe.good());  // the dataset package is a test dependency (dataset-fashion-mnist)
  auto& ctx = rt.context();
  const auto train = dstrain::data::load_fashion_mnist(DSTRAIN_TEST_DATA_DIR, "train", 2048);
  auto model = dstrain::models::small_cnn(dstrain::Device::cpu());
  dstrain::nn::init_parameters(*model, 7);
  dstrain::DataParallel ddp(rt, *model);
  model->set_needs_input_grad(false);
  dstrain::optim::SgdOptions so;
  so.lr = 0.05f;
  so.momentum = 0.9f;
  so.nesterov = true;
  so.weight_decay = 5e-4f;
  dstrain::optim::SGD opt(model->parameters(), so);

  const std::int64_t global_batch = 64;
  dstrain::data::EpochSampler sampler(train.count, global_batch, 7, 0);
  const int steps = 24;
  std::vector<double> losses;
  dstrain::Tensor dlogits, loss = dstrain::Tensor::zeros({1}, dstrain::DType::F32, dstrain::Device::cpu());
  dstrain::Tensor correct = dstrain::Tensor::zeros({1}, dstrain::DType::F32, dstrain::Device::cpu());
  for (int s = 0; s < steps; ++s) {
    const auto idx = sampler.shard(s, rt.rank(), rt.world_size());
    const auto n = static_cast<std::int64_t>(idx.size());
    auto x = dstrain::Tensor::empty({n, 28, 28, 1}, dstrain::DType::F32, dstrain::Device::cpu());
    auto y = dstrain::Tensor::empty({n}, dstrain::DType::I32, dstrain::Device::cpu());
    dstrain::data::gather_batch(train, idx, true, 7, 0, x.data_as<float>(), y.data_as<std::int32_t>());
    const auto& logits = model->forward(ctx, x, true);
    dlogits.resize(logits.shape(), dstrain::DType::F32, dstrain::Device::cpu());
    dstrain::ops::softmax_cross_entropy(ctx, logits, y, &dlogits, 1.0f / global_batch, loss, correct);
    model->backward(ctx, dlogits);
    ddp.reduce_gradients();
    opt.step(ctx);
    double l = loss.to_host_floats()[0];
    rt.host_allreduce_sum(&l, 1);
    losses.push_back(l / global_batch);
  }
  const double first = (losses[0] + losses[1] + losses[2]) / 3, last = (losses[21] + losses[22] + losses[23]) / 3;
  INFO("mean loss of the first 3 steps " << first << ", of the last 3 " << last);
  CHECK(std::isfinite(last));
  CHECK(last < 0.8 * first);
  CHECK(rt.all_ranks_equal(dstrain::nn::parameter_hash(*model)));
}
