// IDX reading, Fashion-MNIST loading, the epoch sampler and batch gathering. Every test writes
// its own small files into a fresh temporary directory; only the last one reads the real
// dataset, and only when it is installed.
#include <catch2/catch.hpp>

#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "dstrain/data.h"
#include "dstrain/error.h"

namespace fs = std::filesystem;
using namespace dstrain;
using namespace dstrain::data;

namespace {

// A fresh directory, removed with everything in it at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    for (int attempt = 0; attempt < 100; ++attempt) {
      path_ = fs::temp_directory_path() /
              ("dstrain_test_data_" + std::to_string(::getpid()) + "_" + std::to_string(rd()));
      std::error_code ec;
      if (fs::create_directory(path_, ec)) return;
    }
    FAIL("cannot create a temporary directory");
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

std::vector<std::uint8_t> idx_bytes(const std::vector<std::uint32_t>& dims,
                                    const std::vector<std::uint8_t>& values, std::uint8_t type = 0x08) {
  std::vector<std::uint8_t> b = {0, 0, type, static_cast<std::uint8_t>(dims.size())};
  for (std::uint32_t d : dims)
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<std::uint8_t>(d >> s));
  b.insert(b.end(), values.begin(), values.end());
  return b;
}

void write_plain(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

void write_gz(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  if (!bytes.empty())
    REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

std::vector<std::uint8_t> read_raw(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// Runs fn, which must throw dstrain::Error with `code` and a message holding every `parts`.
template <typename Fn>
void expect_error(Fn fn, ErrorCode code, const std::vector<std::string>& parts) {
  try {
    fn();
    FAIL("no exception thrown");
  } catch (const Error& e) {
    const std::string msg = e.what();
    INFO("message: " << msg);
    CHECK(e.code() == code);
    for (const auto& p : parts) {
      INFO("expected to find: " << p);
      CHECK(msg.find(p) != std::string::npos);
    }
  }
}

std::vector<std::uint8_t> iota_bytes(std::size_t n, int start = 0) {
  std::vector<std::uint8_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::uint8_t>((start + i) & 0xFF);
  return v;
}

// Writes a synthetic split: n images of h x w with pixel (i, y, x) = (i * 31 + y * w + x) % 256.
void write_split(const TempDir& dir, const std::string& split, std::uint32_t n, std::uint32_t h,
                 std::uint32_t w, const std::vector<std::uint8_t>& labels) {
  std::vector<std::uint8_t> px(static_cast<std::size_t>(n) * h * w);
  for (std::uint32_t i = 0; i < n; ++i)
    for (std::uint32_t k = 0; k < h * w; ++k) px[i * h * w + k] = static_cast<std::uint8_t>((i * 31 + k) % 256);
  write_gz(dir.file(split + "-images-idx3-ubyte.gz"), idx_bytes({n, h, w}, px));
  write_gz(dir.file(split + "-labels-idx1-ubyte.gz"),
           idx_bytes({static_cast<std::uint32_t>(labels.size())}, labels));
}

float normalised(int p) { return (static_cast<float>(p) / 255.0f - kFashionMnistMean) / kFashionMnistStd; }

}  // namespace

TEST_CASE("read_idx reads gzip and plain files", "[data]") {
  TempDir dir;
  const auto values = iota_bytes(2 * 3 * 4, 7);
  const auto bytes = idx_bytes({2, 3, 4}, values);
  write_gz(dir.file("a.gz"), bytes);
  write_plain(dir.file("a.raw"), bytes);
  for (const std::string name : {"a.gz", "a.raw"}) {
    const IdxArray a = read_idx(dir.file(name));
    CHECK(a.dims == std::vector<std::uint32_t>{2, 3, 4});
    CHECK(a.values == values);
  }
  // one dimension, large values of a dim (big-endian decoding), and an empty array
  const auto big = iota_bytes(300);
  write_gz(dir.file("b.gz"), idx_bytes({300}, big));
  const IdxArray b = read_idx(dir.file("b.gz"));
  CHECK(b.dims == std::vector<std::uint32_t>{300});
  CHECK(b.values == big);
  write_plain(dir.file("c.raw"), idx_bytes({0, 5}, {}));
  const IdxArray c = read_idx(dir.file("c.raw"));
  CHECK(c.dims == std::vector<std::uint32_t>{0, 5});
  CHECK(c.values.empty());
  // a file larger than one read chunk
  const auto large = iota_bytes(3u << 20, 3);
  write_gz(dir.file("d.gz"), idx_bytes({3, 1024, 1024}, large));
  CHECK(read_idx(dir.file("d.gz")).values == large);
}

TEST_CASE("read_idx reports missing and unreadable files", "[data]") {
  TempDir dir;
  const std::string missing = dir.file("no-such-file-idx1-ubyte.gz");
  expect_error([&] { read_idx(missing); }, ErrorCode::Io, {missing, "No such file"});
  expect_error([&] { read_idx(dir.str()); }, ErrorCode::Io, {dir.str()});  // a directory
}

TEST_CASE("read_idx rejects malformed files", "[data]") {
  TempDir dir;
  const auto good = idx_bytes({2, 3, 4}, iota_bytes(24));

  SECTION("truncated data") {
    for (bool gz : {true, false}) {
      const std::string p = dir.file(gz ? "t.gz" : "t.raw");
      const std::vector<std::uint8_t> cut(good.begin(), good.end() - 4);
      gz ? write_gz(p, cut) : write_plain(p, cut);
      expect_error([&] { read_idx(p); }, ErrorCode::Corrupt, {p, "truncated: expected 24 bytes of data, got 20"});
    }
  }
  SECTION("truncated header") {
    const std::string p = dir.file("h.gz");
    write_gz(p, std::vector<std::uint8_t>(good.begin(), good.begin() + 9));
    expect_error([&] { read_idx(p); }, ErrorCode::Corrupt, {p, "truncated"});
    const std::string e = dir.file("empty.gz");
    write_gz(e, {});
    expect_error([&] { read_idx(e); }, ErrorCode::Corrupt, {e, "truncated"});
  }
  SECTION("bad magic") {
    auto bad = good;
    bad[0] = 0x1F;
    const std::string p = dir.file("m.raw");
    write_plain(p, bad);
    expect_error([&] { read_idx(p); }, ErrorCode::Corrupt, {p, "magic"});
    bad = good;
    bad[1] = 0x01;
    write_plain(p, bad);
    expect_error([&] { read_idx(p); }, ErrorCode::Corrupt, {p, "magic"});
  }
  SECTION("wrong type code") {
    for (std::uint8_t type : {0x09, 0x0B, 0x0C, 0x0D, 0x0E}) {  // i8, i16, i32, f32, f64
      const std::string p = dir.file("type.gz");
      write_gz(p, idx_bytes({2, 3, 4}, iota_bytes(24), type));
      expect_error([&] { read_idx(p); }, ErrorCode::Corrupt, {p, "type code"});
    }
  }
  SECTION("zero dimensions") {
    const std::string p = dir.file("nodims.gz");
    write_gz(p, {0, 0, 8, 0});
    expect_error([&] { read_idx(p); }, ErrorCode::Corrupt, {p, "dimensions"});
  }
  SECTION("trailing bytes") {
    auto extra = good;
    extra.push_back(0);
    extra.push_back(1);
    extra.push_back(2);
    const std::string p = dir.file("trail.gz");
    write_gz(p, extra);
    expect_error([&] { read_idx(p); }, ErrorCode::Corrupt, {p, "trailing", "expected 24 bytes of data, got 27"});
  }
  SECTION("gzip stream cut short") {
    const std::string full = dir.file("full.gz");
    write_gz(full, idx_bytes({64, 64}, iota_bytes(64 * 64)));
    auto raw = read_raw(full);
    REQUIRE(raw.size() > 30);
    raw.resize(raw.size() - 12);  // drops the CRC/length trailer and some deflate data
    const std::string p = dir.file("cut.gz");
    write_plain(p, raw);
    expect_error([&] { read_idx(p); }, ErrorCode::Corrupt, {p});
  }
  SECTION("gzip stream with damaged data") {
    const std::string full = dir.file("full.gz");
    std::vector<std::uint8_t> payload(5000);
    std::mt19937 rng(5);
    for (auto& v : payload) v = static_cast<std::uint8_t>(rng() % 7);
    write_gz(full, idx_bytes({5000}, payload));
    auto raw = read_raw(full);
    REQUIRE(raw.size() > 60);
    for (std::size_t i = 20; i < 40; ++i) raw[i] ^= 0xA5;  // inside the deflate blocks
    const std::string p = dir.file("damaged.gz");
    write_plain(p, raw);
    expect_error([&] { read_idx(p); }, ErrorCode::Corrupt, {p, "gzip"});
  }
  SECTION("dims whose product overflows") {
    const std::string p = dir.file("huge.raw");
    write_plain(p, idx_bytes({0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}, iota_bytes(8)));
    expect_error([&] { read_idx(p); }, ErrorCode::Corrupt, {p, "truncated"});
  }
}

TEST_CASE("load_fashion_mnist on synthetic files", "[data]") {
  TempDir dir;
  const std::vector<std::uint8_t> labels = {3, 0, 9, 1, 5};
  write_split(dir, "train", 5, 4, 3, labels);

  const ImageDataset ds = load_fashion_mnist(dir.str(), "train");
  REQUIRE(ds.count == 5);
  CHECK(ds.height == 4);
  CHECK(ds.width == 3);
  REQUIRE(ds.pixels.size() == 5u * 12u);
  CHECK(ds.labels == std::vector<std::int32_t>{3, 0, 9, 1, 5});
  for (int i = 0; i < 5; ++i)
    for (int k = 0; k < 12; ++k) REQUIRE(ds.pixels[i * 12 + k] == normalised((i * 31 + k) % 256));
  // normalisation endpoints
  CHECK(normalised(0) == Approx(-0.2860 / 0.3530));
  CHECK(normalised(255) == Approx((1 - 0.2860) / 0.3530));

  const ImageDataset lim = load_fashion_mnist(dir.str() + "/", "train", 2);  // trailing slash too
  CHECK(lim.count == 2);
  CHECK(lim.pixels.size() == 2u * 12u);
  CHECK(lim.labels == std::vector<std::int32_t>{3, 0});
  CHECK(std::equal(lim.pixels.begin(), lim.pixels.end(), ds.pixels.begin()));
  CHECK(load_fashion_mnist(dir.str(), "train", 100).count == 5);  // limit past the end keeps all

  expect_error([&] { load_fashion_mnist(dir.str(), "test"); }, ErrorCode::InvalidArgument, {"test"});
  expect_error([&] { load_fashion_mnist(dir.str(), "train", -1); }, ErrorCode::InvalidArgument, {"limit"});
  // t10k is absent from this directory
  expect_error([&] { load_fashion_mnist(dir.str(), "t10k"); }, ErrorCode::Io, {dir.file("t10k-")});
}

TEST_CASE("load_fashion_mnist rejects inconsistent files", "[data]") {
  TempDir dir;
  SECTION("label out of range") {
    write_split(dir, "train", 4, 2, 2, {1, 2, 10, 3});
    expect_error([&] { load_fashion_mnist(dir.str(), "train"); }, ErrorCode::Corrupt,
                 {dir.file("train-labels-idx1-ubyte.gz"), "label 10", "example 2"});
  }
  SECTION("image and label counts differ") {
    write_split(dir, "train", 4, 2, 2, {1, 2, 3});
    expect_error([&] { load_fashion_mnist(dir.str(), "train"); }, ErrorCode::Corrupt,
                 {dir.file("train-images-idx3-ubyte.gz"), dir.file("train-labels-idx1-ubyte.gz"), "4", "3"});
  }
  SECTION("images with the wrong number of dimensions") {
    write_gz(dir.file("train-images-idx3-ubyte.gz"), idx_bytes({4, 4}, iota_bytes(16)));
    write_gz(dir.file("train-labels-idx1-ubyte.gz"), idx_bytes({4}, {0, 1, 2, 3}));
    expect_error([&] { load_fashion_mnist(dir.str(), "train"); }, ErrorCode::Corrupt,
                 {dir.file("train-images-idx3-ubyte.gz"), "expected 3"});
  }
  SECTION("labels with the wrong number of dimensions") {
    write_gz(dir.file("train-images-idx3-ubyte.gz"), idx_bytes({4, 1, 1}, iota_bytes(4)));
    write_gz(dir.file("train-labels-idx1-ubyte.gz"), idx_bytes({2, 2}, {0, 1, 2, 3}));
    expect_error([&] { load_fashion_mnist(dir.str(), "train"); }, ErrorCode::Corrupt,
                 {dir.file("train-labels-idx1-ubyte.gz"), "expected 1"});
  }
  SECTION("empty images") {
    write_gz(dir.file("train-images-idx3-ubyte.gz"), idx_bytes({2, 0, 5}, {}));
    write_gz(dir.file("train-labels-idx1-ubyte.gz"), idx_bytes({2}, {0, 1}));
    expect_error([&] { load_fashion_mnist(dir.str(), "train"); }, ErrorCode::Corrupt,
                 {dir.file("train-images-idx3-ubyte.gz"), "empty"});
  }
  SECTION("missing directory") {
    const std::string nowhere = dir.file("absent");
    expect_error([&] { load_fashion_mnist(nowhere, "train"); }, ErrorCode::Io, {nowhere, "No such file"});
  }
}

TEST_CASE("EpochSampler draws one deterministic permutation per (seed, epoch)", "[data]") {
  const std::int64_t count = 1000, gb = 100;
  EpochSampler a(count, gb, 42, 0), a2(count, gb, 42, 0), b(count, gb, 42, 1), c(count, gb, 43, 0);
  CHECK(a.batches() == 10);
  std::vector<std::int64_t> oa, oa2, ob, oc;
  for (std::int64_t i = 0; i < a.batches(); ++i) {
    for (auto v : a.shard(i, 0, 1)) oa.push_back(v);
    for (auto v : a2.shard(i, 0, 1)) oa2.push_back(v);
    for (auto v : b.shard(i, 0, 1)) ob.push_back(v);
    for (auto v : c.shard(i, 0, 1)) oc.push_back(v);
  }
  REQUIRE(oa.size() == static_cast<std::size_t>(count));
  std::vector<std::int64_t> sorted = oa;
  std::sort(sorted.begin(), sorted.end());
  for (std::int64_t i = 0; i < count; ++i) REQUIRE(sorted[i] == i);  // a permutation
  CHECK(oa == oa2);
  CHECK(oa != ob);
  CHECK(oa != oc);
  std::int64_t fixed = 0;
  for (std::int64_t i = 0; i < count; ++i) fixed += oa[i] == i;
  CHECK(fixed < 10);  // shuffled, not the identity

  // The order is pinned: resumed jobs and other platforms must see the very same sequence.
  // (mt19937_64 output is fixed by the standard; the shuffle and its bounded draws are ours.)
  CHECK(EpochSampler(10, 10, 1234, 5).shard(0, 0, 1) == std::vector<std::int64_t>{9, 1, 8, 7, 6, 0, 5, 4, 2, 3});
  const auto first = EpochSampler(60000, 256, 0, 0).shard(0, 0, 1);
  CHECK(std::vector<std::int64_t>(first.begin(), first.begin() + 8) ==
        std::vector<std::int64_t>{25113, 17805, 17602, 54376, 16688, 35178, 48368, 26542});
  // remainder dropped
  CHECK(EpochSampler(1050, 100, 1, 0).batches() == 10);
  CHECK(EpochSampler(99, 100, 1, 0).batches() == 0);
  CHECK(EpochSampler(0, 1, 1, 0).batches() == 0);
  expect_error([] { EpochSampler(10, 0, 1, 0); }, ErrorCode::InvalidArgument, {"global_batch"});
  expect_error([] { EpochSampler(-1, 4, 1, 0); }, ErrorCode::InvalidArgument, {"count"});
  expect_error([&] { a.shard(10, 0, 1); }, ErrorCode::InvalidArgument, {"batch 10"});
  expect_error([&] { a.shard(0, 3, 3); }, ErrorCode::InvalidArgument, {"rank 3"});
  expect_error([&] { a.shard(0, 0, 0); }, ErrorCode::InvalidArgument, {"world_size"});
}

TEST_CASE("EpochSampler permutations are uniform", "[data]") {
  // All 24 orders of 4 elements over 24000 epochs: each expected 1000 times.
  std::map<std::vector<std::int64_t>, int> freq;
  for (std::uint64_t epoch = 0; epoch < 24000; ++epoch) ++freq[EpochSampler(4, 4, 7, epoch).shard(0, 0, 1)];
  CHECK(freq.size() == 24);
  double chi2 = 0;
  for (const auto& kv : freq) chi2 += (kv.second - 1000.0) * (kv.second - 1000.0) / 1000.0;
  CAPTURE(chi2);
  CHECK(chi2 < 60);  // 23 degrees of freedom: p ~ 4e-5 of a false alarm
}

TEST_CASE("shards of a global batch cover it exactly, whatever the world size", "[data]") {
  const std::int64_t count = 1000;
  for (std::int64_t gb : {64, 100, 7, 3}) {
    EpochSampler s(count, gb, 2024, 3);
    EpochSampler whole(count, gb, 2024, 3);
    for (int world : {1, 2, 3, 4, 5, 8}) {
      for (std::int64_t b : {std::int64_t(0), std::int64_t(1), s.batches() - 1}) {
        const auto global = whole.shard(b, 0, 1);
        REQUIRE(global.size() == static_cast<std::size_t>(gb));
        std::vector<std::int64_t> joined;
        std::size_t min_len = SIZE_MAX, max_len = 0, prev_len = SIZE_MAX;
        for (int r = 0; r < world; ++r) {
          const auto part = s.shard(b, r, world);
          std::int64_t begin, length;
          EpochSampler::shard_range(gb, r, world, begin, length);
          REQUIRE(part.size() == static_cast<std::size_t>(length));
          REQUIRE(static_cast<std::int64_t>(joined.size()) == begin);  // contiguous, in rank order
          min_len = std::min(min_len, part.size());
          max_len = std::max(max_len, part.size());
          REQUIRE(part.size() <= prev_len);  // earlier ranks take the extra examples
          prev_len = part.size();
          joined.insert(joined.end(), part.begin(), part.end());
        }
        INFO("global batch " << gb << " world " << world << " batch " << b);
        CHECK(joined == global);  // same elements, same order, so disjoint and complete
        CHECK(max_len - min_len <= 1);
        std::set<std::int64_t> uniq(joined.begin(), joined.end());
        CHECK(uniq.size() == joined.size());
      }
    }
  }
  std::int64_t begin = -1, length = -1;
  EpochSampler::shard_range(10, 0, 4, begin, length);
  CHECK((begin == 0 && length == 3));
  EpochSampler::shard_range(10, 1, 4, begin, length);
  CHECK((begin == 3 && length == 3));
  EpochSampler::shard_range(10, 2, 4, begin, length);
  CHECK((begin == 6 && length == 2));
  EpochSampler::shard_range(10, 3, 4, begin, length);
  CHECK((begin == 8 && length == 2));
  EpochSampler::shard_range(2, 3, 4, begin, length);
  CHECK((begin == 2 && length == 0));
}

TEST_CASE("flip_example flips about half, per (seed, epoch, index)", "[data]") {
  const int n = 100000;
  int flips = 0, same_next_epoch = 0;
  for (int i = 0; i < n; ++i) {
    const bool f = flip_example(9, 1, i);
    flips += f;
    same_next_epoch += f == flip_example(9, 2, i);
    REQUIRE(f == flip_example(9, 1, i));
  }
  CHECK(flips > n * 0.49);
  CHECK(flips < n * 0.51);
  CHECK(same_next_epoch > n * 0.49);  // epochs decorrelated
  CHECK(same_next_epoch < n * 0.51);
  int differ_by_seed = 0;
  for (int i = 0; i < 1000; ++i) differ_by_seed += flip_example(9, 1, i) != flip_example(10, 1, i);
  CHECK(differ_by_seed > 400);
  CHECK(differ_by_seed < 600);
  // pinned, like the sampler's order
  std::string bits;
  for (int i = 0; i < 16; ++i) bits += flip_example(0, 0, i) ? '1' : '0';
  CHECK(bits == "1001101001110010");
}

TEST_CASE("gather_batch copies, labels and mirrors", "[data]") {
  ImageDataset ds;
  ds.count = 40;
  ds.height = 3;
  ds.width = 4;
  for (int i = 0; i < 40; ++i) {
    for (int k = 0; k < 12; ++k) ds.pixels.push_back(i * 100.0f + k);
    ds.labels.push_back(i % 10);
  }
  const std::vector<std::int64_t> idx = {5, 0, 39, 5, 17, 22, 8, 31, 12, 3, 27, 14};
  const std::uint64_t seed = 77, epoch = 4;
  std::vector<float> out(idx.size() * 12, NAN);
  std::vector<std::int32_t> lab(idx.size(), -1);

  gather_batch(ds, idx, false, seed, epoch, out.data(), lab.data());
  for (std::size_t k = 0; k < idx.size(); ++k) {
    CHECK(lab[k] == idx[k] % 10);
    for (int p = 0; p < 12; ++p) REQUIRE(out[k * 12 + p] == idx[k] * 100.0f + p);
  }

  std::fill(out.begin(), out.end(), NAN);
  std::fill(lab.begin(), lab.end(), -1);
  gather_batch(ds, idx, true, seed, epoch, out.data(), lab.data());
  int flipped = 0;
  for (std::size_t k = 0; k < idx.size(); ++k) {
    const bool flip = flip_example(seed, epoch, idx[k]);
    flipped += flip;
    CHECK(lab[k] == idx[k] % 10);
    for (int h = 0; h < 3; ++h)
      for (int w = 0; w < 4; ++w) {
        const int src_w = flip ? 3 - w : w;
        REQUIRE(out[k * 12 + h * 4 + w] == idx[k] * 100.0f + h * 4 + src_w);
      }
  }
  // the fixture must exercise both branches
  CHECK(flipped > 0);
  CHECK(flipped < static_cast<int>(idx.size()));
  // the same example repeated in the batch gets the same choice
  CHECK(std::equal(out.begin(), out.begin() + 12, out.begin() + 3 * 12));

  expect_error([&] { gather_batch(ds, {40}, false, 0, 0, out.data(), lab.data()); }, ErrorCode::InvalidArgument,
               {"index 40"});
  expect_error([&] { gather_batch(ds, {-1}, false, 0, 0, out.data(), lab.data()); }, ErrorCode::InvalidArgument,
               {"index -1"});
  CHECK_NOTHROW(gather_batch(ds, {}, true, 0, 0, nullptr, nullptr));
}

TEST_CASE("the real Fashion-MNIST, when installed", "[data]") {
  CHECK(std::string(default_fashion_mnist_dir()) == "/usr/share/datasets/fashion-mnist");
  const std::string dir = DSTRAIN_TEST_DATA_DIR;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    WARN("Fashion-MNIST not found at " << dir << ": real-data checks skipped");
    SUCCEED();
    return;
  }
  for (const auto& [split, count] : {std::make_pair(std::string("train"), 60000), std::make_pair(std::string("t10k"), 10000)}) {
    const ImageDataset ds = load_fashion_mnist(dir, split);
    INFO(split);
    CHECK(ds.count == count);
    CHECK(ds.height == 28);
    CHECK(ds.width == 28);
    CHECK(ds.pixels.size() == static_cast<std::size_t>(count) * 28 * 28);
    std::array<int, 10> hist{};
    for (std::int32_t l : ds.labels) ++hist[static_cast<std::size_t>(l)];
    for (int c = 0; c < 10; ++c) CHECK(hist[c] == count / 10);
    // the normalisation constants are the dataset's own mean and standard deviation
    double sum = 0, sq = 0;
    for (float p : ds.pixels) {
      const double raw = p * kFashionMnistStd + kFashionMnistMean;
      sum += raw;
      sq += raw * raw;
    }
    const double mean = sum / ds.pixels.size();
    const double sd = std::sqrt(sq / ds.pixels.size() - mean * mean);
    CHECK(mean == Approx(kFashionMnistMean).margin(0.002));
    CHECK(sd == Approx(kFashionMnistStd).margin(0.002));
  }
  const ImageDataset few = load_fashion_mnist(dir, "t10k", 100);
  CHECK(few.count == 100);
  CHECK(few.labels.size() == 100u);
}
