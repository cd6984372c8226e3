#include "dstrain/data_parallel.h"

#include "dstrain/error.h"

namespace dstrain {

DataParallel::DataParallel(Runtime& runtime, nn::Layer& model) : runtime_(runtime) {
  Communicator& comm = runtime.comm();
  Context& ctx = runtime.context();
  const auto params = model.parameters();
  DSTRAIN_CHECK(!params.empty(), "DataParallel over a model without parameters");
  std::int64_t total = 0;
  for (nn::Parameter* p : params) {
    DSTRAIN_CHECK(p->value.device() == comm.device(),
                  "parameter " + p->name + " is on " + p->value.device().str() + " but the communicator works on " +
                      comm.device().str());
    total += p->value.numel();
  }
  flat_grads_ = Tensor::zeros({total}, DType::F32, comm.device());
  auto* base = flat_grads_.data_as<float>();
  std::int64_t offset = 0;
  for (nn::Parameter* p : params) {
    p->grad = Tensor::wrap(base + offset, p->value.shape(), DType::F32, comm.device());
    offset += p->value.numel();
  }
  for (nn::Parameter* p : params) comm.broadcast(p->value, 0, ctx);
  for (Tensor* b : model.buffers()) comm.broadcast(*b, 0, ctx);
  ctx.synchronize();
}

void DataParallel::sync(ReduceOp op) {
  if (runtime_.world_size() == 1) return;
  runtime_.comm().allreduce(flat_grads_, op, runtime_.context());
}

void DataParallel::reduce_gradients() { sync(ReduceOp::Sum); }
void DataParallel::average_gradients() { sync(ReduceOp::Avg); }

}  // namespace dstrain
