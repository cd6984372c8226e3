#include "dstrain/optim.h"

#include <cmath>

#include "dstrain/error.h"

namespace dstrain::optim {

SGD::SGD(std::vector<nn::Parameter*> params, const SgdOptions& options)
    : params_(std::move(params)), options_(options) {
  DSTRAIN_CHECK(!params_.empty(), "SGD over no parameters");
  DSTRAIN_CHECK(options.lr >= 0 && options.momentum >= 0 && options.weight_decay >= 0,
                "SGD lr, momentum and weight decay must be non-negative");
  DSTRAIN_CHECK(!options.nesterov || options.momentum > 0, "nesterov momentum needs momentum > 0");
  momentum_.reserve(params_.size());
  for (nn::Parameter* p : params_)
    momentum_.push_back(options.momentum > 0 ? Tensor::zeros(p->value.shape(), DType::F32, p->value.device())
                                             : Tensor());
}

void SGD::step(Context& ctx) {
  ops::SgdParams sp;
  sp.lr = options_.lr;
  sp.momentum = options_.momentum;
  sp.weight_decay = options_.weight_decay;
  sp.nesterov = options_.nesterov;
  for (std::size_t i = 0; i < params_.size(); ++i) ops::sgd_step(ctx, params_[i]->value, params_[i]->grad, momentum_[i], sp);
}

float one_cycle_lr(float max_lr, long step, long total_steps, float pct_start, float div_factor,
                   float final_div_factor) {
  DSTRAIN_CHECK(total_steps > 0 && step >= 0, "one-cycle schedule needs total_steps > 0 and step >= 0");
  const double initial = max_lr / div_factor;
  const double final_lr = initial / final_div_factor;
  // PyTorch's phase ends: warm-up ends at pct_start * total - 1, annealing at total - 1.
  const double warm_end = static_cast<double>(pct_start) * total_steps - 1.0;
  const double end = static_cast<double>(total_steps) - 1.0;
  auto cos_anneal = [](double start, double stop, double pct) {
    return stop + (start - stop) / 2.0 * (std::cos(M_PI * pct) + 1.0);
  };
  const double s = static_cast<double>(std::min(step, total_steps - 1));
  if (s <= warm_end) return static_cast<float>(cos_anneal(initial, max_lr, warm_end > 0 ? s / warm_end : 1.0));
  return static_cast<float>(cos_anneal(max_lr, final_lr, (s - warm_end) / std::max(end - warm_end, 1.0)));
}

}  // namespace dstrain::optim
