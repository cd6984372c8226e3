// CPU reference of softmax cross-entropy over the rows of [N, K] logits, fp32 storage, each
// row's log-sum-exp and the loss sum in double.
#include <cmath>
#include <cstdint>
#include <string>

#include "dstrain/error.h"
#include "ops_cpu.h"

namespace dstrain::kernels::cpu {

void softmax_cross_entropy(Context&, const Tensor& logits, const Tensor& labels, Tensor* dlogits,
                           float grad_scale, Tensor& loss_sum, Tensor& correct) {
  const std::int64_t N = logits.dim(0), K = logits.dim(1);
  const float* xp = logits.data_as<float>();
  const std::int32_t* yp = labels.data_as<std::int32_t>();
  // Checked before anything is written.
  for (std::int64_t i = 0; i < N; ++i) {
    if (yp[i] < 0 || yp[i] >= K)
      DSTRAIN_THROW(ErrorCode::InvalidArgument,
                    "softmax_cross_entropy: label " + std::to_string(yp[i]) + " of row " +
                        std::to_string(i) + " is outside [0, " + std::to_string(K) + ")");
  }
  double loss = 0.0;
  std::int64_t hits = 0;
  float* dp = dlogits != nullptr ? dlogits->data_as<float>() : nullptr;
  for (std::int64_t i = 0; i < N; ++i) {
    const float* x = xp + i * K;
    // Argmax, first on ties; it is also the shift that keeps exp from overflowing.
    std::int64_t arg = 0;
    for (std::int64_t k = 1; k < K; ++k)
      if (x[k] > x[arg]) arg = k;
    const double mx = x[arg];
    double sum = 0.0;
    for (std::int64_t k = 0; k < K; ++k) sum += std::exp(static_cast<double>(x[k]) - mx);
    const double lse = mx + std::log(sum);
    const std::int32_t label = yp[i];
    loss += lse - static_cast<double>(x[label]);
    if (arg == label) ++hits;
    if (dp != nullptr) {
      float* d = dp + i * K;
      for (std::int64_t k = 0; k < K; ++k) {
        const double prob = std::exp(static_cast<double>(x[k]) - lse);
        d[k] = static_cast<float>((prob - (k == label ? 1.0 : 0.0)) * grad_scale);
      }
    }
  }
  loss_sum.data_as<float>()[0] = static_cast<float>(loss);
  correct.data_as<float>()[0] = static_cast<float>(hits);
}

}  // namespace dstrain::kernels::cpu
