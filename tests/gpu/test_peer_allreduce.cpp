// dstrain_peer_tests: the peer-memory AllReduce kernels (one-shot, two-shot) under
//   mpirun -np N dstrain_peer_tests        (N = 2, 4, 8; the ranks may share one GPU)
// against a sum computed on the host from every rank's deterministic inputs. Every rank exits
// with DSTRAIN_SKIP_CODE when any of them sees no CUDA device.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "collectives/collectives.h"
#include "collectives/nvlink/peer_allreduce.h"
#include "dstrain/allreduce_algo.h"
#include "dstrain/comm.h"
#include "dstrain/context.h"
#include "dstrain/dtype.h"
#include "dstrain/error.h"
#include "dstrain/tensor.h"

using namespace dstrain;

namespace {

struct Job {
  std::unique_ptr<collectives::MpiSession> session;  // null when not started by a launcher
  std::unique_ptr<Communicator> host;
  std::unique_ptr<Context> ctx;
  std::unique_ptr<collectives::PeerAllreduce> engine;
  int rank = 0, size = 1, device = 0;
};
Job* g_job = nullptr;

constexpr std::size_t kLargestCount = std::size_t{1} << 26;
constexpr std::size_t kMaxOffset = 8;

bool all_equal(std::uint64_t v) { return g_job->session ? g_job->session->all_equal_u64(v) : true; }
void barrier() {
  if (g_job->session) g_job->session->barrier();
}

// Rank `rank`'s input element i of call `seed`: pseudo-random in [-1, 1).
float input_value(std::uint64_t seed, int rank, std::size_t i) {
  std::uint64_t h = seed * 0xD1B54A32D192ED03ull + static_cast<std::uint64_t>(rank) * 0x9E3779B97F4A7C15ull +
                    i * 0xBF58476D1CE4E5B9ull;
  h ^= h >> 31;
  h *= 0x94D049BB133111EBull;
  h ^= h >> 29;
  return static_cast<float>(static_cast<double>(h >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

// The value as the dtype holds it (what the kernel actually reads).
float rounded(float v, DType dt) {
  switch (dt) {
    case DType::F16: return fp16_to_float(float_to_fp16(v));
    case DType::BF16: return bf16_to_float(float_to_bf16(v));
    default: return v;
  }
}

struct Tolerance {
  double atol, rtol;
};
Tolerance tolerance(DType dt) {
  // fp32 accumulation of up to 8 values in [-1, 1], then one rounding to the dtype.
  if (dt == DType::F32) return {1e-5, 1e-5};
  if (dt == DType::F16) return {1e-3, 1e-3};
  return {8e-3, 8e-3};
}

std::uint64_t fnv1a(const void* data, std::size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

// Host bytes of `values` converted to `dt`.
Tensor host_tensor(const std::vector<float>& values, DType dt) {
  Tensor t = Tensor::empty({static_cast<std::int64_t>(values.size())}, dt, Device::cpu());
  convert_host(values.data(), DType::F32, t.data(), dt, values.size());
  return t;
}

struct Case {
  AllreduceAlgo algo;
  DType dtype;
  ReduceOp op;
  std::size_t count;
  std::size_t in_offset, out_offset;  // elements from the start of each allocation
  bool in_place;
  int calls;  // issued back to back without a host sync, each with its own inputs
  std::uint64_t seed;
};

std::string describe(const Case& c) {
  return std::string(allreduce_algo_name(c.algo)) + " " + dtype_name(c.dtype) + " " + reduce_op_name(c.op) +
         " count " + std::to_string(c.count) + " offsets " + std::to_string(c.in_offset) + "/" +
         std::to_string(c.out_offset) + (c.in_place ? " in place" : " out of place") + ", " + std::to_string(c.calls) +
         " calls, " + std::to_string(g_job->size) + " ranks";
}

// Runs one case; returns the number of elements (or guard bytes) found wrong on this rank and
// checks that every rank's output bits are identical.
void run_case(const Case& c) {
  Job& job = *g_job;
  const Device dev = Device::cuda(job.device);
  const std::size_t elem = dtype_size(c.dtype);
  const std::size_t span = c.count + 2 * kMaxOffset;  // guard elements around each buffer
  std::vector<Tensor> ins, outs;
  std::vector<std::vector<double>> expected(static_cast<std::size_t>(c.calls));
  for (int k = 0; k < c.calls; ++k) {
    const std::uint64_t seed = c.seed + static_cast<std::uint64_t>(k);
    std::vector<float> mine(c.count);
    auto& ref = expected[static_cast<std::size_t>(k)];
    ref.assign(c.count, 0.0);
    for (int r = 0; r < job.size; ++r)
      for (std::size_t i = 0; i < c.count; ++i) {
        const float v = rounded(input_value(seed, r, i), c.dtype);
        ref[i] += v;
        if (r == job.rank) mine[i] = v;
      }
    if (c.op == ReduceOp::Avg)
      for (double& v : ref) v /= job.size;

    Tensor out = Tensor::empty({static_cast<std::int64_t>(span)}, c.dtype, dev);
    out.fill_bytes(0xFF);  // NaN in fp32/fp16/bf16: an element left unwritten fails
    Tensor host_in = host_tensor(mine, c.dtype);
    if (c.in_place) {
      Tensor region = Tensor::wrap(static_cast<char*>(out.data()) + c.out_offset * elem,
                                   {static_cast<std::int64_t>(c.count)}, c.dtype, dev);
      region.copy_from(host_in);
    } else {
      Tensor in = Tensor::empty({static_cast<std::int64_t>(span)}, c.dtype, dev);
      in.fill_bytes(0xFF);
      Tensor region = Tensor::wrap(static_cast<char*>(in.data()) + c.in_offset * elem,
                                   {static_cast<std::int64_t>(c.count)}, c.dtype, dev);
      region.copy_from(host_in);
      ins.push_back(std::move(in));
    }
    outs.push_back(std::move(out));
  }
  // Every rank has its inputs in place before the first kernel starts waiting for peers.
  barrier();
  for (int k = 0; k < c.calls; ++k) {
    char* out = static_cast<char*>(outs[static_cast<std::size_t>(k)].data()) + c.out_offset * elem;
    const char* in = c.in_place ? out : static_cast<const char*>(ins[static_cast<std::size_t>(k)].data()) + c.in_offset * elem;
    job.engine->allreduce(in, out, c.count, c.dtype, c.op, c.algo, *job.ctx);
  }
  job.ctx->synchronize();
  job.engine->check_health();

  const Tolerance tol = tolerance(c.dtype);
  for (int k = 0; k < c.calls; ++k) {
    const Tensor& out = outs[static_cast<std::size_t>(k)];
    Tensor host_out = out.to(Device::cpu());
    const std::vector<float> all = host_out.to_host_floats();
    const auto& ref = expected[static_cast<std::size_t>(k)];
    std::size_t wrong = 0, first_wrong = c.count;
    for (std::size_t i = 0; i < c.count; ++i) {
      const double got = all[c.out_offset + i];
      if (!(std::fabs(got - ref[i]) <= tol.atol + tol.rtol * std::fabs(ref[i]))) {
        if (wrong++ == 0) first_wrong = i;
      }
    }
    // Guards: nothing outside [offset, offset + count) was written.
    const auto* bytes = static_cast<const unsigned char*>(host_out.data());
    std::size_t guard_bytes_written = 0;
    for (std::size_t b = 0; b < span * elem; ++b) {
      const bool inside = b >= c.out_offset * elem && b < (c.out_offset + c.count) * elem;
      if (!inside && bytes[b] != 0xFF) ++guard_bytes_written;
    }
    INFO(describe(c) << ", call " << k << ", rank " << job.rank << ": first wrong element " << first_wrong
                     << (first_wrong < c.count ? " got " + std::to_string(all[c.out_offset + first_wrong]) +
                                                     " expected " + std::to_string(ref[first_wrong])
                                               : std::string()));
    CHECK(wrong == 0);
    CHECK(guard_bytes_written == 0);
    // Bit-identical on every rank.
    const std::uint64_t digest = fnv1a(bytes + c.out_offset * elem, c.count * elem);
    CHECK(all_equal(digest));
  }
}

}  // namespace

TEST_CASE("peer allreduce: one-shot and two-shot match the host reference", "[peer]") {
  const std::vector<std::size_t> counts = {1, 2, 3, 7, 8, 9, 1000, 1023, 4097, 65537, (std::size_t{1} << 20) + 5};
  std::uint64_t seed = 1000;
  int variant = 0;
  for (AllreduceAlgo algo : {AllreduceAlgo::OneShot, AllreduceAlgo::TwoShot})
    for (DType dt : {DType::F32, DType::F16, DType::BF16})
      for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg})
        for (std::size_t count : counts) {
          // Placements: aligned out of place, unaligned out of place, unaligned in place. fp32 Sum
          // runs all three, the others one each in turn.
          const bool all_placements = dt == DType::F32 && op == ReduceOp::Sum;
          for (int p = 0; p < 3; ++p) {
            if (!all_placements && p != variant % 3) continue;
            Case c{algo, dt, op, count, 0, 0, false, 3, seed};
            if (p == 1) c.in_offset = 1, c.out_offset = 3;
            if (p == 2) c.in_offset = c.out_offset = 5, c.in_place = true;
            seed += 16;
            run_case(c);
          }
          ++variant;
        }
}

TEST_CASE("peer allreduce: 2^26 elements", "[peer][large]") {
  std::uint64_t seed = 500000;
  for (AllreduceAlgo algo : {AllreduceAlgo::OneShot, AllreduceAlgo::TwoShot}) {
    run_case({algo, DType::F32, ReduceOp::Sum, kLargestCount, 0, 0, false, 2, seed});
    run_case({algo, DType::BF16, ReduceOp::Avg, kLargestCount, 0, 0, true, 1, seed + 16});
    seed += 32;
  }
}

TEST_CASE("peer allreduce: many small calls alternate algorithms without a sync", "[peer]") {
  // Back-to-back calls of both algorithms and changing sizes reuse the flags and both data halves.
  Job& job = *g_job;
  const Device dev = Device::cuda(job.device);
  const std::vector<std::size_t> counts = {5, 4097, 31, 65537, 1, 1000};
  std::vector<Tensor> bufs;
  std::vector<std::vector<double>> refs;
  for (int k = 0; k < 24; ++k) {
    const std::size_t count = counts[static_cast<std::size_t>(k) % counts.size()];
    std::vector<float> mine(count);
    std::vector<double> ref(count, 0.0);
    for (int r = 0; r < job.size; ++r)
      for (std::size_t i = 0; i < count; ++i) {
        const float v = input_value(77000 + static_cast<std::uint64_t>(k), r, i);
        ref[i] += v;
        if (r == job.rank) mine[i] = v;
      }
    Tensor t = Tensor::empty({static_cast<std::int64_t>(count)}, DType::F32, dev);
    t.copy_from(Tensor::from_vector({static_cast<std::int64_t>(count)}, mine));
    bufs.push_back(std::move(t));
    refs.push_back(std::move(ref));
  }
  barrier();
  for (std::size_t k = 0; k < bufs.size(); ++k)
    job.engine->allreduce(bufs[k], ReduceOp::Sum, k % 2 ? AllreduceAlgo::TwoShot : AllreduceAlgo::OneShot, *job.ctx);
  job.ctx->synchronize();
  job.engine->check_health();
  for (std::size_t k = 0; k < bufs.size(); ++k) {
    const std::vector<float> got = bufs[k].to_host_floats();
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < got.size(); ++i)
      if (!(std::fabs(got[i] - refs[k][i]) <= 1e-5 + 1e-5 * std::fabs(refs[k][i]))) ++wrong;
    INFO("call " << k << " of " << got.size() << " elements");
    CHECK(wrong == 0);
  }
}

TEST_CASE("peer allreduce: what it cannot do is refused", "[peer]") {
  Job& job = *g_job;
  collectives::PeerAllreduce& engine = *job.engine;
  CHECK_FALSE(engine.supports(engine.max_bytes() + 16, DType::F32, ReduceOp::Sum));
  CHECK_FALSE(engine.supports(64, DType::I32, ReduceOp::Sum));
  CHECK_FALSE(engine.supports(64, DType::F32, ReduceOp::Max));
  CHECK(engine.supports(engine.max_bytes(), DType::BF16, ReduceOp::Avg));
  Tensor ints = Tensor::empty({16}, DType::I32, Device::cuda(job.device));
  try {
    engine.allreduce(ints, ReduceOp::Sum, AllreduceAlgo::OneShot, *job.ctx);
    FAIL("an i32 AllReduce was accepted");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::Unsupported);
  }
  Tensor f = Tensor::empty({16}, DType::F32, Device::cuda(job.device));
  try {
    engine.allreduce(f, ReduceOp::Sum, AllreduceAlgo::Nccl, *job.ctx);
    FAIL("algorithm nccl was accepted by the peer engine");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::InvalidArgument);
  }
}

TEST_CASE("peer allreduce: a peer that never calls gives a Timeout naming it", "[peer][timeout]") {
  Job& job = *g_job;
  if (job.size < 2) return;  // no peer to miss
  collectives::PeerAllreduceOptions options;
  options.max_bytes = 4096;
  options.timeout_ms = 200;
  auto engine = collectives::make_peer_allreduce(*job.host, job.device, options);
  if (job.rank == 0) {
    Tensor t = Tensor::zeros({100}, DType::F32, Device::cuda(job.device));
    engine->allreduce(t, ReduceOp::Sum, AllreduceAlgo::OneShot, *job.ctx);
    job.ctx->synchronize();
    std::string message;
    try {
      engine->check_health();
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::Timeout);
      message = e.what();
    }
    INFO(message);
    CHECK(message.find("oneshot") != std::string::npos);
    std::string silent;
    for (int r = 1; r < job.size; ++r) silent += (r == 1 ? " " : ", ") + std::to_string(r);
    CHECK(message.find("rank(s)" + silent) != std::string::npos);
    // The engine stays broken: later calls raise at once.
    CHECK_THROWS_AS(engine->allreduce(t, ReduceOp::Sum, AllreduceAlgo::OneShot, *job.ctx), Error);
  }
  // Nobody frees a buffer rank 0's kernel may still signal into.
  barrier();
}

int main(int argc, char** argv) {
  int failed = 0;
  {
    Job job;
    job.session = collectives::start_mpi_session(argc, argv);
    if (job.session) {
      job.rank = job.session->info().rank;
      job.size = job.session->info().size;
    }
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    const int have = status == cudaSuccess && count > 0 ? 1 : 0;
    const bool everyone_has_one = job.session ? job.session->all_equal_u64(have) && have : have;
    if (!everyone_has_one) {
      if (job.rank == 0) std::printf("no CUDA device on some rank: peer AllReduce tests skipped\n");
      return DSTRAIN_SKIP_CODE;  // the session finalises MPI on every rank
    }
    const int local_rank = job.session ? job.session->info().local_rank : 0;
    job.device = local_rank % count;
    job.host = job.session ? job.session->make_host_communicator() : collectives::make_self_communicator(Device::cpu());
    job.ctx = std::make_unique<Context>(Context::cuda(job.device));
    collectives::PeerAllreduceOptions options;
    options.max_bytes = kLargestCount * sizeof(float);
    job.engine = collectives::make_peer_allreduce(*job.host, job.device, options);
    g_job = &job;
    if (job.rank == 0)
      std::printf("peer AllReduce tests: %d rank(s), %d GPU(s) visible, rank 0 on cuda:%d\n", job.size, count,
                  job.device);

    Catch::Session session;
    failed = session.applyCommandLine(argc, argv);
    if (failed == 0) failed = session.run();
    int any_failed = failed ? 1 : 0;
    if (job.session) {
      Tensor flag = Tensor::zeros({1}, DType::I32, Device::cpu());
      flag.data_as<std::int32_t>()[0] = any_failed;
      Context host_ctx = Context::cpu();
      job.host->allreduce(flag, ReduceOp::Sum, host_ctx);
      any_failed = flag.data_as<std::int32_t>()[0];
    }
    if (job.rank == 0) std::printf("peer AllReduce tests: %s on all ranks\n", any_failed ? "FAILED" : "passed");
    failed = any_failed;
    g_job = nullptr;
    // Job's members go in reverse order: engine, context, host communicator, then MPI.
  }
  return failed ? 1 : 0;
}
