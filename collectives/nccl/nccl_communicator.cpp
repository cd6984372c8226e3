// The NCCL communicator: device buffers, collectives issued on the context's stream.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <string>
#include <vector>

#include "collectives/collectives.h"
#include "dstrain/error.h"
#include "kernels/cuda_check.h"

#define DSTRAIN_NCCL_CHECK(expr)                                                                    \
  do {                                                                                              \
    ncclResult_t dstrain_status_ = (expr);                                                          \
    if (dstrain_status_ != ncclSuccess) {                                                           \
      const char* dstrain_last_ = ncclGetLastError(nullptr);                                        \
      ::dstrain::detail::throw_error(::dstrain::ErrorCode::Nccl,                                    \
                                     std::string(#expr " failed: ") + ncclGetErrorString(dstrain_status_) + \
                                         (dstrain_last_ && *dstrain_last_ ? std::string(" (") + dstrain_last_ + ")" \
                                                                          : std::string()),         \
                                     __FILE__, __LINE__, static_cast<long>(dstrain_status_));       \
    }                                                                                               \
  } while (0)

namespace dstrain::collectives {

namespace {

ncclDataType_t nccl_type(DType dt) {
  switch (dt) {
    case DType::F32: return ncclFloat32;
    case DType::F16: return ncclFloat16;
    case DType::BF16: return ncclBfloat16;
    case DType::I32: return ncclInt32;
    default:
      DSTRAIN_THROW(ErrorCode::Unsupported, std::string("NCCL reductions of ") + dtype_name(dt));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Avg: return ncclAvg;
    case ReduceOp::Max: return ncclMax;
    case ReduceOp::Min: return ncclMin;
  }
  return ncclSum;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const std::vector<char>& id_bytes, int rank, int size, int device)
      : rank_(rank), size_(size), device_(device) {
    DSTRAIN_CHECK(id_bytes.size() == sizeof(ncclUniqueId), "malformed NCCL unique id");
    ncclUniqueId id;
    std::memcpy(&id, id_bytes.data(), sizeof(id));
    DSTRAIN_CUDA_CHECK(cudaSetDevice(device));
    DSTRAIN_NCCL_CHECK(ncclCommInitRank(&comm_, size, id, rank));
  }
  ~NcclCommunicator() override {
    if (!comm_) return;
    ncclResult_t status = ncclCommDestroy(comm_);
    if (status != ncclSuccess)
      detail::log_warning(std::string("ncclCommDestroy failed: ") + ncclGetErrorString(status));
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "nccl"; }
  Device device() const override { return Device::cuda(device_); }

  void allreduce(Tensor& t, ReduceOp op, Context& ctx) override {
    check(t, ctx, "allreduce");
    DSTRAIN_NCCL_CHECK(ncclAllReduce(t.data(), t.data(), static_cast<std::size_t>(t.numel()), nccl_type(t.dtype()),
                                     nccl_op(op), comm_, reinterpret_cast<cudaStream_t>(ctx.stream())));
  }

  void broadcast(Tensor& t, int root, Context& ctx) override {
    check(t, ctx, "broadcast");
    DSTRAIN_CHECK(root >= 0 && root < size_, "broadcast root " + std::to_string(root) + " out of range");
    DSTRAIN_NCCL_CHECK(ncclBroadcast(t.data(), t.data(), t.nbytes(), ncclUint8, root, comm_,
                                     reinterpret_cast<cudaStream_t>(ctx.stream())));
  }

 private:
  void check(const Tensor& t, const Context& ctx, const char* what) const {
    DSTRAIN_CHECK(t.device() == Device::cuda(device_),
                  std::string("NCCL ") + what + " buffer on " + t.device().str() + ", communicator on cuda:" +
                      std::to_string(device_));
    DSTRAIN_CHECK(ctx.device() == Device::cuda(device_), std::string("NCCL ") + what + " on a context of " +
                                                             ctx.device().str());
  }
  ncclComm_t comm_ = nullptr;
  int rank_, size_, device_;
};

}  // namespace

std::vector<char> nccl_unique_id() {
  ncclUniqueId id;
  DSTRAIN_NCCL_CHECK(ncclGetUniqueId(&id));
  std::vector<char> bytes(sizeof(id));
  std::memcpy(bytes.data(), &id, sizeof(id));
  return bytes;
}

std::unique_ptr<Communicator> make_nccl_communicator(const std::vector<char>& unique_id, int rank, int size,
                                                     int device) {
  return std::make_unique<NcclCommunicator>(unique_id, rank, size, device);
}

}  // namespace dstrain::collectives
