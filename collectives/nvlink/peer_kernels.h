// The launch interface of the peer-memory AllReduce kernels (peer_kernels.cu), used by the host
// side in peer_allreduce.cu. Included only by CUDA translation units.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dstrain::collectives::peer {

constexpr int kMaxRanks = 8;
constexpr int kMaxBlocks = 64;
constexpr int kThreads = 512;
constexpr int kPackBytes = 16;  // one 16-byte vector load or store
// Flag phases: 0 = this rank's input is in its buffer; 1 = its reduced chunk is (two-shot).
constexpr int kPhases = 2;

// Flag words of one rank's buffer: [parity][phase][block][source rank], each holding the call
// number (epoch) of the last signal. Peers write them, the owner polls them locally.
constexpr std::size_t flag_index(unsigned parity, int phase, int block, int source) {
  return ((static_cast<std::size_t>(parity) * kPhases + phase) * kMaxBlocks + block) * kMaxRanks + source;
}
constexpr std::size_t kFlagBytes = 2 * kPhases * kMaxBlocks * kMaxRanks * sizeof(std::uint32_t);

// Written by a kernel whose wait expired; lives in mapped host memory so the host reads it
// without synchronising. Plain stores only (no read-modify-write): atomics on host memory are not
// native on every PCIe platform, and every writer stores the same values.
struct ErrorWord {
  std::uint32_t failed;                // non-zero once a wait expired
  std::uint32_t epoch;                 // the call that failed
  std::uint32_t phase;                 // the flag phase it waited for
  std::uint32_t algo;                  // Algo of the failed call
  std::uint32_t missing[kMaxRanks];    // non-zero: no signal arrived from that rank
};

enum class ElemType : int { F32, F16, BF16 };
enum class Algo : int { OneShot, TwoShot };

struct Launch {
  const void* in = nullptr;
  void* out = nullptr;
  std::size_t count = 0;
  ElemType type = ElemType::F32;
  Algo algo = Algo::OneShot;
  bool average = false;
  bool in_aligned = false, out_aligned = false;  // 16-byte aligned: vector loads/stores
  int rank = 0, nranks = 1;
  std::uint32_t epoch = 0;                 // this call's number, from 1; parity picks the data half
  char* data[kMaxRanks] = {};              // each rank's data half for this parity, as mapped here
  std::uint32_t* flags[kMaxRanks] = {};    // each rank's flag words, as mapped here
  ErrorWord* error = nullptr;              // device view of the mapped host word
  std::uint64_t timeout_ns = 0;
};

// Enqueues the kernel on `stream`; returns the launch status.
cudaError_t launch(const Launch& launch, cudaStream_t stream);

}  // namespace dstrain::collectives::peer
