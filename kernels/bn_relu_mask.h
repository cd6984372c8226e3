// Which inputs a BatchNorm + ReLU lets through, for the host and the GPU: v = fma(x - mean, scale,
// beta) > 0 with scale = gamma * invstd, in fp32 (the formula of every path, so that their ReLU
// masks agree bit for bit).
//
// For x of a 16-bit type (fp16, bf16) v is monotone in x: x - mean and the fma each round once,
// and rounding keeps order. So the x that pass are exactly those with sign * x >= threshold, one
// (sign, threshold) per channel: sign 1 where scale > 0 (the x at or above the least that passes),
// -1 where scale < 0 (at or below the greatest), 0 where scale is 0 (0 * x is 0 for finite x and
// NaN for an infinite one, which v also refuses); a NaN threshold where no x passes. Half-precision
// compares then test two x at a time with no conversion to fp32.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DSTRAIN_HOST_DEVICE __host__ __device__
#else
#define DSTRAIN_HOST_DEVICE
#endif

namespace dstrain::kernels::bn {

DSTRAIN_HOST_DEVICE inline float preactivation(float x, float mean, float scale, float beta) {
  return fmaf(x - mean, scale, beta);
}

// In the type's own bits: pass where sign * x >= threshold.
struct ReluThreshold {
  std::uint16_t sign, threshold;
};

// The threshold of one channel for a 16-bit float type whose +infinity has bits `inf_bits` (sign,
// exponent, mantissa as in IEEE formats: 0x7c00 for fp16, 0x7f80 for bf16). to_float(bits) is the
// type's exact value in fp32.
template <class ToFloat>
DSTRAIN_HOST_DEVICE ReluThreshold relu_threshold(float mean, float scale, float beta, std::uint16_t inf_bits,
                                                 ToFloat to_float) {
  constexpr std::uint16_t kSignBit = 0x8000u;
  const std::uint16_t nan_bits = static_cast<std::uint16_t>(inf_bits | 1u);
  const std::uint16_t one_bits = static_cast<std::uint16_t>(inf_bits - 0x4000u);  // 1.0: the bias exponent
  const std::uint16_t minus_one_bits = static_cast<std::uint16_t>(one_bits | kSignBit);
  if (scale == 0.0f)  // v = beta for every finite x, NaN for an infinite one
    return {0, beta > 0.0f ? static_cast<std::uint16_t>(0) : nan_bits};
  if (!(scale > 0.0f) && !(scale < 0.0f)) return {one_bits, nan_bits};  // NaN: nothing passes
  // The type's values from -inf (key 0) to +inf (key last) in increasing order, -0 just before +0.
  const std::uint32_t last = 2u * inf_bits + 1u;
  auto bits_of = [&](std::uint32_t key) -> std::uint16_t {
    return key > inf_bits ? static_cast<std::uint16_t>(key - inf_bits - 1u)
                          : static_cast<std::uint16_t>((inf_bits - key) | kSignBit);
  };
  // With scale > 0 the keys that pass are those from some key on, with scale < 0 those up to one.
  const bool rising = scale > 0.0f;
  auto passes = [&](std::uint32_t key) {
    return preactivation(to_float(bits_of(rising ? key : last - key)), mean, scale, beta) > 0.0f;
  };
  if (!passes(last)) return {rising ? one_bits : minus_one_bits, nan_bits};
  std::uint32_t first = last;  // the least (rising: key; falling: last - key) that passes
  if (passes(0)) {
    first = 0;
  } else {
    // A fixed number of halvings (keys fit 16 bits), so that a caller's channels interleave.
    std::uint32_t fails = 0;
    for (int halving = 0; halving < 16; ++halving) {
      const std::uint32_t mid = fails + (first - fails) / 2;
      if (first - fails > 1) {
        if (passes(mid))
          first = mid;
        else
          fails = mid;
      }
    }
  }
  if (rising) return {one_bits, bits_of(first)};
  return {minus_one_bits, static_cast<std::uint16_t>(bits_of(last - first) ^ kSignBit)};  // -x >= -value
}

}  // namespace dstrain::kernels::bn
