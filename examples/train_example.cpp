// Trains the small CNN of the reference script on Fashion-MNIST, data-parallel:
//   mpirun -np 4 ./train_example            (one rank per GPU where there are GPUs, else the CPU)
// Each rank takes a disjoint shard of every global batch; gradients are summed with one
// AllReduce per step; rank 0 reports loss, test accuracy and throughput per epoch.
#include <dstrain/dstrain.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

struct Options {
  int epochs = 15;
  long batch = 256;  // global
  float lr = 0.2f;   // peak of the one-cycle schedule
  float momentum = 0.9f;
  float weight_decay = 5e-4f;
  std::string device = "auto";
  std::string data = dstrain::data::default_fashion_mnist_dir();
  unsigned long long seed = 0;
  long limit_train = 0;  // 0: all 60000
  double progress_s = 10.0;
};

const char* kUsage =
    "usage: train_example [options]          (under mpirun: mpirun -np N train_example [options])\n"
    "Trains the Fashion-MNIST small CNN (six Conv3x3+BN+ReLU, two max pools, global average pool,\n"
    "Linear 128->10) with SGD (nesterov momentum 0.9, weight decay 5e-4) and a one-cycle schedule.\n"
    "  --epochs N          epochs (default 15)\n"
    "  --batch N           global batch size, split across ranks (default 256)\n"
    "  --lr X              peak learning rate of the one-cycle schedule (default 0.2)\n"
    "  --device D          cpu, cuda or auto (default auto: one GPU per rank if there are enough)\n"
    "  --data DIR          folder with the Fashion-MNIST .gz files (default /usr/share/datasets/fashion-mnist)\n"
    "  --seed N            seed for initialisation, shuffling and flips (default 0)\n"
    "  --limit-train N     train on the first N training images only (default: all 60000)\n"
    "  --progress-every S  seconds between progress lines within an epoch (default 10; 0: none)\n"
    "  --help              this text\n";

bool parse_number(const char* text, double& out) {
  char* end = nullptr;
  out = std::strtod(text, &end);
  return end != text && *end == '\0';
}

// Returns false (after printing why) when the arguments are bad; sets help when --help was given.
bool parse(int argc, char** argv, Options& o, bool& help, std::string& error) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      help = true;
      return true;
    }
    if (i + 1 >= argc) {
      error = "missing value after " + flag;
      return false;
    }
    const char* value = argv[++i];
    double v = 0;
    auto number = [&](double lo, double hi) {
      if (!parse_number(value, v) || v < lo || v > hi) {
        error = flag + " " + value + ": expected a number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
        return false;
      }
      return true;
    };
    if (flag == "--epochs") {
      if (!number(1, 10000)) return false;
      o.epochs = static_cast<int>(v);
    } else if (flag == "--batch") {
      if (!number(1, 1 << 20)) return false;
      o.batch = static_cast<long>(v);
    } else if (flag == "--lr") {
      if (!number(0, 100)) return false;
      o.lr = static_cast<float>(v);
    } else if (flag == "--device") {
      o.device = value;
    } else if (flag == "--data") {
      o.data = value;
    } else if (flag == "--seed") {
      if (!number(0, 1e18)) return false;
      o.seed = static_cast<unsigned long long>(v);
    } else if (flag == "--limit-train") {
      if (!number(0, 1e9)) return false;
      o.limit_train = static_cast<long>(v);
    } else if (flag == "--progress-every") {
      if (!number(0, 1e6)) return false;
      o.progress_s = v;
    } else {
      error = "unknown option " + flag;
      return false;
    }
  }
  return true;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int train(dstrain::Runtime& rt, const Options& opt);

int run(int argc, char** argv) {
  Options opt;
  bool help = false;
  std::string error;
  const bool ok = parse(argc, argv, opt, help, error);
  if (help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (!ok) {
    std::fprintf(stderr, "train_example: %s\n%s", error.c_str(), kUsage);
    return 2;
  }

  dstrain::RuntimeOptions ropt;
  ropt.device = dstrain::parse_device_preference(opt.device);
  dstrain::Runtime rt = dstrain::Runtime::init(argc, argv, ropt);
  try {
    return train(rt, opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_example: rank %d: %s\n", rt.rank(), e.what());
    std::fflush(stderr);
    rt.abort_job(1);
    return 1;
  }
}

int train(dstrain::Runtime& rt, const Options& opt) {
  const bool root = rt.is_root();
  const int rank = rt.rank(), world = rt.world_size();
  dstrain::Context& ctx = rt.context();
  const dstrain::Device dev = rt.device();
  auto say = [root](const char* fmt, auto... args) {
    if (root) {
      std::printf(fmt, args...);
      std::fflush(stdout);
    }
  };

  std::int64_t shard_begin = 0, shard_len = 0;
  dstrain::data::EpochSampler::shard_range(opt.batch, world - 1, world, shard_begin, shard_len);
  if (shard_len < 2) {
    if (root)
      std::fprintf(stderr, "train_example: --batch %ld is too small for %d ranks: every rank needs at least 2 "
                   "images per step for BatchNorm\n", opt.batch, world);
    return 2;
  }

  const auto t_load = std::chrono::steady_clock::now();
  const auto train = dstrain::data::load_fashion_mnist(opt.data, "train", opt.limit_train);
  const auto test = dstrain::data::load_fashion_mnist(opt.data, "t10k");
  if (train.count < opt.batch) {
    if (root)
      std::fprintf(stderr, "train_example: %lld training images are fewer than one batch of %ld\n",
                   static_cast<long long>(train.count), opt.batch);
    return 2;
  }
  say("train_example: %s\n", rt.describe().c_str());
  say("data: %lld train / %lld test images from %s (%.1f s)\n", static_cast<long long>(train.count),
      static_cast<long long>(test.count), opt.data.c_str(), seconds_since(t_load));

  auto model = dstrain::models::small_cnn(dev, 10, 1);
  dstrain::nn::init_parameters(*model, opt.seed);
  dstrain::DataParallel ddp(rt, *model);  // broadcasts rank 0's state, fuses the gradients
  dstrain::optim::SgdOptions sgd;
  sgd.lr = opt.lr;
  sgd.momentum = opt.momentum;
  sgd.weight_decay = opt.weight_decay;
  sgd.nesterov = true;
  dstrain::optim::SGD optimizer(model->parameters(), sgd);
  model->set_needs_input_grad(false);
  say("model: %lld parameters, global batch %ld (%ld per rank), %d epoch(s), one-cycle peak lr %g\n%s",
      static_cast<long long>(dstrain::nn::parameter_count(*model)), opt.batch, opt.batch / world, opt.epochs,
      opt.lr, model->summary().c_str());

  const int H = train.height, W = train.width;
  const std::int64_t steps_per_epoch = train.count / opt.batch;
  const long total_steps = static_cast<long>(steps_per_epoch) * opt.epochs;
  const float grad_scale = 1.0f / static_cast<float>(opt.batch);  // sum over ranks = global mean

  // Host staging buffers and their device twins, sized for the largest shard.
  std::int64_t max_shard = 0;
  for (int r = 0; r < world; ++r) {
    std::int64_t b, n;
    dstrain::data::EpochSampler::shard_range(opt.batch, r, world, b, n);
    max_shard = std::max(max_shard, n);
  }
  const std::int64_t eval_chunk = 1000;
  const std::int64_t staging = std::max(max_shard, eval_chunk);
  std::vector<float> host_x(static_cast<std::size_t>(staging * H * W));
  std::vector<std::int32_t> host_y(static_cast<std::size_t>(staging));
  dstrain::Tensor dev_x_store = dstrain::Tensor::empty({staging, H, W, 1}, dstrain::DType::F32, dev);
  dstrain::Tensor dev_y_store = dstrain::Tensor::empty({staging}, dstrain::DType::I32, dev);
  // Per-step loss sums stay on the device until the epoch ends: no host sync per step.
  dstrain::Tensor step_losses = dstrain::Tensor::zeros({steps_per_epoch}, dstrain::DType::F32, dev);
  dstrain::Tensor step_correct = dstrain::Tensor::zeros({steps_per_epoch}, dstrain::DType::F32, dev);
  dstrain::Tensor dlogits;

  auto upload = [&](std::int64_t n) {
    dstrain::Tensor hx = dstrain::Tensor::wrap(host_x.data(), {n, H, W, 1}, dstrain::DType::F32, dstrain::Device::cpu());
    dstrain::Tensor hy = dstrain::Tensor::wrap(host_y.data(), {n}, dstrain::DType::I32, dstrain::Device::cpu());
    // the first n images of the staging tensors
    dstrain::Tensor dx = dstrain::Tensor::wrap(dev_x_store.data(), {n, H, W, 1}, dstrain::DType::F32, dev);
    dstrain::Tensor dy = dstrain::Tensor::wrap(dev_y_store.data(), {n}, dstrain::DType::I32, dev);
    dstrain::ops::copy(ctx, hx, dx);
    dstrain::ops::copy(ctx, hy, dy);
    return std::make_pair(std::move(dx), std::move(dy));
  };

  // Test accuracy of rank 0's model (its BN running statistics are broadcast first), the test
  // set split across ranks.
  auto evaluate = [&](double& test_loss) {
    for (dstrain::Tensor* b : model->buffers()) rt.comm().broadcast(*b, 0, ctx);
    std::int64_t begin, len;
    dstrain::data::EpochSampler::shard_range(test.count, rank, world, begin, len);
    dstrain::Tensor loss = dstrain::Tensor::zeros({1}, dstrain::DType::F32, dev);
    dstrain::Tensor correct = dstrain::Tensor::zeros({1}, dstrain::DType::F32, dev);
    double sums[2] = {0.0, 0.0};
    for (std::int64_t off = 0; off < len; off += eval_chunk) {
      const std::int64_t n = std::min(eval_chunk, len - off);
      std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
      for (std::int64_t i = 0; i < n; ++i) idx[static_cast<std::size_t>(i)] = begin + off + i;
      dstrain::data::gather_batch(test, idx, false, 0, 0, host_x.data(), host_y.data());
      auto [x, y] = upload(n);
      const dstrain::Tensor& logits = model->forward(ctx, x, /*training=*/false);
      dstrain::ops::softmax_cross_entropy(ctx, logits, y, nullptr, 1.0f, loss, correct);
      const auto l = loss.to_host_floats(), c = correct.to_host_floats();
      sums[0] += l[0];
      sums[1] += c[0];
    }
    rt.host_allreduce_sum(sums, 2);
    test_loss = sums[0] / static_cast<double>(test.count);
    return 100.0 * sums[1] / static_cast<double>(test.count);
  };

  const auto t_train = std::chrono::steady_clock::now();
  double later_epochs_s = 0.0, acc = 0.0, test_loss = 0.0;
  long step = 0;
  for (int epoch = 0; epoch < opt.epochs; ++epoch) {
    ctx.synchronize();
    const auto t_epoch = std::chrono::steady_clock::now();
    auto t_progress = t_epoch;
    dstrain::data::EpochSampler sampler(train.count, opt.batch, opt.seed, static_cast<std::uint64_t>(epoch));
    for (std::int64_t b = 0; b < steps_per_epoch; ++b, ++step) {
      const auto idx = sampler.shard(b, rank, world);
      const auto n = static_cast<std::int64_t>(idx.size());
      dstrain::data::gather_batch(train, idx, /*augment=*/true, opt.seed, static_cast<std::uint64_t>(epoch),
                                  host_x.data(), host_y.data());
      auto [x, y] = upload(n);
      const dstrain::Tensor& logits = model->forward(ctx, x, /*training=*/true);
      if (dlogits.shape() != logits.shape()) dlogits.resize(logits.shape(), dstrain::DType::F32, dev);
      float* loss_base = step_losses.data_as<float>() + b;
      float* correct_base = step_correct.data_as<float>() + b;
      dstrain::Tensor loss_slot = dstrain::Tensor::wrap(loss_base, {1}, dstrain::DType::F32, dev);
      dstrain::Tensor correct_slot = dstrain::Tensor::wrap(correct_base, {1}, dstrain::DType::F32, dev);
      dstrain::ops::softmax_cross_entropy(ctx, logits, y, &dlogits, grad_scale, loss_slot, correct_slot);
      model->backward(ctx, dlogits);
      ddp.reduce_gradients();
      optimizer.set_lr(dstrain::optim::one_cycle_lr(opt.lr, step, total_steps));
      optimizer.step(ctx);
      if (root && opt.progress_s > 0 && seconds_since(t_progress) >= opt.progress_s) {
        ctx.synchronize();
        t_progress = std::chrono::steady_clock::now();
        const float l = step_losses.to_host_floats()[static_cast<std::size_t>(b)];
        say("  epoch %d: step %lld/%lld, rank-0 batch loss %.4f, %.1f s\n", epoch + 1, static_cast<long long>(b + 1),
            static_cast<long long>(steps_per_epoch), l / static_cast<double>(n), seconds_since(t_epoch));
      }
    }
    ctx.synchronize();
    const double epoch_s = seconds_since(t_epoch);
    if (epoch > 0) later_epochs_s += epoch_s;
    double sums[2] = {0.0, 0.0};
    for (float v : step_losses.to_host_floats()) sums[0] += v;
    for (float v : step_correct.to_host_floats()) sums[1] += v;
    rt.host_allreduce_sum(sums, 2);
    const double seen = static_cast<double>(steps_per_epoch * opt.batch);
    acc = evaluate(test_loss);
    say("epoch %2d/%d  loss %.4f  train_acc %.2f%%  test_loss %.4f  test_acc %.2f%%  %.0f img/s  epoch %.2f s  "
        "elapsed %.1f s\n",
        epoch + 1, opt.epochs, sums[0] / seen, 100.0 * sums[1] / seen, test_loss, acc, seen / epoch_s, epoch_s,
        seconds_since(t_train));
  }

  const std::uint64_t hash = dstrain::nn::parameter_hash(*model);
  const bool same = rt.all_ranks_equal(hash);
  say("parameters %s on all %d rank(s) (hash %016llx)\n", same ? "identical" : "DIFFER", world,
      static_cast<unsigned long long>(hash));
  const double epoch_s = opt.epochs > 1 ? later_epochs_s / (opt.epochs - 1) : seconds_since(t_train);
  say("train_example device=%s ranks=%d epochs=%d batch=%ld test_acc=%.2f epoch_s=%.3f train_img_per_s=%.0f\n",
      dev.str().c_str(), world, opt.epochs, opt.batch, acc, epoch_s,
      static_cast<double>(steps_per_epoch * opt.batch) / epoch_s);
  return same ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_example: %s\n", e.what());
    return 1;
  }
}
