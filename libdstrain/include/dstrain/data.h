// Datasets: IDX files (gzip-compressed, read with zlib), Fashion-MNIST, and the sampler that
// makes every rank see a disjoint shard of the same global batch whatever the world size.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dstrain::data {

// An IDX array: dims (big-endian in the file) and the raw bytes of a ubyte array.
struct IdxArray {
  std::vector<std::uint32_t> dims;
  std::vector<std::uint8_t> values;
};
// Reads a .gz (or plain) IDX file of unsigned bytes (type code 0x08). A missing, truncated or
// malformed file raises Error (Io or Corrupt) whose message names the file and what is wrong.
IdxArray read_idx(const std::string& path);

// Images normalised as the reference does: (pixel / 255 - mean) / std, NHWC with C = 1.
struct ImageDataset {
  std::int64_t count = 0;
  int height = 0, width = 0;
  std::vector<float> pixels;   // count * height * width
  std::vector<std::int32_t> labels;  // count, in [0, 10)
};
constexpr float kFashionMnistMean = 0.2860f;
constexpr float kFashionMnistStd = 0.3530f;
const char* default_fashion_mnist_dir();  // /usr/share/datasets/fashion-mnist
// split: "train" or "t10k". limit > 0 keeps the first `limit` examples. Checks that images and
// labels agree in count and labels lie in [0, 10).
ImageDataset load_fashion_mnist(const std::string& dir, const std::string& split, std::int64_t limit = 0);

// Global batches of an epoch: one permutation of [0, count) drawn from (seed, epoch), the same on
// every rank; batch b is positions [b * global_batch, (b + 1) * global_batch) and the remainder
// is dropped (as the reference drops it). A rank takes a contiguous slice of each global batch;
// slices differ by at most one example when global_batch is not a multiple of world_size.
class EpochSampler {
 public:
  EpochSampler(std::int64_t count, std::int64_t global_batch, std::uint64_t seed, std::uint64_t epoch);
  std::int64_t batches() const { return count_ / global_batch_; }
  // Dataset indices of rank `rank`'s slice of global batch `b`.
  std::vector<std::int64_t> shard(std::int64_t b, int rank, int world_size) const;
  // Offset and length of rank's slice inside any global batch.
  static void shard_range(std::int64_t global_batch, int rank, int world_size, std::int64_t& begin,
                          std::int64_t& length);

 private:
  std::int64_t count_, global_batch_;
  std::vector<std::int64_t> order_;
};

// Whether example `index` is flipped horizontally in `epoch`: a hash of (seed, epoch, index), so
// the choice does not depend on which rank draws the example. Probability 1/2.
bool flip_example(std::uint64_t seed, std::uint64_t epoch, std::int64_t index);

// Copies the examples `indices` of `ds` into out (NHWC [n, H, W, 1]) and their labels,
// mirroring those for which flip_example says so when `augment` is true.
void gather_batch(const ImageDataset& ds, const std::vector<std::int64_t>& indices, bool augment,
                  std::uint64_t seed, std::uint64_t epoch, float* out_pixels, std::int32_t* out_labels);

}  // namespace dstrain::data
