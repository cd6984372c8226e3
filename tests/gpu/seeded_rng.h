// Fresh random data for every run of a GPU test, with the seed reported on failure so the run
// can be replayed: DSTRAIN_TEST_SEED=<seed> fixes it.
#pragma once
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdlib>
#include <random>

namespace dstrain_test {

inline std::uint32_t fresh_seed() {
  if (const char* s = std::getenv("DSTRAIN_TEST_SEED")) return static_cast<std::uint32_t>(std::strtoul(s, nullptr, 10));
  return std::random_device{}();
}

}  // namespace dstrain_test

// Declares `rng` seeded afresh, and reports the seed with any failure in the enclosing scope.
#define SEEDED_RNG(rng)                                        \
  const std::uint32_t rng##_seed = dstrain_test::fresh_seed(); \
  INFO("seed " << rng##_seed << " (DSTRAIN_TEST_SEED to replay)"); \
  std::mt19937 rng(rng##_seed)
