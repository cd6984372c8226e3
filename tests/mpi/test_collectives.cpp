// Runs under mpirun -np 4: split, reduce_scatter, all_gather, fp16/bf16 reductions over MPI,
// the hierarchical AllReduce over simulated nodes, timeouts and collective fingerprint checks.
// Inputs are fresh each run (a seed from rank 0's random_device) and every rank can recompute
// every other rank's input, so each rank checks its own result against a reference.
#include <catch2/catch.hpp>
#include <mpi.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "collectives/collectives.h"
#include "dstrain/dstrain.h"

namespace {

using dstrain::Communicator;
using dstrain::Device;
using dstrain::DType;
using dstrain::ReduceOp;
using dstrain::Tensor;
namespace coll = dstrain::collectives;

coll::MpiSession& session() {
  static int argc = 0;
  static char** argv = nullptr;
  static std::unique_ptr<coll::MpiSession> s = coll::start_mpi_session(argc, argv);
  return *s;
}

// The world communicator of these tests; a deadlock shows up as a Timeout within a minute.
Communicator& world() {
  static std::unique_ptr<Communicator> c = [] {
    auto comm = session().make_host_communicator();
    comm->set_timeout(60);
    return comm;
  }();
  return *c;
}

std::uint64_t run_seed() {
  static std::uint64_t seed = [] {
    std::uint64_t s = std::random_device{}();
    MPI_Bcast(&s, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
    return s;
  }();
  return seed;
}

std::uint64_t mix(std::uint64_t x) {  // splitmix64 finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Rank r's input element i of test `salt`: uniform in [-1, 1), as the dtype stores it.
float input_value(int rank, std::int64_t i, std::uint64_t salt, DType dt) {
  const std::uint64_t h = mix(run_seed() ^ mix(salt * 1000003ull + static_cast<std::uint64_t>(rank)) ^
                              static_cast<std::uint64_t>(i) * 0x632BE59BD9B4E019ull);
  const float v = static_cast<float>(h >> 40) / static_cast<float>(1 << 23) - 1.0f;
  if (dt == DType::F16) return dstrain::fp16_to_float(dstrain::float_to_fp16(v));
  if (dt == DType::BF16) return dstrain::bf16_to_float(dstrain::float_to_bf16(v));
  return v;
}

void store(void* base, DType dt, std::int64_t i, float v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(base)[i] = v; break;
    case DType::F16: static_cast<std::uint16_t*>(base)[i] = dstrain::float_to_fp16(v); break;
    case DType::BF16: static_cast<std::uint16_t*>(base)[i] = dstrain::float_to_bf16(v); break;
    case DType::I32: static_cast<std::int32_t*>(base)[i] = static_cast<std::int32_t>(std::lround(v * 1000)); break;
    default: FAIL("dtype");
  }
}

double load(const void* base, DType dt, std::int64_t i) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(base)[i];
    case DType::F16: return dstrain::fp16_to_float(static_cast<const std::uint16_t*>(base)[i]);
    case DType::BF16: return dstrain::bf16_to_float(static_cast<const std::uint16_t*>(base)[i]);
    case DType::I32: return static_cast<const std::int32_t*>(base)[i];
    default: return NAN;
  }
}

double epsilon(DType dt) {
  switch (dt) {
    case DType::F16: return std::ldexp(1.0, -10);
    case DType::BF16: return std::ldexp(1.0, -7);
    case DType::I32: return 0;
    default: return std::ldexp(1.0, -23);
  }
}

// The reduction over `ranks` (all their inputs at element i), in double.
double reference(ReduceOp op, DType dt, std::int64_t i, std::uint64_t salt, int ranks, int rank_offset = 0) {
  double acc = 0;
  for (int r = 0; r < ranks; ++r) {
    const float x = input_value(r + rank_offset, i, salt, dt);
    const double v = dt == DType::I32 ? std::lround(x * 1000) : x;
    if (r == 0 || op == ReduceOp::Sum || op == ReduceOp::Avg)
      acc = (r == 0) ? v : acc + v;
    else
      acc = op == ReduceOp::Max ? std::max(acc, v) : std::min(acc, v);
  }
  return op == ReduceOp::Avg ? acc / ranks : acc;
}

// atol + rtol*|ref|: every pairwise step rounds to the dtype, on values of magnitude <= 1 (times
// the rank count for sums).
bool close(double got, double ref, DType dt, int ranks) {
  const double eps = epsilon(dt);
  return std::fabs(got - ref) <= 2.0 * ranks * eps + eps * std::fabs(ref);
}

// A host buffer of count elements starting `offset` elements into its storage; the elements
// before it are a guard that the collective must leave alone.
struct OffsetBuffer {
  Tensor storage;
  Tensor view;
  OffsetBuffer(std::int64_t count, DType dt, std::int64_t offset) {
    storage = Tensor::empty({count + offset}, dt, Device::cpu());
    storage.fill_bytes(0x5A);
    view = Tensor::wrap(static_cast<char*>(storage.data()) + offset * dstrain::dtype_size(dt), {count}, dt,
                        Device::cpu());
  }
  bool guard_intact() const {
    const auto* p = static_cast<const unsigned char*>(storage.data());
    for (std::size_t b = 0; b < storage.nbytes() - view.nbytes(); ++b)
      if (p[b] != 0x5A) return false;
    return true;
  }
};

const char* name_of(ReduceOp op) { return dstrain::reduce_op_name(op); }

// Counts elements of `t` off the reference; reports the first.
std::int64_t count_wrong(const Tensor& t, ReduceOp op, std::uint64_t salt, int ranks, std::int64_t first_index = 0) {
  std::int64_t wrong = 0;
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const double ref = reference(op, t.dtype(), first_index + i, salt, ranks);
    const double got = load(t.data(), t.dtype(), i);
    const bool ok = t.dtype() == DType::I32 || op == ReduceOp::Max || op == ReduceOp::Min
                        ? got == ref || (t.dtype() != DType::I32 && close(got, ref, t.dtype(), ranks))
                        : close(got, ref, t.dtype(), ranks);
    if (!ok && wrong++ == 0)
      UNSCOPED_INFO("first wrong element " << first_index + i << ": got " << got << ", expected " << ref);
  }
  return wrong;
}

}  // namespace

TEST_CASE("default timeout comes from DSTRAIN_TIMEOUT_S", "[mpi][collectives]") {
  ::unsetenv("DSTRAIN_TIMEOUT_S");
  CHECK(dstrain::default_collective_timeout_s() == 600.0);
  ::setenv("DSTRAIN_TIMEOUT_S", "2.5", 1);
  CHECK(dstrain::default_collective_timeout_s() == 2.5);
  auto self = coll::make_self_communicator(Device::cpu());
  CHECK(self->timeout() == 2.5);
  ::setenv("DSTRAIN_TIMEOUT_S", "soon", 1);
  CHECK_THROWS_AS(dstrain::default_collective_timeout_s(), dstrain::Error);
  ::setenv("DSTRAIN_TIMEOUT_S", "-1", 1);
  CHECK_THROWS_AS(dstrain::default_collective_timeout_s(), dstrain::Error);
  ::unsetenv("DSTRAIN_TIMEOUT_S");
  CHECK_THROWS_AS(self->set_timeout(0), dstrain::Error);
  self->set_timeout(3);
  CHECK(self->timeout() == 3);
}

TEST_CASE("split groups ranks by color and orders them by key", "[mpi][collectives]") {
  Communicator& w = world();
  const int n = w.size(), r = w.rank();
  REQUIRE(n >= 2);
  const int color = r % 2;
  auto child = w.split(color, /*key=*/-r);  // reversed order
  CHECK(child->timeout() == w.timeout());
  int expected_size = 0, expected_rank = 0;
  for (int p = 0; p < n; ++p)
    if (p % 2 == color) {
      ++expected_size;
      if (p > r) ++expected_rank;  // larger world ranks have smaller keys
    }
  CHECK(child->size() == expected_size);
  CHECK(child->rank() == expected_rank);
  CHECK(child->name().find("mpi communicator (rank " + std::to_string(expected_rank)) != std::string::npos);
  // The child reduces over its own ranks only.
  Tensor t = Tensor::empty({1}, DType::I32, Device::cpu());
  *t.data_as<std::int32_t>() = r;
  dstrain::Context ctx = dstrain::Context::cpu();
  child->allreduce(t, ReduceOp::Sum, ctx);
  int expected_sum = 0;
  for (int p = color; p < n; p += 2) expected_sum += p;
  CHECK(*t.data_as<std::int32_t>() == expected_sum);
  // A split of the split, and a self communicator's split.
  auto grandchild = child->split(0, child->rank());
  CHECK(grandchild->size() == child->size());
  CHECK(grandchild->rank() == child->rank());
  CHECK(coll::make_self_communicator(Device::cpu())->split(3, 0)->size() == 1);
  CHECK_THROWS_AS(w.split(-1, 0), dstrain::Error);  // checked before any exchange, on every rank
}

TEST_CASE("reduce_scatter and all_gather take equal chunks", "[mpi][collectives]") {
  Communicator& w = world();
  const int n = w.size(), r = w.rank();
  dstrain::Context ctx = dstrain::Context::cpu();
  std::uint64_t salt = 100;
  for (DType dt : {DType::F32, DType::F16, DType::BF16, DType::I32}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min}) {
      if (dt == DType::I32 && op == ReduceOp::Avg) continue;
      for (std::int64_t k : {1, 3, 1000, 4099}) {
        ++salt;
        INFO(dstrain::dtype_name(dt) << " " << name_of(op) << " chunk " << k);
        OffsetBuffer in(n * k, dt, 1);
        for (std::int64_t i = 0; i < n * k; ++i) store(in.view.data(), dt, i, input_value(r, i, salt, dt));
        OffsetBuffer out(k, dt, 1);
        out.view.fill_bytes(0xFF);  // poison: NaN for floats
        w.reduce_scatter(in.view, out.view, op, ctx);
        CHECK(count_wrong(out.view, op, salt, n, r * k) == 0);
        CHECK(out.guard_intact());
      }
    }
    for (std::int64_t k : {1, 7, 1001}) {
      ++salt;
      INFO(dstrain::dtype_name(dt) << " all_gather chunk " << k);
      OffsetBuffer in(k, dt, 1);
      for (std::int64_t i = 0; i < k; ++i) store(in.view.data(), dt, i, input_value(r, i, salt, dt));
      OffsetBuffer out(n * k, dt, 1);
      out.view.fill_bytes(0xFF);
      w.all_gather(in.view, out.view, ctx);
      std::int64_t wrong = 0;
      for (int p = 0; p < n; ++p)
        for (std::int64_t i = 0; i < k; ++i) {
          OffsetBuffer expect(1, dt, 0);
          store(expect.view.data(), dt, 0, input_value(p, i, salt, dt));
          if (std::memcmp(static_cast<const char*>(out.view.data()) + (p * k + i) * dstrain::dtype_size(dt),
                          expect.view.data(), dstrain::dtype_size(dt)) != 0)
            ++wrong;
        }
      CHECK(wrong == 0);
      CHECK(out.guard_intact());
    }
  }
  // The contract is checked before any exchange (the same on every rank).
  Tensor big = Tensor::empty({n * 4 + 1}, DType::F32, Device::cpu());
  Tensor small = Tensor::empty({4}, DType::F32, Device::cpu());
  CHECK_THROWS_AS(w.reduce_scatter(big, small, ReduceOp::Sum, ctx), dstrain::Error);
  CHECK_THROWS_AS(w.all_gather(small, big, ctx), dstrain::Error);
  Tensor half = Tensor::empty({n * 4}, DType::F16, Device::cpu());
  CHECK_THROWS_AS(w.reduce_scatter(half, small, ReduceOp::Sum, ctx), dstrain::Error);
  Tensor ints = Tensor::empty({4}, DType::I32, Device::cpu());
  CHECK_THROWS_AS(w.allreduce(ints, ReduceOp::Avg, ctx), dstrain::Error);
}

TEST_CASE("MPI allreduce of fp16 and bf16 accumulates in fp32 per step", "[mpi][collectives]") {
  Communicator& w = world();
  const int n = w.size(), r = w.rank();
  dstrain::Context ctx = dstrain::Context::cpu();
  std::uint64_t salt = 5000;
  for (DType dt : {DType::F16, DType::BF16}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min}) {
      for (std::int64_t count : {1, 2, 7, 1000, 65537}) {
        ++salt;
        INFO(dstrain::dtype_name(dt) << " " << name_of(op) << " count " << count);
        OffsetBuffer buf(count, dt, 1);
        for (std::int64_t i = 0; i < count; ++i) store(buf.view.data(), dt, i, input_value(r, i, salt, dt));
        w.allreduce(buf.view, op, ctx);
        CHECK(count_wrong(buf.view, op, salt, n) == 0);
        CHECK(buf.guard_intact());
        // Every rank holds the same bits.
        Tensor hash = Tensor::empty({1}, DType::I32, Device::cpu());
        std::uint32_t h = 2166136261u;
        const auto* bytes = static_cast<const unsigned char*>(buf.view.data());
        for (std::size_t b = 0; b < buf.view.nbytes(); ++b) h = (h ^ bytes[b]) * 16777619u;
        std::int32_t mine = static_cast<std::int32_t>(h & 0x7FFFFFFF), lo = 0, hi = 0;
        MPI_Allreduce(&mine, &lo, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
        MPI_Allreduce(&mine, &hi, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        CHECK(lo == hi);
      }
    }
  }
  // fp8 is not reduced over MPI.
  Tensor f8 = Tensor::empty({4}, DType::F8E4M3, Device::cpu());
  CHECK_THROWS_AS(w.allreduce(f8, ReduceOp::Sum, ctx), dstrain::Error);
}

TEST_CASE("hierarchical AllReduce over 2 simulated nodes matches the reference", "[mpi][collectives][hierarchical]") {
  Communicator& w = world();
  const int n = w.size(), r = w.rank();
  REQUIRE(n % 2 == 0);
  ::setenv("DSTRAIN_SIMULATE_NODES", "2", 1);
  coll::ProcessInfo info = session().info();
  int node = -1, local_rank = -1;
  coll::hierarchical_placement(info, node, local_rank);
  ::unsetenv("DSTRAIN_SIMULATE_NODES");
  CHECK(node == r / (n / 2));
  CHECK(local_rank == r % (n / 2));
  auto h = coll::make_hierarchical_communicator(w, node, local_rank);
  CHECK(h->size() == n);
  CHECK(h->rank() == r);
  CHECK(h->name().find("2 nodes of " + std::to_string(n / 2)) != std::string::npos);
  dstrain::Context ctx = dstrain::Context::cpu();
  std::uint64_t salt = 9000;
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Avg}) {
      for (std::int64_t count : {1, 2, 3, 7, 1000, 1001, (1 << 20) + 3}) {
        if (dt != DType::F32 && count > 1001 && op == ReduceOp::Avg) continue;  // keep the run short
        ++salt;
        INFO(dstrain::dtype_name(dt) << " " << name_of(op) << " count " << count);
        OffsetBuffer buf(count, dt, 1);  // unaligned: starts at element 1
        for (std::int64_t i = 0; i < count; ++i) store(buf.view.data(), dt, i, input_value(r, i, salt, dt));
        h->allreduce(buf.view, op, ctx);
        CHECK(count_wrong(buf.view, op, salt, n) == 0);
        CHECK(buf.guard_intact());
      }
    }
  }
  // Max and Min go the same way.
  for (ReduceOp op : {ReduceOp::Max, ReduceOp::Min}) {
    ++salt;
    OffsetBuffer buf(1001, DType::F32, 1);
    for (std::int64_t i = 0; i < 1001; ++i) store(buf.view.data(), DType::F32, i, input_value(r, i, salt, DType::F32));
    h->allreduce(buf.view, op, ctx);
    CHECK(count_wrong(buf.view, op, salt, n) == 0);
  }
  // Its other collectives and split go over all ranks.
  Tensor b = Tensor::empty({3}, DType::I32, Device::cpu());
  for (int i = 0; i < 3; ++i) b.data_as<std::int32_t>()[i] = r * 10 + i;
  h->broadcast(b, n - 1, ctx);
  CHECK(b.data_as<std::int32_t>()[2] == (n - 1) * 10 + 2);
  CHECK(h->split(0, r)->size() == n);
}

TEST_CASE("hierarchical AllReduce of 2^26 fp32", "[mpi][collectives][hierarchical][large]") {
  Communicator& w = world();
  const int n = w.size(), r = w.rank();
  auto h = coll::make_hierarchical_communicator(w, r / (n / 2), r % (n / 2));
  dstrain::Context ctx = dstrain::Context::cpu();
  const std::int64_t count = std::int64_t{1} << 26;
  // Small integers: sums are exact in fp32, so the check is a cheap equality against the
  // closed form sum over ranks of (v_i + rank).
  const std::uint64_t seed = run_seed();
  auto base_value = [seed](std::int64_t i) { return static_cast<float>((mix(seed + i) >> 58) & 15) - 8.0f; };
  OffsetBuffer buf(count, DType::F32, 1);
  float* p = buf.view.data_as<float>();
  for (std::int64_t i = 0; i < count; ++i) p[i] = base_value(i) + static_cast<float>(r);
  h->allreduce(buf.view, ReduceOp::Sum, ctx);
  const float rank_sum = static_cast<float>(n * (n - 1) / 2);
  std::int64_t wrong = 0, first = -1;
  for (std::int64_t i = 0; i < count; ++i)
    if (p[i] != static_cast<float>(n) * base_value(i) + rank_sum && wrong++ == 0) first = i;
  INFO("first wrong element " << first);
  CHECK(wrong == 0);
  CHECK(buf.guard_intact());
}

TEST_CASE("DSTRAIN_DEBUG_COLLECTIVES names the ranks that called something else", "[mpi][collectives]") {
  Communicator& w = world();
  const int n = w.size(), r = w.rank();
  ::setenv("DSTRAIN_DEBUG_COLLECTIVES", "1", 1);
  auto checked = w.split(0, r);  // a fresh communicator reads the setting
  ::unsetenv("DSTRAIN_DEBUG_COLLECTIVES");
  dstrain::Context ctx = dstrain::Context::cpu();
  Tensor same = Tensor::zeros({10}, DType::F32, Device::cpu());
  checked->allreduce(same, ReduceOp::Sum, ctx);  // call #1: all agree
  const std::int64_t count = r == n - 1 ? 11 : 10;
  Tensor t = Tensor::zeros({count}, DType::F32, Device::cpu());
  std::string message;
  try {
    checked->allreduce(t, ReduceOp::Sum, ctx);
  } catch (const dstrain::Error& e) {
    message = e.what();
    CHECK(e.code() == dstrain::ErrorCode::InvalidArgument);
  }
  INFO(message);
  std::string others = "ranks ";
  for (int p = 0; p < n - 1; ++p) others += (p ? "," : "") + std::to_string(p);
  CHECK(message.find(others + " called allreduce sum of 10 fp32 (call #2)") != std::string::npos);
  CHECK(message.find("rank " + std::to_string(n - 1) + " called allreduce sum of 11 fp32 (call #2)") !=
        std::string::npos);
  // The communicator stays broken; the others are unaffected.
  CHECK_THROWS_AS(checked->allreduce(same, ReduceOp::Sum, ctx), dstrain::Error);
  Tensor ok = Tensor::zeros({2}, DType::F32, Device::cpu());
  w.allreduce(ok, ReduceOp::Sum, ctx);
}

TEST_CASE("fingerprint_mismatch groups ranks by call", "[mpi][collectives]") {
  coll::CallFingerprint a;
  a.operation = static_cast<std::int32_t>(coll::CollectiveKind::Broadcast);
  a.dtype = static_cast<std::int32_t>(DType::BF16);
  a.op = -1;
  a.root = 2;
  a.count = 64;
  a.call = 9;
  coll::CallFingerprint b = a;
  CHECK(coll::fingerprint_mismatch({a, b, a}).empty());
  b.root = 0;
  CHECK(coll::fingerprint_mismatch({a, b, a}) ==
        "ranks 0,2 called broadcast of 64 bf16 from root 2 (call #9); rank 1 called broadcast of 64 bf16 from root 0 "
        "(call #9)");
}
