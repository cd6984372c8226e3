// CPU conversion between floating dtypes (any to any), through dstrain::convert_host.
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops_cpu.h"

namespace dstrain::kernels::cpu {

void convert(Context&, const Tensor& src, Tensor& dst) {
  const std::size_t n = static_cast<std::size_t>(src.numel());
  if (src.dtype() == dst.dtype()) {
    if (src.data() != dst.data()) std::memmove(dst.data(), src.data(), src.nbytes());
    return;
  }
  const auto* s = static_cast<const unsigned char*>(src.data());
  const auto* d = static_cast<const unsigned char*>(dst.data());
  const bool overlap = n > 0 && s < d + dst.nbytes() && d < s + src.nbytes();
  if (overlap) {  // convert_host needs distinct buffers: go through a copy of the source.
    std::vector<unsigned char> tmp(s, s + src.nbytes());
    convert_host(tmp.data(), src.dtype(), dst.data(), dst.dtype(), n);
    return;
  }
  convert_host(src.data(), src.dtype(), dst.data(), dst.dtype(), n);
}

}  // namespace dstrain::kernels::cpu
