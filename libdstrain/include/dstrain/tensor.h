// Tensor: a shape, a dtype and a contiguous block of host or device memory.
// Layout convention: activations are NHWC ([N, H, W, C], C fastest), convolution filters are
// KRSC ([out, kh, kw, in]), linear weights are [out, in], all row-major and contiguous.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "dstrain/device.h"
#include "dstrain/dtype.h"

namespace dstrain {

using Shape = std::vector<std::int64_t>;
std::string shape_str(const Shape& s);
std::int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;  // empty: no storage, numel 0
  // Uninitialised storage.
  static Tensor empty(const Shape& shape, DType dtype, Device device);
  static Tensor zeros(const Shape& shape, DType dtype, Device device);
  // A host fp32 tensor holding `values` (size must match the shape).
  static Tensor from_vector(const Shape& shape, const std::vector<float>& values);
  // A non-owning view of memory owned elsewhere; the owner must outlive the view.
  static Tensor wrap(void* data, const Shape& shape, DType dtype, Device device);

  ~Tensor();
  Tensor(Tensor&& o) noexcept;
  Tensor& operator=(Tensor&& o) noexcept;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  std::int64_t dim(int i) const;  // negative i counts from the end
  std::int64_t numel() const { return numel_; }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel_) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool is_cuda() const { return device_.is_cuda(); }
  bool defined() const { return data_ != nullptr || !shape_.empty(); }
  bool owns_memory() const { return owning_; }
  // Strides in elements, row-major contiguous.
  std::vector<std::int64_t> strides() const;

  void* data() { return data_; }
  const void* data() const { return data_; }
  template <class T> T* data_as() { return static_cast<T*>(data_); }
  template <class T> const T* data_as() const { return static_cast<const T*>(data_); }

  // A non-owning view of the same memory with another shape of the same element count.
  Tensor view(const Shape& shape) const;
  // Copies the bytes of `src` (same shape and dtype, any device) into this tensor; blocking.
  void copy_from(const Tensor& src);
  // A new owning copy on `device`.
  Tensor to(Device device) const;
  // Host fp32 values (converted from any floating dtype), for tests and checks.
  std::vector<float> to_host_floats() const;
  // Sets every element's bytes to `byte` (poisoning outputs in tests, zeroing buffers).
  void fill_bytes(unsigned char byte);
  void zero() { fill_bytes(0); }

  // Makes this tensor own storage of `shape` (reusing it when the byte size matches).
  void resize(const Shape& shape, DType dtype, Device device);

 private:
  void release() noexcept;

  void* data_ = nullptr;
  Shape shape_;
  std::int64_t numel_ = 0;
  DType dtype_ = DType::F32;
  Device device_{};
  bool owning_ = false;
  std::size_t capacity_bytes_ = 0;
};

// Raises InvalidArgument naming `what` when t's shape differs from `expected`.
void check_shape(const Tensor& t, const Shape& expected, const char* what);
void check_dtype(const Tensor& t, DType expected, const char* what);

}  // namespace dstrain
