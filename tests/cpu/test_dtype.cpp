// dtype names and the bit-exact host conversions: every boundary of every format, round trips of
// every code, and a sweep against an independent oracle (nearest representable value by
// comparison with exact midpoints). With DSTRAIN_HAVE_CUDA_HEADERS, also against CUDA's own
// host conversions.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "dstrain/dtype.h"
#include "dstrain/error.h"

#ifdef DSTRAIN_HAVE_CUDA_HEADERS
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#endif

using namespace dstrain;

namespace {

float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
std::uint32_t to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
float up(float x) { return std::nextafter(x, std::numeric_limits<float>::infinity()); }
float down(float x) { return std::nextafter(x, -std::numeric_limits<float>::infinity()); }
float p2(int e) { return std::ldexp(1.0f, e); }
// double -> float without the undefined behaviour of an out-of-range conversion.
float to_float(double v) {
  if (std::fabs(v) > std::numeric_limits<float>::max()) return static_cast<float>(std::copysign(INFINITY, v));
  return static_cast<float>(v);
}

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

bool fp16_is_nan(std::uint16_t h) { return (h & 0x7C00u) == 0x7C00u && (h & 0x3FFu) != 0; }
bool bf16_is_nan(std::uint16_t b) { return (b & 0x7F80u) == 0x7F80u && (b & 0x7Fu) != 0; }
bool e4m3_is_nan(std::uint8_t v) { return (v & 0x7Fu) == 0x7Fu; }
bool e5m2_is_nan(std::uint8_t v) { return (v & 0x7Cu) == 0x7Cu && (v & 0x3u) != 0; }

// A format described by its decoder: values[c] for every non-negative finite magnitude code c in
// increasing order (codes and magnitudes increase together in all four formats).
struct Oracle {
  std::vector<double> values;  // index = magnitude code
  double max_ulp;              // step above the largest finite value
  bool has_inf;                // past max + ulp/2 (tie included) -> inf; else saturate to max
  std::uint32_t inf_code;      // magnitude code of infinity when has_inf
  int sign_shift;              // 15 or 7

  // The correctly rounded code of x (not NaN), ties to even.
  std::uint32_t round(float x) const {
    const std::uint32_t sign = std::signbit(x) ? (1u << sign_shift) : 0u;
    const double a = std::fabs(static_cast<double>(x));
    const double max = values.back();
    const std::uint32_t max_code = static_cast<std::uint32_t>(values.size() - 1);
    if (a >= max) {
      const double mid = max + max_ulp / 2;
      if (has_inf) return sign | (a >= mid ? inf_code : max_code);
      return sign | max_code;
    }
    // values[lo] <= a < values[lo + 1]
    std::size_t lo = 0, hi = values.size() - 1;
    while (hi - lo > 1) {
      const std::size_t m = (lo + hi) / 2;
      if (values[m] <= a)
        lo = m;
      else
        hi = m;
    }
    const double mid = (values[lo] + values[hi]) / 2;  // exact in double: few significant bits
    std::uint32_t code;
    if (a < mid)
      code = static_cast<std::uint32_t>(lo);
    else if (a > mid)
      code = static_cast<std::uint32_t>(hi);
    else
      code = static_cast<std::uint32_t>((lo & 1) ? hi : lo);
    return sign | code;
  }
};

Oracle fp16_oracle() {
  Oracle o;
  for (std::uint32_t c = 0; c <= 0x7BFF; ++c) o.values.push_back(fp16_to_float(static_cast<std::uint16_t>(c)));
  o.max_ulp = 32.0;
  o.has_inf = true;
  o.inf_code = 0x7C00;
  o.sign_shift = 15;
  return o;
}
Oracle bf16_oracle() {
  Oracle o;
  for (std::uint32_t c = 0; c <= 0x7F7F; ++c) o.values.push_back(bf16_to_float(static_cast<std::uint16_t>(c)));
  o.max_ulp = std::ldexp(1.0, 127 - 7);
  o.has_inf = true;
  o.inf_code = 0x7F80;
  o.sign_shift = 15;
  return o;
}
Oracle e4m3_oracle() {
  Oracle o;
  for (std::uint32_t c = 0; c <= 0x7E; ++c) o.values.push_back(fp8_e4m3_to_float(static_cast<std::uint8_t>(c)));
  o.max_ulp = 32.0;
  o.has_inf = false;
  o.inf_code = 0;
  o.sign_shift = 7;
  return o;
}
Oracle e5m2_oracle() {
  Oracle o;
  for (std::uint32_t c = 0; c <= 0x7B; ++c) o.values.push_back(fp8_e5m2_to_float(static_cast<std::uint8_t>(c)));
  o.max_ulp = 8192.0;
  o.has_inf = true;
  o.inf_code = 0x7C;
  o.sign_shift = 7;
  return o;
}

// Floats worth testing for a format: each representable value, the midpoints between
// neighbours, one float ulp either side of both, their negatives, plus random bit patterns and
// random values inside the format's exponent range.
std::vector<float> probe_values(const Oracle& o, std::size_t n_random, std::uint64_t seed) {
  std::vector<float> xs;
  auto add = [&xs](double v) {
    const float f = to_float(v);
    for (float g : {f, up(f), down(f)}) {
      xs.push_back(g);
      xs.push_back(-g);
    }
  };
  for (std::size_t i = 0; i < o.values.size(); ++i) {
    add(o.values[i]);
    if (i + 1 < o.values.size()) add((o.values[i] + o.values[i + 1]) / 2);
  }
  add(o.values.back() + o.max_ulp / 2);
  add(o.values.back() + o.max_ulp);
  std::mt19937_64 rng(seed);
  for (std::size_t i = 0; i < n_random; ++i) xs.push_back(from_bits(static_cast<std::uint32_t>(rng())));
  const double lo = std::log2(o.values[1]) - 2, hi = std::log2(o.values.back()) + 2;
  std::uniform_real_distribution<double> e(lo, hi);
  for (std::size_t i = 0; i < n_random; ++i) {
    const float f = to_float(std::exp2(e(rng)));
    xs.push_back((rng() & 1) ? f : -f);
  }
  return xs;
}

template <typename Narrow, typename IsNaN>
void check_against_oracle(const Oracle& o, Narrow narrow, IsNaN is_nan, std::uint64_t seed) {
  std::size_t checked = 0, mismatches = 0;
  for (float x : probe_values(o, 200000, seed)) {
    const std::uint32_t got = narrow(x);
    if (std::isnan(x)) {
      if (!is_nan(got)) ++mismatches;
      continue;
    }
    const std::uint32_t want = o.round(x);
    if (got != want) {
      if (mismatches < 5) {
        INFO("x = " << x << " (bits 0x" << std::hex << to_bits(x) << ") got 0x" << got << " want 0x" << want);
        CHECK(got == want);
      }
      ++mismatches;
    }
    ++checked;
  }
  INFO(checked << " finite probes");
  CHECK(mismatches == 0);
}

}  // namespace

TEST_CASE("dtype names, sizes and parsing", "[dtype]") {
  const DType all[] = {DType::F32, DType::F16, DType::BF16, DType::F8E4M3, DType::F8E5M2, DType::I32};
  const char* names[] = {"fp32", "fp16", "bf16", "fp8e4m3", "fp8e5m2", "i32"};
  const std::size_t sizes[] = {4, 2, 2, 1, 1, 4};
  for (int i = 0; i < 6; ++i) {
    CHECK(std::string(dtype_name(all[i])) == names[i]);
    CHECK(dtype_size(all[i]) == sizes[i]);
    CHECK(parse_dtype(names[i]) == all[i]);
  }
  const auto invalid = static_cast<DType>(200);
  CHECK(std::string(dtype_name(invalid)) == "invalid");  // usable inside error messages
  try {
    dtype_size(invalid);
    FAIL("dtype_size accepted an invalid DType");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::InvalidArgument);
  }
  for (const char* bad : {"", "float32", "FP16", "fp8", "e4m3", "fp8e4m3 ", "int32"}) {
    try {
      parse_dtype(bad);
      FAIL("parse_dtype accepted '" << bad << "'");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::InvalidArgument);
      const std::string msg = e.what();
      CHECK(msg.find(std::string("'") + bad + "'") != std::string::npos);
      CHECK(msg.find("fp8e5m2") != std::string::npos);
      CHECK(msg.find("bf16") != std::string::npos);
    }
  }
}

TEST_CASE("fp16 boundaries", "[dtype]") {
  CHECK(float_to_fp16(0.0f) == 0x0000);
  CHECK(float_to_fp16(-0.0f) == 0x8000);
  CHECK(float_to_fp16(1.0f) == 0x3C00);
  CHECK(float_to_fp16(-2.0f) == 0xC000);
  // subnormals: min 2^-24, max 1023 * 2^-24; min normal 2^-14; max normal 65504
  CHECK(float_to_fp16(p2(-24)) == 0x0001);
  CHECK(float_to_fp16(-p2(-24)) == 0x8001);
  CHECK(float_to_fp16(1023 * p2(-24)) == 0x03FF);
  CHECK(float_to_fp16(p2(-14)) == 0x0400);
  CHECK(float_to_fp16(65504.0f) == 0x7BFF);
  CHECK(float_to_fp16(-65504.0f) == 0xFBFF);
  // below half the min subnormal -> 0; exactly half ties to even (0); just above -> min subnormal
  CHECK(float_to_fp16(p2(-26)) == 0x0000);
  CHECK(float_to_fp16(p2(-25)) == 0x0000);
  CHECK(float_to_fp16(-p2(-25)) == 0x8000);
  CHECK(float_to_fp16(up(p2(-25))) == 0x0001);
  CHECK(float_to_fp16(from_bits(0x00000001)) == 0x0000);  // float subnormal
  CHECK(float_to_fp16(-from_bits(0x007FFFFF)) == 0x8000);
  // subnormal ties: 1.5 -> 2 (up to even), 2.5 -> 2 (down to even)
  CHECK(float_to_fp16(1.5f * p2(-24)) == 0x0002);
  CHECK(float_to_fp16(2.5f * p2(-24)) == 0x0002);
  CHECK(float_to_fp16(down(2.5f * p2(-24))) == 0x0002);
  CHECK(float_to_fp16(up(2.5f * p2(-24))) == 0x0003);
  // max subnormal + half step ties to min normal (0x3FF is odd); just below stays subnormal
  CHECK(float_to_fp16(1023.5f * p2(-24)) == 0x0400);
  CHECK(float_to_fp16(down(1023.5f * p2(-24))) == 0x03FF);
  // normal ties: 1 + 2^-11 -> 1.0 (even), 1 + 3*2^-11 -> 1 + 2^-9 (even)
  CHECK(float_to_fp16(1.0f + p2(-11)) == 0x3C00);
  CHECK(float_to_fp16(up(1.0f + p2(-11))) == 0x3C01);
  CHECK(float_to_fp16(1.0f + 3 * p2(-11)) == 0x3C02);
  CHECK(float_to_fp16(down(1.0f + 3 * p2(-11))) == 0x3C01);
  // carry into the next binade: 2 - 2^-12 -> 2.0
  CHECK(float_to_fp16(2.0f - p2(-12)) == 0x4000);
  // overflow: max + ulp/2 = 65520 ties to inf, just below stays max
  CHECK(float_to_fp16(down(65520.0f)) == 0x7BFF);
  CHECK(float_to_fp16(65520.0f) == 0x7C00);
  CHECK(float_to_fp16(-65520.0f) == 0xFC00);
  CHECK(float_to_fp16(1e10f) == 0x7C00);
  CHECK(float_to_fp16(std::numeric_limits<float>::max()) == 0x7C00);
  CHECK(float_to_fp16(kInf) == 0x7C00);
  CHECK(float_to_fp16(-kInf) == 0xFC00);
  CHECK(fp16_is_nan(float_to_fp16(kNaN)));
  CHECK(fp16_is_nan(float_to_fp16(-kNaN)));
  CHECK(fp16_is_nan(float_to_fp16(from_bits(0x7F800001))));  // signalling NaN, payload in low bits
  CHECK(fp16_is_nan(float_to_fp16(from_bits(0xFF800001))));
  // decode
  CHECK(fp16_to_float(0x0001) == p2(-24));
  CHECK(fp16_to_float(0x03FF) == 1023 * p2(-24));
  CHECK(fp16_to_float(0x0400) == p2(-14));
  CHECK(fp16_to_float(0x7BFF) == 65504.0f);
  CHECK(fp16_to_float(0x7C00) == kInf);
  CHECK(fp16_to_float(0xFC00) == -kInf);
  CHECK(std::isnan(fp16_to_float(0x7E00)));
  CHECK(std::isnan(fp16_to_float(0x7C01)));
  CHECK(std::signbit(fp16_to_float(0x8000)));
}

TEST_CASE("bf16 boundaries", "[dtype]") {
  CHECK(float_to_bf16(0.0f) == 0x0000);
  CHECK(float_to_bf16(-0.0f) == 0x8000);
  CHECK(float_to_bf16(1.0f) == 0x3F80);
  // subnormals share float's exponent range: min 2^-133, max 127 * 2^-133; min normal 2^-126
  CHECK(float_to_bf16(p2(-133)) == 0x0001);
  CHECK(float_to_bf16(127 * p2(-133)) == 0x007F);
  CHECK(float_to_bf16(p2(-126)) == 0x0080);
  const float bf16_max = from_bits(0x7F7F0000u);
  CHECK(float_to_bf16(bf16_max) == 0x7F7F);
  CHECK(float_to_bf16(-bf16_max) == 0xFF7F);
  // subnormal ties and half of the min subnormal
  CHECK(float_to_bf16(from_bits(0x00008000u)) == 0x0000);
  CHECK(float_to_bf16(from_bits(0x00008001u)) == 0x0001);
  CHECK(float_to_bf16(from_bits(0x00018000u)) == 0x0002);
  CHECK(float_to_bf16(from_bits(0x00028000u)) == 0x0002);
  CHECK(float_to_bf16(from_bits(0x007F8000u)) == 0x0080);  // max subnormal + half -> min normal
  CHECK(float_to_bf16(from_bits(0x007F7FFFu)) == 0x007F);
  // normal ties: 1 + 2^-8 -> 1.0, 1 + 3*2^-8 -> 1 + 2^-6
  CHECK(float_to_bf16(1.0f + p2(-8)) == 0x3F80);
  CHECK(float_to_bf16(up(1.0f + p2(-8))) == 0x3F81);
  CHECK(float_to_bf16(1.0f + 3 * p2(-8)) == 0x3F82);
  CHECK(float_to_bf16(down(1.0f + 3 * p2(-8))) == 0x3F81);
  // overflow: max + ulp/2 (bits 0x7F7F8000) ties to inf; just below stays max
  CHECK(float_to_bf16(from_bits(0x7F7F7FFFu)) == 0x7F7F);
  CHECK(float_to_bf16(from_bits(0x7F7F8000u)) == 0x7F80);
  CHECK(float_to_bf16(from_bits(0xFF7F8000u)) == 0xFF80);
  CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7F80);
  CHECK(float_to_bf16(kInf) == 0x7F80);
  CHECK(float_to_bf16(-kInf) == 0xFF80);
  // NaN stays a quiet NaN even when its payload sits in the low 16 bits (naive rounding would
  // turn 0x7F800001 into inf or carry 0x7FFFFFFF into the sign)
  for (std::uint32_t nan_bits : {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u, 0x7FFFFFFFu, 0x7F80FFFFu}) {
    const std::uint16_t b = float_to_bf16(from_bits(nan_bits));
    CHECK(bf16_is_nan(b));
    CHECK((b & 0x0040u) != 0);  // quiet
    CHECK((b >> 15) == (nan_bits >> 31));
  }
  CHECK(bf16_to_float(0x0001) == p2(-133));
  CHECK(bf16_to_float(0x7F7F) == bf16_max);
  CHECK(bf16_to_float(0x7F80) == kInf);
  CHECK(std::isnan(bf16_to_float(0x7FC0)));
}

TEST_CASE("fp8 e4m3 boundaries", "[dtype]") {
  CHECK(float_to_fp8_e4m3(0.0f) == 0x00);
  CHECK(float_to_fp8_e4m3(-0.0f) == 0x80);
  CHECK(float_to_fp8_e4m3(1.0f) == 0x38);
  // subnormals: min 2^-9, max 7 * 2^-9; min normal 2^-6; max 448
  CHECK(float_to_fp8_e4m3(p2(-9)) == 0x01);
  CHECK(float_to_fp8_e4m3(-p2(-9)) == 0x81);
  CHECK(float_to_fp8_e4m3(7 * p2(-9)) == 0x07);
  CHECK(float_to_fp8_e4m3(p2(-6)) == 0x08);
  CHECK(float_to_fp8_e4m3(448.0f) == 0x7E);
  CHECK(float_to_fp8_e4m3(-448.0f) == 0xFE);
  // underflow and subnormal ties
  CHECK(float_to_fp8_e4m3(p2(-10)) == 0x00);
  CHECK(float_to_fp8_e4m3(-p2(-10)) == 0x80);
  CHECK(float_to_fp8_e4m3(up(p2(-10))) == 0x01);
  CHECK(float_to_fp8_e4m3(1.5f * p2(-9)) == 0x02);
  CHECK(float_to_fp8_e4m3(2.5f * p2(-9)) == 0x02);
  CHECK(float_to_fp8_e4m3(up(2.5f * p2(-9))) == 0x03);
  CHECK(float_to_fp8_e4m3(7.5f * p2(-9)) == 0x08);  // max subnormal + half -> min normal
  CHECK(float_to_fp8_e4m3(down(7.5f * p2(-9))) == 0x07);
  CHECK(float_to_fp8_e4m3(from_bits(0x00000001)) == 0x00);
  // normal ties: 1 + 2^-4 -> 1.0, 1 + 3*2^-4 -> 1.25
  CHECK(float_to_fp8_e4m3(1.0625f) == 0x38);
  CHECK(float_to_fp8_e4m3(up(1.0625f)) == 0x39);
  CHECK(float_to_fp8_e4m3(1.1875f) == 0x3A);
  CHECK(float_to_fp8_e4m3(down(1.1875f)) == 0x39);
  // top of the range: 416 (0x7D) and 448 (0x7E); 432 ties up to the even 0x7E
  CHECK(float_to_fp8_e4m3(416.0f) == 0x7D);
  CHECK(float_to_fp8_e4m3(down(432.0f)) == 0x7D);
  CHECK(float_to_fp8_e4m3(432.0f) == 0x7E);
  // no infinity: past 448 + 16 and +-inf saturate to +-448 (0x7F stays NaN)
  CHECK(float_to_fp8_e4m3(456.0f) == 0x7E);
  CHECK(float_to_fp8_e4m3(464.0f) == 0x7E);
  CHECK(float_to_fp8_e4m3(down(464.0f)) == 0x7E);
  CHECK(float_to_fp8_e4m3(up(464.0f)) == 0x7E);
  CHECK(float_to_fp8_e4m3(480.0f) == 0x7E);
  CHECK(float_to_fp8_e4m3(-1e6f) == 0xFE);
  CHECK(float_to_fp8_e4m3(std::numeric_limits<float>::max()) == 0x7E);
  CHECK(float_to_fp8_e4m3(kInf) == 0x7E);
  CHECK(float_to_fp8_e4m3(-kInf) == 0xFE);
  CHECK(float_to_fp8_e4m3(kNaN) == 0x7F);
  CHECK(float_to_fp8_e4m3(-kNaN) == 0xFF);
  CHECK(float_to_fp8_e4m3(from_bits(0x7F800001u)) == 0x7F);
  // decode
  CHECK(fp8_e4m3_to_float(0x01) == p2(-9));
  CHECK(fp8_e4m3_to_float(0x07) == 7 * p2(-9));
  CHECK(fp8_e4m3_to_float(0x08) == p2(-6));
  CHECK(fp8_e4m3_to_float(0x7E) == 448.0f);
  CHECK(fp8_e4m3_to_float(0xFE) == -448.0f);
  CHECK(fp8_e4m3_to_float(0x78) == 256.0f);  // exponent field 15 is a normal binade in e4m3fn
  CHECK(std::isnan(fp8_e4m3_to_float(0x7F)));
  CHECK(std::isnan(fp8_e4m3_to_float(0xFF)));
  CHECK(std::signbit(fp8_e4m3_to_float(0x80)));
}

TEST_CASE("fp8 e5m2 boundaries", "[dtype]") {
  CHECK(float_to_fp8_e5m2(0.0f) == 0x00);
  CHECK(float_to_fp8_e5m2(-0.0f) == 0x80);
  CHECK(float_to_fp8_e5m2(1.0f) == 0x3C);
  // subnormals: min 2^-16, max 3 * 2^-16; min normal 2^-14; max 57344
  CHECK(float_to_fp8_e5m2(p2(-16)) == 0x01);
  CHECK(float_to_fp8_e5m2(3 * p2(-16)) == 0x03);
  CHECK(float_to_fp8_e5m2(p2(-14)) == 0x04);
  CHECK(float_to_fp8_e5m2(57344.0f) == 0x7B);
  CHECK(float_to_fp8_e5m2(-57344.0f) == 0xFB);
  // underflow and subnormal ties
  CHECK(float_to_fp8_e5m2(p2(-17)) == 0x00);
  CHECK(float_to_fp8_e5m2(up(p2(-17))) == 0x01);
  CHECK(float_to_fp8_e5m2(1.5f * p2(-16)) == 0x02);
  CHECK(float_to_fp8_e5m2(2.5f * p2(-16)) == 0x02);
  CHECK(float_to_fp8_e5m2(3.5f * p2(-16)) == 0x04);  // max subnormal + half -> min normal
  CHECK(float_to_fp8_e5m2(down(3.5f * p2(-16))) == 0x03);
  // normal ties: 1.125 -> 1.0, 1.375 -> 1.5
  CHECK(float_to_fp8_e5m2(1.125f) == 0x3C);
  CHECK(float_to_fp8_e5m2(up(1.125f)) == 0x3D);
  CHECK(float_to_fp8_e5m2(1.375f) == 0x3E);
  CHECK(float_to_fp8_e5m2(down(1.375f)) == 0x3D);
  // overflow: max + ulp/2 = 61440 ties to inf
  CHECK(float_to_fp8_e5m2(down(61440.0f)) == 0x7B);
  CHECK(float_to_fp8_e5m2(61440.0f) == 0x7C);
  CHECK(float_to_fp8_e5m2(-61440.0f) == 0xFC);
  CHECK(float_to_fp8_e5m2(1e30f) == 0x7C);
  CHECK(float_to_fp8_e5m2(kInf) == 0x7C);
  CHECK(float_to_fp8_e5m2(-kInf) == 0xFC);
  CHECK(e5m2_is_nan(float_to_fp8_e5m2(kNaN)));
  CHECK(e5m2_is_nan(float_to_fp8_e5m2(-kNaN)));
  CHECK(e5m2_is_nan(float_to_fp8_e5m2(from_bits(0x7F800001u))));
  CHECK((float_to_fp8_e5m2(kNaN) & 0x02u) != 0);  // quiet
  // decode
  CHECK(fp8_e5m2_to_float(0x01) == p2(-16));
  CHECK(fp8_e5m2_to_float(0x04) == p2(-14));
  CHECK(fp8_e5m2_to_float(0x7B) == 57344.0f);
  CHECK(fp8_e5m2_to_float(0x7C) == kInf);
  CHECK(fp8_e5m2_to_float(0xFC) == -kInf);
  for (std::uint8_t v : {0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF}) CHECK(std::isnan(fp8_e5m2_to_float(v)));
}

TEST_CASE("every code round-trips narrow -> float -> narrow", "[dtype]") {
  int nan_codes = 0;
  for (std::uint32_t c = 0; c < 0x10000; ++c) {
    const auto h = static_cast<std::uint16_t>(c);
    const float f = fp16_to_float(h);
    if (fp16_is_nan(h)) {
      ++nan_codes;
      REQUIRE(std::isnan(f));
      REQUIRE(fp16_is_nan(float_to_fp16(f)));
    } else {
      REQUIRE(float_to_fp16(f) == h);
    }
  }
  CHECK(nan_codes == 2 * 1023);
  nan_codes = 0;
  for (std::uint32_t c = 0; c < 0x10000; ++c) {
    const auto b = static_cast<std::uint16_t>(c);
    const float f = bf16_to_float(b);
    if (bf16_is_nan(b)) {
      ++nan_codes;
      REQUIRE(std::isnan(f));
      REQUIRE(bf16_is_nan(float_to_bf16(f)));
    } else {
      REQUIRE(float_to_bf16(f) == b);
    }
  }
  CHECK(nan_codes == 2 * 127);
  nan_codes = 0;
  for (std::uint32_t c = 0; c < 0x100; ++c) {
    const auto v = static_cast<std::uint8_t>(c);
    const float f = fp8_e4m3_to_float(v);
    if (e4m3_is_nan(v)) {
      ++nan_codes;
      REQUIRE(std::isnan(f));
      REQUIRE(float_to_fp8_e4m3(f) == v);  // 0x7F / 0xFF, sign kept
    } else {
      REQUIRE(!std::isnan(f));
      REQUIRE(!std::isinf(f));
      REQUIRE(float_to_fp8_e4m3(f) == v);
    }
  }
  CHECK(nan_codes == 2);
  nan_codes = 0;
  for (std::uint32_t c = 0; c < 0x100; ++c) {
    const auto v = static_cast<std::uint8_t>(c);
    const float f = fp8_e5m2_to_float(v);
    if (e5m2_is_nan(v)) {
      ++nan_codes;
      REQUIRE(std::isnan(f));
      REQUIRE(e5m2_is_nan(float_to_fp8_e5m2(f)));
    } else {
      REQUIRE(float_to_fp8_e5m2(f) == v);
    }
  }
  CHECK(nan_codes == 6);
}

TEST_CASE("decoded values are exact and ordered", "[dtype]") {
  // Every positive finite code decodes to sign-free, strictly increasing values with the step
  // the format's definition gives: exact decoding is what the oracle below relies on.
  auto check_fmt = [](const Oracle& o, int man_bits, int bias) {
    for (std::size_t c = 0; c < o.values.size(); ++c) {
      const int e = static_cast<int>(c >> man_bits);
      const int m = static_cast<int>(c & ((1u << man_bits) - 1));
      const double want = e == 0 ? std::ldexp(static_cast<double>(m), 1 - bias - man_bits)
                                 : std::ldexp(1.0 + std::ldexp(m, -man_bits), e - bias);
      REQUIRE(o.values[c] == want);
      if (c > 0) REQUIRE(o.values[c] > o.values[c - 1]);
    }
  };
  check_fmt(fp16_oracle(), 10, 15);
  check_fmt(bf16_oracle(), 7, 127);
  check_fmt(e4m3_oracle(), 3, 7);
  check_fmt(e5m2_oracle(), 2, 15);
}

TEST_CASE("float -> narrow matches the nearest-even oracle", "[dtype]") {
  SECTION("fp16") {
    check_against_oracle(fp16_oracle(), [](float x) { return float_to_fp16(x); },
                         [](std::uint32_t c) { return fp16_is_nan(static_cast<std::uint16_t>(c)); }, 1);
  }
  SECTION("bf16") {
    check_against_oracle(bf16_oracle(), [](float x) { return float_to_bf16(x); },
                         [](std::uint32_t c) { return bf16_is_nan(static_cast<std::uint16_t>(c)); }, 2);
  }
  SECTION("fp8 e4m3") {
    check_against_oracle(e4m3_oracle(), [](float x) { return float_to_fp8_e4m3(x); },
                         [](std::uint32_t c) { return e4m3_is_nan(static_cast<std::uint8_t>(c)); }, 3);
  }
  SECTION("fp8 e5m2") {
    check_against_oracle(e5m2_oracle(), [](float x) { return float_to_fp8_e5m2(x); },
                         [](std::uint32_t c) { return e5m2_is_nan(static_cast<std::uint8_t>(c)); }, 4);
  }
}

TEST_CASE("convert_host between every pair of floating dtypes", "[dtype]") {
  const DType floating[] = {DType::F32, DType::F16, DType::BF16, DType::F8E4M3, DType::F8E5M2};
  // Source values: every fp16 code reinterpreted per source dtype, or a float sweep for fp32.
  std::vector<float> sweep;
  for (std::uint32_t c = 0; c < 0x10000; ++c) sweep.push_back(fp16_to_float(static_cast<std::uint16_t>(c)));
  sweep.push_back(1e30f);
  sweep.push_back(-3.3e-9f);
  sweep.push_back(kInf);
  const std::size_t n = sweep.size();

  auto encode = [](DType dt, float v, unsigned char* p) {
    switch (dt) {
      case DType::F32: std::memcpy(p, &v, 4); break;
      case DType::F16: { const std::uint16_t h = float_to_fp16(v); std::memcpy(p, &h, 2); break; }
      case DType::BF16: { const std::uint16_t b = float_to_bf16(v); std::memcpy(p, &b, 2); break; }
      case DType::F8E4M3: *p = float_to_fp8_e4m3(v); break;
      case DType::F8E5M2: *p = float_to_fp8_e5m2(v); break;
      default: break;
    }
  };
  auto decode = [](DType dt, const unsigned char* p) -> float {
    switch (dt) {
      case DType::F32: { float v; std::memcpy(&v, p, 4); return v; }
      case DType::F16: { std::uint16_t h; std::memcpy(&h, p, 2); return fp16_to_float(h); }
      case DType::BF16: { std::uint16_t b; std::memcpy(&b, p, 2); return bf16_to_float(b); }
      case DType::F8E4M3: return fp8_e4m3_to_float(*p);
      case DType::F8E5M2: return fp8_e5m2_to_float(*p);
      default: return 0;
    }
  };

  for (DType s : floating) {
    const std::size_t ss = dtype_size(s);
    std::vector<unsigned char> src(n * ss);
    for (std::size_t i = 0; i < n; ++i) encode(s, sweep[i], &src[i * ss]);
    for (DType d : floating) {
      const std::size_t ds = dtype_size(d);
      std::vector<unsigned char> dst(n * ds, 0xA5), want(n * ds);
      // expected: decode exactly to float, then round once into the destination
      for (std::size_t i = 0; i < n; ++i) {
        if (s == d)
          std::memcpy(&want[i * ds], &src[i * ss], ds);
        else
          encode(d, decode(s, &src[i * ss]), &want[i * ds]);
      }
      convert_host(src.data(), s, dst.data(), d, n);
      INFO(dtype_name(s) << " -> " << dtype_name(d));
      CHECK(dst == want);
    }
  }
  // A value that is a tie in e4m3 when seen from fp16 exactly (no double rounding via float).
  const std::uint16_t h = float_to_fp16(1.0625f);
  std::uint8_t out = 0;
  convert_host(&h, DType::F16, &out, DType::F8E4M3, 1);
  CHECK(out == 0x38);
  // n == 0 touches nothing, even with null pointers
  CHECK_NOTHROW(convert_host(nullptr, DType::F32, nullptr, DType::F16, 0));
}

TEST_CASE("convert_host rejects i32", "[dtype]") {
  std::int32_t i = 7;
  float f = 0;
  for (auto pair : {std::make_pair(DType::I32, DType::F32), std::make_pair(DType::F32, DType::I32),
                    std::make_pair(DType::I32, DType::I32)}) {
    try {
      convert_host(pair.first == DType::I32 ? static_cast<const void*>(&i) : &f, pair.first,
                   pair.second == DType::I32 ? static_cast<void*>(&i) : &f, pair.second, 1);
      FAIL("convert_host accepted " << dtype_name(pair.first) << " -> " << dtype_name(pair.second));
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::Unsupported);
      CHECK(std::string(e.what()).find("i32") != std::string::npos);
    }
  }
}

#ifdef DSTRAIN_HAVE_CUDA_HEADERS
// CUDA's host paths are the reference the device kernels agree with. NaN outputs are compared
// as NaN-ness: CUDA returns a positive canonical NaN, we keep the sign.
TEST_CASE("host conversions match CUDA's", "[dtype]") {
  std::vector<float> xs = {0.0f, -0.0f, kInf, -kInf, kNaN, -kNaN, from_bits(0x7F800001u),
                           std::numeric_limits<float>::max(), std::numeric_limits<float>::min(),
                           std::numeric_limits<float>::denorm_min(), 448.0f, 464.0f, up(464.0f),
                           57344.0f, 61440.0f, down(61440.0f), 65504.0f, 65520.0f, down(65520.0f)};
  for (const Oracle& o : {fp16_oracle(), bf16_oracle(), e4m3_oracle(), e5m2_oracle()}) {
    const auto more = probe_values(o, 100000, 99);
    xs.insert(xs.end(), more.begin(), more.end());
  }
  std::size_t bad16 = 0, badbf = 0, bad43 = 0, bad52 = 0;
  for (float x : xs) {
    const __half_raw hr = static_cast<__half_raw>(__float2half_rn(x));
    const std::uint16_t h = float_to_fp16(x);
    if (std::isnan(x) ? !(fp16_is_nan(hr.x) && fp16_is_nan(h)) : hr.x != h) ++bad16;

    const __nv_bfloat16_raw br = static_cast<__nv_bfloat16_raw>(__float2bfloat16_rn(x));
    const std::uint16_t b = float_to_bf16(x);
    if (std::isnan(x) ? !(bf16_is_nan(br.x) && bf16_is_nan(b)) : br.x != b) ++badbf;

    const std::uint8_t c43 = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
    const std::uint8_t v43 = float_to_fp8_e4m3(x);
    if (std::isnan(x) ? !(e4m3_is_nan(c43) && e4m3_is_nan(v43)) : c43 != v43) ++bad43;

    const std::uint8_t c52 = __nv_cvt_float_to_fp8(x, __NV_NOSAT, __NV_E5M2);
    const std::uint8_t v52 = float_to_fp8_e5m2(x);
    if (std::isnan(x) ? !(e5m2_is_nan(c52) && e5m2_is_nan(v52)) : c52 != v52) ++bad52;
  }
  INFO(xs.size() << " inputs");
  CHECK(bad16 == 0);
  CHECK(badbf == 0);
  CHECK(bad43 == 0);
  CHECK(bad52 == 0);
  // Decoding agrees too (NaN as NaN-ness).
  for (std::uint32_t c = 0; c < 0x10000; ++c) {
    __half_raw hr;
    hr.x = static_cast<unsigned short>(c);
    const float cf = __half2float(__half(hr));
    const float mf = fp16_to_float(static_cast<std::uint16_t>(c));
    REQUIRE((std::isnan(cf) ? std::isnan(mf) : to_bits(cf) == to_bits(mf)));
  }
  for (std::uint32_t c = 0; c < 0x100; ++c) {
    const auto v = static_cast<__nv_fp8_storage_t>(c);
    const float c43 = __half2float(__half(__nv_cvt_fp8_to_halfraw(v, __NV_E4M3)));
    const float c52 = __half2float(__half(__nv_cvt_fp8_to_halfraw(v, __NV_E5M2)));
    const float m43 = fp8_e4m3_to_float(static_cast<std::uint8_t>(c));
    const float m52 = fp8_e5m2_to_float(static_cast<std::uint8_t>(c));
    REQUIRE((std::isnan(c43) ? std::isnan(m43) : to_bits(c43) == to_bits(m43)));
    REQUIRE((std::isnan(c52) ? std::isnan(m52) : to_bits(c52) == to_bits(m52)));
  }
}
#endif
