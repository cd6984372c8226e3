// The symbols of kernels/cuda_api.h and of dstrain/device.h's CUDA classes for a build without
// CUDA: no device is ever visible, and anything that would need one raises Unsupported.
// Includes no CUDA header.
#include <cstddef>
#include <string>

#include "cuda_api.h"
#include "dstrain/device.h"
#include "dstrain/error.h"

namespace dstrain {

namespace {
[[noreturn]] void no_cuda(const char* what, const char* file, int line) {
  detail::throw_error(ErrorCode::Unsupported, std::string(what) + ": built without CUDA", file, line);
}
}  // namespace

#define DSTRAIN_NO_CUDA(what) no_cuda((what), __FILE__, __LINE__)

DeviceGuard::DeviceGuard(int device) {
  (void)device;
  DSTRAIN_NO_CUDA("DeviceGuard");
}
DeviceGuard::~DeviceGuard() {}

Stream Stream::create(int device) {
  (void)device;
  DSTRAIN_NO_CUDA("Stream::create");
}
Stream::~Stream() {}
Stream::Stream(Stream&& o) noexcept : stream_(o.stream_), device_(o.device_) {
  o.stream_ = nullptr;
  o.device_ = -1;
}
Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    stream_ = o.stream_;
    device_ = o.device_;
    o.stream_ = nullptr;
    o.device_ = -1;
  }
  return *this;
}
void Stream::synchronize() const { DSTRAIN_NO_CUDA("Stream::synchronize"); }

Event Event::create(int device, bool timing) {
  (void)device;
  (void)timing;
  DSTRAIN_NO_CUDA("Event::create");
}
Event::~Event() {}
Event::Event(Event&& o) noexcept : event_(o.event_), device_(o.device_) {
  o.event_ = nullptr;
  o.device_ = -1;
}
Event& Event::operator=(Event&& o) noexcept {
  if (this != &o) {
    event_ = o.event_;
    device_ = o.device_;
    o.event_ = nullptr;
    o.device_ = -1;
  }
  return *this;
}
void Event::record(StreamHandle stream) {
  (void)stream;
  DSTRAIN_NO_CUDA("Event::record");
}
void Event::wait(StreamHandle stream) const {
  (void)stream;
  DSTRAIN_NO_CUDA("Event::wait");
}
void Event::synchronize() const { DSTRAIN_NO_CUDA("Event::synchronize"); }
float Event::elapsed_ms(const Event& since) const {
  (void)since;
  DSTRAIN_NO_CUDA("Event::elapsed_ms");
}

CudaGraph CudaGraph::capture(StreamHandle stream, const std::function<void()>& work) {
  (void)stream;
  (void)work;
  DSTRAIN_NO_CUDA("CudaGraph::capture");
}
CudaGraph::~CudaGraph() {}
CudaGraph::CudaGraph(CudaGraph&& o) noexcept : exec_(o.exec_) { o.exec_ = nullptr; }
CudaGraph& CudaGraph::operator=(CudaGraph&& o) noexcept {
  if (this != &o) {
    exec_ = o.exec_;
    o.exec_ = nullptr;
  }
  return *this;
}
void CudaGraph::replay(StreamHandle stream) const {
  (void)stream;
  DSTRAIN_NO_CUDA("CudaGraph::replay");
}

std::string cuda_description(int device) {
  (void)device;
  DSTRAIN_NO_CUDA("cuda_description");
}

namespace kernels {

int cuda_device_count() noexcept { return 0; }

void* device_malloc(std::size_t bytes, int device) {
  (void)bytes;
  (void)device;
  DSTRAIN_NO_CUDA("device_malloc");
}

void device_free(void* p) noexcept { (void)p; }

void memcpy_any(void* dst, const void* src, std::size_t bytes) {
  (void)dst;
  (void)src;
  (void)bytes;
  DSTRAIN_NO_CUDA("memcpy_any");
}

void device_memset(void* dst, int byte, std::size_t bytes) {
  (void)dst;
  (void)byte;
  (void)bytes;
  DSTRAIN_NO_CUDA("device_memset");
}

void memcpy_async(void* dst, const void* src, std::size_t bytes, StreamHandle stream) {
  (void)dst;
  (void)src;
  (void)bytes;
  (void)stream;
  DSTRAIN_NO_CUDA("memcpy_async");
}

void* host_pinned_malloc(std::size_t bytes) {
  (void)bytes;
  DSTRAIN_NO_CUDA("host_pinned_malloc");
}

void host_pinned_free(void* p) noexcept { (void)p; }

CudaState* create_cuda_state(int device) {
  (void)device;
  DSTRAIN_NO_CUDA("create_cuda_state");
}

void destroy_cuda_state(CudaState* s) noexcept { (void)s; }

StreamHandle cuda_state_stream(const CudaState* s) {
  (void)s;
  DSTRAIN_NO_CUDA("cuda_state_stream");
}

}  // namespace kernels
}  // namespace dstrain
