#include "dstrain/runtime.h"

#include <cstdlib>
#include <sstream>

#include "collectives/collectives.h"
#include "collectives/dispatch.h"
#include "dstrain/error.h"
#include "dstrain/topology.h"

namespace dstrain {

DevicePreference parse_device_preference(const std::string& text) {
  if (text == "auto") return DevicePreference::Auto;
  if (text == "cpu") return DevicePreference::Cpu;
  if (text == "cuda" || text == "gpu") return DevicePreference::Cuda;
  DSTRAIN_THROW(ErrorCode::InvalidArgument, "device '" + text + "': expected cpu, cuda or auto");
}

struct Runtime::Impl {
  // Declaration order is destruction order reversed: the communicator and context go before MPI.
  std::unique_ptr<collectives::MpiSession> mpi;
  collectives::ProcessInfo info;
  Context context = Context::cpu();
  std::unique_ptr<Communicator> host_comm;
  std::unique_ptr<Communicator> comm;  // gradients: NCCL on GPUs, else a second MPI communicator
};

namespace {

Device choose_device(DevicePreference pref, const collectives::ProcessInfo& info) {
  if (pref == DevicePreference::Auto) {
    if (const char* env = std::getenv("DSTRAIN_DEVICE"); env && *env) pref = parse_device_preference(env);
  }
  const int gpus = cuda_device_count();
  if (pref == DevicePreference::Cpu) return Device::cpu();
  if (pref == DevicePreference::Cuda) {
    if (info.local_size > gpus)
      DSTRAIN_THROW(ErrorCode::InvalidArgument,
                    "--device cuda: " + std::to_string(info.local_size) + " ranks on this node but " +
                        std::to_string(gpus) + " GPU(s) visible; NCCL needs one GPU per rank");
    return Device::cuda(info.local_rank);
  }
  // Auto: GPUs only when each rank of the node can have its own.
  if (gpus > 0 && info.local_size <= gpus) return Device::cuda(info.local_rank);
  if (gpus > 0 && info.rank == 0)
    detail::log_warning(std::to_string(info.local_size) + " ranks per node but " + std::to_string(gpus) +
                        " GPU(s): running on the CPU");
  return Device::cpu();
}

}  // namespace

Runtime::Runtime(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Runtime::~Runtime() = default;
Runtime::Runtime(Runtime&&) noexcept = default;
Runtime& Runtime::operator=(Runtime&&) noexcept = default;

Runtime Runtime::init(int& argc, char**& argv, const RuntimeOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->mpi = collectives::start_mpi_session(argc, argv);
  if (impl->mpi) impl->info = impl->mpi->info();
  const Device device = choose_device(options.device, impl->info);
  // Host threads feeding a GPU run on its NUMA-local cores (DSTRAIN_BIND_CPU=0 turns this off).
  if (device.is_cuda()) bind_to_gpu_numa_cores(device.index);
  impl->context = Context::for_device(device);
  const int size = impl->info.size;
  DSTRAIN_CHECK(options.timeout_s >= 0, "timeout must be >= 0 seconds (0: default), got " +
                                             std::to_string(options.timeout_s));
  const double timeout_s = options.timeout_s > 0 ? options.timeout_s : default_collective_timeout_s();
  if (impl->mpi) impl->mpi->set_timeout(timeout_s);
  // The host communicator first: the NCCL one exchanges its debug fingerprints over it.
  impl->host_comm = impl->mpi ? impl->mpi->make_host_communicator() : collectives::make_self_communicator(Device::cpu());
  impl->host_comm->set_timeout(timeout_s);
  if (device.is_cuda()) {
    std::vector<char> id;
    if (impl->info.rank == 0) id = collectives::nccl_unique_id();
    if (impl->mpi) impl->mpi->broadcast_bytes(id, 0);
    impl->comm = collectives::make_nccl_communicator(id, impl->info.rank, size, device.index, timeout_s,
                                                     impl->host_comm.get());
  } else if (impl->mpi) {
    impl->comm = impl->mpi->make_host_communicator();
  } else {
    impl->comm = collectives::make_self_communicator(device);
  }
  // Several GPUs: each AllReduce takes the algorithm the topology plan picks for its size.
  if (device.is_cuda() && size > 1)
    impl->comm = collectives::make_gpu_dispatch(std::move(impl->comm), *impl->host_comm, impl->info, device.index);
  impl->comm->set_timeout(timeout_s);
  return Runtime(std::move(impl));
}

int Runtime::rank() const { return impl_->info.rank; }
int Runtime::world_size() const { return impl_->info.size; }
int Runtime::local_rank() const { return impl_->info.local_rank; }
int Runtime::local_size() const { return impl_->info.local_size; }
int Runtime::node_count() const { return impl_->info.node_count; }
bool Runtime::launched_by_mpi() const { return impl_->mpi != nullptr; }
Device Runtime::device() const { return impl_->context.device(); }
Context& Runtime::context() { return impl_->context; }
Communicator& Runtime::comm() { return *impl_->comm; }
Communicator& Runtime::host_comm() { return *impl_->host_comm; }

bool Runtime::all_ranks_equal(std::uint64_t value) { return impl_->mpi ? impl_->mpi->all_equal_u64(value) : true; }

void Runtime::host_allreduce_sum(double* values, int n) {
  if (impl_->mpi) impl_->mpi->allreduce_sum_f64(values, n);
}

void Runtime::barrier() {
  if (impl_->mpi) impl_->mpi->barrier();
}

void Runtime::abort_job(int exit_code) noexcept {
  if (impl_->mpi && world_size() > 1) impl_->mpi->abort(exit_code);
}

std::string Runtime::describe() const {
  std::ostringstream out;
  out << world_size() << " rank(s) on " << node_count() << " node(s), " << local_size() << " per node; rank "
      << rank() << " on " << device().str() << "; communicator " << impl_->comm->backend();
  return out.str();
}

}  // namespace dstrain
