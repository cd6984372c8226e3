// Where tensors live, and move-only RAII for the CUDA objects the library hands to users.
// No CUDA type appears here: streams are passed as opaque handles (cudaStream_t is a pointer).
#pragma once
#include <functional>
#include <string>

struct CUstream_st;
struct CUevent_st;
struct CUgraphExec_st;

namespace dstrain {

enum class DeviceKind { Cpu, Cuda };

struct Device {
  DeviceKind kind = DeviceKind::Cpu;
  int index = 0;  // CUDA ordinal; 0 for the CPU

  static Device cpu() { return {DeviceKind::Cpu, 0}; }
  static Device cuda(int index) { return {DeviceKind::Cuda, index}; }
  bool is_cuda() const { return kind == DeviceKind::Cuda; }
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const;
};

// True when this build has CUDA and the process sees at least one GPU.
bool cuda_available();
int cuda_device_count();  // 0 when the build has no CUDA or no GPU is visible
// One line naming GPU `device` and the CUDA libraries loaded at run time (driver, runtime, cuDNN,
// cuBLASLt versions), for benchmark headers: the cuDNN that runs may not be the one built against.
std::string cuda_description(int device);

using StreamHandle = CUstream_st*;
using EventHandle = CUevent_st*;
using GraphExecHandle = CUgraphExec_st*;

// Makes `device` current for the lifetime of the guard and restores the previous one after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// A non-blocking CUDA stream owned by this object.
class Stream {
 public:
  Stream() = default;  // empty: no stream
  static Stream create(int device);
  ~Stream();
  Stream(Stream&& o) noexcept;
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  StreamHandle handle() const { return stream_; }
  int device() const { return device_; }
  void synchronize() const;

 private:
  StreamHandle stream_ = nullptr;
  int device_ = -1;
};

// A CUDA event, with timing enabled unless asked otherwise.
class Event {
 public:
  Event() = default;
  static Event create(int device, bool timing = true);
  ~Event();
  Event(Event&& o) noexcept;
  Event& operator=(Event&& o) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void record(StreamHandle stream);
  void wait(StreamHandle stream) const;  // makes `stream` wait for this event (no host block)
  void synchronize() const;
  float elapsed_ms(const Event& since) const;  // time from `since` to this event
  EventHandle handle() const { return event_; }

 private:
  EventHandle event_ = nullptr;
  int device_ = -1;
};

// A CUDA graph: what `work` queues on a stream (a Context's, and any stream it forks to), captured
// once and then replayed with one launch. Replays read and write the same device addresses as the
// capture, so new data goes into the same tensors between replays. dstrain's ops can be captured
// after one run of the same work outside the capture (plans built, choices timed, scratch sized);
// a shape first seen inside the capture runs its untimed first way, and an op whose scratch would
// have to grow there raises Unsupported. Capture uses cudaStreamCaptureModeThreadLocal.
class CudaGraph {
 public:
  CudaGraph() = default;  // empty: nothing to replay
  // Captures `work` on `stream` (nothing runs); if work throws, or the capture fails, the capture
  // is ended and the stream left usable before the error propagates.
  static CudaGraph capture(StreamHandle stream, const std::function<void()>& work);
  ~CudaGraph();
  CudaGraph(CudaGraph&& o) noexcept;
  CudaGraph& operator=(CudaGraph&& o) noexcept;
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  void replay(StreamHandle stream) const;  // queues one replay on `stream`; no host wait
  bool empty() const { return exec_ == nullptr; }

 private:
  GraphExecHandle exec_ = nullptr;
};

}  // namespace dstrain
