// On a GPU machine: live topology discovery (NVML) agrees with CUDA and with the machine's own
// `nvidia-smi topo -m`; binding to the GPU's NUMA-local cores; DataParallel buckets on the comm
// stream (one process: NCCL with one rank, so each bucket is a copy, and bf16 compression a
// rounding the test can predict exactly).
#include <catch2/catch.hpp>
#include <cuda_runtime.h>
#include <sched.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "dstrain/dstrain.h"
#include "dstrain/topology.h"

using namespace dstrain;

namespace {

std::string lower_bus_id(int device) {
  char buf[64] = {};
  REQUIRE(cudaDeviceGetPCIBusId(buf, sizeof buf, device) == cudaSuccess);
  std::string s = buf;
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::set<int> allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  REQUIRE(sched_getaffinity(0, sizeof set, &set) == 0);
  std::set<int> out;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) out.insert(c);
  return out;
}

class ParamBag final : public nn::Layer {
 public:
  ParamBag(const std::vector<std::int64_t>& sizes, Device device) {
    for (std::size_t k = 0; k < sizes.size(); ++k) {
      params_.push_back(std::make_unique<nn::Parameter>());
      params_.back()->name = "p" + std::to_string(k);
      params_.back()->value = Tensor::zeros({sizes[k]}, DType::F32, device);
    }
  }
  const Tensor& forward(Context&, const Tensor& x, bool) override { return x; }
  const Tensor& backward(Context&, const Tensor& dy) override { return dy; }
  std::vector<nn::Parameter*> parameters() override {
    std::vector<nn::Parameter*> out;
    for (auto& p : params_) out.push_back(p.get());
    return out;
  }
  std::string name() const override { return "ParamBag"; }

 private:
  std::vector<std::unique_ptr<nn::Parameter>> params_;
};

}  // namespace

TEST_CASE("live topology matches CUDA and nvidia-smi", "[gpu][topology]") {
  int count = 0;
  REQUIRE(cudaGetDeviceCount(&count) == cudaSuccess);
  const Topology t = discover_topology();
  INFO(t.describe());
  REQUIRE(t.gpu_count() == count);
  CHECK(t.node_count() == 1);
  CHECK(t.source() == "nvml");  // libnvidia-ml.so.1 ships with the driver
  for (int i = 0; i < count; ++i) {
    CHECK(t.link(i, i).kind == LinkKind::Self);
    CHECK(t.gpu(i).pci_bus_id == lower_bus_id(i));
    CHECK_FALSE(t.gpu(i).cpu_affinity.empty());
    for (int j = 0; j < count; ++j)
      if (i != j) CHECK(t.link(i, j).gbps > 0.0);
  }
  const Plan plan = make_plan(t, CostModel());
  CHECK(static_cast<int>(plan.ring.size()) == count);
  INFO(plan.describe());

  // The machine's own nvidia-smi, when it shows the same GPUs (no CUDA_VISIBLE_DEVICES subset).
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  if (visible && *visible) return;
  Topology smi;
  try {
    smi = topology_from_nvidia_smi();
  } catch (const Error& e) {
    // Output that does not parse is a parser bug; only a missing or failing command is skipped.
    if (e.code() == ErrorCode::InvalidArgument) FAIL("nvidia-smi topo -m output did not parse: " << e.what());
    WARN("nvidia-smi not usable, cross-check skipped: " << e.what());
    return;
  }
  INFO(smi.describe());
  REQUIRE(smi.gpu_count() == count);
  CHECK(smi.has_nvswitch(0) == t.has_nvswitch(0));
  for (int i = 0; i < count; ++i) {
    CHECK(parse_cpu_list(smi.gpu(i).cpu_affinity) == parse_cpu_list(t.gpu(i).cpu_affinity));
    CHECK(smi.gpu(i).numa_node == t.gpu(i).numa_node);
    for (int j = 0; j < count; ++j) {
      INFO("GPU" << i << "-GPU" << j);
      CHECK(smi.link(i, j).kind == t.link(i, j).kind);
      CHECK(smi.link(i, j).nvlinks == t.link(i, j).nvlinks);
    }
  }
}

TEST_CASE("binding to the GPU's NUMA-local cores", "[gpu][topology]") {
  cpu_set_t before;
  CPU_ZERO(&before);
  REQUIRE(sched_getaffinity(0, sizeof before, &before) == 0);
  const std::set<int> was = allowed_cpus();
  std::ifstream in("/sys/bus/pci/devices/" + lower_bus_id(0) + "/local_cpulist");
  std::string list;
  REQUIRE(std::getline(in, list));
  const std::vector<int> local = parse_cpu_list(list);
  REQUIRE_FALSE(local.empty());

  const bool bound = bind_to_gpu_numa_cores(0);
  const std::set<int> now = allowed_cpus();
  std::set<int> expected;
  for (int c : local)
    if (was.count(c)) expected.insert(c);
  if (expected.empty()) {
    CHECK_FALSE(bound);  // none of the local cores allowed: left as it was
    CHECK(now == was);
  } else {
    CHECK(bound);
    CHECK(now == expected);
  }
  REQUIRE(sched_setaffinity(0, sizeof before, &before) == 0);

  ::setenv("DSTRAIN_BIND_CPU", "0", 1);
  CHECK_FALSE(bind_to_gpu_numa_cores(0));
  ::unsetenv("DSTRAIN_BIND_CPU");
  CHECK(allowed_cpus() == was);
}

TEST_CASE("DataParallel buckets on the comm stream are ordered with the compute stream", "[gpu][buckets]") {
  int argc = 0;
  char** argv = nullptr;
  RuntimeOptions ro;
  ro.device = DevicePreference::Cuda;
  Runtime rt = Runtime::init(argc, argv, ro);
  REQUIRE(rt.device().is_cuda());
  REQUIRE(rt.world_size() == 1);
  Context& ctx = rt.context();
  for (GradCompression compression : {GradCompression::None, GradCompression::Bf16}) {
    INFO("compression " << static_cast<int>(compression));
    BucketOptions o;
    o.first_bucket_mb = 1;
    o.bucket_mb = 8;
    o.compression = compression;
    // 64 MiB of gradients: long enough copies that a missing event would let reads overtake.
    ParamBag model({4 << 20, 4 << 20, 4 << 20, 3 << 20, 1 << 20, 123457}, rt.device());
    DataParallel ddp(rt, model, o);
    REQUIRE(ddp.buckets().size() >= 4);
    std::mt19937 gen(42);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<float> host(static_cast<std::size_t>(ddp.gradient_count()));
    for (float& v : host) v = u(gen);
    Tensor src = Tensor::from_vector({ddp.gradient_count()}, host);
    Tensor out = Tensor::empty({ddp.gradient_count()}, DType::F32, Device::cpu());
    for (int step = 0; step < 3; ++step) {
      out.fill_bytes(0xFF);  // poison: NaN
      ddp.flat_gradients().fill_bytes(0xFF);
      ops::copy(ctx, src, ddp.flat_gradients());  // gradients written on the compute stream
      auto params = model.parameters();
      for (auto it = params.rbegin(); it != params.rend(); ++it) ddp.grad_ready(**it);
      ddp.finish();
      ops::copy(ctx, ddp.flat_gradients(), out);  // read on the compute stream after finish()
      ctx.synchronize();
      const float* got = out.data_as<float>();
      std::size_t wrong = 0;
      for (std::size_t i = 0; i < host.size(); ++i) {
        const float expect =
            compression == GradCompression::Bf16 ? bf16_to_float(float_to_bf16(host[i])) : host[i];
        wrong += got[i] != expect;
      }
      CHECK(wrong == 0);
      CHECK(ddp.last_issue_order().size() == ddp.buckets().size());
    }
  }
}
