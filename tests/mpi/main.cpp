// Catch2 runner for tests launched as `mpirun -np 4 dstrain_mpi_tests`: every rank runs every
// test; a rank whose test fails makes the job fail (the result is agreed by all ranks).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <mpi.h>

#include <cstdio>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  Catch::Session session;
  int failed = session.applyCommandLine(argc, argv);
  if (failed == 0) failed = session.run();
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) std::printf("mpi tests: %s on all ranks\n", any_failed ? "FAILED" : "passed");
  MPI_Finalize();
  return any_failed ? 1 : 0;
}
