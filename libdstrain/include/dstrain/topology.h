// GPU topology: how the GPUs of a job are connected (NVLink, NVSwitch, PCIe, network between
// nodes), where their NUMA-local CPU cores are, and the AllReduce plan derived from it (ring
// order, algorithm per message size from an alpha-beta cost model).
//
// A Topology comes from live discovery (NVML, loaded at run time; else `nvidia-smi topo -m`;
// else CUDA alone), or from the text of `nvidia-smi topo -m` saved in a file. A cluster file
// holds several nodes, each section starting with a line `# node N` followed by that node's
// `nvidia-smi topo -m` output (see tests/fixtures/topo/cluster_2x8_h100.txt):
//
//   # node 0
//           GPU0    GPU1   ...   CPU Affinity    NUMA Affinity
//   GPU0     X      NV18   ...   0-55,112-167    0
//   ...
//   # node 1
//   ...
//
// Other lines starting with '#' are comments. Nodes are joined by the network link.
#pragma once
#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include "dstrain/allreduce_algo.h"

namespace dstrain {

// From fastest to slowest path. PIX..Sys are nvidia-smi's PCIe path levels.
enum class LinkKind {
  Self,      // the same GPU
  NVSwitch,  // NVLinks through an NVSwitch fabric (every pair of the node at full bandwidth)
  NVLink,    // direct NVLinks between the two GPUs
  PIX,       // at most one PCIe bridge
  PXB,       // several PCIe bridges, no host bridge
  PHB,       // through a PCIe host bridge (the CPU)
  Node,      // between host bridges of one NUMA node
  Sys,       // across NUMA nodes (QPI/UPI/xGMI)
  Network,   // different hosts
};
const char* link_kind_name(LinkKind kind);  // "X", "NVSwitch", "NVLink", "PIX", ..., "NET"

struct Link {
  LinkKind kind = LinkKind::Sys;
  int nvlinks = 0;     // NVLink count (NVLink / NVSwitch kinds)
  double gbps = 0.0;   // estimated bandwidth, GB/s per direction
};

struct GpuInfo {
  int node = 0;         // host index within the job
  int local_index = 0;  // CUDA ordinal on that host
  int numa_node = -1;   // -1: unknown
  std::string cpu_affinity;  // as nvidia-smi prints it ("0-55,112-167"), empty when unknown
  std::string name;          // device name when known (live discovery)
  std::string pci_bus_id;    // when known (live discovery)
};

// Bandwidth estimates, GB/s per direction (the "bidirectional" figures vendors quote are twice):
//
//   path                            per direction      example
//   NVLink2 (V100), per link        25                 DGX-1 NV2 = 50
//   NVLink3 (A100), per link        25 (50 bidir)      A100 NV12 via NVSwitch = 300
//   NVLink4 (H100/H200), per link   25 (50 bidir)      H100 NV18 via NVSwitch = 450
//   NVLink1 (P100), per link        20
//   PCIe gen3 / gen4 / gen5 x16     12 / 25 / 50       (PIX and PXB run at full PCIe speed)
//   PHB                             0.8 x PCIe         through the root complex
//   NODE                            0.7 x PCIe         between host bridges of a NUMA node
//   SYS                             0.4 x PCIe         across sockets; P2P often staged via host
//   Network (between hosts)         25                 one 200 Gb/s NIC per GPU
//
// From nvidia-smi text the GPU generation is not printed; PCIe speed is guessed from the largest
// NVLink count (NV18: Hopper, gen5; otherwise gen4) unless pcie_gbps is given.
struct TopologyEstimates {
  double nvlink_gbps_per_link = 25.0;
  double pcie_gbps = 0.0;  // 0: guess as above
  double network_gbps = 25.0;
};
double estimate_link_gbps(LinkKind kind, int nvlinks, const TopologyEstimates& est);

class Topology {
 public:
  Topology() = default;
  // gpus.size() x gpus.size() links; links[i][i] must be Self. Checks symmetry of kinds.
  Topology(std::vector<GpuInfo> gpus, std::vector<std::vector<Link>> links, std::vector<bool> nvswitch_per_node,
           std::string source);

  int gpu_count() const { return static_cast<int>(gpus_.size()); }
  int node_count() const { return static_cast<int>(nvswitch_.size()); }
  const GpuInfo& gpu(int i) const { return gpus_.at(static_cast<std::size_t>(i)); }
  const Link& link(int i, int j) const;
  // True when the GPUs of `node` are joined by an NVSwitch fabric.
  bool has_nvswitch(int node = 0) const;
  // Global GPU indices of one node, in order.
  std::vector<int> gpus_of_node(int node) const;
  // True when every pair of GPUs of `node` has NVLink (direct or through NVSwitch); true for a
  // node of one GPU.
  bool all_pairs_nvlink(int node = 0) const;
  // "nvidia-smi", "nvml", "cuda", "file:<path>", "combined", ...
  const std::string& source() const { return source_; }
  // The link matrix (kind/NVLink count/GB/s per pair), NVSwitch flag, NUMA and CPU affinity.
  std::string describe() const;

 private:
  std::vector<GpuInfo> gpus_;
  std::vector<std::vector<Link>> links_;
  std::vector<bool> nvswitch_;
  std::string source_;
};

// Parses the output of `nvidia-smi topo -m`: a header naming GPU0..GPUn (NIC/mlx5 columns are
// ignored), one row per GPU with cells X, NV#, PIX, PXB, PHB, NODE, SYS, then the CPU Affinity
// and NUMA Affinity columns; NIC rows and the legend are ignored. NVSwitch is detected when every
// pair shows the same NV# and that count could not be wired directly to every peer (count x
// (n-1) >= 18, the most NVLinks any GPU has). Bad text raises InvalidArgument naming the line.
Topology parse_nvidia_smi_topo(const std::string& text, const TopologyEstimates& est = {},
                               const std::string& source = "nvidia-smi");
// One node's text, or a cluster file of `# node N` sections (each parsed, then combined).
Topology parse_topology_text(const std::string& text, const TopologyEstimates& est = {},
                             const std::string& source = "text");
Topology load_topology_file(const std::string& path, const TopologyEstimates& est = {});
// Runs `nvidia-smi topo -m`; raises Unsupported when nvidia-smi is absent or fails.
Topology topology_from_nvidia_smi(const TopologyEstimates& est = {});
// Nodes in order; GPU i of node k becomes global GPU (sum of earlier nodes' counts) + i; pairs
// on different nodes get a Network link of network_gbps.
Topology combine_nodes(const std::vector<Topology>& nodes, double network_gbps = 25.0);
// This machine: NVML (libnvidia-ml.so.1, loaded at run time) with CUDA P2P attributes, else
// `nvidia-smi topo -m`, else CUDA alone. An empty topology (no GPU) when none of these works;
// never raises for a missing driver.
Topology discover_topology(const TopologyEstimates& est = {});

// "0-15,32-47" -> {0..15, 32..47}. Whitespace around items is allowed; "" -> {}. Bad text
// (reversed range, letters) raises InvalidArgument.
std::vector<int> parse_cpu_list(const std::string& text);
// Restricts the calling process to the CPU cores local to CUDA device `device` (NVML's CPU
// affinity, else /sys/bus/pci/devices/<bus id>/local_cpulist), intersected with the cores it may
// already use. Returns true when the affinity was set; on any failure it logs a warning and
// returns false. DSTRAIN_BIND_CPU=0 disables it.
bool bind_to_gpu_numa_cores(int device);
// Sets the calling process's affinity to `cpus` intersected with its current allowed set; false
// (with a warning) when the intersection is empty or sched_setaffinity fails.
bool bind_to_cpus(const std::vector<int>& cpus);

// Alpha-beta model per algorithm: time_us = alpha_us + bytes / (beta_gbps * 1e3), where beta is
// the message bytes over the time it takes (algorithm bandwidth), so a bigger beta is faster.
struct AlgoCost {
  double alpha_us = 0.0;
  double beta_gbps = 1.0;
};

class CostModel {
 public:
  // Estimates for `topo` (and `ranks` ranks; 0: one per GPU) for each algorithm that can run on
  // it. An empty topology gives the CPU model (Mpi only).
  static CostModel defaults_for(const Topology& topo, int ranks = 0);
  // Text: one line per algorithm `<name> <alpha_us> <beta_GBps>`; '#' starts a comment. Bad
  // lines raise InvalidArgument naming the file and line; a missing file raises Io.
  static CostModel load(const std::string& path);
  static CostModel parse(const std::string& text, const std::string& origin = "cost model");
  void save(const std::string& path) const;
  std::string to_text() const;

  void set(AllreduceAlgo algo, AlgoCost cost);
  bool has(AllreduceAlgo algo) const { return costs_.count(algo) != 0; }
  const AlgoCost& get(AllreduceAlgo algo) const;
  double time_us(AllreduceAlgo algo, std::size_t bytes) const;
  const std::map<AllreduceAlgo, AlgoCost>& entries() const { return costs_; }
  // This model's entries, with those it lacks taken from `fallback`.
  CostModel merged_over(const CostModel& fallback) const;

 private:
  std::map<AllreduceAlgo, AlgoCost> costs_;
};

struct SizeRange {
  std::size_t min_bytes = 0;  // the range is [min_bytes, next range's min_bytes)
  AllreduceAlgo algo = AllreduceAlgo::Nccl;
};

struct Plan {
  int gpu_count = 0;  // 0: a CPU job
  int node_count = 1;
  std::vector<int> ring;          // global GPU indices, node-major
  double bottleneck_gbps = 0.0;   // slowest link of the ring (0 for one GPU or none)
  std::vector<AllreduceAlgo> available;  // what may run on this topology
  std::vector<SizeRange> ranges;  // cheapest algorithm per message size, ascending
  CostModel cost;                 // the model the ranges come from

  bool is_available(AllreduceAlgo algo) const;
  // The algorithm of `ranges` for a message of `bytes`.
  AllreduceAlgo auto_algo(std::size_t bytes) const;
  // Table of size ranges -> algorithm, the ring order and its bottleneck.
  std::string describe() const;
};

// Ring: maximises the slowest link, then the sum of link bandwidths (so it crosses slow links as
// few times as possible); exact for up to 8 GPUs per node, greedy beyond. Several nodes: each
// node's ring in turn (node-major). Missing cost entries are taken from the topology's defaults.
Plan make_plan(const Topology& topo, const CostModel& cost);
// As above with the cost model of DSTRAIN_ALLREDUCE_COST_MODEL when set, else the defaults.
Plan make_plan(const Topology& topo);

// The algorithm for a message of `bytes`: allreduce_algo_from_env() when it is not Auto and is
// available on the plan's topology (else a one-time warning and the planner's choice), otherwise
// the planner's choice.
AllreduceAlgo choose_allreduce_algo(const Plan& plan, std::size_t bytes);

}  // namespace dstrain
