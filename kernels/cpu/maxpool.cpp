// CPU reference of 2x2 stride-2 max pooling over NHWC, fp32. An odd trailing row or column is
// dropped. The maximum is the first one in row-major window order (a NaN wins, as in PyTorch);
// backward sends each gradient to that element and zero everywhere else.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ops_cpu.h"

namespace dstrain::kernels::cpu {
namespace {

// True when v replaces the current maximum `best` (scanning in window order).
inline bool beats(float v, float best) { return v > best || (std::isnan(v) && !std::isnan(best)); }

}  // namespace

void maxpool2x2_forward(Context&, const Tensor& x, Tensor& y) {
  const std::int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
  const std::int64_t Ho = H / 2, Wo = W / 2;
  const float* xp = x.data_as<float>();
  float* yp = y.data_as<float>();
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t oh = 0; oh < Ho; ++oh) {
      const float* r0 = xp + ((n * H + 2 * oh) * W) * C;
      const float* r1 = r0 + W * C;
      for (std::int64_t ow = 0; ow < Wo; ++ow) {
        const float* a = r0 + 2 * ow * C;
        const float* b = a + C;
        const float* c2 = r1 + 2 * ow * C;
        const float* d = c2 + C;
        float* o = yp + ((n * Ho + oh) * Wo + ow) * C;
        for (std::int64_t c = 0; c < C; ++c) {
          float m = a[c];
          if (beats(b[c], m)) m = b[c];
          if (beats(c2[c], m)) m = c2[c];
          if (beats(d[c], m)) m = d[c];
          o[c] = m;
        }
      }
    }
  }
}

void maxpool2x2_backward(Context&, const Tensor& dy, const Tensor& x, const Tensor&, Tensor& dx) {
  const std::int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
  const std::int64_t Ho = H / 2, Wo = W / 2;
  const float* xp = x.data_as<float>();
  const float* dyp = dy.data_as<float>();
  float* dxp = dx.data_as<float>();
  // Covers the dropped trailing row/column too; windows do not overlap, so the rest is assigned.
  std::fill(dxp, dxp + dx.numel(), 0.0f);
  // The argmax is recomputed from x with the forward's rule, so it is the same element.
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t oh = 0; oh < Ho; ++oh) {
      const std::int64_t row0 = (n * H + 2 * oh) * W * C;
      const std::int64_t row1 = row0 + W * C;
      for (std::int64_t ow = 0; ow < Wo; ++ow) {
        const std::int64_t off[4] = {row0 + 2 * ow * C, row0 + (2 * ow + 1) * C, row1 + 2 * ow * C,
                                     row1 + (2 * ow + 1) * C};
        const float* g = dyp + ((n * Ho + oh) * Wo + ow) * C;
        for (std::int64_t c = 0; c < C; ++c) {
          std::int64_t best = off[0] + c;
          float m = xp[best];
          for (int k = 1; k < 4; ++k) {
            const float v = xp[off[k] + c];
            if (beats(v, m)) {
              m = v;
              best = off[k] + c;
            }
          }
          dxp[best] = g[c];
        }
      }
    }
  }
}

}  // namespace dstrain::kernels::cpu
