// dstrain::Error: the one exception type of the library, and the check macros that raise it.
#pragma once
#include <stdexcept>
#include <string>

namespace dstrain {

enum class ErrorCode {
  Cuda,
  Nccl,
  Cudnn,
  Cublas,
  Mpi,
  InvalidArgument,
  Unsupported,
  Timeout,
  Io,
  Corrupt,
  Internal,
};

const char* to_string(ErrorCode code);

class Error : public std::runtime_error {
 public:
  // backend_code: the failing backend's own status (cudaError_t, ncclResult_t, ...), 0 when none.
  Error(ErrorCode code, const std::string& message, const char* file, int line, long backend_code = 0);

  ErrorCode code() const noexcept { return code_; }
  long backend_code() const noexcept { return backend_code_; }
  const std::string& file() const noexcept { return file_; }
  int line() const noexcept { return line_; }

 private:
  ErrorCode code_;
  long backend_code_;
  std::string file_;
  int line_;
};

namespace detail {
[[noreturn]] void throw_error(ErrorCode code, const std::string& message, const char* file, int line,
                              long backend_code = 0);
// Logs from destructors and other places that must not throw.
void log_warning(const std::string& message) noexcept;
}  // namespace detail

}  // namespace dstrain

#define DSTRAIN_THROW(code, msg) ::dstrain::detail::throw_error((code), (msg), __FILE__, __LINE__)

// DSTRAIN_CHECK(cond, msg): raises InvalidArgument with msg when cond is false.
#define DSTRAIN_CHECK(cond, msg)                                                              \
  do {                                                                                        \
    if (!(cond))                                                                              \
      ::dstrain::detail::throw_error(::dstrain::ErrorCode::InvalidArgument,                   \
                                     std::string("check failed: " #cond ": ") + (msg), __FILE__, \
                                     __LINE__);                                               \
  } while (0)
