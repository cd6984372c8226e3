// Host tensors for the tests: NaN-poisoned outputs (all bits set is NaN in fp32, fp16 and bf16, so
// an element an op forgot to write fails), uniform random fp32 values, and dtype conversions.
#pragma once
#include <cstddef>
#include <random>
#include <vector>

#include "dstrain/dtype.h"
#include "dstrain/tensor.h"

namespace dstrain_test {

inline dstrain::Tensor poisoned_host(const dstrain::Shape& shape, dstrain::DType dt) {
  dstrain::Tensor t = dstrain::Tensor::empty(shape, dt, dstrain::Device::cpu());
  t.fill_bytes(0xFF);
  return t;
}

inline dstrain::Tensor uniform_host(const dstrain::Shape& shape, std::mt19937& rng, float lo, float hi) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(dstrain::shape_numel(shape)));
  for (float& e : v) e = u(rng);
  return dstrain::Tensor::from_vector(shape, v);
}

inline dstrain::Tensor converted_host(const dstrain::Tensor& src, dstrain::DType dt) {
  dstrain::Tensor t = dstrain::Tensor::empty(src.shape(), dt, dstrain::Device::cpu());
  dstrain::convert_host(src.data(), src.dtype(), t.data(), dt, static_cast<std::size_t>(src.numel()));
  return t;
}

}  // namespace dstrain_test
