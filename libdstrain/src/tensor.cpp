#include "dstrain/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "dstrain/error.h"
#include "kernels/cuda_api.h"

namespace dstrain {

std::string shape_str(const Shape& s) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < s.size(); ++i) out << (i ? "," : "") << s[i];
  out << ']';
  return out.str();
}

std::int64_t shape_numel(const Shape& s) {
  std::int64_t n = 1;
  for (auto d : s) {
    DSTRAIN_CHECK(d >= 0, "negative dimension in shape " + shape_str(s));
    n *= d;
  }
  return n;
}

namespace {
constexpr std::size_t kHostAlignment = 64;

void* allocate(std::size_t bytes, Device device) {
  if (bytes == 0) return nullptr;
  if (device.is_cuda()) return kernels::device_malloc(bytes, device.index);
  void* p = std::aligned_alloc(kHostAlignment, (bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment);
  if (!p) DSTRAIN_THROW(ErrorCode::Internal, "host allocation of " + std::to_string(bytes) + " bytes failed");
  return p;
}

void deallocate(void* p, Device device) noexcept {
  if (!p) return;
  if (device.is_cuda())
    kernels::device_free(p);
  else
    std::free(p);
}
}  // namespace

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  Tensor t;
  t.resize(shape, dtype, device);
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.zero();
  return t;
}

Tensor Tensor::from_vector(const Shape& shape, const std::vector<float>& values) {
  DSTRAIN_CHECK(shape_numel(shape) == static_cast<std::int64_t>(values.size()),
                "shape " + shape_str(shape) + " holds " + std::to_string(shape_numel(shape)) + " values, got " +
                    std::to_string(values.size()));
  Tensor t = empty(shape, DType::F32, Device::cpu());
  if (!values.empty()) std::memcpy(t.data(), values.data(), values.size() * sizeof(float));
  return t;
}

Tensor Tensor::wrap(void* data, const Shape& shape, DType dtype, Device device) {
  Tensor t;
  t.data_ = data;
  t.shape_ = shape;
  t.numel_ = shape_numel(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  t.owning_ = false;
  DSTRAIN_CHECK(data != nullptr || t.numel_ == 0, "wrap: null data for a non-empty shape");
  return t;
}

Tensor::~Tensor() { release(); }

Tensor::Tensor(Tensor&& o) noexcept
    : data_(o.data_),
      shape_(std::move(o.shape_)),
      numel_(o.numel_),
      dtype_(o.dtype_),
      device_(o.device_),
      owning_(o.owning_),
      capacity_bytes_(o.capacity_bytes_) {
  o.data_ = nullptr;
  o.shape_.clear();
  o.numel_ = 0;
  o.owning_ = false;
  o.capacity_bytes_ = 0;
}

Tensor& Tensor::operator=(Tensor&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    shape_ = std::move(o.shape_);
    numel_ = o.numel_;
    dtype_ = o.dtype_;
    device_ = o.device_;
    owning_ = o.owning_;
    capacity_bytes_ = o.capacity_bytes_;
    o.data_ = nullptr;
    o.shape_.clear();
    o.numel_ = 0;
    o.owning_ = false;
    o.capacity_bytes_ = 0;
  }
  return *this;
}

void Tensor::release() noexcept {
  if (owning_) deallocate(data_, device_);
  data_ = nullptr;
  owning_ = false;
  capacity_bytes_ = 0;
}

void Tensor::resize(const Shape& shape, DType dtype, Device device) {
  const std::size_t bytes = static_cast<std::size_t>(shape_numel(shape)) * dtype_size(dtype);
  const bool reusable = owning_ && device == device_ && bytes <= capacity_bytes_ && data_ != nullptr;
  if (!reusable) {
    release();
    data_ = allocate(bytes, device);
    owning_ = true;
    capacity_bytes_ = bytes;
  }
  shape_ = shape;
  numel_ = shape_numel(shape);
  dtype_ = dtype;
  device_ = device;
}

std::int64_t Tensor::dim(int i) const {
  const int n = ndim();
  const int k = i < 0 ? i + n : i;
  DSTRAIN_CHECK(k >= 0 && k < n, "dimension " + std::to_string(i) + " of a tensor of shape " + shape_str(shape_));
  return shape_[static_cast<std::size_t>(k)];
}

std::vector<std::int64_t> Tensor::strides() const {
  std::vector<std::int64_t> s(shape_.size(), 1);
  for (int i = ndim() - 2; i >= 0; --i) s[static_cast<std::size_t>(i)] = s[i + 1] * shape_[i + 1];
  return s;
}

Tensor Tensor::view(const Shape& shape) const {
  DSTRAIN_CHECK(shape_numel(shape) == numel_,
                "view " + shape_str(shape) + " of a tensor of shape " + shape_str(shape_) + " changes the element count");
  return wrap(const_cast<void*>(data_), shape, dtype_, device_);
}

void Tensor::copy_from(const Tensor& src) {
  DSTRAIN_CHECK(src.shape_ == shape_, "copy_from: shape " + shape_str(src.shape_) + " into " + shape_str(shape_));
  DSTRAIN_CHECK(src.dtype_ == dtype_, std::string("copy_from: dtype ") + dtype_name(src.dtype_) + " into " +
                                          dtype_name(dtype_));
  if (nbytes() == 0) return;
  if (!src.is_cuda() && !is_cuda())
    std::memcpy(data_, src.data_, nbytes());
  else
    kernels::memcpy_any(data_, src.data_, nbytes());
}

Tensor Tensor::to(Device device) const {
  Tensor t = empty(shape_, dtype_, device);
  t.copy_from(*this);
  return t;
}

std::vector<float> Tensor::to_host_floats() const {
  std::vector<float> out(static_cast<std::size_t>(numel_));
  if (numel_ == 0) return out;
  const Tensor host = is_cuda() ? to(Device::cpu()) : view(shape_);
  if (dtype_ == DType::I32) {
    const auto* p = host.data_as<std::int32_t>();
    for (std::int64_t i = 0; i < numel_; ++i) out[static_cast<std::size_t>(i)] = static_cast<float>(p[i]);
  } else {
    convert_host(host.data(), dtype_, out.data(), DType::F32, static_cast<std::size_t>(numel_));
  }
  return out;
}

void Tensor::fill_bytes(unsigned char byte) {
  if (nbytes() == 0) return;
  if (is_cuda())
    kernels::device_memset(data_, byte, nbytes());
  else
    std::memset(data_, byte, nbytes());
}

void check_shape(const Tensor& t, const Shape& expected, const char* what) {
  if (t.shape() != expected)
    DSTRAIN_THROW(ErrorCode::InvalidArgument,
                  std::string(what) + " has shape " + shape_str(t.shape()) + ", expected " + shape_str(expected));
}

void check_dtype(const Tensor& t, DType expected, const char* what) {
  if (t.dtype() != expected)
    DSTRAIN_THROW(ErrorCode::InvalidArgument,
                  std::string(what) + " has dtype " + dtype_name(t.dtype()) + ", expected " + dtype_name(expected));
}

}  // namespace dstrain
