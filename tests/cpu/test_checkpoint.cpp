// Checkpointer in one process: round trips of every kind of state, atomic layout, pruning,
// and refusal of damaged or foreign checkpoints.
#include <dstrain/checkpoint.h>
#include <dstrain/error.h>
#include <dstrain/models.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

namespace fs = std::filesystem;
using dstrain::Checkpointer;
using dstrain::CheckpointOptions;
using dstrain::Device;
using dstrain::DType;
using dstrain::ErrorCode;
using dstrain::OnWorldSizeChange;
using dstrain::Tensor;
using dstrain::TrainProgress;

namespace {

dstrain::Runtime& runtime() {
  static dstrain::Runtime rt = [] {
    int argc = 1;
    char name[] = "test";
    char* args[] = {name, nullptr};
    char** argv = args;
    dstrain::RuntimeOptions o;
    o.device = dstrain::DevicePreference::Cpu;
    return dstrain::Runtime::init(argc, argv, o);
  }();
  return rt;
}

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("dstrain-ckpt-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

Tensor random_tensor(const dstrain::Shape& shape, std::mt19937& rng) {
  std::uniform_real_distribution<float> d(-3.0f, 3.0f);
  std::vector<float> v(static_cast<std::size_t>(dstrain::shape_numel(shape)));
  for (float& x : v) x = d(rng);
  return Tensor::from_vector(shape, v);
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

// The state a test saves: two replicated tensors, a per-rank one, a blob.
struct State {
  Tensor weights, momentum, running;
  std::vector<char> blob;
  explicit State(std::uint32_t seed) {
    std::mt19937 rng(seed);
    weights = random_tensor({3, 5, 7}, rng);
    momentum = random_tensor({11}, rng);
    running = random_tensor({4}, rng);
    blob.resize(13);
    for (char& c : blob) c = static_cast<char>(rng());
  }
  void attach(Checkpointer& c) {
    c.add_replicated("weights", weights);
    c.add_replicated("momentum", momentum);
    c.add_per_rank("running", running, OnWorldSizeChange::TakeRankZero);
    c.add_blob("scaler", [this] { return blob; }, [this](const std::vector<char>& b) { blob = b; });
  }
};

CheckpointOptions options_for(const fs::path& dir, int keep = 3) {
  CheckpointOptions o;
  o.dir = dir.string();
  o.keep = keep;
  o.every_steps = 0;
  o.every_minutes = 0;
  return o;
}

void save_state(const fs::path& dir, std::uint32_t seed, std::int64_t step, int keep = 3) {
  State s(seed);
  Checkpointer c(runtime(), options_for(dir, keep), "test model");
  s.attach(c);
  c.save({step, step / 10, step % 10});
  c.wait();
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_text(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}

// Rewrites a manifest body and appends a valid manifest_crc line: a well-formed manifest that
// says something else.
std::string with_valid_crc(const std::string& manifest_body) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%08x", dstrain::crc32c(manifest_body.data(), manifest_body.size()));
  return manifest_body + "manifest_crc " + buf + "\n";
}

std::string manifest_body(const fs::path& ckpt) {
  const std::string text = read_text(ckpt / "MANIFEST");
  return text.substr(0, text.rfind("manifest_crc "));
}

std::string error_of(const std::function<void()>& f, ErrorCode& code) {
  try {
    f();
  } catch (const dstrain::Error& e) {
    code = e.code();
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("crc32c matches the standard check value", "[checkpoint]") {
  const char* check = "123456789";
  CHECK(dstrain::crc32c(check, 9) == 0xE3069283u);
  // Continuing a CRC over two pieces equals one pass.
  CHECK(dstrain::crc32c(check + 4, 5, dstrain::crc32c(check, 4)) == 0xE3069283u);
  CHECK(dstrain::crc32c(check, 0) == 0u);
}

TEST_CASE("a checkpoint round-trips every kind of state bit for bit", "[checkpoint]") {
  TempDir dir;
  State saved(1);
  Checkpointer writer(runtime(), options_for(dir.path), "test model");
  saved.attach(writer);
  writer.set_metadata({{"batch", "256"}});
  writer.save({1234, 5, 67});
  writer.wait();
  REQUIRE(writer.list().size() == 1);
  CHECK(fs::path(writer.list()[0]).filename() == "step-000000001234");
  CHECK(writer.last_save_stats().bytes > 0);

  State loaded(2);  // different values: the restore must overwrite every one
  REQUIRE_FALSE(same_bytes(saved.weights, loaded.weights));
  Checkpointer reader(runtime(), options_for(dir.path), "test model");
  loaded.attach(reader);
  reader.set_metadata({{"batch", "256"}});
  const auto p = reader.restore_latest();
  REQUIRE(p.has_value());
  CHECK(p->step == 1234);
  CHECK(p->epoch == 5);
  CHECK(p->step_in_epoch == 67);
  CHECK(same_bytes(saved.weights, loaded.weights));
  CHECK(same_bytes(saved.momentum, loaded.momentum));
  CHECK(same_bytes(saved.running, loaded.running));
  CHECK(saved.blob == loaded.blob);
}

TEST_CASE("a model with optimizer round-trips, and an empty folder restores nothing", "[checkpoint]") {
  TempDir dir;
  auto model = dstrain::models::small_cnn(Device::cpu(), 10, 1);
  dstrain::nn::init_parameters(*model, 7);
  dstrain::optim::SgdOptions so;
  so.momentum = 0.9f;
  dstrain::optim::SGD opt(model->parameters(), so);
  std::mt19937 rng(3);
  for (Tensor& m : opt.momentum_buffers()) m.copy_from(random_tensor(m.shape(), rng));
  {
    Checkpointer c(runtime(), options_for(dir.path), "cnn");
    c.add_model(*model);
    c.add_optimizer(opt);
    CHECK_FALSE(c.restore_latest().has_value());
    c.save({10, 0, 10});
  }  // the destructor waits for the write
  auto other = dstrain::models::small_cnn(Device::cpu(), 10, 1);
  dstrain::nn::init_parameters(*other, 8);
  dstrain::optim::SGD other_opt(other->parameters(), so);
  Checkpointer c(runtime(), options_for(dir.path), "cnn");
  c.add_model(*other);
  c.add_optimizer(other_opt);
  REQUIRE(c.restore_latest().has_value());
  CHECK(dstrain::nn::parameter_hash(*model) == dstrain::nn::parameter_hash(*other));
  for (std::size_t i = 0; i < opt.momentum_buffers().size(); ++i)
    CHECK(same_bytes(opt.momentum_buffers()[i], other_opt.momentum_buffers()[i]));
  const auto b1 = model->buffers(), b2 = other->buffers();
  for (std::size_t i = 0; i < b1.size(); ++i) CHECK(same_bytes(*b1[i], *b2[i]));
}

TEST_CASE("only the newest K checkpoints are kept, and leftovers of a killed save are ignored", "[checkpoint]") {
  TempDir dir;
  for (int step = 1; step <= 5; ++step) save_state(dir.path, static_cast<std::uint32_t>(step), step, 2);
  fs::create_directories(dir.path / ".tmp-step-000000000009");  // a save killed before its rename
  write_text(dir.path / ".tmp-step-000000000009" / "state.bin", "partial");
  State s(0);
  Checkpointer c(runtime(), options_for(dir.path, 2), "test model");
  s.attach(c);
  const auto all = c.list();
  REQUIRE(all.size() == 2);
  CHECK(fs::path(all[0]).filename() == "step-000000000005");
  CHECK(fs::path(all[1]).filename() == "step-000000000004");
  const auto p = c.restore_latest();
  REQUIRE(p.has_value());
  CHECK(p->step == 5);
  CHECK(same_bytes(s.weights, State(5).weights));
}

TEST_CASE("damaged checkpoints are refused with the file and the reason", "[checkpoint]") {
  TempDir dir;
  save_state(dir.path, 1, 1);
  save_state(dir.path, 2, 2);
  const fs::path newest = dir.path / "step-000000000002";
  const fs::path state = newest / "state.bin";
  const std::string good_state = read_text(state);
  const std::string good_manifest = read_text(newest / "MANIFEST");

  auto restore_newest = [&](ErrorCode& code) {
    return error_of(
        [&] {
          State s(0);
          Checkpointer c(runtime(), options_for(dir.path), "test model");
          s.attach(c);
          c.restore(newest.string());
        },
        code);
  };
  ErrorCode code = ErrorCode::Internal;

  SECTION("truncated state file") {
    write_text(state, good_state.substr(0, good_state.size() - 100));
    const std::string msg = restore_newest(code);
    CHECK(code == ErrorCode::Corrupt);
    CHECK(msg.find(state.string()) != std::string::npos);
    CHECK(msg.find("truncated") != std::string::npos);
  }
  SECTION("one flipped byte in the state file") {
    std::string bad = good_state;
    bad[bad.size() / 2] ^= 0x10;
    write_text(state, bad);
    const std::string msg = restore_newest(code);
    CHECK(code == ErrorCode::Corrupt);
    CHECK(msg.find(state.string()) != std::string::npos);
    CHECK(msg.find("checksum") != std::string::npos);
  }
  SECTION("one flipped byte in the manifest") {
    std::string bad = good_manifest;
    bad[good_manifest.find("step ") + 5] ^= 0x01;
    write_text(newest / "MANIFEST", bad);
    const std::string msg = restore_newest(code);
    CHECK(code == ErrorCode::Corrupt);
    CHECK(msg.find("MANIFEST") != std::string::npos);
  }
  SECTION("a missing manifest") {
    fs::remove(newest / "MANIFEST");
    const std::string msg = restore_newest(code);
    CHECK(code == ErrorCode::Io);
    CHECK(msg.find(newest.string()) != std::string::npos);
  }
  SECTION("a wrong format version") {
    std::string body = manifest_body(newest);
    body.replace(body.find("dstrain-checkpoint 1"), 20, "dstrain-checkpoint 9");
    write_text(newest / "MANIFEST", with_valid_crc(body));
    const std::string msg = restore_newest(code);
    CHECK(code == ErrorCode::Unsupported);
    CHECK(msg.find("format version 9") != std::string::npos);
    CHECK(msg.find("MANIFEST") != std::string::npos);
  }
  SECTION("the newest is damaged: restore_latest takes the previous one") {
    std::string bad = good_state;
    bad[bad.size() - 1] ^= 0x80;
    write_text(state, bad);
    State s(0);
    Checkpointer c(runtime(), options_for(dir.path), "test model");
    s.attach(c);
    const auto p = c.restore_latest();
    REQUIRE(p.has_value());
    CHECK(p->step == 1);
    CHECK(same_bytes(s.weights, State(1).weights));
  }
  SECTION("every checkpoint damaged: restore_latest fails listing them") {
    write_text(state, good_state.substr(0, 10));
    write_text(dir.path / "step-000000000001" / "state.bin", "x");
    State s(0);
    Checkpointer c(runtime(), options_for(dir.path), "test model");
    s.attach(c);
    const std::string msg = error_of([&] { c.restore_latest(); }, code);
    CHECK(msg.find("no valid checkpoint") != std::string::npos);
    CHECK(msg.find("step-000000000001") != std::string::npos);
    CHECK(msg.find("step-000000000002") != std::string::npos);
  }
}

TEST_CASE("a checkpoint of another model or other settings is refused", "[checkpoint]") {
  TempDir dir;
  save_state(dir.path, 1, 1);
  ErrorCode code = ErrorCode::Internal;

  SECTION("another model description") {
    State s(0);
    Checkpointer c(runtime(), options_for(dir.path), "another model");
    s.attach(c);
    const std::string msg = error_of([&] { c.restore_latest(); }, code);
    CHECK(code == ErrorCode::InvalidArgument);
    CHECK(msg.find("another model") != std::string::npos);
    CHECK(msg.find("step-000000000001") != std::string::npos);
  }
  SECTION("an entry of another shape") {
    State s(0);
    std::mt19937 rng(1);
    s.weights = random_tensor({3, 5, 8}, rng);
    Checkpointer c(runtime(), options_for(dir.path), "test model");
    s.attach(c);
    const std::string msg = error_of([&] { c.restore_latest(); }, code);
    CHECK(code == ErrorCode::InvalidArgument);
    CHECK(msg.find("'weights'") != std::string::npos);
    CHECK(msg.find("[3,5,7]") != std::string::npos);
  }
  SECTION("an entry the checkpoint lacks") {
    State s(0);
    Tensor extra = Tensor::zeros({2}, DType::F32, Device::cpu());
    Checkpointer c(runtime(), options_for(dir.path), "test model");
    s.attach(c);
    c.add_replicated("extra", extra);
    const std::string msg = error_of([&] { c.restore_latest(); }, code);
    CHECK(msg.find("'extra'") != std::string::npos);
  }
  SECTION("different metadata") {
    State s(0);
    Checkpointer c(runtime(), options_for(dir.path), "test model");
    s.attach(c);
    c.set_metadata({{"batch", "512"}});
    const std::string msg = error_of([&] { c.restore_latest(); }, code);
    CHECK(code == ErrorCode::InvalidArgument);
    CHECK(msg.find("batch") != std::string::npos);
    CHECK(msg.find("512") != std::string::npos);
  }
}

TEST_CASE("per-rank state that cannot move to another world size is refused", "[checkpoint]") {
  TempDir dir;
  Tensor accumulator = Tensor::from_vector({2}, {1.0f, 2.0f});
  {
    Checkpointer c(runtime(), options_for(dir.path), "m");
    c.add_per_rank("acc", accumulator, OnWorldSizeChange::Refuse);
    c.save({3, 0, 3});
  }
  // Make the checkpoint say it was written by 2 ranks (manifest and state header agree).
  const fs::path ck = dir.path / "step-000000000003";
  std::string body = manifest_body(ck);
  body.replace(body.find("world_size 1"), 12, "world_size 2");
  std::string state = read_text(ck / "state.bin");
  const std::uint32_t two = 2;
  std::memcpy(&state[12], &two, sizeof(two));  // FileHeader::world_size
  char crc[16];
  std::snprintf(crc, sizeof(crc), "%08x", dstrain::crc32c(state.data(), state.size()));
  const auto file_line = body.find("file state.bin");
  body = body.substr(0, file_line) + "file state.bin " + std::to_string(state.size()) + " " + crc + "\n";
  write_text(ck / "state.bin", state);
  write_text(ck / "MANIFEST", with_valid_crc(body));

  Checkpointer c(runtime(), options_for(dir.path), "m");
  c.add_per_rank("acc", accumulator, OnWorldSizeChange::Refuse);
  ErrorCode code = ErrorCode::Internal;
  const std::string msg = error_of([&] { c.restore_latest(); }, code);
  CHECK(code == ErrorCode::InvalidArgument);
  CHECK(msg.find("2 ranks") != std::string::npos);
  CHECK(msg.find("'acc'") != std::string::npos);
}

TEST_CASE("due() follows the step interval", "[checkpoint]") {
  TempDir dir;
  CheckpointOptions o = options_for(dir.path);
  o.every_steps = 4;
  Checkpointer c(runtime(), o, "m");
  CHECK_FALSE(c.due(0));
  CHECK_FALSE(c.due(3));
  CHECK(c.due(4));
  CHECK(c.due(8));
  CHECK_FALSE(c.due(9));
}
