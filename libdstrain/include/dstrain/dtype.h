// Element types and their host conversions.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace dstrain {

enum class DType : std::uint8_t { F32, F16, BF16, F8E4M3, F8E5M2, I32 };

std::size_t dtype_size(DType dt);
const char* dtype_name(DType dt);
// Parses "fp32", "fp16", "bf16", "fp8e4m3", "fp8e5m2", "i32"; throws InvalidArgument otherwise.
DType parse_dtype(const std::string& name);

// Host conversions. float -> narrow rounds to nearest, ties to even, and handles subnormals of
// the target. Overflow follows each format's definition:
//  - fp16, bf16, fp8 e5m2 have infinities: a value past max + ulp/2 becomes +-inf, inf stays inf.
//  - fp8 e4m3 (OCP "e4m3fn") has no infinity: a value past 448 + 16 and +-inf saturate to +-448,
//    as CUDA's __NV_SATFINITE conversion does (the convention of FP8 training).
// NaN stays NaN in every format (e4m3: 0x7F with the sign; e5m2: a quiet NaN).
std::uint16_t float_to_fp16(float f);
float fp16_to_float(std::uint16_t h);
std::uint16_t float_to_bf16(float f);
float bf16_to_float(std::uint16_t b);
std::uint8_t float_to_fp8_e4m3(float f);
float fp8_e4m3_to_float(std::uint8_t v);
std::uint8_t float_to_fp8_e5m2(float f);
float fp8_e5m2_to_float(std::uint8_t v);

// Converts n elements between any two floating dtypes on the host (src and dst may not alias).
void convert_host(const void* src, DType src_dt, void* dst, DType dst_dt, std::size_t n);

}  // namespace dstrain
