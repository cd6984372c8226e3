// CPU reference of 2x2 stride-2 max pooling over NHWC, fp32. An odd trailing row or column is
// dropped. The maximum is the first one in row-major window order (a NaN wins, as in PyTorch);
// backward sends each gradient to that element and zero everywhere else.
#include <algorithm>
#include <cstdint>

#include "ops_cpu.h"

namespace dstrain::kernels::cpu {
namespace {

// True when v replaces the current maximum `best` (scanning in window order). Written with
// comparisons only (v != v is isnan) so GCC if-converts and vectorises the loops over C.
inline bool beats(float v, float best) { return v > best || (v != v && best == best); }
// True when v is the maximum m (NaN matching NaN).
inline bool same(float v, float m) { return v == m || (v != v && m != m); }

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
#pragma GCC ivdep
        for (std::int64_t c = 0; c < C; ++c) {
          const float va = a[c], vb = b[c], vc = c2[c], vd = d[c];
          float m = va;
          m = beats(vb, m) ? vb : m;
          m = beats(vc, m) ? vc : m;
          m = beats(vd, m) ? vd : m;
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
  // The maximum is recomputed from x with the forward's rule, and the gradient goes to the first
  // element equal to it (NaN matching NaN). Every element of each window is written, branch-free
  // over C so the loop vectorises; only a dropped trailing row/column needs zeroing apart.
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t oh = 0; oh < Ho; ++oh) {
      const std::int64_t row0 = (n * H + 2 * oh) * W * C;
      const std::int64_t row1 = row0 + W * C;
      for (std::int64_t ow = 0; ow < Wo; ++ow) {
        const float* a = xp + row0 + 2 * ow * C;
        const float* b = a + C;
        const float* c2 = xp + row1 + 2 * ow * C;
        const float* d = c2 + C;
        float* da = dxp + row0 + 2 * ow * C;
        float* db = da + C;
        float* dc = dxp + row1 + 2 * ow * C;
        float* dd = dc + C;
        const float* g = dyp + ((n * Ho + oh) * Wo + ow) * C;
#pragma GCC ivdep
        for (std::int64_t c = 0; c < C; ++c) {
          const float va = a[c], vb = b[c], vc = c2[c], vd = d[c];
          float m = va;
          m = beats(vb, m) ? vb : m;
          m = beats(vc, m) ? vc : m;
          m = beats(vd, m) ? vd : m;
          const bool ia = same(va, m);
          const bool ib = !ia && same(vb, m);
          const bool ic = !ia && !ib && same(vc, m);
          const bool id = !ia && !ib && !ic;
          da[c] = ia ? g[c] : 0.0f;
          db[c] = ib ? g[c] : 0.0f;
          dc[c] = ic ? g[c] : 0.0f;
          dd[c] = id ? g[c] : 0.0f;
        }
      }
      if (W % 2 != 0) {  // dropped last column of both rows
        std::fill(dxp + row0 + (W - 1) * C, dxp + row0 + W * C, 0.0f);
        std::fill(dxp + row1 + (W - 1) * C, dxp + row1 + W * C, 0.0f);
      }
    }
    if (H % 2 != 0) {  // dropped last row
      float* last = dxp + (n * H + H - 1) * W * C;
      std::fill(last, last + W * C, 0.0f);
    }
  }
}

}  // namespace dstrain::kernels::cpu
