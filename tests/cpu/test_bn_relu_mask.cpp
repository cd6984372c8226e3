// The ReLU threshold of a BatchNorm channel (kernels/bn_relu_mask.h) against v = fma(x - mean,
// scale, beta) > 0 itself, for every one of the 65536 fp16 and bf16 codes (infinities, NaNs,
// subnormals, both zeros) and many channels: random ones and the edges (scale 0, negative, tiny,
// huge or infinite, beta 0, nothing or everything passing).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "dstrain/dtype.h"
#include "kernels/bn_relu_mask.h"

using dstrain::kernels::bn::preactivation;
using dstrain::kernels::bn::relu_threshold;
using dstrain::kernels::bn::ReluThreshold;

namespace {

struct Channel {
  float mean, scale, beta;
};

// The codes whose test (sign * x >= threshold, each side exact in fp32) disagrees with v > 0.
template <class ToFloat>
std::vector<std::uint32_t> disagreements(const Channel& c, std::uint16_t inf_bits, ToFloat to_float) {
  const ReluThreshold t = relu_threshold(c.mean, c.scale, c.beta, inf_bits, to_float);
  const float sign = to_float(t.sign), threshold = to_float(t.threshold);
  std::vector<std::uint32_t> wrong;
  for (std::uint32_t code = 0; code <= 0xffffu; ++code) {
    const float x = to_float(static_cast<std::uint16_t>(code));
    const bool expected = preactivation(x, c.mean, c.scale, c.beta) > 0.0f;
    const bool got = sign * x >= threshold;
    if (expected != got) wrong.push_back(code);
  }
  return wrong;
}

std::vector<Channel> channels() {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<Channel> cs = {
      {0.0f, 1.0f, 0.0f},       {0.3f, 2.5f, -0.1f},     {-0.3f, -1.7f, 0.2f},  {0.0f, 0.0f, 0.5f},
      {1.0f, 0.0f, -0.5f},      {0.0f, 0.0f, 0.0f},      {0.5f, 1e-30f, 0.0f},  {0.5f, -1e-30f, 1e-30f},
      {100.0f, 1e20f, 3.0f},    {-7.0f, -1e20f, -3.0f},  {0.0f, inf, 0.0f},     {0.0f, -inf, 0.0f},
      {0.0f, 1.0f, 1e30f},      {0.0f, 1.0f, -1e30f},    {0.0f, -1.0f, 1e30f},  {0.0f, -1.0f, -1e30f},
      {1e-3f, 3.0f, -3e-3f},    {60000.0f, 1.0f, 0.0f},  {-60000.0f, -1.0f, 0.0f},
      {0.0f, std::nanf(""), 1.0f},
  };
  std::mt19937 rng(20261207);
  std::uniform_real_distribution<float> m(-2.0f, 2.0f), s(0.05f, 20.0f), b(-1.0f, 1.0f);
  for (int i = 0; i < 200; ++i) cs.push_back({m(rng), (i % 2 ? -1.0f : 1.0f) * s(rng), b(rng)});
  return cs;
}

}  // namespace

TEST_CASE("The ReLU threshold of a BatchNorm channel passes exactly the fp16 and bf16 codes that v > 0 does",
          "[bn_relu_mask]") {
  for (const Channel& c : channels()) {
    INFO("mean " << c.mean << " scale " << c.scale << " beta " << c.beta);
    CHECK(disagreements(c, 0x7c00u, dstrain::fp16_to_float).empty());
    CHECK(disagreements(c, 0x7f80u, dstrain::bf16_to_float).empty());
  }
}

TEST_CASE("The ReLU threshold: scale 0 refuses the infinities, and a NaN threshold everything",
          "[bn_relu_mask]") {
  // scale 0: v = beta for finite x, NaN (refused) for infinite x.
  const ReluThreshold zero = relu_threshold(0.0f, 0.0f, 1.0f, 0x7c00u, dstrain::fp16_to_float);
  CHECK(zero.sign == 0);
  const float sign = dstrain::fp16_to_float(zero.sign), threshold = dstrain::fp16_to_float(zero.threshold);
  CHECK(sign * 65504.0f >= threshold);                                  // the largest finite fp16
  CHECK_FALSE(sign * dstrain::fp16_to_float(0x7c00u) >= threshold);    // +inf
  CHECK_FALSE(preactivation(dstrain::fp16_to_float(0x7c00u), 0.0f, 0.0f, 1.0f) > 0.0f);
  // Nothing passes (scale 0, beta <= 0): a NaN threshold. With scale != 0, +-inf always makes v infinite.
  const ReluThreshold none = relu_threshold(0.0f, 0.0f, -0.5f, 0x7c00u, dstrain::fp16_to_float);
  CHECK(std::isnan(dstrain::fp16_to_float(none.threshold)));
}
