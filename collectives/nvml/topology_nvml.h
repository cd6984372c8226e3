// Live topology discovery through NVML (loaded with dlopen) and the CUDA runtime. Built only
// with CUDA (collectives/nvml/topology_nvml.cpp); libdstrain/src/topology.cpp calls these behind
// DSTRAIN_HAVE_CUDA.
#pragma once
#include <string>
#include <vector>

#include "dstrain/topology.h"

namespace dstrain::detail {

// The visible CUDA devices with NVLink counts, NVSwitch links and PCIe levels from NVML, P2P
// support from CUDA. Raises Unsupported when libnvidia-ml.so.1 cannot be loaded or initialised.
Topology discover_topology_nvml(const TopologyEstimates& est);
// From CUDA alone (no NVML): P2P access and native atomics tell NVLink from PCIe, roughly.
// An empty topology when no device is visible.
Topology discover_topology_cuda(const TopologyEstimates& est);
// CPU cores NVML reports as local to CUDA device `device`; empty when NVML is unavailable.
std::vector<int> nvml_cpu_affinity(int device);
// "0000:18:00.0" (lower case, 4-digit domain, as in /sys/bus/pci/devices).
std::string cuda_pci_bus_id(int device);

}  // namespace dstrain::detail
