// checkpoint_bench: what a checkpoint of a ResNet-50-sized training state costs.
//   For 25.6M fp32 parameters plus their momentum (161 tensors each, on the GPU when there is one):
//   the time the training loop is blocked per save, the background write throughput against a
//   plain `dd ... conv=fsync` of the same size to the same folder, and the load time.
// The first save is restored into fresh tensors and compared byte for byte before anything is timed.
#include <dstrain/dstrain.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace {

struct Options {
  double params = 25.6e6;
  int tensors = 161;
  int iters = 5;
  int warmup = 1;
  std::string dir = "checkpoint_bench.tmp";
  std::string device = "auto";
  std::string json;
  bool dd = true;
};

const char* kUsage =
    "usage: checkpoint_bench [options]\n"
    "Times checkpoints of a training state of P fp32 parameters plus momentum (ResNet-50: 25.6M).\n"
    "  --params P     parameter count (default 25.6e6)\n"
    "  --tensors T    split into T tensors (default 161, as ResNet-50)\n"
    "  -n N           timed saves (default 5)\n"
    "  -w N           warm-up saves (default 1)\n"
    "  --dir D        folder to write (default ./checkpoint_bench.tmp; removed at the end)\n"
    "  --device D     cpu, cuda or auto (default auto)\n"
    "  --no-dd        skip the dd comparison\n"
    "  --json FILE    also write the figures as JSON\n"
    "  --help         this text\n";

double median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

bool parse(int argc, char** argv, Options& o, bool& help) {
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--help" || f == "-h") {
      help = true;
      return true;
    }
    if (f == "--no-dd") {
      o.dd = false;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "checkpoint_bench: missing value after %s\n", f.c_str());
      return false;
    }
    const char* v = argv[++i];
    char* end = nullptr;
    const double x = std::strtod(v, &end);
    const bool numeric = end != v && *end == '\0';
    if (f == "--params" && numeric && x >= 1) {
      o.params = x;
    } else if (f == "--tensors" && numeric && x >= 1) {
      o.tensors = static_cast<int>(x);
    } else if (f == "-n" && numeric && x >= 1) {
      o.iters = static_cast<int>(x);
    } else if (f == "-w" && numeric && x >= 0) {
      o.warmup = static_cast<int>(x);
    } else if (f == "--dir") {
      o.dir = v;
    } else if (f == "--device") {
      o.device = v;
    } else if (f == "--json") {
      o.json = v;
    } else {
      std::fprintf(stderr, "checkpoint_bench: bad option %s %s\n%s", f.c_str(), v, kUsage);
      return false;
    }
  }
  return true;
}

// `dd if=/dev/zero of=<dir>/dd.tmp bs=8M count=<n> conv=fsync`, timed from here.
double time_dd(const std::string& dir, std::uint64_t bytes) {
  const std::uint64_t block = 8ull << 20;
  const std::uint64_t count = (bytes + block - 1) / block;
  const std::string path = dir + "/dd.tmp";
  const std::string cmd = "dd if=/dev/zero of='" + path + "' bs=8M count=" + std::to_string(count) +
                          " conv=fsync status=none";
  const auto t0 = std::chrono::steady_clock::now();
  const int rc = std::system(cmd.c_str());
  const double s = seconds_since(t0);
  std::filesystem::remove(path);
  if (rc != 0) return NAN;
  return s * static_cast<double>(bytes) / static_cast<double>(count * block);  // same byte count
}

int run(int argc, char** argv) {
  Options o;
  bool help = false;
  if (!parse(argc, argv, o, help)) return 2;
  if (help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  dstrain::RuntimeOptions ropt;
  ropt.device = dstrain::parse_device_preference(o.device);
  dstrain::Runtime rt = dstrain::Runtime::init(argc, argv, ropt);
  const dstrain::Device dev = rt.device();
  std::filesystem::remove_all(o.dir);

  // The state: parameters and momentum, random, on the run's device.
  const auto total = static_cast<std::int64_t>(o.params);
  std::vector<dstrain::Tensor> params, momentum, loaded_params, loaded_momentum;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (int i = 0; i < o.tensors; ++i) {
    const std::int64_t n = total / o.tensors + (i < total % o.tensors ? 1 : 0);
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = dist(rng);
    params.push_back(dstrain::Tensor::from_vector({n}, v).to(dev));
    for (auto& x : v) x = dist(rng);
    momentum.push_back(dstrain::Tensor::from_vector({n}, v).to(dev));
    loaded_params.push_back(dstrain::Tensor::zeros({n}, dstrain::DType::F32, dev));
    loaded_momentum.push_back(dstrain::Tensor::zeros({n}, dstrain::DType::F32, dev));
  }
  dstrain::CheckpointOptions co;
  co.dir = o.dir;
  co.keep = 2;
  co.every_minutes = 0;
  dstrain::Checkpointer ckpt(rt, co, "checkpoint_bench");
  dstrain::Checkpointer reader(rt, co, "checkpoint_bench");
  for (int i = 0; i < o.tensors; ++i) {
    ckpt.add_replicated("param." + std::to_string(i), params[static_cast<std::size_t>(i)]);
    ckpt.add_replicated("momentum." + std::to_string(i), momentum[static_cast<std::size_t>(i)]);
    reader.add_replicated("param." + std::to_string(i), loaded_params[static_cast<std::size_t>(i)]);
    reader.add_replicated("momentum." + std::to_string(i), loaded_momentum[static_cast<std::size_t>(i)]);
  }

  std::printf("# checkpoint_bench dstrain %s\n# %s\n# state: %lld parameters + momentum in %d tensors each, "
              "fp32, folder %s\n",
              DSTRAIN_VERSION_STRING, rt.describe().c_str(), static_cast<long long>(total), o.tensors,
              o.dir.c_str());

  // Check first: save, restore into other tensors, compare.
  ckpt.save({1, 0, 1});
  ckpt.wait();
  if (!reader.restore_latest()) {
    std::fprintf(stderr, "checkpoint_bench: the checkpoint just written was not found\n");
    return 1;
  }
  for (int i = 0; i < o.tensors; ++i) {
    const auto a = params[static_cast<std::size_t>(i)].to(dstrain::Device::cpu());
    const auto b = loaded_params[static_cast<std::size_t>(i)].to(dstrain::Device::cpu());
    const auto c = momentum[static_cast<std::size_t>(i)].to(dstrain::Device::cpu());
    const auto d = loaded_momentum[static_cast<std::size_t>(i)].to(dstrain::Device::cpu());
    if (std::memcmp(a.data(), b.data(), a.nbytes()) != 0 || std::memcmp(c.data(), d.data(), c.nbytes()) != 0) {
      std::fprintf(stderr, "checkpoint_bench: restored tensor %d differs from the saved one\n", i);
      return 1;
    }
  }
  std::printf("# check: restored state identical to the saved one\n");

  std::vector<double> blocked_ms, write_s, load_s, dd_s;
  std::uint64_t bytes = 0;
  for (int i = 0; i < o.warmup + o.iters; ++i) {
    ckpt.save({2 + i, 0, 2 + i});
    const double blocked = ckpt.last_save_stats().blocked_ms;
    ckpt.wait();
    const dstrain::SaveStats& st = ckpt.last_save_stats();
    bytes = st.bytes;
    const auto t0 = std::chrono::steady_clock::now();
    reader.restore_latest();
    const double load = seconds_since(t0);
    if (i < o.warmup) continue;
    blocked_ms.push_back(blocked);
    write_s.push_back(st.write_s);
    load_s.push_back(load);
    if (o.dd && rt.is_root()) dd_s.push_back(time_dd(o.dir, bytes));
  }
  const double gb = static_cast<double>(bytes) / 1e9;
  const double ours = gb / median(write_s);
  const double dd = o.dd ? gb / median(dd_s) : NAN;
  std::printf("%12s %12s %14s %14s %14s %10s %10s\n", "bytes", "blocked(ms)", "write(GB/s)", "dd(GB/s)",
              "write/dd", "load(s)", "load(GB/s)");
  std::printf("%12llu %12.2f %14.3f %14.3f %14.3f %10.3f %10.3f\n", static_cast<unsigned long long>(bytes),
              median(blocked_ms), ours, dd, ours / dd, median(load_s), gb / median(load_s));
  std::printf("# medians of %d saves after %d warm-up; blocked = gather + copy into pinned memory; write = "
              "checksum + write + fsync + rename in the background\n",
              o.iters, o.warmup);
  if (!o.json.empty() && rt.is_root()) {
    if (std::FILE* f = std::fopen(o.json.c_str(), "w")) {
      std::fprintf(f,
                   "{\"bytes\": %llu, \"blocked_ms\": %.3f, \"write_GBps\": %.4f, \"dd_GBps\": %.4f, "
                   "\"load_s\": %.4f, \"device\": \"%s\"}\n",
                   static_cast<unsigned long long>(bytes), median(blocked_ms), ours, dd, median(load_s),
                   dev.str().c_str());
      std::fclose(f);
    }
  }
  std::filesystem::remove_all(o.dir);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "checkpoint_bench: %s\n", e.what());
    return 1;
  }
}
