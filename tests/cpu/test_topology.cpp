// Topology: parsing `nvidia-smi topo -m` fixtures of real machines, the ring planner, the cost
// model and algorithm choice, CPU lists and affinity.
#include <catch2/catch.hpp>
#include <sched.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "dstrain/error.h"
#include "dstrain/topology.h"

namespace fs = std::filesystem;
using namespace dstrain;
using Catch::Matchers::Contains;

namespace {

std::string fixture(const std::string& name) {
  return (fs::path(__FILE__).parent_path().parent_path() / "fixtures" / "topo" / name).string();
}

Topology load(const std::string& name) { return load_topology_file(fixture(name)); }

// Sets an environment variable for the scope of the object.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) had_ = true, old_ = old;
    if (value)
      ::setenv(name, value, 1);
    else
      ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_)
      ::setenv(name_.c_str(), old_.c_str(), 1);
    else
      ::unsetenv(name_.c_str());
  }

 private:
  std::string name_, old_;
  bool had_ = false;
};

int nvlink_total(const Topology& t, int gpu) {
  int sum = 0;
  for (int j = 0; j < t.gpu_count(); ++j)
    if (j != gpu) sum += t.link(gpu, j).nvlinks;
  return sum;
}

std::vector<LinkKind> ring_links(const Topology& t, const Plan& p) {
  std::vector<LinkKind> out;
  for (std::size_t k = 0; k < p.ring.size(); ++k) out.push_back(t.link(p.ring[k], p.ring[(k + 1) % p.ring.size()]).kind);
  return out;
}

double ring_bottleneck(const Topology& t, const std::vector<int>& ring) {
  double lo = std::numeric_limits<double>::infinity();
  for (std::size_t k = 0; k < ring.size(); ++k) lo = std::min(lo, t.link(ring[k], ring[(k + 1) % ring.size()]).gbps);
  return lo;
}

bool is_permutation_of_all(const Plan& p, int n) {
  std::set<int> s(p.ring.begin(), p.ring.end());
  return static_cast<int>(p.ring.size()) == n && static_cast<int>(s.size()) == n && *s.begin() == 0 &&
         *s.rbegin() == n - 1;
}

// The cheapest available algorithm at `bytes`, by brute force over the plan's cost model.
AllreduceAlgo cheapest(const Plan& p, std::size_t bytes) {
  AllreduceAlgo best = p.available.front();
  for (AllreduceAlgo a : p.available)
    if (p.cost.time_us(a, bytes) < p.cost.time_us(best, bytes)) best = a;
  return best;
}

void check_ranges_are_cheapest(const Plan& p) {
  REQUIRE(!p.ranges.empty());
  CHECK(p.ranges.front().min_bytes == 0);
  for (std::size_t k = 1; k < p.ranges.size(); ++k) {
    CHECK(p.ranges[k].min_bytes > p.ranges[k - 1].min_bytes);
    CHECK(p.ranges[k].algo != p.ranges[k - 1].algo);
  }
  for (std::size_t bytes = 1; bytes < (std::size_t{1} << 34); bytes = bytes * 3 / 2 + 1) {
    INFO("bytes " << bytes);
    const AllreduceAlgo a = p.auto_algo(bytes), b = cheapest(p, bytes);
    // Equal cost at a crossing point may pick either.
    if (a != b) CHECK(p.cost.time_us(a, bytes) == Approx(p.cost.time_us(b, bytes)));
  }
}

}  // namespace

TEST_CASE("parse DGX H100: NV18 through NVSwitch, NUMA halves", "[topology]") {
  const Topology t = load("dgx_h100_8gpu_nvswitch.txt");
  REQUIRE(t.gpu_count() == 8);
  CHECK(t.node_count() == 1);
  CHECK(t.has_nvswitch(0));
  CHECK(t.all_pairs_nvlink(0));
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      if (i == j) {
        CHECK(t.link(i, j).kind == LinkKind::Self);
        continue;
      }
      CHECK(t.link(i, j).kind == LinkKind::NVSwitch);
      CHECK(t.link(i, j).nvlinks == 18);
      CHECK(t.link(i, j).gbps == Approx(450.0));
    }
  for (int i = 0; i < 8; ++i) {
    CHECK(t.gpu(i).numa_node == (i < 4 ? 0 : 1));
    CHECK(t.gpu(i).cpu_affinity == (i < 4 ? "0-55,112-167" : "56-111,168-223"));
    CHECK(t.gpu(i).local_index == i);
  }
}

TEST_CASE("parse DGX-1 V100: hybrid cube-mesh of NV1/NV2 with SYS pairs", "[topology]") {
  const Topology t = load("dgx1_v100_8gpu_cubemesh.txt");
  REQUIRE(t.gpu_count() == 8);
  CHECK_FALSE(t.has_nvswitch(0));
  CHECK_FALSE(t.all_pairs_nvlink(0));
  CHECK(t.link(0, 1).kind == LinkKind::NVLink);
  CHECK(t.link(0, 1).nvlinks == 1);
  CHECK(t.link(0, 1).gbps == Approx(25.0));
  CHECK(t.link(0, 3).nvlinks == 2);
  CHECK(t.link(0, 3).gbps == Approx(50.0));
  CHECK(t.link(0, 4).nvlinks == 2);
  CHECK(t.link(0, 5).kind == LinkKind::Sys);
  CHECK(t.link(0, 5).nvlinks == 0);
  CHECK(t.link(3, 7).nvlinks == 1);
  CHECK(t.link(2, 6).kind == LinkKind::NVLink);
  CHECK(t.link(1, 4).kind == LinkKind::Sys);
  for (int i = 0; i < 8; ++i) {
    CHECK(nvlink_total(t, i) == 6);  // a V100 SXM2 has six NVLinks
    CHECK(t.gpu(i).numa_node == (i < 4 ? 0 : 1));
  }
  // A Sys link is far slower than any NVLink.
  CHECK(t.link(0, 5).gbps < t.link(0, 1).gbps);
}

TEST_CASE("parse DGX A100: NV12 through NVSwitch, four NUMA nodes", "[topology]") {
  const Topology t = load("dgx_a100_8gpu_nvswitch.txt");
  REQUIRE(t.gpu_count() == 8);
  CHECK(t.has_nvswitch(0));
  CHECK(t.link(2, 7).kind == LinkKind::NVSwitch);
  CHECK(t.link(2, 7).nvlinks == 12);
  CHECK(t.link(2, 7).gbps == Approx(300.0));
  const int numa[] = {3, 3, 1, 1, 7, 7, 5, 5};
  for (int i = 0; i < 8; ++i) CHECK(t.gpu(i).numa_node == numa[i]);
  CHECK(t.gpu(4).cpu_affinity == "112-127,240-255");
}

TEST_CASE("parse 4 GPUs in NVLink-bridged pairs", "[topology]") {
  const Topology t = load("pcie_4gpu_nvlink_bridge_pairs.txt");
  REQUIRE(t.gpu_count() == 4);
  CHECK_FALSE(t.has_nvswitch(0));
  CHECK_FALSE(t.all_pairs_nvlink(0));
  CHECK(t.link(0, 1).kind == LinkKind::NVLink);
  CHECK(t.link(0, 1).nvlinks == 4);
  CHECK(t.link(2, 3).nvlinks == 4);
  CHECK(t.link(1, 2).kind == LinkKind::PHB);
  CHECK(t.gpu(0).numa_node == -1);  // N/A
}

TEST_CASE("parse 8 PCIe GPUs over two NUMA nodes", "[topology]") {
  const Topology t = load("pcie_8gpu_2numa.txt");
  REQUIRE(t.gpu_count() == 8);
  CHECK_FALSE(t.has_nvswitch(0));
  CHECK(t.link(0, 1).kind == LinkKind::PIX);
  CHECK(t.link(0, 2).kind == LinkKind::PXB);
  CHECK(t.link(4, 6).kind == LinkKind::Node);
  CHECK(t.link(3, 4).kind == LinkKind::Sys);
  CHECK(t.link(0, 1).gbps > t.link(4, 6).gbps);
  CHECK(t.link(4, 6).gbps > t.link(3, 4).gbps);
  CHECK(t.gpu(5).cpu_affinity == "24-47,72-95");
  CHECK(t.gpu(5).numa_node == 1);
}

TEST_CASE("parse a 2-node cluster file and combine nodes", "[topology]") {
  const Topology t = load("cluster_2x8_h100.txt");
  REQUIRE(t.gpu_count() == 16);
  CHECK(t.node_count() == 2);
  CHECK(t.has_nvswitch(0));
  CHECK(t.has_nvswitch(1));
  for (int i = 0; i < 16; ++i) {
    CHECK(t.gpu(i).node == (i < 8 ? 0 : 1));
    CHECK(t.gpu(i).local_index == i % 8);
  }
  CHECK(t.link(9, 15).kind == LinkKind::NVSwitch);
  CHECK(t.link(0, 8).kind == LinkKind::Network);
  CHECK(t.link(0, 8).gbps == Approx(25.0));
  CHECK(t.gpus_of_node(1).size() == 8);

  const Topology mixed = combine_nodes({load("dgx1_v100_8gpu_cubemesh.txt"), load("pcie_4gpu_nvlink_bridge_pairs.txt")}, 12.5);
  REQUIRE(mixed.gpu_count() == 12);
  CHECK(mixed.link(8, 9).nvlinks == 4);                 // node 1's GPU0-GPU1
  CHECK(mixed.link(0, 3).nvlinks == 2);                 // node 0 unchanged
  CHECK(mixed.link(7, 8).kind == LinkKind::Network);
  CHECK(mixed.link(7, 8).gbps == Approx(12.5));
  CHECK(mixed.has_nvswitch(0) == false);
}

TEST_CASE("planner: DGX-1 ring avoids SYS and its bottleneck is an NVLink", "[topology][plan]") {
  const Topology t = load("dgx1_v100_8gpu_cubemesh.txt");
  const Plan p = make_plan(t, CostModel());
  REQUIRE(is_permutation_of_all(p, 8));
  for (LinkKind k : ring_links(t, p)) CHECK(k == LinkKind::NVLink);
  // The cube-mesh has a Hamiltonian cycle of double links (0-3-2-1-5-6-7-4): 50 GB/s.
  CHECK(p.bottleneck_gbps == Approx(50.0));
  CHECK(ring_bottleneck(t, p.ring) == Approx(p.bottleneck_gbps));
  // Not every pair has NVLink: only NCCL.
  CHECK(p.available == std::vector<AllreduceAlgo>{AllreduceAlgo::Nccl});
  CHECK(p.auto_algo(64) == AllreduceAlgo::Nccl);
}

TEST_CASE("planner: PCIe box keeps NUMA halves together", "[topology][plan]") {
  const Topology t = load("pcie_8gpu_2numa.txt");
  const Plan p = make_plan(t, CostModel());
  REQUIRE(is_permutation_of_all(p, 8));
  int crossings = 0;
  for (LinkKind k : ring_links(t, p)) crossings += k == LinkKind::Sys;
  CHECK(crossings == 2);  // a ring must cross twice; a careless one crosses up to 8 times
  // Each PIX pair sits side by side.
  for (int a : {0, 2, 4, 6}) {
    bool adjacent = false;
    for (std::size_t k = 0; k < p.ring.size(); ++k) {
      const int x = p.ring[k], y = p.ring[(k + 1) % p.ring.size()];
      adjacent = adjacent || (x == a && y == a + 1) || (x == a + 1 && y == a);
    }
    CHECK(adjacent);
  }
  CHECK(p.bottleneck_gbps == Approx(t.link(0, 4).gbps));
  CHECK(p.available == std::vector<AllreduceAlgo>{AllreduceAlgo::Nccl});
}

TEST_CASE("planner: bridged pairs ride both bridges", "[topology][plan]") {
  const Topology t = load("pcie_4gpu_nvlink_bridge_pairs.txt");
  const Plan p = make_plan(t, CostModel());
  REQUIRE(is_permutation_of_all(p, 4));
  int nvlink_hops = 0;
  for (LinkKind k : ring_links(t, p)) nvlink_hops += k == LinkKind::NVLink;
  CHECK(nvlink_hops == 2);
  CHECK(p.bottleneck_gbps == Approx(t.link(1, 2).gbps));
}

TEST_CASE("planner: NVSwitch node takes OneShot for small messages, NCCL for large", "[topology][plan]") {
  ScopedEnv no_force("DSTRAIN_ALLREDUCE_ALGO", nullptr);
  for (const char* name : {"dgx_h100_8gpu_nvswitch.txt", "dgx_a100_8gpu_nvswitch.txt"}) {
    INFO(name);
    const Topology t = load(name);
    const Plan p = make_plan(t, CostModel());
    REQUIRE(is_permutation_of_all(p, 8));
    CHECK(p.bottleneck_gbps == Approx(t.link(0, 1).gbps));
    CHECK(p.is_available(AllreduceAlgo::OneShot));
    CHECK(p.is_available(AllreduceAlgo::TwoShot));
    CHECK_FALSE(p.is_available(AllreduceAlgo::Hierarchical));
    CHECK(choose_allreduce_algo(p, 4096) == AllreduceAlgo::OneShot);
    CHECK(choose_allreduce_algo(p, std::size_t{1} << 30) == AllreduceAlgo::Nccl);
    REQUIRE(p.ranges.size() == 3);
    CHECK(p.ranges[1].algo == AllreduceAlgo::TwoShot);
    check_ranges_are_cheapest(p);
    const std::string d = p.describe();
    CHECK_THAT(d, Contains("oneshot"));
    CHECK_THAT(d, Contains("twoshot"));
    CHECK_THAT(d, Contains("ring:"));
    CHECK_THAT(d, Contains("bottleneck"));
  }
}

TEST_CASE("planner: two nodes choose Hierarchical for large messages", "[topology][plan]") {
  ScopedEnv no_force("DSTRAIN_ALLREDUCE_ALGO", nullptr);
  const Topology t = load("cluster_2x8_h100.txt");
  const Plan p = make_plan(t, CostModel());
  REQUIRE(is_permutation_of_all(p, 16));
  for (int k = 0; k < 8; ++k) CHECK(p.ring[static_cast<std::size_t>(k)] < 8);  // node-major
  CHECK(p.node_count == 2);
  CHECK(p.bottleneck_gbps == Approx(25.0));  // the network
  CHECK_FALSE(p.is_available(AllreduceAlgo::OneShot));
  CHECK(choose_allreduce_algo(p, std::size_t{256} << 20) == AllreduceAlgo::Hierarchical);
  CHECK(choose_allreduce_algo(p, 1024) == AllreduceAlgo::Nccl);
  check_ranges_are_cheapest(p);
}

TEST_CASE("planner: a CPU job uses MPI, and one GPU is trivially NVLink-connected", "[topology][plan]") {
  ScopedEnv no_force("DSTRAIN_ALLREDUCE_ALGO", nullptr);
  const Plan cpu = make_plan(Topology(), CostModel());
  CHECK(cpu.gpu_count == 0);
  CHECK(cpu.available == std::vector<AllreduceAlgo>{AllreduceAlgo::Mpi});
  CHECK(choose_allreduce_algo(cpu, 1 << 20) == AllreduceAlgo::Mpi);

  const Topology one({GpuInfo{}}, {{Link{LinkKind::Self, 0, 0.0}}}, {false}, "test");
  const Plan p = make_plan(one, CostModel());
  CHECK(p.ring == std::vector<int>{0});
  CHECK(p.is_available(AllreduceAlgo::OneShot));
  check_ranges_are_cheapest(p);
}

TEST_CASE("DSTRAIN_ALLREDUCE_ALGO forces an algorithm only where it can run", "[topology][plan]") {
  const Plan nvswitch = make_plan(load("dgx_h100_8gpu_nvswitch.txt"), CostModel());
  const Plan pcie = make_plan(load("pcie_8gpu_2numa.txt"), CostModel());
  {
    ScopedEnv force("DSTRAIN_ALLREDUCE_ALGO", "twoshot");
    CHECK(choose_allreduce_algo(nvswitch, 16) == AllreduceAlgo::TwoShot);
    CHECK(choose_allreduce_algo(nvswitch, std::size_t{1} << 30) == AllreduceAlgo::TwoShot);
    CHECK(choose_allreduce_algo(pcie, 16) == AllreduceAlgo::Nccl);  // falls back, warns once
  }
  {
    ScopedEnv force("DSTRAIN_ALLREDUCE_ALGO", "nccl");
    CHECK(choose_allreduce_algo(nvswitch, 16) == AllreduceAlgo::Nccl);
  }
  {
    ScopedEnv force("DSTRAIN_ALLREDUCE_ALGO", "bogus");
    CHECK_THROWS_AS(choose_allreduce_algo(nvswitch, 16), Error);
  }
}

TEST_CASE("cost model: save, load, override, bad lines", "[topology][cost]") {
  ScopedEnv no_force("DSTRAIN_ALLREDUCE_ALGO", nullptr);
  const Topology t = load("dgx_h100_8gpu_nvswitch.txt");
  const CostModel defaults = CostModel::defaults_for(t);
  CHECK(defaults.has(AllreduceAlgo::OneShot));
  CHECK_FALSE(defaults.has(AllreduceAlgo::Mpi));

  const fs::path dir = fs::temp_directory_path() / ("dstrain_cost_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string path = (dir / "model.txt").string();
  defaults.save(path);
  const CostModel back = CostModel::load(path);
  for (const auto& [algo, c] : defaults.entries()) {
    REQUIRE(back.has(algo));
    CHECK(back.get(algo).alpha_us == Approx(c.alpha_us));
    CHECK(back.get(algo).beta_gbps == Approx(c.beta_gbps));
  }

  // A measured model where NCCL is fastest everywhere moves every range to NCCL.
  const CostModel measured = CostModel::parse("# calibrated\nnccl 1.0 1000\n");
  const Plan p = make_plan(t, measured);
  REQUIRE(p.ranges.size() == 1);
  CHECK(p.ranges[0].algo == AllreduceAlgo::Nccl);
  CHECK(p.cost.has(AllreduceAlgo::OneShot));  // the rest still from the defaults

  // ... and taken from DSTRAIN_ALLREDUCE_COST_MODEL by make_plan(topo).
  {
    std::ofstream(dir / "fast_oneshot.txt") << "oneshot 0.5 5000\n";
    ScopedEnv env("DSTRAIN_ALLREDUCE_COST_MODEL", (dir / "fast_oneshot.txt").c_str());
    const Plan q = make_plan(t);
    REQUIRE(q.ranges.size() == 1);
    CHECK(q.ranges[0].algo == AllreduceAlgo::OneShot);
  }

  CHECK_THROWS_WITH(CostModel::parse("nccl 1 2\nnccl 1\n", "m.txt"), Contains("m.txt line 2"));
  CHECK_THROWS_WITH(CostModel::parse("\nfoo 1 2\n", "m.txt"), Contains("m.txt line 2"));
  CHECK_THROWS_WITH(CostModel::parse("nccl 1 -2\n", "m.txt"), Contains("line 1"));
  CHECK_THROWS_WITH(CostModel::parse("nccl 1 2x\n", "m.txt"), Contains("line 1"));
  CHECK_THROWS_WITH(CostModel::parse("auto 1 2\n", "m.txt"), Contains("line 1"));
  try {
    CostModel::load((dir / "missing.txt").string());
    FAIL("no error for a missing file");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::Io);
  }
  fs::remove_all(dir);
}

TEST_CASE("malformed topology text raises InvalidArgument naming the line", "[topology]") {
  const std::string header = "\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\n";
  auto error_of = [](const std::string& text) -> std::string {
    try {
      parse_nvidia_smi_topo(text, {}, "t.txt");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::InvalidArgument);
      return e.what();
    }
    return "no error";
  };
  // The good text parses.
  CHECK(parse_nvidia_smi_topo(header + "GPU0\t X \tNV4\t0-7\t0\nGPU1\tNV4\t X \t0-7\t0\n").gpu_count() == 2);

  CHECK_THAT(error_of(header + "GPU0\t X \tNVX\t0-7\t0\nGPU1\tNV4\t X \t0-7\t0\n"),
             Contains("t.txt line 2") && Contains("NVX"));
  CHECK_THAT(error_of(header + "GPU0\t X \tNV4\t0-7\t0\nGPU1\tFOO\t X \t0-7\t0\n"),
             Contains("line 3") && Contains("FOO"));
  CHECK_THAT(error_of(header + "GPU0\t X \tNV4\t0-7\t0\nGPU1\tNV2\t X \t0-7\t0\n"), Contains("line 3"));  // asymmetric
  CHECK_THAT(error_of(header + "GPU0\t X \tNV4\t0-7\t0\n"), Contains("no row for GPU1"));
  CHECK_THAT(error_of(header + "GPU0\t X \t0-7\t0\nGPU1\tNV4\t X \t0-7\t0\n"), Contains("line 2"));
  CHECK_THAT(error_of(header + "GPU0\tNV4\tNV4\t0-7\t0\nGPU1\tNV4\t X \t0-7\t0\n"), Contains("diagonal"));
  CHECK_THAT(error_of(header + "GPU0\t X \tNV4\t0-7\t0\nGPU1\tNV4\t X \t0-7\t0\nbanana\n"),
             Contains("line 4") && Contains("banana"));
  CHECK_THAT(error_of(header + "GPU0\t X \tNV4\t0-7\tzero\nGPU1\tNV4\t X \t0-7\t0\n"), Contains("line 2"));
  CHECK_THAT(error_of(header + "GPU0\t X \tNV4\t7-0\t0\nGPU1\tNV4\t X \t0-7\t0\n"), Contains("line 2"));
  CHECK_THAT(error_of("hello\n" + header), Contains("line 1"));
  CHECK_THAT(error_of(""), Contains("no `nvidia-smi topo -m` matrix header"));
  CHECK_THAT(error_of("\tGPU1\tGPU0\nGPU0\t X \tPIX\n"), Contains("line 1"));
  // Cluster files: sections numbered in order.
  CHECK_THROWS_WITH(parse_topology_text("# node 1\n" + header, {}, "c.txt"), Contains("c.txt line 1"));
  CHECK_THROWS_WITH(parse_topology_text("# node 0\n" + header + "GPU0\t X \tPIX\nGPU1\tPIX\t X \n# node 0\n", {}, "c.txt"),
                    Contains("line 5"));
}

TEST_CASE("CPU lists", "[topology][cpu]") {
  const auto a = parse_cpu_list("0-15,32-47");
  REQUIRE(a.size() == 32);
  CHECK(a.front() == 0);
  CHECK(a[15] == 15);
  CHECK(a[16] == 32);
  CHECK(a.back() == 47);
  CHECK(parse_cpu_list("3") == std::vector<int>{3});
  CHECK(parse_cpu_list("0-3, 8") == std::vector<int>{0, 1, 2, 3, 8});
  CHECK(parse_cpu_list("8,0-1\n") == std::vector<int>{0, 1, 8});
  CHECK(parse_cpu_list("").empty());
  CHECK_THROWS_AS(parse_cpu_list("5-2"), Error);
  CHECK_THROWS_AS(parse_cpu_list("a-b"), Error);
  CHECK_THROWS_AS(parse_cpu_list("1,,2"), Error);
  CHECK_THROWS_AS(parse_cpu_list("-3"), Error);
}

TEST_CASE("binding to CPUs keeps to the allowed set", "[topology][cpu]") {
  cpu_set_t before;
  CPU_ZERO(&before);
  REQUIRE(sched_getaffinity(0, sizeof before, &before) == 0);
  std::vector<int> allowed;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &before)) allowed.push_back(c);
  REQUIRE(!allowed.empty());

  // Only cores outside the allowed set: nothing changes.
  CHECK_FALSE(bind_to_cpus({CPU_SETSIZE + 5}));
  CHECK_FALSE(bind_to_cpus({}));

  // One allowed core (plus one not allowed): exactly that core.
  CHECK(bind_to_cpus({allowed.back(), CPU_SETSIZE + 5}));
  cpu_set_t now;
  CPU_ZERO(&now);
  REQUIRE(sched_getaffinity(0, sizeof now, &now) == 0);
  CHECK(CPU_COUNT(&now) == 1);
  CHECK(CPU_ISSET(allowed.back(), &now));

  REQUIRE(sched_setaffinity(0, sizeof before, &before) == 0);  // restore

  ScopedEnv off("DSTRAIN_BIND_CPU", "0");
  CHECK_FALSE(bind_to_gpu_numa_cores(0));
}

TEST_CASE("NVSwitch detection from the NVLink count", "[topology]") {
  const std::string header = "\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\n";
  auto pair = [&](const char* cell) {
    return parse_nvidia_smi_topo(header + "GPU0\t X \t" + cell + "\t0-7\t0\nGPU1\t" + cell + "\t X \t0-7\t0\n");
  };
  CHECK(pair("NV18").has_nvswitch(0));  // two GPUs of an HGX H100/H200 board
  CHECK(pair("NV18").link(0, 1).kind == LinkKind::NVSwitch);
  CHECK_FALSE(pair("NV12").has_nvswitch(0));  // a bridged pair
  CHECK(pair("NV12").link(0, 1).kind == LinkKind::NVLink);
  CHECK(pair("NV12").link(0, 1).gbps == Approx(300.0));
  CHECK_FALSE(pair("PIX").all_pairs_nvlink(0));
  // Four GPUs with NV4 to each peer (HGX A100 4-GPU): direct links, not a switch.
  std::string four = "\tGPU0\tGPU1\tGPU2\tGPU3\n";
  for (int i = 0; i < 4; ++i) {
    four += "GPU" + std::to_string(i);
    for (int j = 0; j < 4; ++j) four += i == j ? "\t X " : "\tNV4";
    four += "\n";
  }
  const Topology t = parse_nvidia_smi_topo(four);
  CHECK_FALSE(t.has_nvswitch(0));
  CHECK(t.all_pairs_nvlink(0));
  CHECK(t.gpu(2).numa_node == -1);
  CHECK(t.gpu(2).cpu_affinity.empty());
  // Direct links: OneShot reads each peer over its own link.
  const Plan p = make_plan(t, CostModel());
  CHECK(p.is_available(AllreduceAlgo::OneShot));
  CHECK(p.bottleneck_gbps == Approx(100.0));
}

TEST_CASE("parse a real capture: one H200, header underlined with terminal escapes, GPU NUMA ID column",
          "[topology][parse]") {
  // `nvidia-smi topo -m > file` on the GPU machine (driver 580): the header line is wrapped in
  // ESC[4m ... ESC[0m and the last column is "GPU NUMA ID".
  const Topology t = load("h200_single_nvidia_smi.txt");
  REQUIRE(t.gpu_count() == 1);
  CHECK(t.link(0, 0).kind == LinkKind::Self);
  CHECK(t.gpu(0).cpu_affinity == "0-15");
  CHECK(t.gpu(0).numa_node == 0);
}
