// Element types and their bit-exact host conversions.
//
// float -> narrow: one routine for fp16 and both fp8 formats (round to nearest, ties to even, on
// the integer bit pattern, so the result is exact whatever the host's floating-point settings);
// bf16 is the upper half of a float and uses the classic add-and-truncate. narrow -> float is
// exact for every format. The results match CUDA's host conversions (__float2half_rn,
// __float2bfloat16_rn, __nv_cvt_float_to_fp8 with __NV_SATFINITE/E4M3 and __NV_NOSAT/E5M2) for
// every non-NaN input; a NaN gives a NaN that keeps its sign (CUDA gives a positive canonical one).
#include "dstrain/dtype.h"

#include <cstring>
#include <string>

#include "dstrain/error.h"

namespace dstrain {

namespace {

struct DTypeInfo {
  DType dtype;
  const char* name;
  std::size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::F32, "fp32", 4},        {DType::F16, "fp16", 2},
    {DType::BF16, "bf16", 2},       {DType::F8E4M3, "fp8e4m3", 1},
    {DType::F8E5M2, "fp8e5m2", 1},  {DType::I32, "i32", 4},
};

const DTypeInfo* find_info(DType dt) {
  for (const auto& info : kDTypes)
    if (info.dtype == dt) return &info;
  return nullptr;
}

std::string valid_names() {
  std::string s;
  for (const auto& info : kDTypes) {
    if (!s.empty()) s += ", ";
    s += info.name;
  }
  return s;
}

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A binary interchange format narrower than float: `man_bits` explicit mantissa bits, exponent
// bias `bias`, and the largest finite magnitude code `max_code` (sign bit excluded).
struct Format {
  int man_bits;
  int bias;
  std::uint32_t max_code;
};
constexpr Format kF16{10, 15, 0x7BFFu};
constexpr Format kE4M3{3, 7, 0x7Eu};
constexpr Format kE5M2{2, 15, 0x7Bu};

// Rounds a shifted-out remainder to nearest, ties to even.
inline std::uint32_t round_shift(std::uint32_t sig, int shift) {
  if (shift <= 0) return sig;
  if (shift > 25) return 0;  // sig < 2^24: below half the smallest step
  const std::uint32_t code = sig >> shift;
  const std::uint32_t rem = sig & ((1u << shift) - 1u);
  const std::uint32_t half = 1u << (shift - 1);
  return (rem > half || (rem == half && (code & 1u))) ? code + 1u : code;
}

// Magnitude code of |f| (finite, not NaN) in `fmt`, rounded to nearest even. The result may
// exceed fmt.max_code: the caller decides between infinity and saturation. A carry out of the
// mantissa (max subnormal -> min normal, or into the next binade) lands in the exponent field,
// which is exactly the next representable value.
inline std::uint32_t magnitude_code(std::uint32_t abs_bits, const Format& fmt) {
  const int drop = 23 - fmt.man_bits;
  const int fexp = static_cast<int>(abs_bits >> 23);
  const std::uint32_t man = abs_bits & 0x7FFFFFu;
  if (fexp == 0) {
    // Float subnormals lie far below the smallest subnormal of every format handled here
    // (2^-126 vs 2^-24 at most), so they round to zero.
    return 0;
  }
  const int texp = fexp - 127 + fmt.bias;  // biased exponent in the target
  if (texp >= 1) {
    if (texp > 0xFF) return 0xFFFFFFFFu;  // far past any overflow threshold
    const std::uint32_t code = (static_cast<std::uint32_t>(texp) << fmt.man_bits) | (man >> drop);
    const std::uint32_t rem = man & ((1u << drop) - 1u);
    const std::uint32_t half = 1u << (drop - 1);
    return (rem > half || (rem == half && (code & 1u))) ? code + 1u : code;
  }
  // Target subnormal: value = sig * 2^(fexp - 150); the target's step is 2^(1 - bias - man_bits).
  const std::uint32_t sig = man | 0x800000u;
  return round_shift(sig, drop + 1 - texp);
}

// Narrow code -> float for formats whose all-ones exponent holds infinities and NaNs (ieee_top)
// or, for e4m3fn, only the NaN 0x7F.
inline float narrow_to_float(std::uint32_t code, int total_bits, const Format& fmt, bool ieee_top) {
  const int exp_bits = total_bits - 1 - fmt.man_bits;
  const std::uint32_t sign = (code >> (total_bits - 1)) & 1u;
  const std::uint32_t exp = (code >> fmt.man_bits) & ((1u << exp_bits) - 1u);
  const std::uint32_t man = code & ((1u << fmt.man_bits) - 1u);
  const std::uint32_t exp_max = (1u << exp_bits) - 1u;
  std::uint32_t out;
  if (ieee_top && exp == exp_max) {
    // Inf (man == 0) or NaN: keep the payload and force the quiet bit.
    out = 0x7F800000u | (man << (23 - fmt.man_bits));
    if (man != 0) out |= 0x00400000u;
  } else if (!ieee_top && exp == exp_max && man == ((1u << fmt.man_bits) - 1u)) {
    out = 0x7FC00000u;  // e4m3fn NaN
  } else if (exp == 0) {
    if (man == 0) {
      out = 0;
    } else {
      // Normalise: value = man * 2^(1 - bias - man_bits).
      int e = 1 - fmt.bias;
      std::uint32_t m = man;
      while ((m & (1u << fmt.man_bits)) == 0) {
        m <<= 1;
        --e;
      }
      m &= (1u << fmt.man_bits) - 1u;
      out = (static_cast<std::uint32_t>(e + 127) << 23) | (m << (23 - fmt.man_bits));
    }
  } else {
    out = ((exp - fmt.bias + 127) << 23) | (man << (23 - fmt.man_bits));
  }
  return bits_float(out | (sign << 31));
}

}  // namespace

std::size_t dtype_size(DType dt) {
  const DTypeInfo* info = find_info(dt);
  if (!info)
    DSTRAIN_THROW(ErrorCode::InvalidArgument,
                  "dtype_size: invalid DType value " + std::to_string(static_cast<int>(dt)));
  return info->size;
}

const char* dtype_name(DType dt) {
  const DTypeInfo* info = find_info(dt);
  return info ? info->name : "invalid";
}

DType parse_dtype(const std::string& name) {
  for (const auto& info : kDTypes)
    if (name == info.name) return info.dtype;
  DSTRAIN_THROW(ErrorCode::InvalidArgument,
                "unknown dtype '" + name + "' (valid: " + valid_names() + ")");
}

std::uint16_t float_to_fp16(float f) {
  const std::uint32_t bits = float_bits(f);
  const std::uint32_t sign = (bits >> 16) & 0x8000u;
  const std::uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u)  // NaN: quiet, payload truncated
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
  if (abs == 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
  const std::uint32_t code = magnitude_code(abs, kF16);
  return static_cast<std::uint16_t>(sign | (code > kF16.max_code ? 0x7C00u : code));
}

float fp16_to_float(std::uint16_t h) { return narrow_to_float(h, 16, kF16, true); }

std::uint16_t float_to_bf16(float f) {
  const std::uint32_t bits = float_bits(f);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u)  // NaN: keep sign and top payload, force quiet bit
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  // Round to nearest even on the low 16 bits; a carry into the exponent is the next value up,
  // and past the largest finite value it gives exactly the infinity pattern. Inf stays inf.
  const std::uint32_t rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>(rounded >> 16);
}

float bf16_to_float(std::uint16_t b) { return bits_float(static_cast<std::uint32_t>(b) << 16); }

std::uint8_t float_to_fp8_e4m3(float f) {
  const std::uint32_t bits = float_bits(f);
  const std::uint32_t sign = (bits >> 24) & 0x80u;
  const std::uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<std::uint8_t>(sign | 0x7Fu);
  // No infinity in e4m3fn: anything past 448 + 16 (and +-inf) saturates to +-448.
  if (abs == 0x7F800000u) return static_cast<std::uint8_t>(sign | kE4M3.max_code);
  const std::uint32_t code = magnitude_code(abs, kE4M3);
  return static_cast<std::uint8_t>(sign | (code > kE4M3.max_code ? kE4M3.max_code : code));
}

float fp8_e4m3_to_float(std::uint8_t v) { return narrow_to_float(v, 8, kE4M3, false); }

std::uint8_t float_to_fp8_e5m2(float f) {
  const std::uint32_t bits = float_bits(f);
  const std::uint32_t sign = (bits >> 24) & 0x80u;
  const std::uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<std::uint8_t>(sign | 0x7Fu);  // quiet NaN
  if (abs == 0x7F800000u) return static_cast<std::uint8_t>(sign | 0x7Cu);
  const std::uint32_t code = magnitude_code(abs, kE5M2);
  return static_cast<std::uint8_t>(sign | (code > kE5M2.max_code ? 0x7Cu : code));
}

float fp8_e5m2_to_float(std::uint8_t v) { return narrow_to_float(v, 8, kE5M2, true); }

namespace {

bool is_floating(DType dt) {
  return dt == DType::F32 || dt == DType::F16 || dt == DType::BF16 || dt == DType::F8E4M3 ||
         dt == DType::F8E5M2;
}

// Storage type and float codec of each floating dtype, so that every (src, dst) pair gets its
// own loop with the conversion inlined instead of a switch per element.
struct F32Codec {
  using T = float;
  static float dec(T v) { return v; }
  static T enc(float f) { return f; }
};
struct F16Codec {
  using T = std::uint16_t;
  static float dec(T v) { return fp16_to_float(v); }
  static T enc(float f) { return float_to_fp16(f); }
};
struct BF16Codec {
  using T = std::uint16_t;
  static float dec(T v) { return bf16_to_float(v); }
  static T enc(float f) { return float_to_bf16(f); }
};
struct E4M3Codec {
  using T = std::uint8_t;
  static float dec(T v) { return fp8_e4m3_to_float(v); }
  static T enc(float f) { return float_to_fp8_e4m3(f); }
};
struct E5M2Codec {
  using T = std::uint8_t;
  static float dec(T v) { return fp8_e5m2_to_float(v); }
  static T enc(float f) { return float_to_fp8_e5m2(f); }
};

template <typename S, typename D>
void convert_loop(const void* src, void* dst, std::size_t n) {
  const auto* s = static_cast<const typename S::T*>(src);
  auto* d = static_cast<typename D::T*>(dst);
  for (std::size_t i = 0; i < n; ++i) d[i] = D::enc(S::dec(s[i]));
}

template <typename S>
void convert_from(const void* src, void* dst, DType dst_dt, std::size_t n) {
  switch (dst_dt) {
    case DType::F32: convert_loop<S, F32Codec>(src, dst, n); return;
    case DType::F16: convert_loop<S, F16Codec>(src, dst, n); return;
    case DType::BF16: convert_loop<S, BF16Codec>(src, dst, n); return;
    case DType::F8E4M3: convert_loop<S, E4M3Codec>(src, dst, n); return;
    case DType::F8E5M2: convert_loop<S, E5M2Codec>(src, dst, n); return;
    default: return;  // unreachable: checked by convert_host
  }
}

}  // namespace

void convert_host(const void* src, DType src_dt, void* dst, DType dst_dt, std::size_t n) {
  if (!is_floating(src_dt) || !is_floating(dst_dt))
    DSTRAIN_THROW(ErrorCode::Unsupported, std::string("convert_host: ") + dtype_name(src_dt) +
                                              " -> " + dtype_name(dst_dt) +
                                              " is not supported (floating dtypes only)");
  if (n == 0) return;
  DSTRAIN_CHECK(src != nullptr && dst != nullptr, "convert_host: null pointer with n > 0");
  if (src_dt == dst_dt) {
    std::memcpy(dst, src, n * dtype_size(src_dt));
    return;
  }
  // narrow -> float is exact, so going through float rounds once: the result is the correctly
  // rounded value of the source in the destination format.
  switch (src_dt) {
    case DType::F32: convert_from<F32Codec>(src, dst, dst_dt, n); return;
    case DType::F16: convert_from<F16Codec>(src, dst, dst_dt, n); return;
    case DType::BF16: convert_from<BF16Codec>(src, dst, dst_dt, n); return;
    case DType::F8E4M3: convert_from<E4M3Codec>(src, dst, dst_dt, n); return;
    case DType::F8E5M2: convert_from<E5M2Codec>(src, dst, dst_dt, n); return;
    default: return;  // unreachable: checked above
  }
}

}  // namespace dstrain
