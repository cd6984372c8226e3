// dstrain-topo: shows the GPU topology dstrain sees (link kind, NVLink count and estimated GB/s
// per GPU pair, NVSwitch, NUMA and CPU affinity) and the AllReduce plan it derives from it: ring
// order, bottleneck link, and the algorithm per message size.
//
//   dstrain-topo                              this machine (NVML, else nvidia-smi, else CUDA)
//   dstrain-topo --topo-file topo.txt         saved `nvidia-smi topo -m` output
//   dstrain-topo --nodes-file cluster.txt     several nodes: `# node N` sections, one per node
//   dstrain-topo --cost-model model.txt       measured alpha-beta costs (allreduce_perf --calibrate)
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "dstrain/error.h"
#include "dstrain/topology.h"

namespace {

const char* kUsage =
    "usage: dstrain-topo [options]\n"
    "  --topo-file FILE     read one node's `nvidia-smi topo -m` output from FILE\n"
    "  --nodes-file FILE    read a cluster: FILE holds `# node N` sections, each one node's\n"
    "                       `nvidia-smi topo -m` output; nodes are joined by the network\n"
    "  --network-gbps X     network bandwidth between nodes per GPU, GB/s (default 25)\n"
    "  --cost-model FILE    alpha-beta cost model (`<algo> <alpha_us> <beta_GBps>` per line);\n"
    "                       default: DSTRAIN_ALLREDUCE_COST_MODEL, else estimates from the topology\n"
    "  --help               this text\n"
    "Without a file the topology of this machine is discovered (NVML, nvidia-smi, CUDA).\n"
    "DSTRAIN_ALLREDUCE_ALGO forces an algorithm where the topology allows it.\n";

bool parse_double(const char* text, double& out) {
  char* end = nullptr;
  out = std::strtod(text, &end);
  return end != text && *end == '\0' && out > 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string topo_file, nodes_file, cost_file;
  dstrain::TopologyEstimates est;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "dstrain-topo: %s needs a value (or unknown flag)\n%s", flag.c_str(), kUsage);
      return 2;
    }
    const char* value = argv[++i];
    if (flag == "--topo-file") {
      topo_file = value;
    } else if (flag == "--nodes-file") {
      nodes_file = value;
    } else if (flag == "--cost-model") {
      cost_file = value;
    } else if (flag == "--network-gbps") {
      if (!parse_double(value, est.network_gbps)) {
        std::fprintf(stderr, "dstrain-topo: --network-gbps '%s': expected a positive number\n", value);
        return 2;
      }
    } else {
      std::fprintf(stderr, "dstrain-topo: unknown flag %s\n%s", flag.c_str(), kUsage);
      return 2;
    }
  }
  if (!topo_file.empty() && !nodes_file.empty()) {
    std::fprintf(stderr, "dstrain-topo: give --topo-file or --nodes-file, not both\n");
    return 2;
  }
  try {
    dstrain::Topology topo;
    if (!topo_file.empty()) {
      topo = dstrain::load_topology_file(topo_file, est);
    } else if (!nodes_file.empty()) {
      topo = dstrain::load_topology_file(nodes_file, est);
    } else {
      topo = dstrain::discover_topology(est);
      if (topo.gpu_count() == 0) {
        std::fprintf(stderr,
                     "dstrain-topo: no GPU found on this machine (no CUDA device, NVML or nvidia-smi); "
                     "give --topo-file FILE or --nodes-file FILE to read a saved topology\n");
        return 1;
      }
    }
    const dstrain::Plan plan = cost_file.empty() ? dstrain::make_plan(topo)
                                                 : dstrain::make_plan(topo, dstrain::CostModel::load(cost_file));
    std::fputs(topo.describe().c_str(), stdout);
    std::fputs("\n", stdout);
    std::fputs(plan.describe().c_str(), stdout);
    std::fputs("choice per message size (DSTRAIN_ALLREDUCE_ALGO honoured):", stdout);
    for (std::size_t bytes : {std::size_t{4} << 10, std::size_t{256} << 10, std::size_t{4} << 20,
                              std::size_t{64} << 20, std::size_t{1} << 30})
      std::printf("  %zu:%s", bytes, dstrain::allreduce_algo_name(dstrain::choose_allreduce_algo(plan, bytes)));
    std::fputs("\n", stdout);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dstrain-topo: %s\n", e.what());
    return 1;
  }
}
