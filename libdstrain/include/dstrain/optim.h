// Optimizers over nn::Parameter lists. State (momentum) lives on the parameters' device.
#pragma once
#include <vector>

#include "dstrain/nn.h"
#include "dstrain/ops.h"

namespace dstrain::optim {

struct SgdOptions {
  float lr = 0.1f;
  float momentum = 0.0f;
  float weight_decay = 0.0f;
  bool nesterov = false;
};

// PyTorch's torch.optim.SGD (dampening 0).
class SGD {
 public:
  SGD(std::vector<nn::Parameter*> params, const SgdOptions& options);
  void step(Context& ctx);
  void set_lr(float lr) { options_.lr = lr; }
  float lr() const { return options_.lr; }
  const SgdOptions& options() const { return options_; }
  std::vector<Tensor>& momentum_buffers() { return momentum_; }

 private:
  std::vector<nn::Parameter*> params_;
  SgdOptions options_;
  std::vector<Tensor> momentum_;
};

// torch.optim.lr_scheduler.OneCycleLR with its defaults (cosine annealing, pct_start 0.3,
// div_factor 25, final_div_factor 1e4): the learning rate at `step` of `total_steps`.
float one_cycle_lr(float max_lr, long step, long total_steps, float pct_start = 0.3f, float div_factor = 25.0f,
                   float final_div_factor = 1e4f);

}  // namespace dstrain::optim
