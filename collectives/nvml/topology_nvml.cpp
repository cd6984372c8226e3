// Live GPU topology through NVML and the CUDA runtime. NVML is opened with dlopen at run time
// (there is no link-time dependency on libnvidia-ml, so the library still loads on machines
// without the driver); the few entry points used are declared here as nvml.h defines them.
#include "collectives/nvml/topology_nvml.h"

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "dstrain/error.h"

namespace dstrain::detail {

namespace {

// --- The subset of nvml.h used here (same types, values and layouts as the driver's header).
using nvmlReturn_t = int;
constexpr nvmlReturn_t NVML_SUCCESS = 0;
struct nvmlDevice_st;
using nvmlDevice_t = nvmlDevice_st*;
using nvmlEnableState_t = int;  // NVML_FEATURE_DISABLED = 0, NVML_FEATURE_ENABLED = 1
constexpr int NVML_FEATURE_ENABLED = 1;
using nvmlGpuTopologyLevel_t = int;  // INTERNAL 0, SINGLE 10, MULTIPLE 20, HOSTBRIDGE 30, NODE 40, SYSTEM 50
using nvmlIntNvLinkDeviceType_t = int;  // GPU 0, IBMNPU 1, SWITCH 2, UNKNOWN 0xFF
constexpr int NVML_NVLINK_DEVICE_TYPE_SWITCH = 2;
constexpr unsigned kNvmlMaxLinks = 18;  // NVML_NVLINK_MAX_LINKS (Hopper)
struct nvmlPciInfo_t {
  char busIdLegacy[16];
  unsigned int domain;
  unsigned int bus;
  unsigned int device;
  unsigned int pciDeviceId;
  unsigned int pciSubSystemId;
  char busId[32];
};

struct NvmlApi {
  nvmlReturn_t (*init)() = nullptr;
  nvmlReturn_t (*shutdown)() = nullptr;
  const char* (*error_string)(nvmlReturn_t) = nullptr;
  nvmlReturn_t (*handle_by_pci_bus_id)(const char*, nvmlDevice_t*) = nullptr;
  nvmlReturn_t (*nvlink_state)(nvmlDevice_t, unsigned, nvmlEnableState_t*) = nullptr;
  nvmlReturn_t (*nvlink_remote_pci)(nvmlDevice_t, unsigned, nvmlPciInfo_t*) = nullptr;
  nvmlReturn_t (*nvlink_remote_type)(nvmlDevice_t, unsigned, nvmlIntNvLinkDeviceType_t*) = nullptr;  // optional
  nvmlReturn_t (*common_ancestor)(nvmlDevice_t, nvmlDevice_t, nvmlGpuTopologyLevel_t*) = nullptr;
  nvmlReturn_t (*cpu_affinity)(nvmlDevice_t, unsigned, unsigned long*) = nullptr;
};

// The loaded library and an initialised NVML, released in reverse on destruction.
class Nvml {
 public:
  Nvml() {
    lib_ = ::dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib_) {
      const char* why = ::dlerror();
      DSTRAIN_THROW(ErrorCode::Unsupported, std::string("NVML not available: ") + (why ? why : "dlopen failed"));
    }
    try {
      bind(api_.init, "nvmlInit_v2");
      bind(api_.shutdown, "nvmlShutdown");
      bind(api_.error_string, "nvmlErrorString");
      bind(api_.handle_by_pci_bus_id, "nvmlDeviceGetHandleByPciBusId_v2");
      bind(api_.nvlink_state, "nvmlDeviceGetNvLinkState");
      bind(api_.nvlink_remote_pci, "nvmlDeviceGetNvLinkRemotePciInfo_v2");
      bind(api_.common_ancestor, "nvmlDeviceGetTopologyCommonAncestor");
      bind(api_.cpu_affinity, "nvmlDeviceGetCpuAffinity");
      api_.nvlink_remote_type = reinterpret_cast<decltype(api_.nvlink_remote_type)>(
          ::dlsym(lib_, "nvmlDeviceGetNvLinkRemoteDeviceType"));
      check(api_.init(), "nvmlInit_v2");
      initialised_ = true;
    } catch (...) {
      ::dlclose(lib_);
      throw;
    }
  }
  ~Nvml() {
    if (initialised_ && api_.shutdown() != NVML_SUCCESS) log_warning("nvmlShutdown failed");
    if (lib_) ::dlclose(lib_);
  }
  Nvml(const Nvml&) = delete;
  Nvml& operator=(const Nvml&) = delete;

  const NvmlApi& api() const { return api_; }
  void check(nvmlReturn_t r, const char* what) const {
    if (r != NVML_SUCCESS)
      throw_error(ErrorCode::Unsupported,
                  std::string(what) + " failed: " + (api_.error_string ? api_.error_string(r) : "NVML error"),
                  __FILE__, __LINE__, r);
  }

 private:
  template <class F>
  void bind(F& fn, const char* name) {
    fn = reinterpret_cast<F>(::dlsym(lib_, name));
    if (!fn) DSTRAIN_THROW(ErrorCode::Unsupported, std::string("NVML has no ") + name);
  }
  void* lib_ = nullptr;
  bool initialised_ = false;
  NvmlApi api_;
};

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw_error(ErrorCode::Cuda, std::string(what) + " failed: " + cudaGetErrorString(e), __FILE__, __LINE__, e);
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// "00000000:18:00.0" or "0000:18:00.0" -> "0000:18:00.0" (sysfs spelling).
std::string normalise_bus_id(const std::string& id) {
  std::string s = lower(id);
  const auto colon = s.find(':');
  if (colon != std::string::npos && colon > 4) s = s.substr(colon - 4);
  return s;
}

// The kernel reports -1 for a device without NUMA affinity, as on a machine (or VM) with a single
// NUMA node: there the GPU is on node 0, which is what nvidia-smi prints too.
int sysfs_numa_node(const std::string& bus_id) {
  std::ifstream in("/sys/bus/pci/devices/" + bus_id + "/numa_node");
  int node = -1;
  if (!(in >> node)) return -1;
  if (node >= 0) return node;
  std::error_code ec;
  int nodes = 0;
  for (const auto& e : std::filesystem::directory_iterator("/sys/devices/system/node", ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() > 4 && name.compare(0, 4, "node") == 0 &&
        std::all_of(name.begin() + 4, name.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
      ++nodes;
  }
  return nodes == 1 ? 0 : -1;
}

std::string cpu_list_text(const std::vector<int>& cpus) {
  std::string out;
  for (std::size_t i = 0; i < cpus.size();) {
    std::size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += std::to_string(cpus[i]);
    if (j > i) out += "-" + std::to_string(cpus[j]);
    i = j + 1;
  }
  return out;
}

std::vector<int> nvml_affinity(const Nvml& nvml, nvmlDevice_t dev) {
  constexpr unsigned kWords = 64;  // 4096 CPUs
  unsigned long mask[kWords] = {};
  if (nvml.api().cpu_affinity(dev, kWords, mask) != NVML_SUCCESS) return {};
  std::vector<int> cpus;
  const unsigned bits = 8 * sizeof(unsigned long);
  for (unsigned w = 0; w < kWords; ++w)
    for (unsigned b = 0; b < bits; ++b)
      if (mask[w] >> b & 1UL) cpus.push_back(static_cast<int>(w * bits + b));
  return cpus;
}

double pcie_gbps_for(const cudaDeviceProp& p, const TopologyEstimates& est) {
  if (est.pcie_gbps > 0) return est.pcie_gbps;
  if (p.major >= 9) return 50;  // Hopper: PCIe gen5
  if (p.major == 8) return 25;  // Ampere/Ada: gen4
  return 12;                    // Volta and older: gen3
}

struct VisibleGpus {
  std::vector<GpuInfo> info;
  std::vector<cudaDeviceProp> props;
};

VisibleGpus visible_gpus() {
  VisibleGpus out;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return out;
  }
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    cuda_check(cudaGetDeviceProperties(&prop, d), "cudaGetDeviceProperties");
    GpuInfo g;
    g.local_index = d;
    g.name = prop.name;
    g.pci_bus_id = cuda_pci_bus_id(d);
    g.numa_node = sysfs_numa_node(g.pci_bus_id);
    out.info.push_back(g);
    out.props.push_back(prop);
  }
  return out;
}

bool p2p_attr(int a, int b, cudaDeviceP2PAttr attr) {
  int v = 0;
  if (cudaDeviceGetP2PAttribute(&v, attr, a, b) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return v != 0;
}

}  // namespace

std::string cuda_pci_bus_id(int device) {
  char buf[64] = {};
  cuda_check(cudaDeviceGetPCIBusId(buf, sizeof buf, device), "cudaDeviceGetPCIBusId");
  return normalise_bus_id(buf);
}

std::vector<int> nvml_cpu_affinity(int device) {
  try {
    Nvml nvml;
    nvmlDevice_t dev = nullptr;
    nvml.check(nvml.api().handle_by_pci_bus_id(cuda_pci_bus_id(device).c_str(), &dev),
               "nvmlDeviceGetHandleByPciBusId_v2");
    return nvml_affinity(nvml, dev);
  } catch (const Error&) {
    return {};
  }
}

Topology discover_topology_nvml(const TopologyEstimates& est_in) {
  Nvml nvml;
  VisibleGpus gpus = visible_gpus();
  const int n = static_cast<int>(gpus.info.size());
  if (n == 0) return Topology();
  TopologyEstimates est = est_in;
  est.pcie_gbps = pcie_gbps_for(gpus.props[0], est_in);
  // NVLink1 (Pascal) runs at 20 GB/s per link and direction, later generations at 25.
  if (gpus.props[0].major == 6) est.nvlink_gbps_per_link = 20.0;

  std::vector<nvmlDevice_t> handles(static_cast<std::size_t>(n));
  std::map<std::string, int> by_bus;
  for (int i = 0; i < n; ++i) {
    GpuInfo& g = gpus.info[static_cast<std::size_t>(i)];
    nvml.check(nvml.api().handle_by_pci_bus_id(g.pci_bus_id.c_str(), &handles[static_cast<std::size_t>(i)]),
               "nvmlDeviceGetHandleByPciBusId_v2");
    by_bus[g.pci_bus_id] = i;
    g.cpu_affinity = cpu_list_text(nvml_affinity(nvml, handles[static_cast<std::size_t>(i)]));
  }
  // Count each GPU's active NVLinks: to a peer GPU directly, or to an NVSwitch.
  std::vector<std::vector<int>> direct(static_cast<std::size_t>(n), std::vector<int>(static_cast<std::size_t>(n), 0));
  std::vector<int> to_switch(static_cast<std::size_t>(n), 0);
  for (int i = 0; i < n; ++i) {
    nvmlDevice_t h = handles[static_cast<std::size_t>(i)];
    for (unsigned l = 0; l < kNvmlMaxLinks; ++l) {
      nvmlEnableState_t active = 0;
      if (nvml.api().nvlink_state(h, l, &active) != NVML_SUCCESS || active != NVML_FEATURE_ENABLED) continue;
      nvmlIntNvLinkDeviceType_t type = -1;
      if (nvml.api().nvlink_remote_type && nvml.api().nvlink_remote_type(h, l, &type) == NVML_SUCCESS &&
          type == NVML_NVLINK_DEVICE_TYPE_SWITCH) {
        ++to_switch[static_cast<std::size_t>(i)];
        continue;
      }
      nvmlPciInfo_t remote{};
      if (nvml.api().nvlink_remote_pci(h, l, &remote) != NVML_SUCCESS) continue;
      const auto it = by_bus.find(normalise_bus_id(remote.busId));
      if (it != by_bus.end())
        ++direct[static_cast<std::size_t>(i)][static_cast<std::size_t>(it->second)];
      else
        ++to_switch[static_cast<std::size_t>(i)];  // not a visible GPU: an NVSwitch (or a hidden GPU)
    }
  }
  bool nvswitch = false;
  std::vector<std::vector<Link>> links(static_cast<std::size_t>(n), std::vector<Link>(static_cast<std::size_t>(n)));
  for (int i = 0; i < n; ++i) links[static_cast<std::size_t>(i)][static_cast<std::size_t>(i)].kind = LinkKind::Self;
  // Each pair is measured once and mirrored, so the matrix is symmetric whatever the driver says.
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j) {
      Link& l = links[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)];
      const int si = to_switch[static_cast<std::size_t>(i)], sj = to_switch[static_cast<std::size_t>(j)];
      const int d = std::min(direct[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)],
                             direct[static_cast<std::size_t>(j)][static_cast<std::size_t>(i)]);
      if (si > 0 && sj > 0 && p2p_attr(i, j, cudaDevP2PAttrAccessSupported)) {
        l.kind = LinkKind::NVSwitch;
        l.nvlinks = std::min(si, sj);
        nvswitch = true;
      } else if (d > 0) {
        l.kind = LinkKind::NVLink;
        l.nvlinks = d;
      } else {
        nvmlGpuTopologyLevel_t level = 50;
        if (nvml.api().common_ancestor(handles[static_cast<std::size_t>(i)], handles[static_cast<std::size_t>(j)],
                                       &level) != NVML_SUCCESS)
          level = 50;
        l.kind = level <= 10 ? LinkKind::PIX
                 : level <= 20 ? LinkKind::PXB
                 : level <= 30 ? LinkKind::PHB
                 : level <= 40 ? LinkKind::Node
                               : LinkKind::Sys;
      }
      l.gbps = estimate_link_gbps(l.kind, l.nvlinks, est);
      links[static_cast<std::size_t>(j)][static_cast<std::size_t>(i)] = l;
    }
  return Topology(std::move(gpus.info), std::move(links), {nvswitch}, "nvml");
}

Topology discover_topology_cuda(const TopologyEstimates& est_in) {
  VisibleGpus gpus = visible_gpus();
  const int n = static_cast<int>(gpus.info.size());
  if (n == 0) return Topology();
  TopologyEstimates est = est_in;
  est.pcie_gbps = pcie_gbps_for(gpus.props[0], est_in);
  std::vector<std::vector<Link>> links(static_cast<std::size_t>(n), std::vector<Link>(static_cast<std::size_t>(n)));
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      Link& l = links[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)];
      if (i == j) {
        l.kind = LinkKind::Self;
        continue;
      }
      // Native peer atomics come with NVLink, rarely with PCIe; the link count is unknown, so
      // assume the four links of a bridge or a small direct connection.
      const bool access = p2p_attr(i, j, cudaDevP2PAttrAccessSupported) && p2p_attr(j, i, cudaDevP2PAttrAccessSupported);
      const bool atomics = access && p2p_attr(i, j, cudaDevP2PAttrNativeAtomicSupported) &&
                           p2p_attr(j, i, cudaDevP2PAttrNativeAtomicSupported);
      if (atomics) {
        l.kind = LinkKind::NVLink;
        l.nvlinks = 4;
      } else if (access) {
        l.kind = LinkKind::PHB;
      } else {
        l.kind = LinkKind::Sys;
      }
      l.gbps = estimate_link_gbps(l.kind, l.nvlinks, est);
    }
  // Keep the matrix symmetric even if the driver answers differently each way.
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j)
      links[static_cast<std::size_t>(j)][static_cast<std::size_t>(i)] =
          links[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)];
  return Topology(std::move(gpus.info), std::move(links), {false}, "cuda");
}

}  // namespace dstrain::detail
