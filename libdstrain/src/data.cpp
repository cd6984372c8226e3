// IDX reading (zlib), Fashion-MNIST loading, the epoch sampler and batch gathering.
//
// The sampler's permutation is defined here, not by the standard library: std::mt19937_64's
// output is fixed by the standard, but std::shuffle and std::uniform_int_distribution are not,
// so the Fisher-Yates shuffle and its bounded draws are our own. Every rank, compiler and
// platform therefore sees the same order for the same (seed, epoch).
#include "dstrain/data.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <random>
#include <string>

#include "dstrain/error.h"

namespace dstrain::data {

namespace {

constexpr std::uint8_t kIdxTypeUByte = 0x08;
constexpr int kMaxIdxDims = 16;

std::string quoted(const std::string& path) { return "'" + path + "'"; }

std::string hex_byte(unsigned v) {
  static const char* digits = "0123456789abcdef";
  std::string s = "0x";
  s += digits[(v >> 4) & 0xF];
  s += digits[v & 0xF];
  return s;
}

// Closes a gzFile on every path out of read_idx.
struct GzCloser {
  gzFile f;
  ~GzCloser() {
    if (f) gzclose(f);
  }
};

std::vector<std::uint8_t> read_all(const std::string& path) {
  errno = 0;
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) {
    const int err = errno;
    DSTRAIN_THROW(ErrorCode::Io, "cannot open IDX file " + quoted(path) + ": " +
                                     (err ? std::strerror(err) : "zlib could not allocate its state"));
  }
  GzCloser closer{f};
  gzbuffer(f, 1 << 17);
  std::vector<std::uint8_t> bytes;
  constexpr unsigned kChunk = 1u << 20;
  for (;;) {
    const std::size_t old = bytes.size();
    bytes.resize(old + kChunk);
    errno = 0;
    const int got = gzread(f, bytes.data() + old, kChunk);
    if (got < 0) {
      int zerr = Z_OK;
      const char* zmsg = gzerror(f, &zerr);
      if (zerr == Z_ERRNO)
        DSTRAIN_THROW(ErrorCode::Io, "cannot read IDX file " + quoted(path) + ": " +
                                         std::strerror(errno ? errno : EIO));
      DSTRAIN_THROW(ErrorCode::Corrupt, "IDX file " + quoted(path) + " is not a valid gzip stream: " +
                                            (zmsg ? zmsg : "unknown zlib error"));
    }
    bytes.resize(old + static_cast<std::size_t>(got));
    if (got == 0) break;
  }
  // A gzip stream cut short returns what it had and leaves Z_BUF_ERROR behind.
  int zerr = Z_OK;
  const char* zmsg = gzerror(f, &zerr);
  if (zerr != Z_OK)
    DSTRAIN_THROW(ErrorCode::Corrupt, "IDX file " + quoted(path) + " has a damaged gzip stream: " +
                                          (zmsg ? zmsg : "unknown zlib error"));
  closer.f = nullptr;
  const int rc = gzclose(f);
  if (rc != Z_OK)
    DSTRAIN_THROW(ErrorCode::Corrupt, "IDX file " + quoted(path) +
                                          " ends inside its gzip stream (gzclose returned " +
                                          std::to_string(rc) + ")");
  return bytes;
}

std::uint32_t read_be32(const std::uint8_t* p) {
  return (std::uint32_t(p[0]) << 24) | (std::uint32_t(p[1]) << 16) | (std::uint32_t(p[2]) << 8) |
         std::uint32_t(p[3]);
}

std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [0, bound), bound > 0, without modulo bias: reject the lowest 2^64 mod bound
// outputs so the accepted range is a whole number of copies of [0, bound).
std::uint64_t bounded_draw(std::mt19937_64& rng, std::uint64_t bound) {
  const std::uint64_t threshold = (0 - bound) % bound;  // == 2^64 mod bound
  for (;;) {
    const std::uint64_t x = rng();
    if (x >= threshold) return x % bound;
  }
}

}  // namespace

IdxArray read_idx(const std::string& path) {
  const std::vector<std::uint8_t> bytes = read_all(path);
  if (bytes.size() < 4)
    DSTRAIN_THROW(ErrorCode::Corrupt, "IDX file " + quoted(path) + " truncated: " +
                                          std::to_string(bytes.size()) +
                                          " bytes, shorter than the 4-byte magic number");
  if (bytes[0] != 0 || bytes[1] != 0)
    DSTRAIN_THROW(ErrorCode::Corrupt, "IDX file " + quoted(path) + " has a bad magic number: " +
                                          hex_byte(bytes[0]) + " " + hex_byte(bytes[1]) + " " +
                                          hex_byte(bytes[2]) + " " + hex_byte(bytes[3]) +
                                          " (expected 0x00 0x00 0x08 ndims)");
  if (bytes[2] != kIdxTypeUByte)
    DSTRAIN_THROW(ErrorCode::Corrupt, "IDX file " + quoted(path) + " has type code " +
                                          hex_byte(bytes[2]) +
                                          "; only unsigned bytes (0x08) are supported");
  const int ndims = bytes[3];
  if (ndims < 1 || ndims > kMaxIdxDims)
    DSTRAIN_THROW(ErrorCode::Corrupt, "IDX file " + quoted(path) + " declares " +
                                          std::to_string(ndims) + " dimensions (expected 1 to " +
                                          std::to_string(kMaxIdxDims) + ")");
  const std::size_t header = 4 + 4 * static_cast<std::size_t>(ndims);
  if (bytes.size() < header)
    DSTRAIN_THROW(ErrorCode::Corrupt, "IDX file " + quoted(path) + " truncated: header of " +
                                          std::to_string(header) + " bytes, file has " +
                                          std::to_string(bytes.size()));
  IdxArray out;
  out.dims.resize(ndims);
  std::uint64_t expected = 1;
  for (int i = 0; i < ndims; ++i) {
    out.dims[i] = read_be32(bytes.data() + 4 + 4 * i);
    // Saturate instead of wrapping: any product past 2^48 cannot match a file we could read.
    if (out.dims[i] != 0 && expected > (std::uint64_t(1) << 48) / out.dims[i])
      expected = std::uint64_t(1) << 48;
    else
      expected *= out.dims[i];
  }
  const std::uint64_t got = bytes.size() - header;
  if (got < expected)
    DSTRAIN_THROW(ErrorCode::Corrupt, "IDX file " + quoted(path) + " truncated: expected " +
                                          std::to_string(expected) + " bytes of data, got " +
                                          std::to_string(got));
  if (got > expected)
    DSTRAIN_THROW(ErrorCode::Corrupt, "IDX file " + quoted(path) + " has " +
                                          std::to_string(got - expected) +
                                          " trailing bytes: expected " + std::to_string(expected) +
                                          " bytes of data, got " + std::to_string(got));
  out.values.assign(bytes.begin() + static_cast<std::ptrdiff_t>(header), bytes.end());
  return out;
}

const char* default_fashion_mnist_dir() { return "/usr/share/datasets/fashion-mnist"; }

ImageDataset load_fashion_mnist(const std::string& dir, const std::string& split, std::int64_t limit) {
  DSTRAIN_CHECK(split == "train" || split == "t10k",
                "load_fashion_mnist: split must be \"train\" or \"t10k\", got \"" + split + "\"");
  DSTRAIN_CHECK(limit >= 0, "load_fashion_mnist: limit must be >= 0, got " + std::to_string(limit));
  std::string base = dir;
  if (!base.empty() && base.back() != '/') base += '/';
  const std::string images_path = base + split + "-images-idx3-ubyte.gz";
  const std::string labels_path = base + split + "-labels-idx1-ubyte.gz";

  IdxArray labels = read_idx(labels_path);
  if (labels.dims.size() != 1)
    DSTRAIN_THROW(ErrorCode::Corrupt, "labels file " + quoted(labels_path) + " has " +
                                          std::to_string(labels.dims.size()) +
                                          " dimensions, expected 1");
  IdxArray images = read_idx(images_path);
  if (images.dims.size() != 3)
    DSTRAIN_THROW(ErrorCode::Corrupt, "images file " + quoted(images_path) + " has " +
                                          std::to_string(images.dims.size()) +
                                          " dimensions, expected 3 (count, height, width)");
  if (images.dims[0] != labels.dims[0])
    DSTRAIN_THROW(ErrorCode::Corrupt, "images file " + quoted(images_path) + " holds " +
                                          std::to_string(images.dims[0]) + " examples but labels file " +
                                          quoted(labels_path) + " holds " +
                                          std::to_string(labels.dims[0]));
  if (images.dims[1] == 0 || images.dims[2] == 0)
    DSTRAIN_THROW(ErrorCode::Corrupt, "images file " + quoted(images_path) + " has empty images (" +
                                          std::to_string(images.dims[1]) + "x" +
                                          std::to_string(images.dims[2]) + ")");
  for (std::size_t i = 0; i < labels.values.size(); ++i)
    if (labels.values[i] >= 10)
      DSTRAIN_THROW(ErrorCode::Corrupt, "labels file " + quoted(labels_path) + ": label " +
                                            std::to_string(labels.values[i]) + " of example " +
                                            std::to_string(i) + " is outside [0, 10)");

  ImageDataset ds;
  ds.count = images.dims[0];
  if (limit > 0 && limit < ds.count) ds.count = limit;
  ds.height = static_cast<int>(images.dims[1]);
  ds.width = static_cast<int>(images.dims[2]);
  const std::size_t per_image = static_cast<std::size_t>(ds.height) * ds.width;
  const std::size_t n = static_cast<std::size_t>(ds.count);

  // One table entry per byte value, computed with the reference's float expression.
  float table[256];
  for (int p = 0; p < 256; ++p)
    table[p] = (static_cast<float>(p) / 255.0f - kFashionMnistMean) / kFashionMnistStd;
  ds.pixels.resize(n * per_image);
  for (std::size_t i = 0; i < n * per_image; ++i) ds.pixels[i] = table[images.values[i]];
  ds.labels.resize(n);
  for (std::size_t i = 0; i < n; ++i) ds.labels[i] = labels.values[i];
  return ds;
}

EpochSampler::EpochSampler(std::int64_t count, std::int64_t global_batch, std::uint64_t seed,
                           std::uint64_t epoch)
    : count_(count), global_batch_(global_batch) {
  DSTRAIN_CHECK(count >= 0, "EpochSampler: count must be >= 0, got " + std::to_string(count));
  DSTRAIN_CHECK(global_batch > 0,
                "EpochSampler: global_batch must be > 0, got " + std::to_string(global_batch));
  order_.resize(static_cast<std::size_t>(count));
  for (std::int64_t i = 0; i < count; ++i) order_[static_cast<std::size_t>(i)] = i;
  std::mt19937_64 rng(splitmix64(splitmix64(seed) ^ epoch));
  for (std::int64_t i = count - 1; i > 0; --i) {
    const auto j = static_cast<std::int64_t>(bounded_draw(rng, static_cast<std::uint64_t>(i) + 1));
    std::swap(order_[static_cast<std::size_t>(i)], order_[static_cast<std::size_t>(j)]);
  }
}

void EpochSampler::shard_range(std::int64_t global_batch, int rank, int world_size,
                               std::int64_t& begin, std::int64_t& length) {
  DSTRAIN_CHECK(global_batch >= 0, "shard_range: global_batch must be >= 0, got " +
                                       std::to_string(global_batch));
  DSTRAIN_CHECK(world_size > 0, "shard_range: world_size must be > 0, got " +
                                    std::to_string(world_size));
  DSTRAIN_CHECK(rank >= 0 && rank < world_size, "shard_range: rank " + std::to_string(rank) +
                                                    " outside [0, " + std::to_string(world_size) + ")");
  const std::int64_t base = global_batch / world_size;
  const std::int64_t extra = global_batch % world_size;  // the first `extra` ranks take one more
  length = base + (rank < extra ? 1 : 0);
  begin = rank * base + std::min<std::int64_t>(rank, extra);
}

std::vector<std::int64_t> EpochSampler::shard(std::int64_t b, int rank, int world_size) const {
  DSTRAIN_CHECK(b >= 0 && b < batches(), "EpochSampler::shard: batch " + std::to_string(b) +
                                             " outside [0, " + std::to_string(batches()) + ")");
  std::int64_t begin = 0, length = 0;
  shard_range(global_batch_, rank, world_size, begin, length);
  const auto first = order_.begin() + static_cast<std::ptrdiff_t>(b * global_batch_ + begin);
  return std::vector<std::int64_t>(first, first + static_cast<std::ptrdiff_t>(length));
}

bool flip_example(std::uint64_t seed, std::uint64_t epoch, std::int64_t index) {
  std::uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ epoch);
  h = splitmix64(h ^ static_cast<std::uint64_t>(index));
  return (h & 1u) != 0;
}

void gather_batch(const ImageDataset& ds, const std::vector<std::int64_t>& indices, bool augment,
                  std::uint64_t seed, std::uint64_t epoch, float* out_pixels, std::int32_t* out_labels) {
  const std::size_t per_image = static_cast<std::size_t>(ds.height) * ds.width;
  DSTRAIN_CHECK(ds.height >= 0 && ds.width >= 0 && ds.count >= 0 &&
                    ds.pixels.size() == static_cast<std::size_t>(ds.count) * per_image &&
                    ds.labels.size() == static_cast<std::size_t>(ds.count),
                "gather_batch: dataset sizes disagree (count " + std::to_string(ds.count) + ", " +
                    std::to_string(ds.height) + "x" + std::to_string(ds.width) + ", " +
                    std::to_string(ds.pixels.size()) + " pixels, " +
                    std::to_string(ds.labels.size()) + " labels)");
  if (indices.empty()) return;
  DSTRAIN_CHECK(out_pixels != nullptr && out_labels != nullptr, "gather_batch: null output");
  const std::size_t W = static_cast<std::size_t>(ds.width);
  for (std::size_t k = 0; k < indices.size(); ++k) {
    const std::int64_t idx = indices[k];
    DSTRAIN_CHECK(idx >= 0 && idx < ds.count, "gather_batch: index " + std::to_string(idx) +
                                                  " outside [0, " + std::to_string(ds.count) + ")");
    const float* src = ds.pixels.data() + static_cast<std::size_t>(idx) * per_image;
    float* dst = out_pixels + k * per_image;
    if (augment && flip_example(seed, epoch, idx)) {
      for (std::size_t h = 0; h < static_cast<std::size_t>(ds.height); ++h) {
        const float* row = src + h * W;
        float* out_row = dst + h * W;
        for (std::size_t w = 0; w < W; ++w) out_row[w] = row[W - 1 - w];
      }
    } else {
      std::copy(src, src + per_image, dst);
    }
    out_labels[k] = ds.labels[static_cast<std::size_t>(idx)];
  }
}

}  // namespace dstrain::data
