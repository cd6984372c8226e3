// Runs under mpirun -np 4: DataParallel's gradient buckets. Layout (reverse parameter order,
// first bucket 1 MiB, then 25 MiB), AllReduce started as soon as a bucket is complete, results
// equal to one AllReduce over the whole buffer, reporting mistakes, fp16/bf16 compression.
#include <catch2/catch.hpp>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <dstrain/dstrain.h>
#include <random>
#include <string>
#include <vector>

namespace {

using dstrain::nn::Parameter;

dstrain::Runtime& runtime() {
  // MPI is initialised by main; this Runtime neither initialises nor finalises it.
  static int argc = 0;
  static char** argv = nullptr;
  static dstrain::Runtime rt = [] {
    dstrain::RuntimeOptions o;
    o.device = dstrain::DevicePreference::Cpu;
    return dstrain::Runtime::init(argc, argv, o);
  }();
  return rt;
}

// A model that is only parameters of chosen sizes (forward/backward are not used).
class ParamBag final : public dstrain::nn::Layer {
 public:
  explicit ParamBag(const std::vector<std::int64_t>& sizes) {
    for (std::size_t k = 0; k < sizes.size(); ++k) {
      params_.push_back(std::make_unique<Parameter>());
      params_.back()->name = "p" + std::to_string(k);
      params_.back()->value = dstrain::Tensor::zeros({sizes[k]}, dstrain::DType::F32, dstrain::Device::cpu());
    }
  }
  const dstrain::Tensor& forward(dstrain::Context&, const dstrain::Tensor& x, bool) override { return x; }
  const dstrain::Tensor& backward(dstrain::Context&, const dstrain::Tensor& dy) override { return dy; }
  std::vector<Parameter*> parameters() override {
    std::vector<Parameter*> out;
    for (auto& p : params_) out.push_back(p.get());
    return out;
  }
  std::string name() const override { return "ParamBag"; }

 private:
  std::vector<std::unique_ptr<Parameter>> params_;
};

std::uint64_t splitmix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Rank r's gradient element i. Every rank can compute every other rank's values, so the exact
// reference sum is known locally. Integer-valued data makes every summation order exact.
float grad_value(int rank, std::int64_t i, bool integer, std::uint64_t salt) {
  const std::uint64_t h = splitmix(salt * 1000003ull + static_cast<std::uint64_t>(rank) * 0x100000001ull +
                                   static_cast<std::uint64_t>(i));
  if (integer) return static_cast<float>(static_cast<int>(h % 201) - 100);
  return static_cast<float>(static_cast<double>(h >> 11) / 9007199254740992.0 * 2.0 - 1.0);  // [-1, 1)
}

void fill_gradients(dstrain::DataParallel& ddp, int rank, bool integer, std::uint64_t salt) {
  float* g = ddp.flat_gradients().data_as<float>();
  for (std::int64_t i = 0; i < ddp.gradient_count(); ++i) g[i] = grad_value(rank, i, integer, salt);
}

// Sum over ranks of element i, in double, and the sum of magnitudes (for tolerances).
void reference(int ranks, std::int64_t i, bool integer, std::uint64_t salt, double& sum, double& abs_sum) {
  sum = abs_sum = 0.0;
  for (int r = 0; r < ranks; ++r) {
    const double v = grad_value(r, i, integer, salt);
    sum += v;
    abs_sum += std::abs(v);
  }
}

// Reports every parameter in reverse model order, as Sequential::backward does.
void report_all_reversed(dstrain::DataParallel& ddp, dstrain::nn::Layer& model) {
  auto params = model.parameters();
  for (auto it = params.rbegin(); it != params.rend(); ++it) ddp.grad_ready(**it);
}

std::vector<float> snapshot(dstrain::DataParallel& ddp) {
  const float* g = ddp.flat_gradients().data_as<float>();
  return std::vector<float>(g, g + ddp.gradient_count());
}

constexpr std::int64_t kMiB = 1024 * 1024;

}  // namespace

TEST_CASE("buckets: reverse parameter order, first 1 MiB then 25 MiB", "[mpi][buckets]") {
  auto& rt = runtime();
  // fp32 element counts; reversed: p5 0.38 MiB + p4 0.76 MiB close the first bucket (>= 1 MiB);
  // p3 + p2 11.4 MiB + p1 15.3 MiB close the second (>= 25 MiB); p0 is the last.
  ParamBag model({300000, 4000000, 3000000, 100, 200000, 100000});
  dstrain::DataParallel ddp(rt, model);
  const auto& b = ddp.buckets();
  REQUIRE(b.size() == 3);
  auto names = [](const dstrain::GradientBucket& bucket) {
    std::string s;
    for (auto* p : bucket.params) s += p->name + " ";
    return s;
  };
  CHECK(names(b[0]) == "p5 p4 ");
  CHECK(names(b[1]) == "p3 p2 p1 ");
  CHECK(names(b[2]) == "p0 ");
  std::int64_t offset = 0;
  for (std::size_t k = 0; k < b.size(); ++k) {
    CHECK(b[k].offset == offset);
    std::int64_t n = 0;
    for (auto* p : b[k].params) {
      // each gradient is a view at its place in the bucket
      CHECK(p->grad.data_as<float>() == ddp.flat_gradients().data_as<float>() + b[k].offset + n);
      n += p->value.numel();
    }
    CHECK(b[k].numel == n);
    offset += n;
    const std::int64_t cap = (k == 0 ? 1 : 25) * kMiB;
    if (k + 1 < b.size()) {
      CHECK(b[k].numel * 4 >= cap);                                  // full ...
      CHECK((b[k].numel - b[k].params.back()->value.numel()) * 4 < cap);  // ... by its last parameter
    }
  }
  CHECK(offset == ddp.gradient_count());

  // Smaller buckets on request.
  dstrain::BucketOptions small;
  small.bucket_mb = 0.5;
  small.first_bucket_mb = 0.25;
  ParamBag model2({65536, 65536, 65536, 65536, 65536});  // 0.25 MiB each
  dstrain::DataParallel ddp2(rt, model2, small);
  REQUIRE(ddp2.buckets().size() == 3);
  CHECK(ddp2.buckets()[0].params.size() == 1);
  CHECK(ddp2.buckets()[1].params.size() == 2);
  CHECK(ddp2.buckets()[2].params.size() == 2);
  CHECK(ddp2.buckets()[0].params[0]->name == "p4");
}

TEST_CASE("buckets: each AllReduce starts when its bucket is complete, in order", "[mpi][buckets]") {
  auto& rt = runtime();
  const int n = rt.world_size(), r = rt.rank();
  dstrain::BucketOptions o;
  o.first_bucket_mb = 0.25;
  o.bucket_mb = 0.5;
  ParamBag model({65536, 65536, 65536, 65536, 65536});
  dstrain::DataParallel ddp(rt, model, o);
  REQUIRE(ddp.buckets().size() == 3);
  auto params = model.parameters();
  for (int step = 0; step < 2; ++step) {
    fill_gradients(ddp, r, true, 11 + step);
    auto reduced = [&](const dstrain::GradientBucket& b) {
      const float* g = ddp.flat_gradients().data_as<float>();
      for (std::int64_t i = b.offset; i < b.offset + b.numel; ++i) {
        double sum, abs_sum;
        reference(n, i, true, 11 + step, sum, abs_sum);
        if (g[i] != static_cast<float>(sum)) return false;
      }
      return true;
    };
    auto local = [&](const dstrain::GradientBucket& b) {
      const float* g = ddp.flat_gradients().data_as<float>();
      for (std::int64_t i = b.offset; i < b.offset + b.numel; ++i)
        if (g[i] != grad_value(r, i, true, 11 + step)) return false;
      return true;
    };
    const auto& b = ddp.buckets();
    ddp.grad_ready(*params[4]);  // completes bucket 0
    CHECK(reduced(b[0]));
    CHECK(local(b[1]));
    CHECK(local(b[2]));
    ddp.grad_ready(*params[3]);  // half of bucket 1: nothing starts
    CHECK(local(b[1]));
    ddp.grad_ready(*params[2]);
    CHECK(reduced(b[1]));
    CHECK(local(b[2]));
    ddp.grad_ready(*params[1]);
    ddp.grad_ready(*params[0]);
    CHECK(reduced(b[2]));
    ddp.finish();
    CHECK(ddp.last_issue_order() == std::vector<int>{0, 1, 2});
    REQUIRE(ddp.last_issue_offsets_us().size() == 3);
    for (double t : ddp.last_issue_offsets_us()) CHECK(t <= 0.0);  // all issued before finish()
  }

  // A bucket completed early waits for the ones before it, so every rank issues the same order.
  fill_gradients(ddp, r, true, 99);
  ddp.grad_ready(*params[0]);
  ddp.grad_ready(*params[1]);  // bucket 2 complete, but bucket 0 is not: nothing starts yet
  const float* g = ddp.flat_gradients().data_as<float>();
  CHECK(g[ddp.buckets()[2].offset] == grad_value(r, ddp.buckets()[2].offset, true, 99));
  ddp.grad_ready(*params[4]);  // bucket 0: starts 0 only
  ddp.grad_ready(*params[3]);
  ddp.grad_ready(*params[2]);  // bucket 1, then the waiting bucket 2
  ddp.finish();
  CHECK(ddp.last_issue_order() == std::vector<int>{0, 1, 2});
  double sum, abs_sum;
  reference(n, ddp.buckets()[2].offset, true, 99, sum, abs_sum);
  CHECK(g[ddp.buckets()[2].offset] == static_cast<float>(sum));
}

TEST_CASE("buckets: same result as one AllReduce over the whole buffer", "[mpi][buckets]") {
  auto& rt = runtime();
  const int n = rt.world_size(), r = rt.rank();
  dstrain::BucketOptions o;
  o.first_bucket_mb = 0.05;
  o.bucket_mb = 0.3;
  ParamBag model({1000, 70000, 3, 20000, 150000, 7, 33333, 90000});
  dstrain::DataParallel ddp(rt, model, o);
  REQUIRE(ddp.buckets().size() >= 4);

  SECTION("integer-valued data: bit for bit") {
    // Sums of small integers are exact in any order, so whatever reduction order MPI picks for
    // each message size, the two paths must agree exactly.
    fill_gradients(ddp, r, true, 5);
    report_all_reversed(ddp, model);
    ddp.finish();
    const auto bucketed = snapshot(ddp);
    fill_gradients(ddp, r, true, 5);
    ddp.reduce_gradients();
    const auto whole = snapshot(ddp);
    REQUIRE(bucketed.size() == whole.size());
    CHECK(std::memcmp(bucketed.data(), whole.data(), bucketed.size() * sizeof(float)) == 0);
    for (std::int64_t i = 0; i < ddp.gradient_count(); i += 97) {
      double sum, abs_sum;
      reference(n, i, true, 5, sum, abs_sum);
      REQUIRE(bucketed[static_cast<std::size_t>(i)] == static_cast<float>(sum));
    }
  }
  SECTION("random data: equal within fp32 rounding of a 4-term sum") {
    // MPI may add the ranks' values in a different order for a bucket than for the whole buffer
    // (its algorithm depends on the message size), so fp32 sums can differ in the last bits.
    fill_gradients(ddp, r, false, 6);
    report_all_reversed(ddp, model);
    ddp.finish();
    const auto bucketed = snapshot(ddp);
    fill_gradients(ddp, r, false, 6);
    ddp.reduce_gradients();
    const auto whole = snapshot(ddp);
    std::int64_t identical = 0;
    for (std::int64_t i = 0; i < ddp.gradient_count(); ++i) {
      double sum, abs_sum;
      reference(n, i, false, 6, sum, abs_sum);
      const double tol = 1e-30 + n * 6e-8 * abs_sum;
      const float a = bucketed[static_cast<std::size_t>(i)], b = whole[static_cast<std::size_t>(i)];
      if (std::abs(a - sum) > tol || std::abs(b - sum) > tol) {
        FAIL("element " << i << ": bucketed " << a << ", whole " << b << ", exact " << sum);
      }
      identical += a == b;
    }
    INFO("bit-identical elements: " << identical << " of " << ddp.gradient_count());
    CHECK(identical > 0);
  }
  SECTION("average") {
    dstrain::BucketOptions avg = o;
    avg.average = true;
    dstrain::DataParallel ddp_avg(rt, model, avg);
    fill_gradients(ddp_avg, r, true, 8);
    report_all_reversed(ddp_avg, model);
    ddp_avg.finish();
    const float* g = ddp_avg.flat_gradients().data_as<float>();
    for (std::int64_t i = 0; i < ddp_avg.gradient_count(); i += 13) {
      double sum, abs_sum;
      reference(n, i, true, 8, sum, abs_sum);
      REQUIRE(g[i] == Approx(sum / n).margin(1e-6));
    }
  }
}

TEST_CASE("buckets: a parameter reported twice, never, or foreign raises at finish()", "[mpi][buckets]") {
  auto& rt = runtime();
  dstrain::BucketOptions o;
  o.first_bucket_mb = 0.01;
  o.bucket_mb = 0.01;
  ParamBag model({5000, 5000, 5000});
  ParamBag other({10});
  dstrain::DataParallel ddp(rt, model, o);
  auto params = model.parameters();
  using Catch::Matchers::Contains;

  ddp.grad_ready(*params[2]);
  ddp.grad_ready(*params[2]);
  ddp.grad_ready(*params[1]);
  ddp.grad_ready(*params[0]);
  CHECK_THROWS_WITH(ddp.finish(), Contains("more than once: p2"));

  ddp.grad_ready(*params[2]);
  ddp.grad_ready(*params[0]);
  CHECK_THROWS_WITH(ddp.finish(), Contains("never reported: p1"));
  // Even then every bucket was reduced, so all ranks issued the same collectives.
  CHECK(ddp.last_issue_order() == std::vector<int>{0, 1, 2});

  report_all_reversed(ddp, model);
  ddp.grad_ready(*other.parameters()[0]);
  CHECK_THROWS_WITH(ddp.finish(), Contains("not parameters of this model: p0"));

  // The state is reset after an error: a clean step passes.
  fill_gradients(ddp, rt.rank(), true, 3);
  report_all_reversed(ddp, model);
  CHECK_NOTHROW(ddp.finish());
  double sum, abs_sum;
  reference(rt.world_size(), 4242, true, 3, sum, abs_sum);
  CHECK(ddp.flat_gradients().data_as<float>()[4242] == static_cast<float>(sum));
}

TEST_CASE("buckets: fp16 and bf16 compression within the type's rounding", "[mpi][buckets]") {
  auto& rt = runtime();
  const int n = rt.world_size(), r = rt.rank();
  struct Case {
    dstrain::GradCompression c;
    double unit_roundoff;
    const char* name;
  };
  for (const Case& k : {Case{dstrain::GradCompression::Fp16, std::ldexp(1.0, -11), "fp16"},
                        Case{dstrain::GradCompression::Bf16, std::ldexp(1.0, -8), "bf16"}}) {
    INFO(k.name);
    dstrain::BucketOptions o;
    o.first_bucket_mb = 0.05;
    o.bucket_mb = 0.2;
    o.compression = k.c;
    ParamBag model({40000, 3, 70000, 25000});
    dstrain::DataParallel ddp(rt, model, o);
    fill_gradients(ddp, r, false, 21);
    report_all_reversed(ddp, model);
    ddp.finish();
    const float* g = ddp.flat_gradients().data_as<float>();
    double worst = 0.0;
    std::int64_t inexact = 0;
    for (std::int64_t i = 0; i < ddp.gradient_count(); ++i) {
      double sum, abs_sum;
      reference(n, i, false, 21, sum, abs_sum);
      // Each input is rounded once, each partial sum once, the result once: at most 2n roundings
      // of magnitude <= abs_sum.
      const double tol = 1e-6 + 2.0 * n * k.unit_roundoff * abs_sum;
      const double err = std::abs(g[i] - sum);
      worst = std::max(worst, err / (tol));
      inexact += err > 1e-6 * abs_sum;
      if (err > tol) FAIL("element " << i << ": got " << g[i] << ", exact " << sum << ", tolerance " << tol);
    }
    INFO("worst error / tolerance " << worst);
    CHECK(inexact > 0);  // the low-precision path really ran (fp32 would be exact to 1e-6)
  }
}

TEST_CASE("buckets: overlapped with Sequential::backward on a real model", "[mpi][buckets]") {
  auto& rt = runtime();
  auto& ctx = rt.context();
  auto model = dstrain::models::small_cnn(dstrain::Device::cpu());
  dstrain::nn::init_parameters(*model, 3);
  dstrain::BucketOptions o;
  o.first_bucket_mb = 0.01;
  o.bucket_mb = 0.05;
  dstrain::DataParallel ddp(rt, *model, o);
  REQUIRE(ddp.buckets().size() >= 3);
  model->set_needs_input_grad(false);
  const std::int64_t batch = 8;
  auto x = dstrain::Tensor::empty({batch, 28, 28, 1}, dstrain::DType::F32, dstrain::Device::cpu());
  auto y = dstrain::Tensor::empty({batch}, dstrain::DType::I32, dstrain::Device::cpu());
  std::mt19937 gen(100 + rt.rank());
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (std::int64_t i = 0; i < x.numel(); ++i) x.data_as<float>()[i] = u(gen);
  for (std::int64_t i = 0; i < batch; ++i) y.data_as<std::int32_t>()[i] = static_cast<std::int32_t>(gen() % 10);
  dstrain::Tensor dlogits, loss = dstrain::Tensor::zeros({1}, dstrain::DType::F32, dstrain::Device::cpu());
  dstrain::Tensor correct = dstrain::Tensor::zeros({1}, dstrain::DType::F32, dstrain::Device::cpu());
  auto step = [&](bool bucketed) {
    const auto& logits = model->forward(ctx, x, true);
    dlogits.resize(logits.shape(), dstrain::DType::F32, dstrain::Device::cpu());
    dstrain::ops::softmax_cross_entropy(ctx, logits, y, &dlogits, 1.0f / (batch * rt.world_size()), loss, correct);
    if (bucketed) {
      model->backward(ctx, dlogits, ddp.grad_ready_hook());
      ddp.finish();
    } else {
      model->backward(ctx, dlogits);
      ddp.reduce_gradients();
    }
    return snapshot(ddp);
  };
  const auto a = step(true);
  const auto b = step(false);
  CHECK(ddp.last_issue_order().size() == ddp.buckets().size());
  // The last buckets' AllReduce ran while backward still had layers to go.
  CHECK(ddp.last_issue_offsets_us().front() < ddp.last_issue_offsets_us().back());
  double max_diff = 0.0, max_abs = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::abs(a[i] - b[i])));
    max_abs = std::max(max_abs, static_cast<double>(std::abs(b[i])));
  }
  INFO("max |bucketed - whole| " << max_diff << ", max |grad| " << max_abs);
  CHECK(max_abs > 0.0);
  CHECK(max_diff <= 1e-6 * max_abs + 1e-12);
  CHECK(rt.all_ranks_equal(std::hash<std::string>{}(std::string(reinterpret_cast<const char*>(a.data()),
                                                                   a.size() * sizeof(float)))));
}
