#include <cstdlib>
#include <string>

#include "collectives/collectives.h"
#include "dstrain/error.h"

namespace dstrain::collectives {

namespace {
class SelfCommunicator final : public Communicator {
 public:
  explicit SelfCommunicator(Device device) : device_(device) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const char* backend() const override { return "self"; }
  Device device() const override { return device_; }
  void allreduce(Tensor& t, ReduceOp, Context&) override { check(t); }
  void broadcast(Tensor& t, int root, Context&) override {
    check(t);
    DSTRAIN_CHECK(root == 0, "broadcast root " + std::to_string(root) + " in a job of one rank");
  }

 private:
  void check(const Tensor& t) const {
    DSTRAIN_CHECK(t.device() == device_, "collective buffer on " + t.device().str() + ", communicator on " +
                                             device_.str());
  }
  Device device_;
};
}  // namespace

std::unique_ptr<Communicator> make_self_communicator(Device device) {
  return std::make_unique<SelfCommunicator>(device);
}

bool launched_by_mpi_launcher() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "PMI_RANK"})
    if (std::getenv(name)) return true;
  return false;
}

#ifndef DSTRAIN_HAVE_MPI
std::unique_ptr<MpiSession> start_mpi_session(int&, char**&) {
  if (launched_by_mpi_launcher())
    DSTRAIN_THROW(ErrorCode::Unsupported,
                  "started by an MPI launcher, but this dstrain was built without MPI (DSTRAIN_WITH_MPI=OFF)");
  return nullptr;
}
#endif

#ifndef DSTRAIN_HAVE_CUDA
std::vector<char> nccl_unique_id() { DSTRAIN_THROW(ErrorCode::Unsupported, "NCCL in a build without CUDA"); }
std::unique_ptr<Communicator> make_nccl_communicator(const std::vector<char>&, int, int, int) {
  DSTRAIN_THROW(ErrorCode::Unsupported, "NCCL in a build without CUDA");
}
#endif

}  // namespace dstrain::collectives
