// Host side of the peer-memory AllReduce: the shared buffer of this rank, the peers' buffers
// mapped through CUDA IPC, the mapped error word the kernels report timeouts in, and the call
// sequence (epoch) that lets the flags be reused without resetting.
#include <cuda_runtime.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "collectives/nvlink/peer_allreduce.h"
#include "collectives/nvlink/peer_kernels.h"
#include "dstrain/error.h"
#include "kernels/cuda_check.h"

namespace dstrain::collectives {

namespace {

static_assert(PeerAllreduce::kMaxRanks == peer::kMaxRanks, "one rank limit for host and kernels");

constexpr std::size_t kAlign = 256;
constexpr std::size_t round_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

void warn_cuda(cudaError_t status, const char* what) noexcept {
  if (status == cudaSuccess) return;
  cudaGetLastError();
  if (status == cudaErrorCudartUnloading) return;
  try {
    detail::log_warning(std::string("peer AllReduce: ") + what + " failed: " + cudaGetErrorString(status));
  } catch (...) {
  }
}

// This rank's buffer: flag words, then two data halves (one per call parity).
class DeviceAllocation {
 public:
  DeviceAllocation(std::size_t bytes, int device) : device_(device) {
    DeviceGuard guard(device);
    DSTRAIN_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
    DSTRAIN_CUDA_CHECK(cudaMemset(ptr_, 0, bytes));
    DSTRAIN_CUDA_CHECK(cudaDeviceSynchronize());  // zeroed flags before any peer can read them
  }
  ~DeviceAllocation() {
    if (!ptr_) return;
    int previous = -1;
    cudaGetDevice(&previous);
    cudaSetDevice(device_);
    warn_cuda(cudaFree(ptr_), "cudaFree");
    if (previous >= 0) cudaSetDevice(previous);
  }
  DeviceAllocation(const DeviceAllocation&) = delete;
  DeviceAllocation& operator=(const DeviceAllocation&) = delete;
  char* get() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  int device_;
};

// A peer's buffer opened through its IPC handle; closed on destruction.
class IpcMapping {
 public:
  explicit IpcMapping(void* ptr) : ptr_(ptr) {}
  ~IpcMapping() {
    if (ptr_) warn_cuda(cudaIpcCloseMemHandle(ptr_), "cudaIpcCloseMemHandle");
  }
  IpcMapping(const IpcMapping&) = delete;
  IpcMapping& operator=(const IpcMapping&) = delete;
  char* get() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_;
};

// The error word in pinned host memory mapped into the device's address space.
class MappedErrorWord {
 public:
  MappedErrorWord() {
    DSTRAIN_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_), sizeof(peer::ErrorWord),
                                     cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(host_, 0, sizeof(peer::ErrorWord));
    DSTRAIN_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_), host_, 0));
  }
  ~MappedErrorWord() {
    if (host_) warn_cuda(cudaFreeHost(host_), "cudaFreeHost");
  }
  MappedErrorWord(const MappedErrorWord&) = delete;
  MappedErrorWord& operator=(const MappedErrorWord&) = delete;
  // Volatile: the device writes it behind the compiler's back.
  const volatile peer::ErrorWord* host() const { return host_; }
  peer::ErrorWord* device() const { return device_; }

 private:
  peer::ErrorWord* host_ = nullptr;
  peer::ErrorWord* device_ = nullptr;
};

double timeout_ms_from(const PeerAllreduceOptions& options) {
  if (options.timeout_ms > 0) return options.timeout_ms;
  if (const char* env = std::getenv("DSTRAIN_PEER_TIMEOUT_MS"); env && *env) {
    char* end = nullptr;
    const double ms = std::strtod(env, &end);
    if (end == env || *end != '\0' || !(ms > 0))
      DSTRAIN_THROW(ErrorCode::InvalidArgument,
                    std::string("DSTRAIN_PEER_TIMEOUT_MS='") + env + "': expected a positive number of milliseconds");
    return ms;
  }
  return 30000.0;
}

std::uint64_t host_name_hash() {
  char name[256] = {};
  gethostname(name, sizeof(name) - 1);
  return std::hash<std::string>{}(name);
}

peer::ElemType elem_type(DType dt) {
  switch (dt) {
    case DType::F32: return peer::ElemType::F32;
    case DType::F16: return peer::ElemType::F16;
    case DType::BF16: return peer::ElemType::BF16;
    default: DSTRAIN_THROW(ErrorCode::Unsupported, std::string("peer-memory AllReduce of ") + dtype_name(dt));
  }
}

const char* phase_name(std::uint32_t phase) {
  return phase == 0 ? "input-ready signal" : "reduced-chunk signal";
}

// Words each rank contributes to the handle exchange: IPC handle, host name hash (2 words), size
// of a data half (2 words; every rank must map buffers as large as its own).
constexpr int kHandleWords = static_cast<int>(sizeof(cudaIpcMemHandle_t) / sizeof(std::int32_t));
constexpr int kExchangeWords = kHandleWords + 4;
static_assert(sizeof(cudaIpcMemHandle_t) % sizeof(std::int32_t) == 0, "IPC handle of whole words");

class CudaPeerAllreduce final : public PeerAllreduce {
 public:
  CudaPeerAllreduce(Communicator& host, int device, const PeerAllreduceOptions& options)
      : rank_(host.rank()),
        size_(host.size()),
        device_(device),
        max_bytes_(round_up(options.max_bytes == 0 ? 1 : options.max_bytes, peer::kPackBytes)),
        half_bytes_(round_up(max_bytes_, kAlign)),
        flag_bytes_(round_up(peer::kFlagBytes, kAlign)),
        timeout_ms_(timeout_ms_from(options)),
        local_(flag_bytes_ + 2 * half_bytes_, device) {
    if (size_ > kMaxRanks)
      DSTRAIN_THROW(ErrorCode::Unsupported, "peer-memory AllReduce takes at most " + std::to_string(kMaxRanks) +
                                                " ranks, got " + std::to_string(size_));
    DeviceGuard guard(device_);
    cudaIpcMemHandle_t handle;
    DSTRAIN_CUDA_CHECK(cudaIpcGetMemHandle(&handle, local_.get()));

    // All-gather over the host communicator: each rank fills its own slot of a zeroed array.
    Context host_ctx = Context::cpu();
    Tensor table = Tensor::zeros({static_cast<std::int64_t>(size_) * kExchangeWords}, DType::I32, Device::cpu());
    std::int32_t* mine = table.data_as<std::int32_t>() + static_cast<std::size_t>(rank_) * kExchangeWords;
    std::memcpy(mine, &handle, sizeof(handle));
    const std::uint64_t host_hash = host_name_hash();
    std::memcpy(mine + kHandleWords, &host_hash, sizeof(host_hash));
    const std::uint64_t half = half_bytes_;
    std::memcpy(mine + kHandleWords + 2, &half, sizeof(half));
    host.allreduce(table, ReduceOp::Sum, host_ctx);

    // Map every peer's buffer; agree on success so that all ranks fail together.
    std::string failure;
    bases_.assign(static_cast<std::size_t>(size_), nullptr);
    bases_[static_cast<std::size_t>(rank_)] = local_.get();
    for (int r = 0; r < size_ && failure.empty(); ++r) {
      if (r == rank_) continue;
      const std::int32_t* theirs = table.data_as<std::int32_t>() + static_cast<std::size_t>(r) * kExchangeWords;
      std::uint64_t their_host = 0;
      std::memcpy(&their_host, theirs + kHandleWords, sizeof(their_host));
      if (their_host != host_hash) {
        failure = "rank " + std::to_string(r) + " runs on another host";
        break;
      }
      std::uint64_t their_half = 0;
      std::memcpy(&their_half, theirs + kHandleWords + 2, sizeof(their_half));
      if (their_half != half_bytes_) {
        failure = "rank " + std::to_string(r) + " has max_bytes " + std::to_string(their_half) + ", this rank " +
                  std::to_string(half_bytes_) + " (all ranks must pass the same)";
        break;
      }
      cudaIpcMemHandle_t their_handle;
      std::memcpy(&their_handle, theirs, sizeof(their_handle));
      void* ptr = nullptr;
      const cudaError_t status = cudaIpcOpenMemHandle(&ptr, their_handle, cudaIpcMemLazyEnablePeerAccess);
      if (status != cudaSuccess) {
        cudaGetLastError();
        failure = "cudaIpcOpenMemHandle of rank " + std::to_string(r) + "'s buffer: " + cudaGetErrorString(status);
        break;
      }
      mappings_.push_back(std::make_unique<IpcMapping>(ptr));
      bases_[static_cast<std::size_t>(r)] = mappings_.back()->get();
    }
    Tensor failed = Tensor::zeros({1}, DType::I32, Device::cpu());
    failed.data_as<std::int32_t>()[0] = failure.empty() ? 0 : 1;
    host.allreduce(failed, ReduceOp::Sum, host_ctx);
    if (const int ranks_failed = failed.data_as<std::int32_t>()[0]; ranks_failed > 0)
      DSTRAIN_THROW(ErrorCode::Unsupported,
                    "peer-memory AllReduce could not map the buffers on " + std::to_string(ranks_failed) +
                        " rank(s)" + (failure.empty() ? std::string() : "; on rank " + std::to_string(rank_) + ": " + failure));
  }

  ~CudaPeerAllreduce() override {
    // Kernels issued on users' streams may still read the mapped buffers; their waits are
    // bounded, so this returns.
    int previous = -1;
    cudaGetDevice(&previous);
    cudaSetDevice(device_);
    warn_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize before unmapping peers");
    if (previous >= 0) cudaSetDevice(previous);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const override { return device_; }
  std::size_t max_bytes() const override { return max_bytes_; }

  bool supports(std::size_t bytes, DType dtype, ReduceOp op) const override {
    const bool type_ok = dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16;
    const bool op_ok = op == ReduceOp::Sum || op == ReduceOp::Avg;
    return type_ok && op_ok && round_up(bytes, peer::kPackBytes) <= half_bytes_;
  }

  using PeerAllreduce::allreduce;
  void allreduce(const void* in, void* out, std::size_t count, DType dtype, ReduceOp op, AllreduceAlgo algo,
                 Context& ctx) override {
    check_health();
    DSTRAIN_CHECK(ctx.device() == Device::cuda(device_),
                  "peer-memory AllReduce on cuda:" + std::to_string(device_) + " given a context of " + ctx.device().str());
    DSTRAIN_CHECK(algo == AllreduceAlgo::OneShot || algo == AllreduceAlgo::TwoShot,
                  std::string("peer-memory AllReduce runs oneshot or twoshot, not ") + allreduce_algo_name(algo));
    const std::size_t bytes = count * dtype_size(dtype);
    if (!supports(bytes, dtype, op))
      DSTRAIN_THROW(ErrorCode::Unsupported, std::string("peer-memory AllReduce of ") + std::to_string(count) + " " +
                                                dtype_name(dtype) + " (" + reduce_op_name(op) + "): takes fp32/fp16/bf16, "
                                                "sum or avg, up to " + std::to_string(max_bytes_) + " bytes");
    if (count == 0) return;
    DSTRAIN_CHECK(in != nullptr && out != nullptr, "peer-memory AllReduce given a null buffer");
    DSTRAIN_CHECK(reinterpret_cast<std::uintptr_t>(in) % dtype_size(dtype) == 0 &&
                      reinterpret_cast<std::uintptr_t>(out) % dtype_size(dtype) == 0,
                  "peer-memory AllReduce buffers must be aligned to their element size");

    peer::Launch launch;
    launch.in = in;
    launch.out = out;
    launch.count = count;
    launch.type = elem_type(dtype);
    launch.algo = algo == AllreduceAlgo::OneShot ? peer::Algo::OneShot : peer::Algo::TwoShot;
    launch.average = op == ReduceOp::Avg;
    launch.in_aligned = reinterpret_cast<std::uintptr_t>(in) % peer::kPackBytes == 0;
    launch.out_aligned = reinterpret_cast<std::uintptr_t>(out) % peer::kPackBytes == 0;
    launch.rank = rank_;
    launch.nranks = size_;
    launch.epoch = ++epoch_;
    const std::size_t half_offset = flag_bytes_ + (launch.epoch & 1u) * half_bytes_;
    for (int r = 0; r < size_; ++r) {
      launch.data[r] = bases_[static_cast<std::size_t>(r)] + half_offset;
      launch.flags[r] = reinterpret_cast<std::uint32_t*>(bases_[static_cast<std::size_t>(r)]);
    }
    launch.error = error_.device();
    launch.timeout_ns = static_cast<std::uint64_t>(timeout_ms_ * 1e6);
    DeviceGuard guard(device_);
    DSTRAIN_CUDA_CHECK(peer::launch(launch, reinterpret_cast<cudaStream_t>(ctx.stream())));
  }

  void check_health() override {
    if (!broken_.empty()) DSTRAIN_THROW(ErrorCode::Timeout, broken_);
    const volatile peer::ErrorWord* word = error_.host();
    if (word->failed == 0) return;
    std::ostringstream msg;
    msg << "peer-memory AllReduce (" << (word->algo == static_cast<std::uint32_t>(peer::Algo::OneShot) ? "oneshot" : "twoshot")
        << ", call " << word->epoch << ") on rank " << rank_ << " of " << size_ << " timed out after " << timeout_ms_
        << " ms waiting for the " << phase_name(word->phase) << " of rank(s)";
    const char* sep = " ";
    for (int r = 0; r < size_; ++r)
      if (word->missing[r] != 0) {
        msg << sep << r;
        sep = ", ";
      }
    msg << "; the engine is unusable from now on";
    broken_ = msg.str();
    DSTRAIN_THROW(ErrorCode::Timeout, broken_);
  }

 private:
  int rank_, size_, device_;
  std::size_t max_bytes_, half_bytes_, flag_bytes_;
  double timeout_ms_;
  // Declaration order: the mappings close before the local buffer and error word are freed.
  DeviceAllocation local_;
  MappedErrorWord error_;
  std::vector<std::unique_ptr<IpcMapping>> mappings_;
  std::vector<char*> bases_;  // every rank's buffer as mapped in this process
  std::uint32_t epoch_ = 0;
  std::string broken_;
};

}  // namespace

std::unique_ptr<PeerAllreduce> make_peer_allreduce(Communicator& host_comm, int device,
                                                   const PeerAllreduceOptions& options) {
  return std::make_unique<CudaPeerAllreduce>(host_comm, device, options);
}

}  // namespace dstrain::collectives
