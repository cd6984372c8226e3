// Runs under mpirun -np 4 on the CPU: the loss scaler's found-inf flag agreed across ranks, so
// that ranks whose gradients disagree (one rank overflows) all skip the same step and back their
// scales off together, and all take a clean step together.
#include <catch2/catch.hpp>
#include <mpi.h>

#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "collectives/collectives.h"
#include "dstrain/amp.h"
#include "dstrain/dstrain.h"

namespace {

using dstrain::Communicator;
using dstrain::Device;
using dstrain::Tensor;
namespace amp = dstrain::amp;

Communicator& amp_world() {
  static int argc = 0;
  static char** argv = nullptr;
  static std::unique_ptr<dstrain::collectives::MpiSession> session =
      dstrain::collectives::start_mpi_session(argc, argv);
  static std::unique_ptr<Communicator> comm = [] {
    auto c = session->make_host_communicator();
    c->set_timeout(60);  // a rank that skips the agreement shows up as a Timeout, not a hang
    return c;
  }();
  return *comm;
}

}  // namespace

TEST_CASE("found_inf agreed across ranks: one overflowing rank makes all skip", "[mpi][amp]") {
  Communicator& comm = amp_world();
  REQUIRE(comm.size() >= 2);
  const int rank = comm.rank();
  dstrain::Context ctx = dstrain::Context::cpu();
  amp::GradScaler scaler(Device::cpu());
  Tensor p = Tensor::from_vector({4}, {1.0f, 2.0f, 3.0f, 4.0f});
  amp::FusedSGD opt({&p}, {0.5f, 0.9f, 0.0f, false});

  for (int bad_rank = 0; bad_rank < comm.size(); ++bad_rank) {
    INFO("rank " << bad_rank << " overflows");
    const std::vector<float> before = p.to_host_floats();
    const float scale_before = scaler.scale(ctx);
    std::vector<float> g(4, scale_before);  // unscales to 1.0
    if (rank == bad_rank) g[2] = std::numeric_limits<float>::infinity();
    Tensor grad = Tensor::from_vector({4}, g);
    scaler.unscale_and_check(ctx, {&grad});
    CHECK(scaler.found_inf_set(ctx) == (rank == bad_rank));  // before agreement: only the bad rank
    scaler.agree_found_inf(comm, ctx);
    CHECK(scaler.found_inf_set(ctx));  // after: every rank
    opt.step(ctx, {&grad}, &scaler.found_inf());
    CHECK(p.to_host_floats() == before);
    CHECK(opt.momentum_buffers()[0].to_host_floats() == std::vector<float>(4, 0.0f));
    scaler.update(ctx);
    CHECK(scaler.scale(ctx) == scale_before * 0.5f);
  }

  // A clean step on every rank: nobody skips.
  const float scale = scaler.scale(ctx);
  Tensor grad = Tensor::from_vector({4}, std::vector<float>(4, scale));
  scaler.unscale_and_check(ctx, {&grad});
  scaler.agree_found_inf(comm, ctx);
  CHECK_FALSE(scaler.found_inf_set(ctx));
  opt.step(ctx, {&grad}, &scaler.found_inf());
  CHECK(p.to_host_floats() == std::vector<float>{0.5f, 1.5f, 2.5f, 3.5f});
  scaler.update(ctx);
  CHECK(scaler.scale(ctx) == scale);
  CHECK(scaler.growth_tracker(ctx) == 1);
}
