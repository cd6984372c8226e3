// Low-precision working copies written by the fused optimizers (nn.h "Working copies") on the
// CPU: the layers' copies and their slots per parameter, the optimizers' null slots, and training
// with external copies against layers that convert at every forward, bit for bit.
#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <vector>

#include "dstrain/amp.h"
#include "dstrain/context.h"
#include "dstrain/error.h"
#include "dstrain/nn.h"
#include "dstrain/tensor.h"
#include "gpu/seeded_rng.h"
#include "working_copy_check.h"

using dstrain::Context;
using dstrain::Device;
using dstrain::DType;
using dstrain::Tensor;
namespace amp = dstrain::amp;
namespace nn = dstrain::nn;

TEST_CASE("working copies: none under fp32, one per conv/linear weight under fp16/bf16/fp8", "[nn][amp]") {
  const Device cpu = Device::cpu();
  auto fp32 = dstrain_test::working_copy_net(cpu, amp::Policy::fp32());
  CHECK(fp32->working_copies().empty());
  for (Tensor* t : nn::working_copy_per_parameter(*fp32)) CHECK(t == nullptr);

  for (const amp::Policy policy : {amp::Policy::fp16(), amp::Policy::bf16(), amp::Policy::fp8_hybrid()}) {
    auto net = dstrain_test::working_copy_net(cpu, policy);
    const std::vector<nn::Parameter*> params = net->parameters();
    const std::vector<Tensor*> slots = nn::working_copy_per_parameter(*net);
    REQUIRE(slots.size() == params.size());
    // conv.weight, bn.gamma, bn.beta, conv_bn_relu.{weight, gamma, beta}, linear.weight, linear.bias
    REQUIRE(params.size() == 8);
    const auto& conv = static_cast<nn::Conv2d&>(net->layer(0));
    const auto& conv_bn_relu = static_cast<nn::ConvBnRelu&>(net->layer(3));
    CHECK(slots[0] != nullptr);
    CHECK(slots[0]->dtype() == conv.compute_dtype());
    CHECK(slots[1] == nullptr);
    CHECK(slots[2] == nullptr);
    CHECK(slots[3] != nullptr);
    CHECK(slots[3]->dtype() == conv_bn_relu.compute_dtype());
    CHECK(slots[4] == nullptr);
    CHECK(slots[5] == nullptr);
    CHECK((slots[6] != nullptr) == !policy.fp8_linear());
    CHECK(slots[7] == nullptr);
    // Made with the layer, before any forward: a refresh fills them from the masters.
    nn::init_parameters(*net, 7);
    Context ctx = Context::cpu();
    nn::refresh_working_copies(ctx, *net);
    dstrain_test::check_copies_are_rounded_masters(*net);
  }
}

TEST_CASE("working copies: Sequential sets its children external and back", "[nn][amp]") {
  auto net = dstrain_test::working_copy_net(Device::cpu(), amp::Policy::bf16());
  for (std::size_t i = 0; i < net->size(); ++i) CHECK_FALSE(net->layer(i).working_copies_external());
  net->set_working_copies_external(true);
  for (std::size_t i = 0; i < net->size(); ++i) CHECK(net->layer(i).working_copies_external());
  net->set_working_copies_external(false);
  for (std::size_t i = 0; i < net->size(); ++i) CHECK_FALSE(net->layer(i).working_copies_external());
}

TEST_CASE("fused optimizers write only the copies given, null slots skipped", "[amp][optim]") {
  Context ctx = Context::cpu();
  const Device cpu = Device::cpu();
  for (const DType low : {DType::F16, DType::BF16}) {
    for (const auto kind : {dstrain_test::FusedOptimizer::Sgd, dstrain_test::FusedOptimizer::AdamW}) {
      INFO(dstrain::dtype_name(low) << (kind == dstrain_test::FusedOptimizer::Sgd ? " sgd" : " adamw"));
      std::mt19937 rng(11);
      nn::Sequential holder;  // three Linear layers' masters under fp32: the optimizer's parameters
      for (int i = 0; i < 3; ++i) holder.emplace<nn::Linear>(cpu, 5 + i, 3, /*bias=*/false);
      nn::init_parameters(holder, 3);
      const std::vector<Tensor*> values = dstrain_test::master_values(holder);
      const std::vector<Tensor*> grads = dstrain_test::master_grads(holder);
      for (Tensor* g : grads) g->copy_from(dstrain_test::random_tensor(g->shape(), cpu, rng, -1.0f, 1.0f));
      Tensor copy0 = Tensor::empty(values[0]->shape(), low, cpu);
      Tensor copy2 = Tensor::empty(values[2]->shape(), low, cpu);
      copy0.fill_bytes(0xFF);
      copy2.fill_bytes(0xFF);
      const std::vector<Tensor*> slots{&copy0, nullptr, &copy2};
      dstrain_test::StepFn step = dstrain_test::make_fused_optimizer(kind, holder);
      step(ctx, grads, nullptr, &slots);
      CHECK(dstrain_test::bytes_of(copy0) == dstrain_test::rounded_bytes(*values[0], low));
      CHECK(dstrain_test::bytes_of(copy2) == dstrain_test::rounded_bytes(*values[2], low));

      // All slots null: a step like one without copies.
      const std::vector<Tensor*> none(3, nullptr);
      const std::vector<float> before = values[1]->to_host_floats();
      step(ctx, grads, nullptr, &none);
      CHECK(values[1]->to_host_floats() != before);

      // Copies of two dtypes, a wrong shape, a wrong count: refused.
      Tensor other = Tensor::empty(values[2]->shape(), low == DType::F16 ? DType::BF16 : DType::F16, cpu);
      const std::vector<Tensor*> mixed{&copy0, nullptr, &other};
      CHECK_THROWS_AS(step(ctx, grads, nullptr, &mixed), dstrain::Error);
      const std::vector<Tensor*> misplaced{nullptr, &copy0, nullptr};
      CHECK_THROWS_AS(step(ctx, grads, nullptr, &misplaced), dstrain::Error);
      const std::vector<Tensor*> short_list{&copy0, nullptr};
      CHECK_THROWS_AS(step(ctx, grads, nullptr, &short_list), dstrain::Error);
    }
  }
}

TEST_CASE("external working copies follow the masters through FusedSGD, bit-identical forward", "[nn][amp][optim]") {
  Context ctx = Context::cpu();
  SEEDED_RNG(rng);
  for (const amp::Policy policy : {amp::Policy::fp16(), amp::Policy::bf16(), amp::Policy::fp8_hybrid()}) {
    INFO("policy " << (policy.fp8_linear() ? "fp8" : dstrain::dtype_name(policy.compute_dtype(amp::OpKind::Conv))));
    dstrain_test::check_external_working_copies(ctx, policy, dstrain_test::FusedOptimizer::Sgd, rng);
  }
}

TEST_CASE("external working copies follow the masters through FusedAdamW, bit-identical forward", "[nn][amp][optim]") {
  Context ctx = Context::cpu();
  SEEDED_RNG(rng);
  for (const amp::Policy policy : {amp::Policy::fp16(), amp::Policy::bf16()}) {
    INFO("policy " << dstrain::dtype_name(policy.compute_dtype(amp::OpKind::Conv)));
    dstrain_test::check_external_working_copies(ctx, policy, dstrain_test::FusedOptimizer::AdamW, rng);
  }
}
