#include "dstrain/allreduce_algo.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

#include "dstrain/error.h"

namespace dstrain {

const char* allreduce_algo_name(AllreduceAlgo algo) {
  switch (algo) {
    case AllreduceAlgo::Auto: return "auto";
    case AllreduceAlgo::Nccl: return "nccl";
    case AllreduceAlgo::Mpi: return "mpi";
    case AllreduceAlgo::Hierarchical: return "hierarchical";
    case AllreduceAlgo::OneShot: return "oneshot";
    case AllreduceAlgo::TwoShot: return "twoshot";
  }
  return "?";
}

AllreduceAlgo parse_allreduce_algo(const std::string& text) {
  std::string key;
  for (char c : text)
    if (c != '-' && c != '_') key += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (AllreduceAlgo a : {AllreduceAlgo::Auto, AllreduceAlgo::Nccl, AllreduceAlgo::Mpi, AllreduceAlgo::Hierarchical,
                          AllreduceAlgo::OneShot, AllreduceAlgo::TwoShot})
    if (key == allreduce_algo_name(a)) return a;
  DSTRAIN_THROW(ErrorCode::InvalidArgument,
                "AllReduce algorithm '" + text + "': expected auto, nccl, mpi, hierarchical, oneshot or twoshot");
}

AllreduceAlgo allreduce_algo_from_env() {
  const char* env = std::getenv("DSTRAIN_ALLREDUCE_ALGO");
  if (!env || !*env) return AllreduceAlgo::Auto;
  return parse_allreduce_algo(env);
}

}  // namespace dstrain
