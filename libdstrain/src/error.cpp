#include "dstrain/error.h"

#include <cstdio>
#include <cstring>

namespace dstrain {

const char* to_string(ErrorCode code) {
  switch (code) {
    case ErrorCode::Cuda: return "CUDA";
    case ErrorCode::Nccl: return "NCCL";
    case ErrorCode::Cudnn: return "cuDNN";
    case ErrorCode::Cublas: return "cuBLAS";
    case ErrorCode::Mpi: return "MPI";
    case ErrorCode::InvalidArgument: return "invalid argument";
    case ErrorCode::Unsupported: return "unsupported";
    case ErrorCode::Timeout: return "timeout";
    case ErrorCode::Io: return "I/O";
    case ErrorCode::Corrupt: return "corrupt data";
    case ErrorCode::Internal: return "internal";
  }
  return "unknown";
}

namespace {
const char* basename_of(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}
std::string format_message(ErrorCode code, const std::string& message, const char* file, int line) {
  return std::string("dstrain ") + to_string(code) + " error: " + message + " (" + basename_of(file) + ":" +
         std::to_string(line) + ")";
}
}  // namespace

Error::Error(ErrorCode code, const std::string& message, const char* file, int line, long backend_code)
    : std::runtime_error(format_message(code, message, file, line)),
      code_(code),
      backend_code_(backend_code),
      file_(file),
      line_(line) {}

namespace detail {
void throw_error(ErrorCode code, const std::string& message, const char* file, int line, long backend_code) {
  throw Error(code, message, file, line, backend_code);
}

void log_warning(const std::string& message) noexcept {
  std::fprintf(stderr, "dstrain warning: %s\n", message.c_str());
}
}  // namespace detail

}  // namespace dstrain
