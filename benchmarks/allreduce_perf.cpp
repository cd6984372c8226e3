// allreduce_perf: AllReduce time, algorithm and bus bandwidth per message size, in the manner of
// nccl-tests, for each algorithm dstrain has (NCCL, MPI, peer-memory one-shot/two-shot, the
// planner's choice), with the plain NCCL (GPU) or MPI (CPU) path measured beside it in the same
// run. Results are checked before timing; the exit code is non-zero when any element was wrong.
//
//   mpirun -np 4 ./allreduce_perf -b 8 -e 128M -f 2 -a oneshot -d half
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "benchmarks/harness.h"
#include "collectives/collectives.h"
#include "collectives/dispatch.h"
#include "collectives/nvlink/peer_allreduce.h"
#include "dstrain/allreduce_algo.h"
#include "dstrain/comm.h"
#include "dstrain/context.h"
#include "dstrain/device.h"
#include "dstrain/error.h"
#include "dstrain/ops.h"
#include "dstrain/runtime.h"
#include "dstrain/tensor.h"
#include "dstrain/topology.h"
#include "dstrain/version.h"

namespace dstrain {
namespace {

constexpr const char* kUsage = R"(allreduce_perf: AllReduce time and bandwidth per message size (nccl-tests flags)
  -b, --minbytes SIZE   smallest message (default 8; K/M/G suffixes)
  -e, --maxbytes SIZE   largest message (default 32M)
  -f, --stepfactor F    multiply the size by F between rows (default 2)
  -n, --iters N         timed iterations per measurement (default 20)
  -w, --warmup_iters N  untimed iterations first (default 5)
  -c, --check 0|1       check results before timing (default 1)
  -d, --datatype T      float | half | bfloat16 (default float)
  -o, --op OP           sum | avg (default sum)
  -a, --algo ALGO       auto | nccl | mpi | oneshot | twoshot | hierarchical (default auto)
      --device D        auto | cpu | cuda (default auto: cuda when a GPU is visible)
      --json FILE       write the rows as JSON (rank 0)
      --calibrate FILE  fit time = alpha + bytes/beta per algorithm measured and write the cost
                        model (one line per algorithm: <name> <alpha_us> <beta_GBps>);
                        lines of algorithms not measured in this run are kept
      --corrupt         perturb one input element on rank 0 after the expected values are
                        computed (shows that the check counts wrong elements)
  -h, --help            this text
Columns: size count type redop | out-of-place time algbw busbw #wrong | in-place time algbw busbw
#wrong | the same for the plain NCCL (GPU) or MPI (CPU) path when -a is another algorithm.
busbw = algbw * 2(n-1)/n. Times are medians over -n iterations, the slowest rank's.
)";

struct Options {
  std::size_t min_bytes = 8, max_bytes = std::size_t{32} << 20;
  double factor = 2.0;
  int iters = 20, warmup = 5;
  bool check = true;
  DType dtype = DType::F32;
  ReduceOp op = ReduceOp::Sum;
  AllreduceAlgo algo = AllreduceAlgo::Auto;
  DevicePreference device = DevicePreference::Auto;
  std::string json, calibrate;
  bool corrupt = false;
  bool help = false;
};

int parse_int(const std::string& flag, const std::string& v, int min) {
  try {
    std::size_t pos = 0;
    const int n = std::stoi(v, &pos);
    if (pos == v.size() && n >= min) return n;
  } catch (...) {
  }
  DSTRAIN_THROW(ErrorCode::InvalidArgument, flag + " '" + v + "': expected an integer >= " + std::to_string(min));
}

DType parse_bench_dtype(const std::string& v) {
  if (v == "float" || v == "float32" || v == "fp32") return DType::F32;
  if (v == "half" || v == "float16" || v == "fp16") return DType::F16;
  if (v == "bfloat16" || v == "bf16") return DType::BF16;
  DSTRAIN_THROW(ErrorCode::InvalidArgument, "-d '" + v + "': expected float, half or bfloat16");
}

const char* bench_dtype_name(DType dt) {
  return dt == DType::F16 ? "half" : dt == DType::BF16 ? "bfloat16" : "float";
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) DSTRAIN_THROW(ErrorCode::InvalidArgument, a + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") o.help = true;
    else if (a == "-b" || a == "--minbytes") o.min_bytes = bench::parse_size(value());
    else if (a == "-e" || a == "--maxbytes") o.max_bytes = bench::parse_size(value());
    else if (a == "-f" || a == "--stepfactor") {
      const std::string v = value();
      char* end = nullptr;
      o.factor = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end || !(o.factor > 1.0))
        DSTRAIN_THROW(ErrorCode::InvalidArgument, "-f '" + v + "': expected a number > 1");
    } else if (a == "-n" || a == "--iters") o.iters = parse_int(a, value(), 1);
    else if (a == "-w" || a == "--warmup_iters") o.warmup = parse_int(a, value(), 0);
    else if (a == "-c" || a == "--check") o.check = parse_int(a, value(), 0) != 0;
    else if (a == "-d" || a == "--datatype") o.dtype = parse_bench_dtype(value());
    else if (a == "-o" || a == "--op") {
      const std::string v = value();
      if (v == "sum") o.op = ReduceOp::Sum;
      else if (v == "avg") o.op = ReduceOp::Avg;
      else DSTRAIN_THROW(ErrorCode::InvalidArgument, "-o '" + v + "': expected sum or avg");
    } else if (a == "-a" || a == "--algo") o.algo = parse_allreduce_algo(value());
    else if (a == "--device") o.device = parse_device_preference(value());
    else if (a == "--json") o.json = value();
    else if (a == "--calibrate") o.calibrate = value();
    else if (a == "--corrupt") o.corrupt = true;
    else DSTRAIN_THROW(ErrorCode::InvalidArgument, "unknown flag '" + a + "' (see --help)");
  }
  DSTRAIN_CHECK(o.min_bytes <= o.max_bytes, "-b must not exceed -e");
  return o;
}

// Input of `rank` at element i: a multiple of 1/8 in [-1, 1], exact in fp16 and bf16, so sums
// over up to 64 ranks are exact in every dtype.
float input_value(int rank, std::size_t i) {
  std::uint64_t h = (static_cast<std::uint64_t>(rank) + 1) * 0x9E3779B97F4A7C15ull ^ (i * 0xBF58476D1CE4E5B9ull);
  h ^= h >> 31;
  h *= 0x94D049BB133111EBull;
  h ^= h >> 29;
  return static_cast<float>(static_cast<int>(h % 17) - 8) / 8.0f;
}

double tolerance_rel(DType dt) { return dt == DType::F32 ? 1e-6 : dt == DType::F16 ? 1e-3 : 8e-3; }

// One way to run the AllReduce: out-of-place (in -> out) and in place (on out).
struct Runner {
  AllreduceAlgo algo;
  std::function<void(const Tensor& in, Tensor& out, Context& ctx)> out_of_place;
  std::function<void(Tensor& buf, Context& ctx)> in_place;
  std::function<void()> check_health;  // after a synchronize: raises what the calls left behind
};

struct Measure {
  double time_us = 0;
  long long wrong = 0;
  bool ran = false;
};

class Bench {
 public:
  Bench(const Options& opt, Communicator& host, Context& ctx, int world) : opt_(opt), host_(host), ctx_(ctx), n_(world) {}

  // Max over ranks (times), sum over ranks (wrong counts).
  double max_over_ranks(double v) {
    Tensor t = Tensor::from_vector({1}, {static_cast<float>(v)});
    host_.allreduce(t, ReduceOp::Max, host_ctx_);
    return t.data_as<float>()[0];
  }
  long long sum_over_ranks(long long v) {
    Tensor t = Tensor::zeros({1}, DType::I32, Device::cpu());
    t.data_as<std::int32_t>()[0] = static_cast<std::int32_t>(std::min<long long>(v, 1 << 30));
    host_.allreduce(t, ReduceOp::Sum, host_ctx_);
    return t.data_as<std::int32_t>()[0];
  }

  void fill_inputs(Tensor& t, std::size_t count) {
    std::vector<float> v(count);
    for (std::size_t i = 0; i < count; ++i) v[i] = input_value(host_.rank(), i);
    if (opt_.corrupt && host_.rank() == 0 && count > 0) v[0] += 1.0f;
    Tensor h = Tensor::empty({static_cast<std::int64_t>(count)}, opt_.dtype, Device::cpu());
    convert_host(v.data(), DType::F32, h.data(), opt_.dtype, count);
    t.copy_from(h);
  }

  long long count_wrong(const Tensor& out, std::size_t count) {
    const std::vector<float> got = out.to_host_floats();
    const double rel = tolerance_rel(opt_.dtype);
    long long wrong = 0;
    for (std::size_t i = 0; i < count; ++i) {
      double expected = 0;
      for (int r = 0; r < n_; ++r) expected += input_value(r, i);
      if (opt_.op == ReduceOp::Avg) expected /= n_;
      const double err = std::fabs(static_cast<double>(got[i]) - expected);
      if (!(err <= rel + rel * std::fabs(expected))) ++wrong;
    }
    return wrong;
  }

  template <class F>
  double time_us(F&& call) {
    for (int i = 0; i < opt_.warmup; ++i) call();
    std::vector<double> times;
    times.reserve(static_cast<std::size_t>(opt_.iters));
    if (ctx_.is_cuda()) {
      const int dev = ctx_.device().index;
      std::vector<Event> start, stop;
      for (int i = 0; i < opt_.iters; ++i) {
        start.push_back(Event::create(dev));
        stop.push_back(Event::create(dev));
      }
      for (int i = 0; i < opt_.iters; ++i) {
        start[i].record(ctx_.stream());
        call();
        stop[i].record(ctx_.stream());
      }
      stop.back().synchronize();
      for (int i = 0; i < opt_.iters; ++i) times.push_back(1e3 * stop[i].elapsed_ms(start[i]));
    } else {
      for (int i = 0; i < opt_.iters; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        call();
        times.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    return max_over_ranks(bench::median(times));
  }

  // Checks then times one runner on `count` elements.
  void measure(const Runner& r, std::size_t count, Measure& oop, Measure& ip) {
    const Shape shape{static_cast<std::int64_t>(count)};
    Tensor in = Tensor::empty(shape, opt_.dtype, ctx_.device());
    Tensor out = Tensor::empty(shape, opt_.dtype, ctx_.device());
    if (opt_.check) {
      fill_inputs(in, count);
      out.fill_bytes(0xFF);  // NaN in every float dtype: an unwritten element counts as wrong
      r.out_of_place(in, out, ctx_);
      ctx_.synchronize();
      r.check_health();
      oop.wrong = sum_over_ranks(count_wrong(out, count));
      fill_inputs(out, count);
      r.in_place(out, ctx_);
      ctx_.synchronize();
      r.check_health();
      ip.wrong = sum_over_ranks(count_wrong(out, count));
    }
    fill_inputs(in, count);
    oop.time_us = time_us([&] { r.out_of_place(in, out, ctx_); });
    ip.time_us = time_us([&] { r.in_place(out, ctx_); });
    ctx_.synchronize();
    r.check_health();
    oop.ran = ip.ran = true;
  }

 private:
  const Options& opt_;
  Communicator& host_;
  Context& ctx_;
  Context host_ctx_ = Context::cpu();
  int n_;
};

Runner communicator_runner(AllreduceAlgo algo, Communicator& comm, ReduceOp op) {
  Runner r;
  r.algo = algo;
  // The Communicator interface reduces in place: out-of-place is a copy then the in-place call.
  r.out_of_place = [&comm, op](const Tensor& in, Tensor& out, Context& ctx) {
    ops::copy(ctx, in, out);
    comm.allreduce(out, op, ctx);
  };
  r.in_place = [&comm, op](Tensor& buf, Context& ctx) { comm.allreduce(buf, op, ctx); };
  r.check_health = [&comm] { comm.check_health(); };
  return r;
}

Runner peer_runner(AllreduceAlgo algo, collectives::PeerAllreduce& peer, ReduceOp op) {
  Runner r;
  r.algo = algo;
  r.out_of_place = [&peer, algo, op](const Tensor& in, Tensor& out, Context& ctx) {
    peer.allreduce(in.data(), out.data(), static_cast<std::size_t>(in.numel()), in.dtype(), op, algo, ctx);
  };
  r.in_place = [&peer, algo, op](Tensor& buf, Context& ctx) { peer.allreduce(buf, op, algo, ctx); };
  r.check_health = [&peer] { peer.check_health(); };
  return r;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

int run(int argc, char** argv) {
  std::unique_ptr<collectives::MpiSession> session = collectives::start_mpi_session(argc, argv);
  const Options opt = parse_options(argc, argv);
  collectives::ProcessInfo info = session ? session->info() : collectives::ProcessInfo{};
  if (opt.help) {
    if (info.rank == 0) std::fputs(kUsage, stdout);
    return 0;
  }
  const int n = info.size;
  std::unique_ptr<Communicator> host =
      session ? session->make_host_communicator() : collectives::make_self_communicator(Device::cpu());

  const int gpus = cuda_device_count();
  const bool use_gpu = opt.device == DevicePreference::Cuda || (opt.device == DevicePreference::Auto && gpus > 0);
  if (use_gpu && gpus == 0) DSTRAIN_THROW(ErrorCode::Unsupported, "--device cuda but no GPU is visible");
  const int gpu = use_gpu ? info.local_rank % gpus : 0;
  const bool share_gpu = use_gpu && info.local_size > gpus;
  Context ctx = use_gpu ? Context::cuda(gpu) : Context::cpu();

  // The plain path: NCCL with one GPU per rank, MPI (or self) on the CPU.
  std::unique_ptr<Communicator> plain;
  std::string plain_missing;
  if (use_gpu) {
    if (share_gpu) {
      plain_missing = "n/a (ranks share a GPU)";
    } else {
      std::vector<char> id;
      if (info.rank == 0) id = collectives::nccl_unique_id();
      if (session) session->broadcast_bytes(id, 0);
      plain = collectives::make_nccl_communicator(id, info.rank, n, gpu, default_collective_timeout_s(), host.get());
    }
  } else {
    plain = session ? session->make_host_communicator() : collectives::make_self_communicator(Device::cpu());
  }
  const AllreduceAlgo plain_algo = use_gpu ? AllreduceAlgo::Nccl : AllreduceAlgo::Mpi;

  const bool wants_peer = opt.algo == AllreduceAlgo::OneShot || opt.algo == AllreduceAlgo::TwoShot ||
                          opt.algo == AllreduceAlgo::Auto;
  std::unique_ptr<collectives::PeerAllreduce> peer;
  if (use_gpu && wants_peer && info.node_count == 1 && n > 1 && n <= collectives::PeerAllreduce::kMaxRanks) {
    collectives::PeerAllreduceOptions po;
    po.max_bytes = opt.max_bytes;
    peer = collectives::make_peer_allreduce(*host, gpu, po);
  }

  const Topology topo = use_gpu ? discover_topology() : Topology();
  Plan plan = make_plan(topo);

  // The algorithm measured: a fixed one, or Auto through the dispatch communicator (plan per
  // size). With ranks sharing a GPU there is no base for the dispatch; Auto then picks between
  // the peer kernels by the plan directly.
  std::unique_ptr<collectives::DispatchCommunicator> dispatch;
  std::function<AllreduceAlgo(std::size_t bytes)> resolve;
  std::map<AllreduceAlgo, Runner> runners;
  if (plain) runners[plain_algo] = communicator_runner(plain_algo, *plain, opt.op);
  if (peer) {
    runners[AllreduceAlgo::OneShot] = peer_runner(AllreduceAlgo::OneShot, *peer, opt.op);
    runners[AllreduceAlgo::TwoShot] = peer_runner(AllreduceAlgo::TwoShot, *peer, opt.op);
  }
  if (opt.algo == AllreduceAlgo::Auto && plain) {
    collectives::DispatchParts parts;
    if (use_gpu) {
      std::vector<char> id;
      if (info.rank == 0) id = collectives::nccl_unique_id();
      if (session) session->broadcast_bytes(id, 0);
      parts.base = collectives::make_nccl_communicator(id, info.rank, n, gpu, default_collective_timeout_s(), host.get());
    } else {
      parts.base = session ? session->make_host_communicator() : collectives::make_self_communicator(Device::cpu());
    }
    parts.peer = std::move(peer);
    if (info.node_count > 1)
      parts.make_hierarchical = [&info](Communicator& base) {
        int node = 0, local_rank = 0;
        collectives::hierarchical_placement(info, node, local_rank);
        return collectives::make_hierarchical_communicator(base, node, local_rank);
      };
    parts.plan = plan;
    dispatch = std::make_unique<collectives::DispatchCommunicator>(std::move(parts));
    if (dispatch->peer()) {
      runners[AllreduceAlgo::OneShot] = peer_runner(AllreduceAlgo::OneShot, *dispatch->peer(), opt.op);
      runners[AllreduceAlgo::TwoShot] = peer_runner(AllreduceAlgo::TwoShot, *dispatch->peer(), opt.op);
    }
    runners[AllreduceAlgo::Auto] = communicator_runner(AllreduceAlgo::Auto, *dispatch, opt.op);
  } else if (opt.algo == AllreduceAlgo::Auto) {
    // The planner's choice when it can run here; else, between the peer kernels, one-shot for
    // small messages (latency) and two-shot for the rest (bandwidth).
    resolve = [&](std::size_t bytes) {
      const AllreduceAlgo a = choose_allreduce_algo(plan, bytes);
      if (peer && peer->supports(bytes, opt.dtype, opt.op))
        return a == AllreduceAlgo::OneShot || a == AllreduceAlgo::TwoShot ? a
               : bytes <= (std::size_t{256} << 10)                        ? AllreduceAlgo::OneShot
                                                                          : AllreduceAlgo::TwoShot;
      return a;
    };
  }
  // Hierarchical: intra-node reduce-scatter, inter-node AllReduce, intra-node all-gather over the
  // plain communicator (DSTRAIN_SIMULATE_NODES=K splits one host into K nodes for trying it).
  std::unique_ptr<Communicator> hierarchical;
  if (opt.algo == AllreduceAlgo::Hierarchical && plain) {
    int node = 0, local_rank = 0;
    collectives::hierarchical_placement(info, node, local_rank);
    hierarchical = collectives::make_hierarchical_communicator(*plain, node, local_rank);
    runners[AllreduceAlgo::Hierarchical] = communicator_runner(AllreduceAlgo::Hierarchical, *hierarchical, opt.op);
  }
  if (opt.algo != AllreduceAlgo::Auto && !runners.count(opt.algo)) {
    std::string why = (opt.algo == plain_algo || opt.algo == AllreduceAlgo::Hierarchical) && !plain_missing.empty()
                          ? plain_missing
                      : (opt.algo == AllreduceAlgo::OneShot || opt.algo == AllreduceAlgo::TwoShot)
                          ? "the peer-memory kernels need GPUs of one node and 2.." +
                                std::to_string(collectives::PeerAllreduce::kMaxRanks) + " ranks"
                          : std::string("not available on ") + (use_gpu ? "GPUs" : "the CPU");
    DSTRAIN_THROW(ErrorCode::Unsupported, std::string("-a ") + allreduce_algo_name(opt.algo) + ": " + why);
  }
  const bool compare = opt.algo != plain_algo;

  const bool root = info.rank == 0;
  if (root) {
    std::printf("# allreduce_perf, dstrain %s\n", DSTRAIN_VERSION_STRING);
    std::printf("# ranks: %d on %d node(s), %d per node; device: %s%s\n", n, info.node_count, info.local_size,
                ctx.device().str().c_str(), share_gpu ? " (ranks share a GPU)" : "");
    if (use_gpu)
      std::printf("# topology: %d GPU(s) from %s%s%s\n", topo.gpu_count(), topo.source().c_str(),
                  gpu < topo.gpu_count() && !topo.gpu(gpu).name.empty() ? "; this GPU: " : "",
                  gpu < topo.gpu_count() ? topo.gpu(gpu).name.c_str() : "");
    std::printf("# algo: %s; compared with: %s\n", allreduce_algo_name(opt.algo),
                compare ? (plain ? allreduce_algo_name(plain_algo) : plain_missing.c_str()) : "-");
    std::printf("# dtype %s, op %s, iterations %d, warm-up %d, check %d%s\n", bench_dtype_name(opt.dtype),
                reduce_op_name(opt.op), opt.iters, opt.warmup, opt.check ? 1 : 0,
                plain || dispatch ? "; out-of-place through a Communicator (nccl, mpi, hierarchical, auto) = copy + in-place call" : "");
    std::printf("#%37s | %-34s | %-34s", "", "out-of-place", "in-place");
    if (compare) std::printf(" | %-34s", (std::string(plain ? allreduce_algo_name(plain_algo) : "plain path") + ", in-place").c_str());
    std::printf("\n");
    std::printf("# %10s %10s %8s %5s | %9s %8s %8s %6s | %9s %8s %8s %6s", "size(B)", "count", "type", "redop",
                "time(us)", "algbw", "busbw", "#wrong", "time(us)", "algbw", "busbw", "#wrong");
    if (compare) std::printf(" | %9s %8s %8s %6s", "time(us)", "algbw", "busbw", "#wrong");
    if (opt.algo == AllreduceAlgo::Auto) std::printf(" | algo");
    std::printf("\n");
  }

  Bench bench(opt, *host, ctx, n);
  const std::size_t elem = dtype_size(opt.dtype);
  const double bus_factor = n > 1 ? 2.0 * (n - 1) / n : 0.0;
  long long total_wrong = 0;
  std::ostringstream json_rows;
  std::map<AllreduceAlgo, std::pair<std::vector<double>, std::vector<double>>> fits;  // bytes, time
  for (double sz = static_cast<double>(opt.min_bytes); sz <= static_cast<double>(opt.max_bytes) * 1.0000001;
       sz = std::max(sz * opt.factor, sz + 1)) {
    const std::size_t count = static_cast<std::size_t>(sz) / elem;
    if (count == 0) continue;
    const std::size_t bytes = count * elem;
    AllreduceAlgo used = opt.algo;
    const Runner* runner = nullptr;
    if (opt.algo == AllreduceAlgo::Auto) {
      if (dispatch) {
        used = dispatch->algo_for(bytes, opt.dtype, opt.op);
        runner = &runners.at(AllreduceAlgo::Auto);
      } else {
        used = resolve(bytes);
        if (!runners.count(used))
          DSTRAIN_THROW(ErrorCode::Unsupported, std::string("-a auto chose ") + allreduce_algo_name(used) +
                                                    ", which cannot run here");
        runner = &runners.at(used);
      }
    } else {
      runner = &runners.at(opt.algo);
    }
    Measure oop, ip, base;
    bench.measure(*runner, count, oop, ip);
    Measure base_oop;
    if (compare && plain) bench.measure(runners.at(plain_algo), count, base_oop, base);
    total_wrong += oop.wrong + ip.wrong + base.wrong + base_oop.wrong;
    auto algbw = [&](double us) { return us > 0 ? bytes / us / 1e3 : 0.0; };
    fits[used].first.push_back(static_cast<double>(bytes));
    fits[used].second.push_back(ip.time_us);
    if (compare && plain && used != plain_algo) {
      fits[plain_algo].first.push_back(static_cast<double>(bytes));
      fits[plain_algo].second.push_back(base.time_us);
    }
    if (root) {
      std::printf("  %10zu %10zu %8s %5s | %9.2f %8.3f %8.3f %6lld | %9.2f %8.3f %8.3f %6lld", bytes, count,
                  bench_dtype_name(opt.dtype), reduce_op_name(opt.op), oop.time_us, algbw(oop.time_us),
                  algbw(oop.time_us) * bus_factor, opt.check ? oop.wrong : -1LL, ip.time_us, algbw(ip.time_us),
                  algbw(ip.time_us) * bus_factor, opt.check ? ip.wrong : -1LL);
      if (compare && plain)
        std::printf(" | %9.2f %8.3f %8.3f %6lld", base.time_us, algbw(base.time_us), algbw(base.time_us) * bus_factor,
                    opt.check ? base.wrong : -1LL);
      else if (compare)
        std::printf(" | %-34s", plain_missing.c_str());
      if (opt.algo == AllreduceAlgo::Auto) std::printf(" | %s", allreduce_algo_name(used));
      std::printf("\n");
      std::fflush(stdout);
      json_rows << (json_rows.tellp() > 0 ? ",\n" : "") << "    {\"bytes\": " << bytes << ", \"count\": " << count
                << ", \"algo\": \"" << allreduce_algo_name(used) << "\", \"oop_us\": " << oop.time_us
                << ", \"oop_busbw\": " << algbw(oop.time_us) * bus_factor << ", \"oop_wrong\": " << oop.wrong
                << ", \"ip_us\": " << ip.time_us << ", \"ip_busbw\": " << algbw(ip.time_us) * bus_factor
                << ", \"ip_wrong\": " << ip.wrong;
      if (compare && plain)
        json_rows << ", \"plain\": {\"algo\": \"" << allreduce_algo_name(plain_algo) << "\", \"ip_us\": " << base.time_us
                  << ", \"ip_busbw\": " << algbw(base.time_us) * bus_factor << ", \"ip_wrong\": " << base.wrong << "}";
      else if (compare)
        json_rows << ", \"plain\": null";
      json_rows << "}";
    }
  }
  if (root) {
    std::printf("# Out of bounds values : %lld %s\n", total_wrong, total_wrong ? "FAILED" : "OK");
    if (!opt.json.empty()) {
      std::ofstream f(opt.json);
      f << "{\n  \"benchmark\": \"allreduce_perf\", \"version\": \"" << DSTRAIN_VERSION_STRING << "\", \"ranks\": " << n
        << ", \"nodes\": " << info.node_count << ", \"device\": \"" << ctx.device().str()
        << "\", \"ranks_share_gpu\": " << (share_gpu ? "true" : "false") << ", \"algo\": \""
        << allreduce_algo_name(opt.algo) << "\", \"dtype\": \"" << bench_dtype_name(opt.dtype) << "\", \"op\": \""
        << reduce_op_name(opt.op) << "\", \"iters\": " << opt.iters << ", \"warmup\": " << opt.warmup
        << ", \"wrong\": " << total_wrong << ",\n  \"rows\": [\n"
        << json_rows.str() << "\n  ]\n}\n";
      if (!f) DSTRAIN_THROW(ErrorCode::Io, "could not write " + opt.json);
    }
    if (!opt.calibrate.empty()) {
      // Lines for algorithms this run did not measure are kept, so that runs of -a oneshot,
      // -a twoshot, ... build one file together.
      std::map<std::string, std::string> lines;
      {
        std::ifstream previous(opt.calibrate);
        for (std::string line; std::getline(previous, line);) {
          std::istringstream words(line);
          std::string name;
          if ((words >> name) && name[0] != '#') lines[name] = line;
        }
      }
      for (const auto& [algo, xy] : fits) {
        double alpha = 0, slope = 0;
        if (!bench::fit_line(xy.first, xy.second, alpha, slope)) continue;
        const double beta = slope > 0 ? 1.0 / (slope * 1e3) : 1e6;
        lines[allreduce_algo_name(algo)] =
            std::string(allreduce_algo_name(algo)) + ' ' + fmt("%.3f", std::max(alpha, 0.0)) + ' ' + fmt("%.3f", beta);
        std::printf("# calibrated %s: alpha %.3f us, beta %.3f GB/s\n", allreduce_algo_name(algo), std::max(alpha, 0.0),
                    beta);
      }
      std::ofstream f(opt.calibrate);
      f << "# AllReduce cost model from allreduce_perf (" << n << " ranks, " << ctx.device().str() << ", "
        << bench_dtype_name(opt.dtype) << "): <algo> <alpha_us> <beta_GBps>\n";
      for (const auto& [name, line] : lines) f << line << '\n';
      if (!f) DSTRAIN_THROW(ErrorCode::Io, "could not write " + opt.calibrate);
    }
  }
  return total_wrong == 0 ? 0 : 1;
}

}  // namespace
}  // namespace dstrain

int main(int argc, char** argv) {
  try {
    return dstrain::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "allreduce_perf: %s\n", e.what());
    return 1;
  }
}
