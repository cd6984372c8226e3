// The AllreduceAlgo names shared by the planner (topology.h), the communicators that carry the
// algorithms out, the benchmarks and the DSTRAIN_ALLREDUCE_ALGO override.
#pragma once
#include <string>

namespace dstrain {

enum class AllreduceAlgo {
  Auto,          // the planner decides per message size and topology
  Nccl,          // NCCL's own (ring/tree chosen by NCCL)
  Mpi,           // MPI_Allreduce on host buffers
  Hierarchical,  // intra-node reduce-scatter, inter-node AllReduce, intra-node all-gather
  OneShot,       // every rank reads all peers' buffers over NVLink and reduces (small messages)
  TwoShot,       // reduce-scatter then all-gather over NVLink peer memory (medium messages)
};

// "auto", "nccl", "mpi", "hierarchical", "oneshot", "twoshot".
const char* allreduce_algo_name(AllreduceAlgo algo);
// Accepts the names above (case-insensitive, "one-shot"/"two-shot" too); anything else raises
// InvalidArgument listing the valid names.
AllreduceAlgo parse_allreduce_algo(const std::string& text);
// DSTRAIN_ALLREDUCE_ALGO if set and non-empty, else Auto. A bad value raises InvalidArgument.
AllreduceAlgo allreduce_algo_from_env();

}  // namespace dstrain
