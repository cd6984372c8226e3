// Entry point of dstrain_gpu_tests: exits with DSTRAIN_SKIP_CODE (ctest: skipped, never passed)
// when the process sees no CUDA device, else runs the Catch2 session.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime.h>

#include <cstdio>

int main(int argc, char** argv) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    std::printf("no CUDA device: GPU tests skipped\n");
    std::fprintf(stderr, "(cudaGetDeviceCount: %s, %d device(s))\n",
                 status != cudaSuccess ? cudaGetErrorString(status) : "success", count);
    return DSTRAIN_SKIP_CODE;
  }
  return Catch::Session().run(argc, argv);
}
