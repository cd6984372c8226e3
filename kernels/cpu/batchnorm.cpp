// CPU reference of batch normalisation over the last dimension (C) of a contiguous tensor,
// fp32 storage, per-channel sums accumulated in double. Rows are everything before C.
#include <cmath>
#include <cstdint>
#include <vector>

#include "dstrain/error.h"
#include "ops_cpu.h"

namespace dstrain::kernels::cpu {

void batchnorm_forward_train(Context&, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                             Tensor& running_mean, Tensor& running_var, Tensor& y, Tensor& save_mean,
                             Tensor& save_invstd, const ops::BatchNormParams& p) {
  const std::int64_t C = x.dim(-1);
  const std::int64_t rows = C > 0 ? x.numel() / C : 0;
  // PyTorch refuses this too: the unbiased variance of one value is undefined.
  DSTRAIN_CHECK(rows > 1 || C == 0, "batchnorm training needs more than one value per channel");
  const float* xp = x.data_as<float>();
  const float* gp = gamma.data_as<float>();
  const float* bp = beta.data_as<float>();

  std::vector<double> mean(C, 0.0), var(C, 0.0);
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* xr = xp + i * C;
    for (std::int64_t c = 0; c < C; ++c) mean[c] += xr[c];
  }
  for (std::int64_t c = 0; c < C; ++c) mean[c] /= static_cast<double>(rows);
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* xr = xp + i * C;
    for (std::int64_t c = 0; c < C; ++c) {
      const double d = xr[c] - mean[c];
      var[c] += d * d;
    }
  }

  std::vector<float> scale(C);
  float* rm = running_mean.data_as<float>();
  float* rv = running_var.data_as<float>();
  float* sm = save_mean.data_as<float>();
  float* si = save_invstd.data_as<float>();
  const double mom = p.momentum;
  for (std::int64_t c = 0; c < C; ++c) {
    const double biased = var[c] / static_cast<double>(rows);
    const double unbiased = var[c] / static_cast<double>(rows - 1);
    const double invstd = 1.0 / std::sqrt(biased + static_cast<double>(p.eps));
    sm[c] = static_cast<float>(mean[c]);
    si[c] = static_cast<float>(invstd);
    rm[c] = static_cast<float>((1.0 - mom) * rm[c] + mom * mean[c]);
    rv[c] = static_cast<float>((1.0 - mom) * rv[c] + mom * unbiased);
    scale[c] = static_cast<float>(gp[c] * invstd);
  }

  // (x - mean) first: folding the mean into a shift would cancel badly when |mean| >> std.
  float* yp = y.data_as<float>();
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* xr = xp + i * C;
    float* yr = yp + i * C;
    for (std::int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - sm[c]) * scale[c] + bp[c];
  }
}

void batchnorm_forward_eval(Context&, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                            const Tensor& running_mean, const Tensor& running_var, Tensor& y,
                            const ops::BatchNormParams& p) {
  const std::int64_t C = x.dim(-1);
  const std::int64_t rows = C > 0 ? x.numel() / C : 0;
  const float* gp = gamma.data_as<float>();
  const float* bp = beta.data_as<float>();
  const float* rm = running_mean.data_as<float>();
  const float* rv = running_var.data_as<float>();
  std::vector<float> scale(C);
  for (std::int64_t c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(static_cast<double>(rv[c]) + static_cast<double>(p.eps));
    scale[c] = static_cast<float>(gp[c] * invstd);
  }
  const float* xp = x.data_as<float>();
  float* yp = y.data_as<float>();
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* xr = xp + i * C;
    float* yr = yp + i * C;
    for (std::int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - rm[c]) * scale[c] + bp[c];
  }
}

// With xhat = (x - mean) * invstd and n rows:
//   dbeta = sum dy, dgamma = sum dy * xhat,
//   dx = gamma * invstd / n * (n * dy - dbeta - xhat * dgamma).
void batchnorm_backward(Context&, const Tensor& dy, const Tensor& x, const Tensor& gamma,
                        const Tensor& save_mean, const Tensor& save_invstd, Tensor& dx,
                        Tensor& dgamma, Tensor& dbeta) {
  const std::int64_t C = x.dim(-1);
  const std::int64_t rows = C > 0 ? x.numel() / C : 0;
  const float* xp = x.data_as<float>();
  const float* dyp = dy.data_as<float>();
  const float* gp = gamma.data_as<float>();
  const float* mp = save_mean.data_as<float>();
  const float* ip = save_invstd.data_as<float>();

  std::vector<double> sum_dy(C, 0.0), sum_dy_xmu(C, 0.0);
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* xr = xp + i * C;
    const float* dr = dyp + i * C;
    for (std::int64_t c = 0; c < C; ++c) {
      sum_dy[c] += dr[c];
      sum_dy_xmu[c] += static_cast<double>(dr[c]) * (static_cast<double>(xr[c]) - mp[c]);
    }
  }

  float* dgp = dgamma.data_as<float>();
  float* dbp = dbeta.data_as<float>();
  // dx = a * dy + b * (x - mean) + d per channel, folded from the formula above.
  std::vector<float> a(C), b(C), d(C);
  const double n = static_cast<double>(rows);
  for (std::int64_t c = 0; c < C; ++c) {
    const double invstd = ip[c];
    const double dg = sum_dy_xmu[c] * invstd;  // sum dy * xhat
    dgp[c] = static_cast<float>(dg);
    dbp[c] = static_cast<float>(sum_dy[c]);
    const double k = gp[c] * invstd;
    a[c] = static_cast<float>(k);
    b[c] = static_cast<float>(-k * invstd * dg / n);
    d[c] = static_cast<float>(-k * sum_dy[c] / n);
  }
  float* dxp = dx.data_as<float>();
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* xr = xp + i * C;
    const float* dr = dyp + i * C;
    float* o = dxp + i * C;
    for (std::int64_t c = 0; c < C; ++c) o[c] = a[c] * dr[c] + b[c] * (xr[c] - mp[c]) + d[c];
  }
}

}  // namespace dstrain::kernels::cpu
