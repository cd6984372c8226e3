// dstrain_nccl_tests: run as `mpirun -np 2` (or more) with one GPU per rank. The NCCL
// communicator's collectives against a host reference on fresh random data, split, the
// DSTRAIN_DEBUG_COLLECTIVES check, and no hangs: an initialisation or a collective that a peer
// never joins raises Timeout within the timeout. Exits with DSTRAIN_SKIP_CODE on every rank when
// a rank has no GPU of its own.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <cuda_runtime.h>
#include <mpi.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>

#include "collectives/collectives.h"
#include "dstrain/dstrain.h"

namespace {

using dstrain::Communicator;
using dstrain::Device;
using dstrain::DType;
using dstrain::ReduceOp;
using dstrain::Tensor;
namespace coll = dstrain::collectives;
using Clock = std::chrono::steady_clock;

int g_rank = 0, g_size = 1, g_device = 0;
std::uint64_t g_seed = 0;
std::unique_ptr<coll::MpiSession> g_session;
std::unique_ptr<Communicator> g_host;

std::unique_ptr<Communicator> make_nccl(double timeout_s) {
  std::vector<char> id;
  if (g_rank == 0) id = coll::nccl_unique_id();
  g_session->broadcast_bytes(id, 0);
  return coll::make_nccl_communicator(id, g_rank, g_size, g_device, timeout_s, g_host.get());
}

float input_value(int rank, std::int64_t i, std::uint64_t salt) {
  std::uint64_t x = g_seed ^ (salt * 0x9E3779B97F4A7C15ull) ^ (static_cast<std::uint64_t>(rank) << 40) ^
                    static_cast<std::uint64_t>(i) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 31)) * 0x94D049BB133111EBull;
  x ^= x >> 29;
  return static_cast<float>(x >> 40) / static_cast<float>(1 << 23) - 1.0f;
}

float round_to(DType dt, float v) {
  if (dt == DType::F16) return dstrain::fp16_to_float(dstrain::float_to_fp16(v));
  if (dt == DType::BF16) return dstrain::bf16_to_float(dstrain::float_to_bf16(v));
  return v;
}

double tolerance(DType dt, double ref) {
  const double eps = dt == DType::F16 ? std::ldexp(1.0, -10) : dt == DType::BF16 ? std::ldexp(1.0, -7)
                                                                                  : std::ldexp(1.0, -22);
  return 2.0 * g_size * eps + eps * std::fabs(ref);
}

// A device tensor of `count` elements of dt starting one element into its allocation (unaligned),
// filled from host floats.
struct DeviceBuffer {
  Tensor storage, view;
  DeviceBuffer(std::int64_t count, DType dt) {
    storage = Tensor::empty({count + 1}, dt, Device::cuda(g_device));
    view = Tensor::wrap(static_cast<char*>(storage.data()) + dstrain::dtype_size(dt), {count}, dt,
                        Device::cuda(g_device));
  }
  void upload(const std::vector<float>& values) {
    Tensor host = Tensor::from_vector({static_cast<std::int64_t>(values.size())}, values);
    Tensor narrow = Tensor::empty({view.numel()}, view.dtype(), Device::cpu());
    dstrain::convert_host(host.data(), DType::F32, narrow.data(), view.dtype(), values.size());
    view.copy_from(narrow);
  }
};

}  // namespace

TEST_CASE("NCCL allreduce, reduce_scatter and all_gather match the host reference", "[nccl]") {
  auto comm = make_nccl(120);
  dstrain::Context ctx = dstrain::Context::cuda(g_device);
  std::uint64_t salt = 1;
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    for (std::int64_t count : {1, 7, 1000, 65537, (1 << 20) + 3}) {
      for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg}) {
        ++salt;
        INFO(dstrain::dtype_name(dt) << " allreduce " << dstrain::reduce_op_name(op) << " count " << count);
        std::vector<float> mine(static_cast<std::size_t>(count));
        for (std::int64_t i = 0; i < count; ++i) mine[i] = input_value(g_rank, i, salt);
        DeviceBuffer buf(count, dt);
        buf.upload(mine);
        comm->allreduce(buf.view, op, ctx);
        ctx.synchronize();
        const std::vector<float> got = buf.view.to_host_floats();
        std::int64_t wrong = 0;
        for (std::int64_t i = 0; i < count; ++i) {
          double ref = 0;
          for (int r = 0; r < g_size; ++r) ref += round_to(dt, input_value(r, i, salt));
          if (op == ReduceOp::Avg) ref /= g_size;
          if (!(std::fabs(got[i] - ref) <= tolerance(dt, ref))) ++wrong;
        }
        CHECK(wrong == 0);
      }
      // reduce_scatter: chunk r of the sum; all_gather: every rank's chunk.
      ++salt;
      INFO(dstrain::dtype_name(dt) << " reduce_scatter/all_gather chunk " << count);
      std::vector<float> mine(static_cast<std::size_t>(count * g_size));
      for (std::int64_t i = 0; i < count * g_size; ++i) mine[i] = input_value(g_rank, i, salt);
      DeviceBuffer in(count * g_size, dt), out(count, dt);
      in.upload(mine);
      out.view.fill_bytes(0xFF);  // poison
      comm->reduce_scatter(in.view, out.view, ReduceOp::Sum, ctx);
      DeviceBuffer gathered(count * g_size, dt);
      gathered.view.fill_bytes(0xFF);
      comm->all_gather(out.view, gathered.view, ctx);
      ctx.synchronize();
      const std::vector<float> all = gathered.view.to_host_floats();
      std::int64_t wrong = 0;
      for (std::int64_t i = 0; i < count * g_size; ++i) {
        double ref = 0;
        for (int r = 0; r < g_size; ++r) ref += round_to(dt, input_value(r, i, salt));
        if (!(std::fabs(all[i] - ref) <= tolerance(dt, ref))) ++wrong;
      }
      CHECK(wrong == 0);
    }
  }
}

TEST_CASE("NCCL split orders ranks by key", "[nccl]") {
  auto comm = make_nccl(120);
  auto reversed = comm->split(0, -g_rank);
  CHECK(reversed->size() == g_size);
  CHECK(reversed->rank() == g_size - 1 - g_rank);
  CHECK(std::string(reversed->backend()) == "nccl");
  dstrain::Context ctx = dstrain::Context::cuda(g_device);
  Tensor host = Tensor::empty({1}, DType::I32, Device::cpu());
  *host.data_as<std::int32_t>() = reversed->rank() == 0 ? 41 : 0;
  Tensor dev = host.to(Device::cuda(g_device));
  reversed->broadcast(dev, 0, ctx);  // root 0 of the split is the last world rank
  ctx.synchronize();
  host.copy_from(dev);
  CHECK(*host.data_as<std::int32_t>() == 41);
}

TEST_CASE("hierarchical AllReduce over NCCL with simulated nodes", "[nccl][hierarchical]") {
  if (g_size % 2 != 0) return;
  auto world = make_nccl(120);
  ::setenv("DSTRAIN_SIMULATE_NODES", "2", 1);
  coll::ProcessInfo info = g_session->info();
  int node = -1, local_rank = -1;
  coll::hierarchical_placement(info, node, local_rank);
  ::unsetenv("DSTRAIN_SIMULATE_NODES");
  auto h = coll::make_hierarchical_communicator(*world, node, local_rank);
  CHECK(h->size() == g_size);
  INFO(h->name());
  dstrain::Context ctx = dstrain::Context::cuda(g_device);
  std::uint64_t salt = 500;
  for (DType dt : {DType::F32, DType::BF16}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg}) {
      for (std::int64_t count : {1, 3, 1001, (1 << 20) + 3}) {
        ++salt;
        INFO(dstrain::dtype_name(dt) << " " << dstrain::reduce_op_name(op) << " count " << count);
        std::vector<float> mine(static_cast<std::size_t>(count));
        for (std::int64_t i = 0; i < count; ++i) mine[i] = input_value(g_rank, i, salt);
        DeviceBuffer buf(count, dt);
        buf.upload(mine);
        h->allreduce(buf.view, op, ctx);
        ctx.synchronize();
        const std::vector<float> got = buf.view.to_host_floats();
        std::int64_t wrong = 0, first = -1;
        double first_ref = 0;
        for (std::int64_t i = 0; i < count; ++i) {
          double ref = 0;
          for (int r = 0; r < g_size; ++r) ref += round_to(dt, input_value(r, i, salt));
          if (op == ReduceOp::Avg) ref /= g_size;
          if (!(std::fabs(got[i] - ref) <= 2 * tolerance(dt, ref))) {
            if (wrong++ == 0) {
              first = i;
              first_ref = ref;
            }
          }
        }
        INFO("first wrong element " << first << ": got " << (first >= 0 ? got[first] : 0.0f) << ", want "
                                    << first_ref);
        CHECK(wrong == 0);
      }
    }
  }
}

TEST_CASE("DSTRAIN_DEBUG_COLLECTIVES catches another count on NCCL", "[nccl]") {
  ::setenv("DSTRAIN_DEBUG_COLLECTIVES", "1", 1);
  auto comm = make_nccl(120);
  ::unsetenv("DSTRAIN_DEBUG_COLLECTIVES");
  dstrain::Context ctx = dstrain::Context::cuda(g_device);
  Tensor t = Tensor::zeros({g_rank == g_size - 1 ? 65 : 64}, DType::F32, Device::cuda(g_device));
  std::string message;
  try {
    comm->allreduce(t, ReduceOp::Sum, ctx);
  } catch (const dstrain::Error& e) {
    message = e.what();
  }
  INFO(message);
  CHECK(message.find("collective mismatch") != std::string::npos);
  CHECK(message.find("called allreduce sum of 65 fp32 (call #1)") != std::string::npos);
}

TEST_CASE("NCCL watchdog: a collective that a peer never joins raises Timeout", "[nccl][timeout]") {
  const double timeout_s = 3;
  auto comm = make_nccl(timeout_s);
  dstrain::Context ctx = dstrain::Context::cuda(g_device);
  Tensor t = Tensor::zeros({1024}, DType::F32, Device::cuda(g_device));
  comm->allreduce(t, ReduceOp::Sum, ctx);  // call #1: everyone
  ctx.synchronize();
  if (g_rank == 0) {
    const auto start = Clock::now();
    std::string message;
    dstrain::ErrorCode code = dstrain::ErrorCode::Internal;
    try {
      comm->allreduce(t, ReduceOp::Sum, ctx);  // call #2: the others never come
      while (Clock::now() - start < std::chrono::seconds(60)) {
        comm->check_health();
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    } catch (const dstrain::Error& e) {
      message = e.what();
      code = e.code();
    }
    const double waited = std::chrono::duration<double>(Clock::now() - start).count();
    INFO(message);
    CHECK(code == dstrain::ErrorCode::Timeout);
    CHECK(message.find("allreduce sum of 1024 fp32 (call #2)") != std::string::npos);
    CHECK(message.find("aborted") != std::string::npos);
    CHECK(waited >= timeout_s - 0.5);
    CHECK(waited < timeout_s + 15);
    ctx.synchronize();  // the abort released the kernel
    CHECK_THROWS_AS(comm->allreduce(t, ReduceOp::Sum, ctx), dstrain::Error);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST_CASE("NCCL initialisation that a peer never joins raises Timeout", "[nccl][timeout]") {
  if (g_rank == 0) {
    const auto start = Clock::now();
    const std::vector<char> id = coll::nccl_unique_id();
    try {
      auto alone = coll::make_nccl_communicator(id, 0, g_size, g_device, 2.0, nullptr);
      FAIL("initialisation completed without the other ranks");
    } catch (const dstrain::Error& e) {
      INFO(e.what());
      CHECK(e.code() == dstrain::ErrorCode::Timeout);
      CHECK(std::string(e.what()).find("NCCL initialisation of rank 0") != std::string::npos);
    }
    CHECK(std::chrono::duration<double>(Clock::now() - start).count() < 15);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  // One GPU per rank of the node: NCCL refuses two ranks on one GPU.
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_rank, MPI_INFO_NULL, &node);
  int local_rank = 0, local_size = 1, gpus = 0;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_size(node, &local_size);
  MPI_Comm_free(&node);
  if (cudaGetDeviceCount(&gpus) != cudaSuccess) gpus = 0;
  int enough = (gpus >= local_size && g_size >= 2) ? 1 : 0, all_enough = 0;
  MPI_Allreduce(&enough, &all_enough, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!all_enough) {
    if (g_rank == 0)
      std::printf("NCCL tests skipped: need >= 2 ranks and one GPU per rank (%d rank(s) here, %d GPU(s))\n",
                  local_size, gpus);
    MPI_Finalize();
    return DSTRAIN_SKIP_CODE;
  }
  g_device = local_rank;
  std::uint64_t seed = std::random_device{}();
  MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  g_seed = seed;
  int failed = 0;
  {
    g_session = coll::start_mpi_session(argc, argv);
    g_host = g_session->make_host_communicator();
    Catch::Session session;
    failed = session.applyCommandLine(argc, argv);
    if (failed == 0) failed = session.run();
    g_host.reset();
    g_session.reset();
  }
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (g_rank == 0) std::printf("nccl tests: %s on all ranks\n", any_failed ? "FAILED" : "passed");
  MPI_Finalize();
  return any_failed ? 1 : 0;
}
