// The CUDA runtime services of kernels/cuda_api.h, CudaState::ensure_workspace, and the RAII
// classes of dstrain/device.h (DeviceGuard, Stream, Event).
//
// Ordering: library streams are created cudaStreamNonBlocking, so they do not synchronise with
// the legacy default stream that cudaMemcpy/cudaMemset use. memcpy_any and device_memset (behind
// Tensor::copy_from, to, to_host_floats and fill_bytes) are therefore made blocking in both
// directions: they first wait for all work already issued on the devices involved (any stream, a
// Context's included), then for their own transfer. So reading an op's output with
// Tensor::to_host_floats() right after the op is correct. These are slow-path calls; the hot path
// uses memcpy_async (ops::copy), ordered on the Context's stream.
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <string>

#include "cuda_api.h"
#include "cuda_check.h"
#include "cuda_state.h"
#include "dstrain/device.h"
#include "dstrain/error.h"

namespace dstrain {

namespace {

// Logs a failed status from a destructor or other noexcept path. cudaErrorCudartUnloading
// (process teardown after the runtime has gone) is expected and not worth a warning.
void warn_cuda(cudaError_t status, const char* what) noexcept {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear the non-sticky error so it is not reported by a later launch check
  if (status == cudaErrorCudartUnloading) return;
  try {
    detail::log_warning(std::string(what) + " failed: " + cudaGetErrorString(status));
  } catch (...) {
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// DeviceGuard

DeviceGuard::DeviceGuard(int device) {
  int current = -1;
  DSTRAIN_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device) DSTRAIN_CUDA_CHECK(cudaSetDevice(device));
  previous_ = current;
}

DeviceGuard::~DeviceGuard() {
  if (previous_ < 0) return;
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current == previous_) return;
  warn_cuda(cudaSetDevice(previous_), "DeviceGuard: cudaSetDevice (restore)");
}

// ---------------------------------------------------------------------------------------------
// Stream

Stream Stream::create(int device) {
  DeviceGuard guard(device);
  cudaStream_t s = nullptr;
  DSTRAIN_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  Stream out;
  out.stream_ = s;
  out.device_ = device;
  return out;
}

Stream::~Stream() {
  if (stream_ != nullptr) warn_cuda(cudaStreamDestroy(stream_), "cudaStreamDestroy");
}

Stream::Stream(Stream&& o) noexcept : stream_(o.stream_), device_(o.device_) {
  o.stream_ = nullptr;
  o.device_ = -1;
}

Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    if (stream_ != nullptr) warn_cuda(cudaStreamDestroy(stream_), "cudaStreamDestroy");
    stream_ = o.stream_;
    device_ = o.device_;
    o.stream_ = nullptr;
    o.device_ = -1;
  }
  return *this;
}

void Stream::synchronize() const {
  if (stream_ == nullptr)
    DSTRAIN_THROW(ErrorCode::InvalidArgument, "Stream::synchronize on an empty Stream");
  DSTRAIN_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// ---------------------------------------------------------------------------------------------
// Event

Event Event::create(int device, bool timing) {
  DeviceGuard guard(device);
  cudaEvent_t e = nullptr;
  DSTRAIN_CUDA_CHECK(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming));
  Event out;
  out.event_ = e;
  out.device_ = device;
  return out;
}

Event::~Event() {
  if (event_ != nullptr) warn_cuda(cudaEventDestroy(event_), "cudaEventDestroy");
}

Event::Event(Event&& o) noexcept : event_(o.event_), device_(o.device_) {
  o.event_ = nullptr;
  o.device_ = -1;
}

Event& Event::operator=(Event&& o) noexcept {
  if (this != &o) {
    if (event_ != nullptr) warn_cuda(cudaEventDestroy(event_), "cudaEventDestroy");
    event_ = o.event_;
    device_ = o.device_;
    o.event_ = nullptr;
    o.device_ = -1;
  }
  return *this;
}

void Event::record(StreamHandle stream) {
  if (event_ == nullptr) DSTRAIN_THROW(ErrorCode::InvalidArgument, "Event::record on an empty Event");
  DSTRAIN_CUDA_CHECK(cudaEventRecord(event_, stream));
}

void Event::wait(StreamHandle stream) const {
  if (event_ == nullptr) DSTRAIN_THROW(ErrorCode::InvalidArgument, "Event::wait on an empty Event");
  DSTRAIN_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0));
}

void Event::synchronize() const {
  if (event_ == nullptr)
    DSTRAIN_THROW(ErrorCode::InvalidArgument, "Event::synchronize on an empty Event");
  DSTRAIN_CUDA_CHECK(cudaEventSynchronize(event_));
}

float Event::elapsed_ms(const Event& since) const {
  if (event_ == nullptr || since.event_ == nullptr)
    DSTRAIN_THROW(ErrorCode::InvalidArgument, "Event::elapsed_ms on an empty Event");
  float ms = 0.0f;
  DSTRAIN_CUDA_CHECK(cudaEventElapsedTime(&ms, since.event_, event_));
  return ms;
}

// ---------------------------------------------------------------------------------------------
// CudaGraph

CudaGraph CudaGraph::capture(StreamHandle stream, const std::function<void()>& work) {
  if (stream == nullptr)
    DSTRAIN_THROW(ErrorCode::InvalidArgument, "CudaGraph::capture needs a stream (the legacy default stream cannot "
                                              "be captured)");
  DSTRAIN_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  // Ends the capture on every path, so that the stream is usable again whatever happened.
  auto end_capture = [stream](cudaGraph_t* graph) {
    const cudaError_t status = cudaStreamEndCapture(stream, graph);
    if (status != cudaSuccess) cudaGetLastError();
    return status;
  };
  try {
    work();
  } catch (...) {
    cudaGraph_t broken = nullptr;
    end_capture(&broken);
    if (broken != nullptr) warn_cuda(cudaGraphDestroy(broken), "cudaGraphDestroy");
    throw;
  }
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = end_capture(&graph);
  if (ended != cudaSuccess || graph == nullptr)
    DSTRAIN_THROW(ErrorCode::Cuda, std::string("CudaGraph::capture: the capture failed (") +
                                       cudaGetErrorString(ended) +
                                       "): the work made a call that cannot be captured, such as a synchronisation "
                                       "or an allocation");
  cudaGraphExec_t exec = nullptr;
  const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
  warn_cuda(cudaGraphDestroy(graph), "cudaGraphDestroy");
  if (made != cudaSuccess) {
    cudaGetLastError();
    DSTRAIN_THROW(ErrorCode::Cuda, std::string("CudaGraph::capture: cudaGraphInstantiate failed: ") +
                                       cudaGetErrorString(made));
  }
  CudaGraph out;
  out.exec_ = exec;
  return out;
}

CudaGraph::~CudaGraph() {
  if (exec_ != nullptr) warn_cuda(cudaGraphExecDestroy(exec_), "cudaGraphExecDestroy");
}

CudaGraph::CudaGraph(CudaGraph&& o) noexcept : exec_(o.exec_) { o.exec_ = nullptr; }

CudaGraph& CudaGraph::operator=(CudaGraph&& o) noexcept {
  if (this != &o) {
    if (exec_ != nullptr) warn_cuda(cudaGraphExecDestroy(exec_), "cudaGraphExecDestroy");
    exec_ = o.exec_;
    o.exec_ = nullptr;
  }
  return *this;
}

void CudaGraph::replay(StreamHandle stream) const {
  if (exec_ == nullptr) DSTRAIN_THROW(ErrorCode::InvalidArgument, "CudaGraph::replay on an empty graph");
  DSTRAIN_CUDA_CHECK(cudaGraphLaunch(exec_, stream));
}

// ---------------------------------------------------------------------------------------------
// cuda_description

namespace {
// "13.0" from CUDA's 1000 * major + 10 * minor.
std::string cuda_version_text(int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); }
// "9.14.0" from cuDNN 9's 10000 * major + 100 * minor + patch (cuBLASLt: the same layout).
std::string library_version_text(std::size_t v) {
  return std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." + std::to_string(v % 100);
}
}  // namespace

std::string cuda_description(int device) {
  if (device < 0 || device >= kernels::cuda_device_count())
    DSTRAIN_THROW(ErrorCode::InvalidArgument, "cuda_description: no CUDA device " + std::to_string(device));
  cudaDeviceProp prop{};
  DSTRAIN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  int driver = 0, runtime = 0;
  DSTRAIN_CUDA_CHECK(cudaDriverGetVersion(&driver));
  DSTRAIN_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
         std::to_string(prop.multiProcessorCount) + " SMs, " +
         std::to_string(prop.totalGlobalMem >> 30) + " GiB), driver CUDA " + cuda_version_text(driver) +
         ", runtime " + cuda_version_text(runtime) + ", cuDNN " + library_version_text(cudnnGetVersion()) +
         ", cuBLASLt " + library_version_text(cublasLtGetVersion());
}

// ---------------------------------------------------------------------------------------------
// kernels:: runtime services

namespace kernels {

namespace {

// The device that owns `p`, or -1 for host memory (pageable or pinned) and unknown pointers.
int device_of(const void* p) {
  cudaPointerAttributes attr{};
  cudaError_t st = cudaPointerGetAttributes(&attr, p);
  if (st != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) return attr.device;
  return -1;
}

using DeviceCache = std::array<std::atomic<int>, 64>;  // per device ordinal; 0: not asked yet

// A positive device property, asked once per device ordinal (ordinals past the cache ask each time).
template <class Ask>
int once_per_device(DeviceCache& cache, int device, Ask ask) {
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  if (cached) {
    const int known = cache[static_cast<std::size_t>(device)].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  const int value = ask();
  if (cached) cache[static_cast<std::size_t>(device)].store(value, std::memory_order_relaxed);
  return value;
}

}  // namespace

int sm_count(int device) {
  static DeviceCache cache{};
  return once_per_device(cache, device, [device] {
    int n = 0;
    DSTRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  });
}

int compute_capability(int device) {
  static DeviceCache cache{};
  return once_per_device(cache, device, [device] {
    int major = 0, minor = 0;
    DSTRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    DSTRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    return 10 * major + minor;
  });
}

namespace {
// A switch that is on unless the environment variable says "0".
bool on_unless_zero(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr || std::string(env) != "0";
}
}  // namespace

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  DSTRAIN_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

bool overlap_launches(int device) {
  static const bool wanted = on_unless_zero("DSTRAIN_OVERLAP_LAUNCHES");
  return wanted && compute_capability(device) >= 90;
}

int cuda_device_count() noexcept {
  int n = 0;
  cudaError_t st = cudaGetDeviceCount(&n);
  if (st != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void* device_malloc(std::size_t bytes, int device) {
  if (bytes == 0) return nullptr;
  DeviceGuard guard(device);
  void* p = nullptr;
  cudaError_t st = cudaMalloc(&p, bytes);
  if (st != cudaSuccess) {
    cudaGetLastError();  // an out-of-memory is not sticky: keep it out of later launch checks
    detail::throw_error(ErrorCode::Cuda,
                        "cudaMalloc of " + std::to_string(bytes) + " bytes on cuda:" +
                            std::to_string(device) + " failed: " + cudaGetErrorString(st),
                        __FILE__, __LINE__, static_cast<long>(st));
  }
  return p;
}

void device_free(void* p) noexcept {
  if (p != nullptr) warn_cuda(cudaFree(p), "cudaFree");
}

void memcpy_any(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0) return;
  const int dst_dev = device_of(dst), src_dev = device_of(src);
  if (dst_dev < 0 && src_dev < 0) {  // host to host (a build with CUDA may copy CPU tensors here)
    DSTRAIN_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
    return;
  }
  // Work queued on non-blocking streams (a Context's) may still write src or use dst.
  if (src_dev >= 0 && src_dev != dst_dev) {
    DeviceGuard guard(src_dev);
    DSTRAIN_CUDA_CHECK(cudaDeviceSynchronize());
  }
  DeviceGuard guard(dst_dev >= 0 ? dst_dev : src_dev);
  if (dst_dev >= 0) DSTRAIN_CUDA_CHECK(cudaDeviceSynchronize());
  DSTRAIN_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
  // A copy from pageable memory may return before its DMA lands, and non-blocking streams
  // would not wait for it: wait here.
  DSTRAIN_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
}

void device_memset(void* dst, int byte, std::size_t bytes) {
  if (bytes == 0) return;
  const int dev = device_of(dst);
  if (dev < 0) {
    DSTRAIN_CUDA_CHECK(cudaMemset(dst, byte, bytes));
    return;
  }
  DeviceGuard guard(dev);
  DSTRAIN_CUDA_CHECK(cudaDeviceSynchronize());  // queued work may still use the buffer
  DSTRAIN_CUDA_CHECK(cudaMemsetAsync(dst, byte, bytes, cudaStreamLegacy));
  DSTRAIN_CUDA_CHECK(cudaStreamSynchronize(cudaStreamLegacy));
}

void memcpy_async(void* dst, const void* src, std::size_t bytes, StreamHandle stream) {
  if (bytes == 0) return;
  int dev = -1;
  if (stream != nullptr) {
    DSTRAIN_CUDA_CHECK(cudaStreamGetDevice(stream, &dev));
  } else {
    dev = device_of(dst);
    if (dev < 0) dev = device_of(src);
  }
  if (dev < 0) {  // host to host on no stream
    DSTRAIN_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
    return;
  }
  DeviceGuard guard(dev);
  // Pageable host memory: cudaMemcpyAsync stages a host source before it returns and completes a
  // copy into a host destination before it returns, so the host side is reusable at once. A
  // pinned host source is read by the DMA later: wait for the copy so that the caller may reuse
  // it as soon as we return, as ops::copy promises.
  cudaPointerAttributes attr{};
  bool pinned_src = false;
  if (cudaPointerGetAttributes(&attr, src) == cudaSuccess)
    pinned_src = attr.type == cudaMemoryTypeHost;
  else
    cudaGetLastError();
  DSTRAIN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
  if (pinned_src) DSTRAIN_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void* host_pinned_malloc(std::size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  cudaError_t st = cudaMallocHost(&p, bytes);
  if (st != cudaSuccess) {
    cudaGetLastError();
    detail::throw_error(ErrorCode::Cuda,
                        "cudaMallocHost of " + std::to_string(bytes) + " bytes failed: " +
                            cudaGetErrorString(st),
                        __FILE__, __LINE__, static_cast<long>(st));
  }
  return p;
}

void host_pinned_free(void* p) noexcept {
  if (p != nullptr) warn_cuda(cudaFreeHost(p), "cudaFreeHost");
}

namespace {
constexpr std::size_t kInitialWorkspace = std::size_t(64) << 20;
}

CudaState* create_cuda_state(int device) {
  const int count = cuda_device_count();
  if (device < 0 || device >= count)
    DSTRAIN_THROW(ErrorCode::InvalidArgument,
                  "cuda:" + std::to_string(device) + " requested but " + std::to_string(count) +
                      " CUDA device(s) are visible");
  // The calling thread works on this device from now on (one GPU per process is the norm).
  DSTRAIN_CUDA_CHECK(cudaSetDevice(device));
  CudaState* s = new CudaState();
  try {
    s->device = device;
    s->stream = Stream::create(device);
    DSTRAIN_CUDNN_CHECK(cudnnCreate(&s->cudnn));
    DSTRAIN_CUDNN_CHECK(cudnnSetStream(s->cudnn, s->cuda_stream()));
    DSTRAIN_CUBLAS_CHECK(cublasLtCreate(&s->cublaslt));
    s->ensure_workspace(kInitialWorkspace);
  } catch (...) {
    destroy_cuda_state(s);
    throw;
  }
  return s;
}

CudaState* side_state(CudaState& st) {
  static const bool wanted = on_unless_zero("DSTRAIN_SIDE_STREAM");
  if (!wanted) return nullptr;
  if (st.side != nullptr) return st.side;
  DeviceGuard guard(st.device);
  std::unique_ptr<CudaState, void (*)(CudaState*)> side(new CudaState(), destroy_cuda_state);
  side->device = st.device;
  side->owns_handles = false;
  side->stream = Stream::create(st.device);
  side->cudnn = st.cudnn;
  side->cublaslt = st.cublaslt;
  st.fork = Event::create(st.device, false);
  st.join = Event::create(st.device, false);
  st.side = side.release();
  return st.side;
}

CudnnStreamSwitch::CudnnStreamSwitch(const CudaState& from, const CudaState& to) : from_(from) {
  DSTRAIN_CUDNN_CHECK(cudnnSetStream(to.cudnn, to.cuda_stream()));
}

CudnnStreamSwitch::~CudnnStreamSwitch() {
  const cudnnStatus_t status = cudnnSetStream(from_.cudnn, from_.cuda_stream());
  if (status != CUDNN_STATUS_SUCCESS) {
    try {
      detail::log_warning(std::string("cudnnSetStream (back to the main stream) failed: ") +
                          cudnnGetErrorString(status));
    } catch (...) {
    }
  }
}

SideJoin::~SideJoin() {
  try {
    st_.join.record(side_.stream.handle());
    st_.join.wait(st_.stream.handle());
  } catch (const std::exception& e) {
    try {
      detail::log_warning(std::string("joining the side stream failed: ") + e.what());
    } catch (...) {
    }
  }
}

void destroy_cuda_state(CudaState* s) noexcept {
  if (s == nullptr) return;
  destroy_cuda_state(s->side);  // first: it shares this state's handles
  s->side = nullptr;
  int previous = -1;
  const bool have_previous = cudaGetDevice(&previous) == cudaSuccess;
  if (!have_previous) cudaGetLastError();
  if (have_previous && previous != s->device) warn_cuda(cudaSetDevice(s->device), "cudaSetDevice");
  // Work still queued may use the workspace and handles: let it finish first.
  if (s->stream.handle() != nullptr)
    warn_cuda(cudaStreamSynchronize(s->cuda_stream()), "cudaStreamSynchronize (destroy)");
  if (!s->owns_handles) {
    s->cublaslt = nullptr;
    s->cudnn = nullptr;
  }
  if (s->cublaslt != nullptr) {
    cublasStatus_t st = cublasLtDestroy(s->cublaslt);
    if (st != CUBLAS_STATUS_SUCCESS) {
      try {
        detail::log_warning("cublasLtDestroy failed: status " + std::to_string(static_cast<int>(st)));
      } catch (...) {
      }
    }
    s->cublaslt = nullptr;
  }
  if (s->cudnn != nullptr) {
    cudnnStatus_t st = cudnnDestroy(s->cudnn);
    if (st != CUDNN_STATUS_SUCCESS) {
      try {
        detail::log_warning(std::string("cudnnDestroy failed: ") + cudnnGetErrorString(st));
      } catch (...) {
      }
    }
    s->cudnn = nullptr;
  }
  if (s->workspace != nullptr) warn_cuda(cudaFree(s->workspace), "cudaFree (workspace)");
  s->workspace = nullptr;
  s->workspace_bytes = 0;
  if (s->activations != nullptr) warn_cuda(cudaFree(s->activations), "cudaFree (activations)");
  s->activations = nullptr;
  s->activations_bytes = 0;
  if (s->zeroed_accumulators != nullptr) warn_cuda(cudaFree(s->zeroed_accumulators), "cudaFree (accumulators)");
  s->zeroed_accumulators = nullptr;
  for (void* p : s->retired) warn_cuda(cudaFree(p), "cudaFree (retired scratch)");
  s->retired.clear();
  delete s;  // destroys the stream
  if (have_previous && previous != -1) {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous)
      warn_cuda(cudaSetDevice(previous), "cudaSetDevice (restore)");
  }
}

StreamHandle cuda_state_stream(const CudaState* s) {
  if (s == nullptr) DSTRAIN_THROW(ErrorCode::InvalidArgument, "cuda_state_stream: no CUDA state");
  return s->stream.handle();
}

namespace {

// Grows `buffer` to at least `bytes`: geometrically, in whole MiB, so that a sequence of slightly
// larger requests does not reallocate (and synchronise) each time.
void* grow_scratch(CudaState& s, void*& buffer, std::size_t& size, std::size_t bytes, const char* what) {
  const bool in_capture = capturing(s.cuda_stream());
  if (bytes <= size && buffer != nullptr) {
    if (in_capture) s.scratch_in_graph = true;
    return buffer;
  }
  if (in_capture)
    DSTRAIN_THROW(ErrorCode::Unsupported,
                  std::string("the ") + what + " must grow to " + std::to_string(bytes) +
                      " bytes while the stream is being captured into a CUDA graph: run the same work once "
                      "before capturing it");
  std::size_t want = bytes > size + size / 2 ? bytes : size + size / 2;
  const std::size_t mib = std::size_t(1) << 20;
  want = (want + mib - 1) / mib * mib;
  DeviceGuard guard(s.device);
  if (buffer != nullptr) {
    // Queued work may still read or write the old buffer, and a captured graph may hold it.
    DSTRAIN_CUDA_CHECK(cudaStreamSynchronize(s.cuda_stream()));
    if (s.scratch_in_graph) {
      s.retired.push_back(buffer);
    } else {
      DSTRAIN_CUDA_CHECK(cudaFree(buffer));
    }
    buffer = nullptr;
    size = 0;
  }
  buffer = device_malloc(want, s.device);
  size = want;
  return buffer;
}

}  // namespace

void* CudaState::ensure_workspace(std::size_t bytes) {
  return grow_scratch(*this, workspace, workspace_bytes, bytes, "workspace");
}

void* CudaState::ensure_activations(std::size_t bytes) {
  return grow_scratch(*this, activations, activations_bytes, bytes, "activation scratch");
}

bool CudaState::zeroed_accumulators_available() const {
  return zeroed_accumulators != nullptr || !capturing(cuda_stream());
}

void* CudaState::ensure_zeroed_accumulators() {
  if (zeroed_accumulators != nullptr) return zeroed_accumulators;
  if (capturing(cuda_stream()))
    DSTRAIN_THROW(ErrorCode::Unsupported,
                  "the statistics accumulators cannot be made while the stream is being captured into a CUDA graph: "
                  "run the same work once before capturing it");
  DeviceGuard guard(device);
  void* p = device_malloc(kZeroedAccumulatorBytes, device);
  if (const cudaError_t e = cudaMemsetAsync(p, 0, kZeroedAccumulatorBytes, cuda_stream()); e != cudaSuccess) {
    warn_cuda(cudaFree(p), "cudaFree (accumulators)");
    DSTRAIN_CUDA_CHECK(e);
  }
  zeroed_accumulators = p;
  return p;
}

}  // namespace kernels
}  // namespace dstrain
