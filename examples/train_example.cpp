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
#include <memory>
#include <stdexcept>
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
  long limit_test = 0;   // 0: all 10000
  double progress_s = 10.0;
  std::string checkpoint_dir;      // empty: no checkpoints
  long checkpoint_every_steps = 0;
  double checkpoint_every_min = 10.0;
  int keep = 3;
  bool resume = false;
  long stop_after_steps = 0;  // 0: run to the end
  std::string log_losses;     // rank 0 writes "step loss" lines (loss as hex float) here
  bool deterministic = false;
  bool chain = true;  // chained ConvBnRelu pairs (models::small_cnn)
  double timeout_s = 0;  // 0: DSTRAIN_TIMEOUT_S or 600
  double bucket_mb = 25.0;  // 0: one AllReduce after backward
  std::string grad_compression = "none";
  std::string precision = "fp32";
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
    "  --limit-test N      evaluate on the first N test images only (default: all 10000)\n"
    "  --progress-every S  seconds between progress lines within an epoch (default 10; 0: none)\n"
    "  --checkpoint-dir D  save checkpoints (atomic, written in the background) into folder D\n"
    "  --checkpoint-every-steps N   save every N steps (default 0: not by steps)\n"
    "  --checkpoint-every-min M     save when M minutes have passed since the last save (default 10; 0: off)\n"
    "  --keep K            keep the newest K checkpoints (default 3)\n"
    "  --resume            continue from the newest valid checkpoint in --checkpoint-dir (if any)\n"
    "  --stop-after-steps N  stop after N optimizer steps in total (as if interrupted)\n"
    "  --log-losses FILE   rank 0 writes each step's loss (its shard's sum, as a hex float) to FILE\n"
    "  --deterministic     deterministic cuDNN algorithms (bit-identical runs on the GPU)\n"
    "  --no-chain          run the six fused Conv+BN+ReLU layers unchained (each applies its own BN +\n"
    "                      ReLU; by default the second of each pair applies the first's in its prologue)\n"
    "  --bucket-mb X       gradient buckets of X MiB reduced during backward (default 25; 0: one\n"
    "                      AllReduce after backward)\n"
    "  --grad-compression C  none, fp16 or bf16: the precision gradients travel in (default none)\n"
    "  --precision P       fp32, fp16, bf16 or fp8: the precision of convolutions, activations and\n"
    "                      the linear layer (fp32 accumulation, fp32 master weights, BatchNorm and\n"
    "                      loss; fp16 adds dynamic loss scaling; fp8 is bf16 with the linear layer's\n"
    "                      GEMMs in FP8: E4M3 forward, E5M2 gradients, delayed per-tensor scaling).\n"
    "                      Default fp32\n"
    "  --timeout S         seconds a collective waits for the other ranks before the job ends with an\n"
    "                      error naming them (default: DSTRAIN_TIMEOUT_S or 600)\n"
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
    if (flag == "--resume") {
      o.resume = true;
      continue;
    }
    if (flag == "--deterministic") {
      o.deterministic = true;
      continue;
    }
    if (flag == "--no-chain") {
      o.chain = false;
      continue;
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
    } else if (flag == "--limit-test") {
      if (!number(0, 1e9)) return false;
      o.limit_test = static_cast<long>(v);
    } else if (flag == "--progress-every") {
      if (!number(0, 1e6)) return false;
      o.progress_s = v;
    } else if (flag == "--checkpoint-dir") {
      o.checkpoint_dir = value;
    } else if (flag == "--checkpoint-every-steps") {
      if (!number(0, 1e12)) return false;
      o.checkpoint_every_steps = static_cast<long>(v);
    } else if (flag == "--checkpoint-every-min") {
      if (!number(0, 1e6)) return false;
      o.checkpoint_every_min = v;
    } else if (flag == "--keep") {
      if (!number(1, 1e6)) return false;
      o.keep = static_cast<int>(v);
    } else if (flag == "--stop-after-steps") {
      if (!number(1, 1e12)) return false;
      o.stop_after_steps = static_cast<long>(v);
    } else if (flag == "--log-losses") {
      o.log_losses = value;
    } else if (flag == "--timeout") {
      if (!number(0.001, 1e7)) return false;
      o.timeout_s = v;
    } else if (flag == "--bucket-mb") {
      if (!number(0, 1e6)) return false;
      o.bucket_mb = v;
    } else if (flag == "--grad-compression") {
      o.grad_compression = value;
      if (o.grad_compression != "none" && o.grad_compression != "fp16" && o.grad_compression != "bf16") {
        error = "--grad-compression " + o.grad_compression + ": expected none, fp16 or bf16";
        return false;
      }
    } else if (flag == "--precision") {
      o.precision = value;
      if (o.precision != "fp32" && o.precision != "fp16" && o.precision != "bf16" && o.precision != "fp8") {
        error = "--precision " + o.precision + ": expected fp32, fp16, bf16 or fp8";
        return false;
      }
    } else {
      error = "unknown option " + flag;
      return false;
    }
  }
  if (o.resume && o.checkpoint_dir.empty()) {
    error = "--resume needs --checkpoint-dir";
    return false;
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
  ropt.timeout_s = opt.timeout_s;
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
  const auto test = dstrain::data::load_fashion_mnist(opt.data, "t10k", opt.limit_test);
  if (train.count < opt.batch) {
    if (root)
      std::fprintf(stderr, "train_example: %lld training images are fewer than one batch of %ld\n",
                   static_cast<long long>(train.count), opt.batch);
    return 2;
  }
  if (opt.deterministic) dstrain::ops::set_deterministic(true);
  say("train_example: %s\n", rt.describe().c_str());
  say("data: %lld train / %lld test images from %s (%.1f s)\n", static_cast<long long>(train.count),
      static_cast<long long>(test.count), opt.data.c_str(), seconds_since(t_load));

  const dstrain::amp::Policy policy = dstrain::amp::Policy::parse(opt.precision);
  auto model = dstrain::models::small_cnn(dev, 10, 1, policy, opt.chain);
  dstrain::nn::init_parameters(*model, opt.seed);
  // Broadcasts rank 0's state; gradients in buckets reduced while backward still runs.
  dstrain::BucketOptions buckets;
  const bool overlap = opt.bucket_mb > 0;
  if (overlap) buckets.bucket_mb = opt.bucket_mb;
  buckets.compression = opt.grad_compression == "fp16"   ? dstrain::GradCompression::Fp16
                        : opt.grad_compression == "bf16" ? dstrain::GradCompression::Bf16
                                                         : dstrain::GradCompression::None;
  dstrain::DataParallel ddp(rt, *model, buckets);
  dstrain::optim::SgdOptions sgd;
  sgd.lr = opt.lr;
  sgd.momentum = opt.momentum;
  sgd.weight_decay = opt.weight_decay;
  sgd.nesterov = true;
  dstrain::optim::SGD optimizer(model->parameters(), sgd);
  // Low precision: the same SGD as one multi-tensor launch over the fp32 master weights, which
  // skips a step on the device when the loss scaler found an inf/NaN gradient (fp16).
  std::vector<dstrain::Tensor*> master_values, master_grads;
  for (dstrain::nn::Parameter* p : model->parameters()) {
    master_values.push_back(&p->value);
    master_grads.push_back(&p->grad);
  }
  std::unique_ptr<dstrain::amp::FusedSGD> fused_sgd;
  std::unique_ptr<dstrain::amp::GradScaler> scaler;
  // The layers' fp16/bf16 weight copies, one slot per master (null where a parameter has none):
  // the fused step writes them with the masters, so the layers no longer convert at forward.
  std::vector<dstrain::Tensor*> low_copies;
  if (policy.low_precision()) {
    dstrain::amp::FusedSGDOptions fo;
    fo.lr = opt.lr;
    fo.momentum = opt.momentum;
    fo.weight_decay = opt.weight_decay;
    fo.nesterov = true;
    fused_sgd = std::make_unique<dstrain::amp::FusedSGD>(master_values, fo);
    low_copies = dstrain::nn::working_copy_per_parameter(*model);
    model->set_working_copies_external(true);
    // The masters are rank 0's since DataParallel's broadcast: the copies start from them.
    dstrain::nn::refresh_working_copies(ctx, *model);
  }
  if (policy.needs_loss_scaling()) scaler = std::make_unique<dstrain::amp::GradScaler>(dev);
  // FP8 delayed scaling: the linear layer's amax states, agreed over the ranks each step.
  const std::vector<dstrain::amp::Fp8Meta*> fp8_metas = model->fp8_metas();
  model->set_needs_input_grad(false);
  say("model: %lld parameters, global batch %ld (%ld per rank), %d epoch(s), one-cycle peak lr %g, precision %s%s\n%s",
      static_cast<long long>(dstrain::nn::parameter_count(*model)), opt.batch, opt.batch / world, opt.epochs,
      opt.lr, opt.precision.c_str(), scaler ? " (dynamic loss scaling)" : "", model->summary().c_str());

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

  // Checkpoints: parameters and optimizer state once (rank 0), BatchNorm statistics and the
  // epoch's loss accumulators per rank; the data position is the step (the sampler is a function
  // of seed, epoch and step, whatever the world size).
  std::unique_ptr<dstrain::Checkpointer> ckpt;
  std::int64_t start_epoch = 0, start_batch = 0;
  long step = 0;
  if (!opt.checkpoint_dir.empty()) {
    dstrain::CheckpointOptions co;
    co.dir = opt.checkpoint_dir;
    co.keep = opt.keep;
    co.every_steps = opt.checkpoint_every_steps;
    co.every_minutes = opt.checkpoint_every_min;
    ckpt = std::make_unique<dstrain::Checkpointer>(rt, co, "train_example small_cnn fashion-mnist 10 classes");
    ckpt->add_model(*model);
    if (fused_sgd) {
      std::vector<dstrain::Tensor>& momentum = fused_sgd->momentum_buffers();
      for (std::size_t i = 0; i < momentum.size(); ++i)
        ckpt->add_replicated("optimizer.fused_sgd.momentum." + std::to_string(i), momentum[i]);
    } else {
      ckpt->add_optimizer(optimizer);
    }
    if (scaler)
      ckpt->add_blob(
          "amp.grad_scaler", [&scaler] { return scaler->state(); },
          [&scaler](const std::vector<char>& bytes) { scaler->load_state(bytes); });
    for (std::size_t i = 0; i < fp8_metas.size(); ++i)
      ckpt->add_replicated("amp.fp8_meta." + std::to_string(i), fp8_metas[i]->state());
    ckpt->add_per_rank("epoch.step_losses", step_losses, dstrain::OnWorldSizeChange::SumToRankZero);
    ckpt->add_per_rank("epoch.step_correct", step_correct, dstrain::OnWorldSizeChange::SumToRankZero);
    char lr_text[32];
    std::snprintf(lr_text, sizeof(lr_text), "%a", static_cast<double>(opt.lr));
    ckpt->set_metadata({{"batch", std::to_string(opt.batch)},
                        {"epochs", std::to_string(opt.epochs)},
                        {"lr", lr_text},
                        {"precision", opt.precision},
                        {"seed", std::to_string(opt.seed)},
                        {"train_images", std::to_string(train.count)}});
    if (opt.resume) {
      if (auto p = ckpt->restore_latest()) {
        dstrain::nn::refresh_working_copies(ctx, *model);  // the restored masters
        step = static_cast<long>(p->step);
        start_epoch = p->epoch;
        start_batch = p->step_in_epoch;
        say("resumed from %s at step %ld (epoch %lld, batch %lld)\n", opt.checkpoint_dir.c_str(), step,
            static_cast<long long>(start_epoch + 1), static_cast<long long>(start_batch));
      } else {
        say("no checkpoint in %s: starting from the beginning\n", opt.checkpoint_dir.c_str());
      }
    }
  }
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> loss_log(nullptr, &std::fclose);
  if (root && !opt.log_losses.empty()) {
    loss_log.reset(std::fopen(opt.log_losses.c_str(), opt.resume ? "a" : "w"));
    if (!loss_log) throw std::runtime_error("cannot open --log-losses file " + opt.log_losses);
  }
  // Rank 0's per-step losses of batches [from, to) of the current epoch, as exact hex floats.
  auto log_losses = [&](int epoch, std::int64_t from, std::int64_t to) {
    if (!loss_log || to <= from) return;
    const auto l = step_losses.to_host_floats();
    for (std::int64_t b = from; b < to; ++b)
      std::fprintf(loss_log.get(), "%lld %a\n", static_cast<long long>(epoch * steps_per_epoch + b),
                   static_cast<double>(l[static_cast<std::size_t>(b)]));
    std::fflush(loss_log.get());
  };

  const auto t_train = std::chrono::steady_clock::now();
  double later_epochs_s = 0.0, acc = 0.0, test_loss = 0.0;
  long last_saved = -1;
  bool stopped = false;
  for (int epoch = static_cast<int>(start_epoch); epoch < opt.epochs && !stopped; ++epoch) {
    ctx.synchronize();
    const auto t_epoch = std::chrono::steady_clock::now();
    auto t_progress = t_epoch;
    dstrain::data::EpochSampler sampler(train.count, opt.batch, opt.seed, static_cast<std::uint64_t>(epoch));
    const std::int64_t first_batch = epoch == start_epoch ? start_batch : 0;
    std::int64_t b = first_batch;
    for (; b < steps_per_epoch; ++b, ++step) {
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
      if (scaler) scaler->scale_gradient(ctx, dlogits);  // by the device-side loss scale
      if (overlap) {
        model->backward(ctx, dlogits, ddp.grad_ready_hook());
        ddp.finish();
      } else {
        model->backward(ctx, dlogits);
        ddp.reduce_gradients();
      }
      const float lr = dstrain::optim::one_cycle_lr(opt.lr, step, total_steps);
      if (fused_sgd) {
        const dstrain::Tensor* found_inf = nullptr;
        if (scaler) {
          scaler->unscale_and_check(ctx, master_grads);
          scaler->agree_found_inf(rt.comm(), ctx);  // every rank skips the same steps
          found_inf = &scaler->found_inf();
        }
        fused_sgd->set_lr(lr);
        // A step the scaler skips writes neither masters nor copies.
        fused_sgd->step(ctx, master_grads, found_inf, &low_copies);
        if (scaler) scaler->update(ctx);
        if (!fp8_metas.empty()) dstrain::amp::update_fp8_scales(ctx, fp8_metas, &rt.comm());
      } else {
        optimizer.set_lr(lr);
        optimizer.step(ctx);
      }
      const long done = step + 1;
      if (ckpt && ckpt->due(done)) {
        ckpt->save({done, epoch, b + 1});
        last_saved = done;
      }
      if (opt.stop_after_steps > 0 && done >= opt.stop_after_steps) {
        stopped = true;
        ++b;
        ++step;
        break;
      }
      if (root && opt.progress_s > 0 && seconds_since(t_progress) >= opt.progress_s) {
        ctx.synchronize();
        t_progress = std::chrono::steady_clock::now();
        const float l = step_losses.to_host_floats()[static_cast<std::size_t>(b)];
        say("  epoch %d: step %lld/%lld, rank-0 batch loss %.4f, %.1f s\n", epoch + 1, static_cast<long long>(b + 1),
            static_cast<long long>(steps_per_epoch), l / static_cast<double>(n), seconds_since(t_epoch));
      }
    }
    ctx.synchronize();
    rt.comm().check_health();  // an asynchronous communicator failure surfaces here at the latest
    log_losses(epoch, first_batch, b);
    if (stopped) {
      say("stopped after step %ld, as --stop-after-steps asked\n", step);
      break;
    }
    const double epoch_s = seconds_since(t_epoch);
    if (epoch > start_epoch) later_epochs_s += epoch_s;
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
  if (ckpt) {
    if (!stopped && last_saved != step && step > 0) {
      ckpt->save({step, opt.epochs, 0});  // the finished run, for a later --resume to find complete
      last_saved = step;
    }
    ckpt->wait();
    if (last_saved >= 0) {
      const dstrain::SaveStats& st = ckpt->last_save_stats();
      say("checkpoints in %s: last save blocked training %.1f ms, wrote %.1f MB in %.3f s\n",
          opt.checkpoint_dir.c_str(), st.blocked_ms, st.bytes / 1e6, st.write_s);
    }
  }

  const std::uint64_t hash = dstrain::nn::parameter_hash(*model);
  const bool same = rt.all_ranks_equal(hash);
  say("parameters %s on all %d rank(s) (hash %016llx)\n", same ? "identical" : "DIFFER", world,
      static_cast<unsigned long long>(hash));
  if (stopped) return same ? 0 : 1;
  const int timed_epochs = opt.epochs - static_cast<int>(start_epoch) - 1;
  const double epoch_s = timed_epochs > 0 ? later_epochs_s / timed_epochs : seconds_since(t_train);
  if (scaler) say("loss scale at the end: %g\n", static_cast<double>(scaler->scale(ctx)));
  say("train_example device=%s ranks=%d epochs=%d batch=%ld precision=%s test_acc=%.2f epoch_s=%.3f "
      "train_img_per_s=%.0f\n",
      dev.str().c_str(), world, opt.epochs, opt.batch, opt.precision.c_str(), acc, epoch_s,
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
