// A training-like loop of AllReduces under mpirun, with one injected fault, for the fault tests
// (run_fault.sh): a rank that dies, skips a collective, stalls, or calls with another count.
// Whatever happens, the job must end within the timeout plus a margin with a message that names
// the operation and the ranks involved, and leave no process behind.
//
//   fault_main [--steps N] [--count C] [--step-ms MS] [--timeout T]
//              [--kill-rank R | --skip-rank R | --stall-rank R | --mismatch-rank R] [--at-step S]
//              [--bench ITERS]   (per-call cost of a small allreduce, with and without the checks)
//              [--tag WORD]      (ignored; lets the test script find this job's processes)
#include <mpi.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "dstrain/dstrain.h"

namespace {

struct Options {
  int steps = 20;
  long count = 1000;
  int step_ms = 5;
  double timeout_s = 0;  // 0: the library default (DSTRAIN_TIMEOUT_S or 600)
  int kill_rank = -1, skip_rank = -1, stall_rank = -1, mismatch_rank = -1;
  int at_step = 5;
  int bench_iters = 0;
};

bool parse(int argc, char** argv, Options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "fault_main: %s needs a value\n", a.c_str());
      return false;
    }
    const char* v = argv[++i];
    if (a == "--steps") o.steps = std::atoi(v);
    else if (a == "--count") o.count = std::atol(v);
    else if (a == "--step-ms") o.step_ms = std::atoi(v);
    else if (a == "--timeout") o.timeout_s = std::atof(v);
    else if (a == "--kill-rank") o.kill_rank = std::atoi(v);
    else if (a == "--skip-rank") o.skip_rank = std::atoi(v);
    else if (a == "--stall-rank") o.stall_rank = std::atoi(v);
    else if (a == "--mismatch-rank") o.mismatch_rank = std::atoi(v);
    else if (a == "--at-step") o.at_step = std::atoi(v);
    else if (a == "--bench") o.bench_iters = std::atoi(v);
    else if (a == "--tag") continue;
    else {
      std::fprintf(stderr, "fault_main: unknown flag %s\n", a.c_str());
      return false;
    }
  }
  return o.steps > 0 && o.count > 0;
}

double median_us(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2] * 1e6;
}

// Per-call time of an AllReduce of one fp32: the library's path (nonblocking, polled, with the
// timeout) beside a plain blocking MPI_Allreduce, and with the debug fingerprint exchange.
void bench(dstrain::Runtime& rt, int iters) {
  dstrain::Context& ctx = rt.context();
  dstrain::Tensor t = dstrain::Tensor::zeros({1}, dstrain::DType::F32, dstrain::Device::cpu());
  MPI_Comm raw;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw);
  ::setenv("DSTRAIN_DEBUG_COLLECTIVES", "1", 1);
  auto checked = rt.comm().split(0, rt.rank());
  ::unsetenv("DSTRAIN_DEBUG_COLLECTIVES");
  auto time_one = [&](auto&& call) {
    std::vector<double> reps;
    for (int rep = 0; rep < 5; ++rep) {
      for (int i = 0; i < iters / 10 + 1; ++i) call();  // warm-up
      MPI_Barrier(raw);
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) call();
      reps.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters);
    }
    return median_us(reps);
  };
  const double mpi_us = time_one([&] { MPI_Allreduce(MPI_IN_PLACE, t.data(), 1, MPI_FLOAT, MPI_SUM, raw); });
  const double lib_us = time_one([&] { rt.comm().allreduce(t, dstrain::ReduceOp::Sum, ctx); });
  const double debug_us = time_one([&] { checked->allreduce(t, dstrain::ReduceOp::Sum, ctx); });
  if (rt.is_root())
    std::printf("bench: allreduce of 1 fp32 on %d ranks, median of 5 x %d calls: MPI_Allreduce %.2f us, "
                "dstrain (polled, timeout) %.2f us (overhead %+.2f us), with DSTRAIN_DEBUG_COLLECTIVES %.2f us\n",
                rt.world_size(), iters, mpi_us, lib_us, lib_us - mpi_us, debug_us);
  MPI_Comm_free(&raw);
}

int run(dstrain::Runtime& rt, const Options& o) {
  dstrain::Context& ctx = rt.context();
  dstrain::Communicator& comm = rt.comm();
  const int rank = rt.rank();
  if (o.bench_iters > 0) {
    bench(rt, o.bench_iters);
    return 0;
  }
  dstrain::Tensor grad = dstrain::Tensor::empty({o.count}, dstrain::DType::F32, dstrain::Device::cpu());
  dstrain::Tensor odd = dstrain::Tensor::empty({o.count + 1}, dstrain::DType::F32, dstrain::Device::cpu());
  for (int step = 0; step < o.steps; ++step) {
    std::this_thread::sleep_for(std::chrono::milliseconds(o.step_ms));  // "forward and backward"
    if (step == o.at_step) {
      if (rank == o.kill_rank) {
        std::fprintf(stderr, "fault_main: rank %d kills itself at step %d\n", rank, step);
        std::fflush(stderr);
        ::raise(SIGKILL);
      }
      if (rank == o.skip_rank) {
        std::fprintf(stderr, "fault_main: rank %d skips the allreduce of step %d\n", rank, step);
        continue;
      }
      if (rank == o.stall_rank) {
        std::fprintf(stderr, "fault_main: rank %d stalls at step %d\n", rank, step);
        std::fflush(stderr);
        std::this_thread::sleep_for(std::chrono::duration<double>(10 * comm.timeout() + 60));
      }
    }
    dstrain::Tensor& t = (step == o.at_step && rank == o.mismatch_rank) ? odd : grad;
    // The same values every step: a skipped step shows up as a missing rank, not a wrong sum.
    float* p = t.data_as<float>();
    for (long i = 0; i < t.numel(); ++i) p[i] = static_cast<float>(rank + 1);
    comm.allreduce(t, dstrain::ReduceOp::Sum, ctx);
    const float expect = static_cast<float>(rt.world_size() * (rt.world_size() + 1) / 2);
    if (p[0] != expect) {
      std::fprintf(stderr, "fault_main: rank %d step %d: sum %g, expected %g\n", rank, step, p[0], expect);
      return 1;
    }
  }
  std::printf("fault_main: rank %d finished %d steps\n", rank, o.steps);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse(argc, argv, o)) return 2;
  dstrain::RuntimeOptions ropt;
  ropt.device = dstrain::DevicePreference::Cpu;
  ropt.timeout_s = o.timeout_s;
  try {
    dstrain::Runtime rt = dstrain::Runtime::init(argc, argv, ropt);
    try {
      return run(rt, o);
    } catch (const std::exception& e) {
      // As a training program does: report, then end every rank of the job.
      std::fprintf(stderr, "fault_main: rank %d: %s\n", rt.rank(), e.what());
      std::fflush(stderr);
      rt.abort_job(1);
      return 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fault_main: %s\n", e.what());
    return 1;
  }
}
