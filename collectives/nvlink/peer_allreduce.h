// Peer-memory AllReduce among the ranks of one node: every rank owns a device buffer that all
// the others map through CUDA IPC, and custom kernels reduce by reading the peers' buffers
// directly (NVLink P2P between GPUs, or plain device memory when ranks share one GPU).
// Plain C++ declarations: the CUDA side lives in peer_allreduce.cu and peer_kernels.cu.
#pragma once
#include <cstddef>
#include <memory>

#include "dstrain/allreduce_algo.h"
#include "dstrain/comm.h"
#include "dstrain/error.h"

namespace dstrain::collectives {

struct PeerAllreduceOptions {
  // The largest message (bytes) one call may reduce; the shared buffers are sized for it once.
  std::size_t max_bytes = std::size_t{32} << 20;
  // How long a kernel waits for a peer's signal before it gives up and reports a Timeout.
  // 0: DSTRAIN_PEER_TIMEOUT_MS if set, else 30 s (generous: ranks sharing one GPU are time-sliced).
  double timeout_ms = 0;
};

class PeerAllreduce {
 public:
  static constexpr int kMaxRanks = 8;

  virtual ~PeerAllreduce() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual int device() const = 0;
  virtual std::size_t max_bytes() const = 0;
  // True for fp32/fp16/bf16, Sum/Avg, and messages up to max_bytes().
  virtual bool supports(std::size_t bytes, DType dtype, ReduceOp op) const = 0;

  // out[i] = reduction over ranks of in[i] for i < count; `out` may equal `in` (in place), and
  // both may start at any element offset. Issued on ctx's stream without a host sync. Every rank
  // must make the same sequence of calls with the same count, dtype, op and algo (OneShot or
  // TwoShot), and a rank's calls must run in the order issued (one stream, or streams ordered by
  // events): reusing the two buffer halves relies on call k having finished before call k+1 starts.
  // A wait that expired in an earlier call raises Timeout here.
  virtual void allreduce(const void* in, void* out, std::size_t count, DType dtype, ReduceOp op,
                         AllreduceAlgo algo, Context& ctx) = 0;
  void allreduce(Tensor& t, ReduceOp op, AllreduceAlgo algo, Context& ctx);

  // Raises Timeout naming the operation and the silent peers when a kernel's wait expired. Calls
  // already issued are only seen after the stream has been synchronised.
  virtual void check_health() = 0;
};

inline void PeerAllreduce::allreduce(Tensor& t, ReduceOp op, AllreduceAlgo algo, Context& ctx) {
  DSTRAIN_CHECK(t.device() == Device::cuda(device()),
                "peer-memory AllReduce buffer on " + t.device().str() + ", engine on cuda:" + std::to_string(device()));
  allreduce(t.data(), t.data(), static_cast<std::size_t>(t.numel()), t.dtype(), op, algo, ctx);
}

// Collective over host_comm, whose ranks must all run on this node (one engine per rank, the
// same options on every rank); `device` is this rank's GPU. Raises Unsupported in a build without CUDA, with more than
// kMaxRanks ranks, or when the ranks are on different hosts.
std::unique_ptr<PeerAllreduce> make_peer_allreduce(Communicator& host_comm, int device,
                                                   const PeerAllreduceOptions& options = {});

}  // namespace dstrain::collectives
