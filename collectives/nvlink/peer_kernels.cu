// Peer-memory AllReduce kernels. Every rank's buffer is mapped by all ranks of the node; a call
// copies this rank's input into its own buffer, signals the peers, waits for their signals and
// then reads their buffers.
//
// Work is split into the same blocks on every rank (the grid depends only on count and rank
// count), and block b of a rank only ever reads what block b of the peers wrote and signalled, so
// no grid-wide barrier is needed and blocks never wait on blocks of their own kernel.
//
// Reuse: calls alternate between two data halves by the parity of their epoch. A rank reaches
// call k+2 (same half as call k) only after call k+1 received every peer's "input ready" signal,
// and a peer gives that signal only after its kernel for call k has finished reading; so a fast
// rank never overwrites data a slow peer still reads, and flags never need resetting.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "collectives/nvlink/peer_kernels.h"

namespace dstrain::collectives::peer {

namespace {

__device__ __forceinline__ void store_release_system(std::uint32_t* address, std::uint32_t value) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(address), "r"(value) : "memory");
}

__device__ __forceinline__ std::uint32_t load_acquire_system(const std::uint32_t* address) {
  std::uint32_t value;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

__device__ __forceinline__ std::uint64_t global_time_ns() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__host__ __device__ constexpr std::size_t div_up(std::size_t a, std::size_t b) { return (a + b - 1) / b; }

template <class T>
struct Convert;
template <>
struct Convert<float> {
  static __device__ float to_float(float v) { return v; }
  static __device__ float from_float(float v) { return v; }
};
template <>
struct Convert<__half> {
  static __device__ float to_float(__half v) { return __half2float(v); }
  static __device__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <class T>
constexpr int kElems = kPackBytes / static_cast<int>(sizeof(T));

// Pack `pack` of the user's input: a 16-byte load when aligned and whole, else element by element
// (the tail past `count` reads as zero, so the shared buffer never holds stale padding).
template <class T>
__device__ __forceinline__ uint4 load_user_pack(const T* in, std::size_t pack, std::size_t count, bool aligned) {
  const std::size_t base = pack * kElems<T>;
  if (aligned && base + kElems<T> <= count) return *reinterpret_cast<const uint4*>(in + base);
  uint4 v = make_uint4(0, 0, 0, 0);
  T* elems = reinterpret_cast<T*>(&v);
#pragma unroll
  for (int j = 0; j < kElems<T>; ++j)
    if (base + j < count) elems[j] = in[base + j];
  return v;
}

template <class T>
__device__ __forceinline__ void store_user_pack(T* out, std::size_t pack, std::size_t count, bool aligned, uint4 v) {
  const std::size_t base = pack * kElems<T>;
  if (aligned && base + kElems<T> <= count) {
    *reinterpret_cast<uint4*>(out + base) = v;
    return;
  }
  const T* elems = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int j = 0; j < kElems<T>; ++j)
    if (base + j < count) out[base + j] = elems[j];
}

// Sum (or mean) of pack `pack` over all ranks' buffers, accumulated in fp32 in rank order 0..n-1
// so that every rank that computes it gets the same bits. L2-only loads (.cg): the data was
// written by other processes or GPUs, and L1 is not coherent with them.
template <class T>
__device__ __forceinline__ uint4 reduce_pack(const Launch& p, std::size_t pack) {
  uint4 v[kMaxRanks];
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r)
    if (r < p.nranks) v[r] = __ldcg(reinterpret_cast<const uint4*>(p.data[r]) + pack);
  float acc[kElems<T>];
#pragma unroll
  for (int j = 0; j < kElems<T>; ++j) acc[j] = Convert<T>::to_float(reinterpret_cast<const T*>(&v[0])[j]);
#pragma unroll
  for (int r = 1; r < kMaxRanks; ++r) {
    if (r >= p.nranks) break;
#pragma unroll
    for (int j = 0; j < kElems<T>; ++j) acc[j] += Convert<T>::to_float(reinterpret_cast<const T*>(&v[r])[j]);
  }
  uint4 out;
  T* out_elems = reinterpret_cast<T*>(&out);
  const float n = static_cast<float>(p.nranks);
#pragma unroll
  for (int j = 0; j < kElems<T>; ++j) out_elems[j] = Convert<T>::from_float(p.average ? acc[j] / n : acc[j]);
  return out;
}

// Tells every peer that this block finished `phase` of this call. The barrier orders all the
// block's data writes before the system-scope fence and release store.
__device__ void signal_peers(const Launch& p, int phase) {
  __syncthreads();
  const int peer = static_cast<int>(threadIdx.x);
  if (peer < p.nranks && peer != p.rank) {
    __threadfence_system();
    store_release_system(p.flags[peer] + flag_index(p.epoch & 1u, phase, blockIdx.x, p.rank), p.epoch);
  }
}

// Waits until every peer's block of the same index signalled `phase` of this call. Thread r polls
// rank r's flag. Past the deadline it records the silent peers in the error word and the whole
// block returns false (its output is left unwritten; the host raises Timeout).
__device__ bool wait_for_peers(const Launch& p, int phase) {
  __shared__ int timed_out;
  if (threadIdx.x == 0) timed_out = 0;
  __syncthreads();
  const int peer = static_cast<int>(threadIdx.x);
  if (peer < p.nranks && peer != p.rank) {
    const std::uint32_t* flag = p.flags[p.rank] + flag_index(p.epoch & 1u, phase, blockIdx.x, peer);
    const std::uint64_t deadline = global_time_ns() + p.timeout_ns;
    for (unsigned spins = 1;; ++spins) {
      // Wrap-safe "flag >= epoch": a peer is never more than one call ahead on this parity.
      if (static_cast<std::int32_t>(load_acquire_system(flag) - p.epoch) >= 0) break;
      if (spins % 256 == 0 && global_time_ns() > deadline) {
        volatile ErrorWord* error = p.error;
        error->missing[peer] = 1u;
        error->epoch = p.epoch;
        error->phase = static_cast<std::uint32_t>(phase);
        error->algo = static_cast<std::uint32_t>(p.algo);
        __threadfence_system();
        error->failed = 1u;
        __threadfence_system();
        timed_out = 1;
        break;
      }
    }
  }
  __syncthreads();
  return timed_out == 0;
}

template <class T>
__global__ void __launch_bounds__(kThreads) one_shot_kernel(const __grid_constant__ Launch p) {
  const std::size_t packs = div_up(p.count, kElems<T>);
  const std::size_t per_block = div_up(packs, gridDim.x);
  const std::size_t begin = blockIdx.x * per_block;
  const std::size_t end = begin + per_block < packs ? begin + per_block : packs;
  uint4* own = reinterpret_cast<uint4*>(p.data[p.rank]);
  const T* in = static_cast<const T*>(p.in);
  for (std::size_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    __stcg(own + i, load_user_pack(in, i, p.count, p.in_aligned));
  signal_peers(p, 0);
  if (!wait_for_peers(p, 0)) return;
  T* out = static_cast<T*>(p.out);
  for (std::size_t i = begin + threadIdx.x; i < end; i += blockDim.x)
    store_user_pack(out, i, p.count, p.out_aligned, reduce_pack<T>(p, i));
}

template <class T>
__global__ void __launch_bounds__(kThreads) two_shot_kernel(const __grid_constant__ Launch p) {
  const std::size_t packs = div_up(p.count, kElems<T>);
  const std::size_t chunk = div_up(packs, static_cast<std::size_t>(p.nranks));
  const std::size_t per_block = div_up(chunk, gridDim.x);
  // This block's slice of rank q's chunk: the same slice on every rank.
  auto slice_begin = [&](int q) {
    const std::size_t b = q * chunk + blockIdx.x * per_block;
    return b < packs ? b : packs;
  };
  auto slice_end = [&](int q) {
    std::size_t e = q * chunk + blockIdx.x * per_block + per_block;
    const std::size_t chunk_end = (q + 1) * chunk;
    if (e > chunk_end) e = chunk_end;
    return e < packs ? e : packs;
  };
  uint4* own = reinterpret_cast<uint4*>(p.data[p.rank]);
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);

  // This block's slice of every chunk goes into the own buffer (the same elements it writes to
  // `out` later, so in place is safe).
  for (int q = 0; q < p.nranks; ++q)
    for (std::size_t i = slice_begin(q) + threadIdx.x; i < slice_end(q); i += blockDim.x)
      __stcg(own + i, load_user_pack(in, i, p.count, p.in_aligned));
  signal_peers(p, 0);
  if (!wait_for_peers(p, 0)) return;

  // Reduce-scatter: this rank's chunk, reduced from all buffers, replaces its own input there
  // (peers read only their own chunks of this buffer in this phase).
  for (std::size_t i = slice_begin(p.rank) + threadIdx.x; i < slice_end(p.rank); i += blockDim.x) {
    const uint4 v = reduce_pack<T>(p, i);
    __stcg(own + i, v);
    store_user_pack(out, i, p.count, p.out_aligned, v);
  }
  signal_peers(p, 1);
  if (!wait_for_peers(p, 1)) return;

  // All-gather: the other chunks, reduced by their owners.
  for (int q = 0; q < p.nranks; ++q) {
    if (q == p.rank) continue;
    const uint4* theirs = reinterpret_cast<const uint4*>(p.data[q]);
    for (std::size_t i = slice_begin(q) + threadIdx.x; i < slice_end(q); i += blockDim.x)
      store_user_pack(out, i, p.count, p.out_aligned, __ldcg(theirs + i));
  }
}

template <class T>
cudaError_t launch_typed(const Launch& p, cudaStream_t stream) {
  const std::size_t packs = div_up(p.count, kElems<T>);
  const std::size_t per_grid = p.algo == Algo::OneShot ? packs : div_up(packs, static_cast<std::size_t>(p.nranks));
  std::size_t blocks = div_up(per_grid, kThreads);
  if (blocks < 1) blocks = 1;
  if (blocks > static_cast<std::size_t>(kMaxBlocks)) blocks = kMaxBlocks;
  if (p.algo == Algo::OneShot)
    one_shot_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  else
    two_shot_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch(const Launch& p, cudaStream_t stream) {
  switch (p.type) {
    case ElemType::F32: return launch_typed<float>(p, stream);
    case ElemType::F16: return launch_typed<__half>(p, stream);
    case ElemType::BF16: return launch_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dstrain::collectives::peer
