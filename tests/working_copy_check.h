// Low-precision working copies kept by the optimizer (nn.h "Working copies"), checked on one
// device: a network whose layers use external copies written by the fused optimizer against the
// same network converting its masters at every forward. Shared by the CPU and the GPU tests.
#pragma once
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "dstrain/amp.h"
#include "dstrain/amp_policy.h"
#include "dstrain/context.h"
#include "dstrain/dtype.h"
#include "dstrain/nn.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

namespace dstrain_test {

using Bytes = std::vector<unsigned char>;

// A tensor's bytes on the host (the copy waits for the device's queued work).
inline Bytes bytes_of(const dstrain::Tensor& t) {
  const dstrain::Tensor host = t.to(dstrain::Device::cpu());
  const auto* p = static_cast<const unsigned char*>(host.data());
  return Bytes(p, p + host.nbytes());
}

// The fp32 master rounded to `dtype` on the host, as bytes.
inline Bytes rounded_bytes(const dstrain::Tensor& master, dstrain::DType dtype) {
  const Bytes src = bytes_of(master);
  Bytes out(static_cast<std::size_t>(master.numel()) * dstrain::dtype_size(dtype));
  dstrain::convert_host(src.data(), dstrain::DType::F32, out.data(), dtype, static_cast<std::size_t>(master.numel()));
  return out;
}

inline dstrain::Tensor random_tensor(const dstrain::Shape& shape, dstrain::Device device, std::mt19937& rng,
                                     float lo, float hi) {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = dist(rng);
  return dstrain::Tensor::from_vector(shape, v).to(device);
}

// Conv2d, BatchNorm (fp32 parameters: no copies), a strided ConvBnRelu (a copy of its filter, none
// of its gamma and beta), pooling and Linear with a bias.
inline std::unique_ptr<dstrain::nn::Sequential> working_copy_net(dstrain::Device device, dstrain::amp::Policy policy) {
  namespace nn = dstrain::nn;
  auto net = std::make_unique<nn::Sequential>();
  net->emplace<nn::Conv2d>(device, 3, 8, 3, 1, 1, false, policy);
  net->emplace<nn::BatchNorm2d>(device, 8);
  net->emplace<nn::ReLU>();
  net->emplace<nn::ConvBnRelu>(device, 8, 12, 3, 2, 1, policy);
  net->emplace<nn::GlobalAvgPool>();
  net->emplace<nn::Linear>(device, 12, 5, true, policy);
  net->set_needs_input_grad(false);
  return net;
}

inline std::vector<dstrain::Tensor*> master_values(dstrain::nn::Layer& model) {
  std::vector<dstrain::Tensor*> v;
  for (dstrain::nn::Parameter* p : model.parameters()) v.push_back(&p->value);
  return v;
}

inline std::vector<dstrain::Tensor*> master_grads(dstrain::nn::Layer& model) {
  std::vector<dstrain::Tensor*> v;
  for (dstrain::nn::Parameter* p : model.parameters()) v.push_back(&p->grad);
  return v;
}

// Every working copy of `model` holds its master rounded to the copy's dtype, bit for bit.
inline void check_copies_are_rounded_masters(dstrain::nn::Layer& model) {
  for (const dstrain::nn::WorkingCopy& c : model.working_copies()) {
    INFO(c.master->name);
    CHECK(bytes_of(*c.low) == rounded_bytes(c.master->value, c.low->dtype()));
  }
}

// Deterministic algorithms while alive (two networks compared bit for bit must take the same
// ones, with no atomics in their reductions); the previous mode after.
class DeterministicScope {
 public:
  DeterministicScope() : was_(dstrain::ops::deterministic()) { dstrain::ops::set_deterministic(true); }
  ~DeterministicScope() { dstrain::ops::set_deterministic(was_); }
  DeterministicScope(const DeterministicScope&) = delete;
  DeterministicScope& operator=(const DeterministicScope&) = delete;

 private:
  bool was_;
};

enum class FusedOptimizer { Sgd, AdamW };

// The fused optimizer over `model`'s masters: step(grads, found_inf, low_precision copies).
using StepFn = std::function<void(dstrain::Context&, const std::vector<dstrain::Tensor*>&, const dstrain::Tensor*,
                                  const std::vector<dstrain::Tensor*>*)>;

inline StepFn make_fused_optimizer(FusedOptimizer kind, dstrain::nn::Layer& model) {
  if (kind == FusedOptimizer::Sgd) {
    dstrain::amp::FusedSGDOptions o;
    o.lr = 0.05f;
    o.momentum = 0.9f;
    o.weight_decay = 5e-4f;
    o.nesterov = true;
    auto opt = std::make_shared<dstrain::amp::FusedSGD>(master_values(model), o);
    return [opt](dstrain::Context& ctx, const std::vector<dstrain::Tensor*>& g, const dstrain::Tensor* found_inf,
                 const std::vector<dstrain::Tensor*>* low) { opt->step(ctx, g, found_inf, low); };
  }
  dstrain::amp::FusedAdamWOptions o;
  o.lr = 1e-2f;
  auto opt = std::make_shared<dstrain::amp::FusedAdamW>(master_values(model), o);
  return [opt](dstrain::Context& ctx, const std::vector<dstrain::Tensor*>& g, const dstrain::Tensor* found_inf,
               const std::vector<dstrain::Tensor*>* low) { opt->step(ctx, g, found_inf, low); };
}

// Trains two identical networks a few steps on `ctx`'s device: `external` computes from working
// copies the fused optimizer writes, `converting` (the default) converts its masters at every
// forward. Both get the same gradients (external's), so their masters stay bit-identical; then
// after every step each copy must equal its master rounded, and the forward outputs must be
// bit-identical. A step skipped by the GradScaler must leave masters and copies untouched.
inline void check_external_working_copies(dstrain::Context& ctx, dstrain::amp::Policy policy, FusedOptimizer kind,
                                          std::mt19937& rng) {
  namespace nn = dstrain::nn;
  using dstrain::Tensor;
  const DeterministicScope deterministic;
  const dstrain::Device dev = ctx.device();
  auto external = working_copy_net(dev, policy);
  auto converting = working_copy_net(dev, policy);
  const std::uint64_t seed = rng();
  nn::init_parameters(*external, seed);
  nn::init_parameters(*converting, seed);
  external->set_working_copies_external(true);
  REQUIRE(external->working_copies_external());
  REQUIRE(external->layer(0).working_copies_external());
  REQUIRE_FALSE(converting->layer(0).working_copies_external());

  // Conv filters always have a copy; Linear's only outside FP8; BatchNorm's and the bias never.
  const std::vector<nn::WorkingCopy> copies = external->working_copies();
  REQUIRE(copies.size() == (policy.fp8_linear() ? 2u : 3u));
  const std::vector<Tensor*> low = nn::working_copy_per_parameter(*external);
  const std::vector<nn::Parameter*> params = external->parameters();
  REQUIRE(low.size() == params.size());
  std::size_t given = 0;
  for (std::size_t i = 0; i < low.size(); ++i) {
    if (low[i] == nullptr) continue;
    ++given;
    CHECK(low[i]->shape() == params[i]->value.shape());
    CHECK(low[i]->dtype() == policy.compute_dtype(dstrain::amp::OpKind::Conv));
    CHECK(low[i]->device() == dev);
  }
  CHECK(given == copies.size());

  nn::refresh_working_copies(ctx, *external);
  check_copies_are_rounded_masters(*external);

  StepFn step_external = make_fused_optimizer(kind, *external);
  StepFn step_converting = make_fused_optimizer(kind, *converting);
  const std::vector<Tensor*> grads_external = master_grads(*external);
  const std::vector<Tensor*> grads_converting = master_grads(*converting);
  Tensor y_external, y_converting;  // the latest forward outputs
  auto forward_both = [&](const Tensor& x) {
    y_external = external->forward(ctx, x, true).to(dstrain::Device::cpu());
    y_converting = converting->forward(ctx, x, true).to(dstrain::Device::cpu());
    return bytes_of(y_external) == bytes_of(y_converting);
  };

  const int steps = 3;
  for (int s = 0; s < steps; ++s) {
    INFO("step " << s);
    const Tensor x = random_tensor({4, 8, 8, 3}, dev, rng, -2.0f, 2.0f);
    const Tensor dy = random_tensor({4, 5}, dev, rng, -1.0f, 1.0f);
    CHECK(forward_both(x));
    external->backward(ctx, dy);
    converting->backward(ctx, dy);
    // The same gradients for both, whatever the backward algorithms do.
    for (std::size_t i = 0; i < grads_external.size(); ++i) grads_converting[i]->copy_from(*grads_external[i]);
    std::vector<Bytes> copies_before;
    for (const nn::WorkingCopy& c : copies) copies_before.push_back(bytes_of(*c.low));
    step_external(ctx, grads_external, nullptr, &low);
    step_converting(ctx, grads_converting, nullptr, nullptr);
    for (std::size_t i = 0; i < params.size(); ++i)
      CHECK(bytes_of(params[i]->value) == bytes_of(*master_values(*converting)[i]));
    check_copies_are_rounded_masters(*external);
    // The step moved every copy (the optimizer wrote them, they did not merely stay equal).
    for (std::size_t i = 0; i < copies.size(); ++i) CHECK(bytes_of(*copies[i].low) != copies_before[i]);
  }
  const Tensor x = random_tensor({4, 8, 8, 3}, dev, rng, -2.0f, 2.0f);
  CHECK(forward_both(x));

  // A skipped step: an inf planted in one gradient, found by the scaler, writes nothing.
  dstrain::amp::GradScaler scaler(dev);
  std::vector<float> g0 = grads_external[0]->to_host_floats();
  g0[g0.size() / 2] = std::numeric_limits<float>::infinity();
  grads_external[0]->copy_from(Tensor::from_vector(grads_external[0]->shape(), g0));
  scaler.unscale_and_check(ctx, grads_external);
  REQUIRE(scaler.found_inf_set(ctx));
  std::vector<Bytes> before;
  for (Tensor* p : master_values(*external)) before.push_back(bytes_of(*p));
  for (const nn::WorkingCopy& c : copies) before.push_back(bytes_of(*c.low));
  step_external(ctx, grads_external, &scaler.found_inf(), &low);
  std::vector<Bytes> after;
  for (Tensor* p : master_values(*external)) after.push_back(bytes_of(*p));
  for (const nn::WorkingCopy& c : copies) after.push_back(bytes_of(*c.low));
  CHECK(before == after);
  CHECK(forward_both(x));

  // External layers compute from the copy as it is: a stale copy shows in the output, until a
  // refresh; a converting layer ignores it.
  copies[0].low->zero();
  CHECK_FALSE(forward_both(x));
  nn::refresh_working_copies(ctx, *external);
  check_copies_are_rounded_masters(*external);
  CHECK(forward_both(x));
  copies[0].low->zero();
  external->set_working_copies_external(false);
  CHECK(forward_both(x));
  check_copies_are_rounded_masters(*external);  // the forward converted into the copy
}

}  // namespace dstrain_test
