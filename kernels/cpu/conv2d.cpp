// CPU reference of conv2d (NHWC activations, KRSC filters), fp32, single-threaded.
//
// Forward is im2col + GEMM: with M = N*Ho*Wo rows (one per output pixel) and a column matrix
// col[M, R*S*C] whose row holds the receptive field of that pixel in (r, s, c) order,
//   y[M, K]      = col * W^T          (W viewed as [K, R*S*C], which is KRSC; y is NHWC directly)
//   dW[K, RSC]   = dY^T * col
//   dcol[M, RSC] = dY * W, then col2im accumulates dcol into dx.
// The rows are processed in blocks so the column matrix of a block stays in cache (and the
// scratch buffer stays small); the block's buffer is a thread_local vector reused across calls.
// A 1x1 filter with stride 1 and no padding needs no im2col: x itself is col.
// GCC 12 reports a false -Wmaybe-uninitialized inside Eigen's AVX-512 GEMM packing.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops_cpu.h"

namespace dstrain::kernels::cpu {
namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapMat = Eigen::Map<RowMat>;
using CMapMat = Eigen::Map<const RowMat>;

// Target size of one block of the column matrix (floats): 256 KiB, well within L2 beside Eigen's
// own packed panels. Measured on the training CNN's layers (batch 64): blocks of 128 KiB to
// 1 MiB are within noise of each other, one GEMM over the whole matrix is about 1.5x slower.
constexpr std::int64_t kBlockFloats = 64 * 1024;

struct Geometry {
  std::int64_t N, H, W, C;   // input
  std::int64_t K, R, S;      // filter
  std::int64_t Ho, Wo;       // output
  std::int64_t sh, sw, ph, pw;
  std::int64_t M() const { return N * Ho * Wo; }
  std::int64_t cols() const { return R * S * C; }
  bool pointwise() const { return R == 1 && S == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0; }
};

Geometry make_geometry(const Shape& x, const Shape& w, const Shape& y, const ops::Conv2dParams& p) {
  Geometry g;
  g.N = x[0]; g.H = x[1]; g.W = x[2]; g.C = x[3];
  g.K = w[0]; g.R = w[1]; g.S = w[2];
  g.Ho = y[1]; g.Wo = y[2];
  g.sh = p.stride_h; g.sw = p.stride_w; g.ph = p.pad_h; g.pw = p.pad_w;
  return g;
}

std::int64_t block_rows(const Geometry& g) {
  const std::int64_t per_row = std::max<std::int64_t>(g.cols(), 1);
  // At least 64 rows so the GEMM is never degenerate, at most all of them.
  return std::min(g.M(), std::max<std::int64_t>(64, kBlockFloats / per_row));
}

float* scratch(std::size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) {
    buf.clear();
    buf.shrink_to_fit();
    buf.resize(n);
  }
  return buf.data();
}

// Writes rows [m0, m0 + rows) of the column matrix into col ([rows, R*S*C], row-major).
// For a fixed (pixel, r) the in-range s taps read x[n, ih, iw0 + s, :], contiguous over (s, c),
// so each becomes one memcpy with zeros for the padded taps on either side.
void im2col(const float* x, const Geometry& g, std::int64_t m0, std::int64_t rows, float* col) {
  const std::int64_t SC = g.S * g.C;
  const std::int64_t ncols = g.cols();
  std::int64_t ow = m0 % g.Wo;
  std::int64_t oh = (m0 / g.Wo) % g.Ho;
  std::int64_t n = m0 / (g.Wo * g.Ho);
  for (std::int64_t i = 0; i < rows; ++i) {
    float* dst = col + i * ncols;
    const std::int64_t ih0 = oh * g.sh - g.ph;
    const std::int64_t iw0 = ow * g.sw - g.pw;
    const std::int64_t s_lo = std::max<std::int64_t>(0, -iw0);
    const std::int64_t s_hi = std::min<std::int64_t>(g.S, g.W - iw0);  // exclusive
    for (std::int64_t r = 0; r < g.R; ++r) {
      float* d = dst + r * SC;
      const std::int64_t ih = ih0 + r;
      if (ih < 0 || ih >= g.H || s_lo >= s_hi) {
        std::memset(d, 0, sizeof(float) * SC);
        continue;
      }
      if (s_lo > 0) std::memset(d, 0, sizeof(float) * s_lo * g.C);
      const float* src = x + ((n * g.H + ih) * g.W + iw0 + s_lo) * g.C;
      std::memcpy(d + s_lo * g.C, src, sizeof(float) * (s_hi - s_lo) * g.C);
      if (s_hi < g.S) std::memset(d + s_hi * g.C, 0, sizeof(float) * (g.S - s_hi) * g.C);
    }
    if (++ow == g.Wo) {
      ow = 0;
      if (++oh == g.Ho) { oh = 0; ++n; }
    }
  }
}

// Adds rows [m0, m0 + rows) of dcol into dx (the adjoint of im2col).
void col2im_add(const float* col, const Geometry& g, std::int64_t m0, std::int64_t rows, float* dx) {
  const std::int64_t SC = g.S * g.C;
  const std::int64_t ncols = g.cols();
  std::int64_t ow = m0 % g.Wo;
  std::int64_t oh = (m0 / g.Wo) % g.Ho;
  std::int64_t n = m0 / (g.Wo * g.Ho);
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* src_row = col + i * ncols;
    const std::int64_t ih0 = oh * g.sh - g.ph;
    const std::int64_t iw0 = ow * g.sw - g.pw;
    const std::int64_t s_lo = std::max<std::int64_t>(0, -iw0);
    const std::int64_t s_hi = std::min<std::int64_t>(g.S, g.W - iw0);
    if (s_lo < s_hi) {
      const std::int64_t len = (s_hi - s_lo) * g.C;
      for (std::int64_t r = 0; r < g.R; ++r) {
        const std::int64_t ih = ih0 + r;
        if (ih < 0 || ih >= g.H) continue;
        const float* s = src_row + r * SC + s_lo * g.C;
        float* d = dx + ((n * g.H + ih) * g.W + iw0 + s_lo) * g.C;
        for (std::int64_t j = 0; j < len; ++j) d[j] += s[j];
      }
    }
    if (++ow == g.Wo) {
      ow = 0;
      if (++oh == g.Ho) { oh = 0; ++n; }
    }
  }
}

}  // namespace

void conv2d_forward(Context&, const Tensor& x, const Tensor& w, Tensor& y, const ops::Conv2dParams& p) {
  const Geometry g = make_geometry(x.shape(), w.shape(), y.shape(), p);
  const std::int64_t M = g.M(), K = g.K, RSC = g.cols();
  float* yp = y.data_as<float>();
  if (M == 0 || K == 0) return;
  if (RSC == 0) {
    std::fill(yp, yp + M * K, 0.0f);
    return;
  }
  CMapMat wm(w.data_as<float>(), K, RSC);
  if (g.pointwise()) {
    MapMat(yp, M, K).noalias() = CMapMat(x.data_as<float>(), M, RSC) * wm.transpose();
    return;
  }
  const std::int64_t B = block_rows(g);
  float* col = scratch(static_cast<std::size_t>(B * RSC));
  for (std::int64_t m0 = 0; m0 < M; m0 += B) {
    const std::int64_t rows = std::min(B, M - m0);
    im2col(x.data_as<float>(), g, m0, rows, col);
    MapMat(yp + m0 * K, rows, K).noalias() = CMapMat(col, rows, RSC) * wm.transpose();
  }
}

void conv2d_backward_data(Context&, const Tensor& dy, const Tensor& w, Tensor& dx,
                          const ops::Conv2dParams& p) {
  const Geometry g = make_geometry(dx.shape(), w.shape(), dy.shape(), p);
  const std::int64_t M = g.M(), K = g.K, RSC = g.cols();
  float* dxp = dx.data_as<float>();
  if (g.pointwise()) {
    if (K == 0) {
      std::fill(dxp, dxp + dx.numel(), 0.0f);
      return;
    }
    MapMat(dxp, M, RSC).noalias() =
        CMapMat(dy.data_as<float>(), M, K) * CMapMat(w.data_as<float>(), K, RSC);
    return;
  }
  std::fill(dxp, dxp + dx.numel(), 0.0f);
  if (M == 0 || K == 0 || RSC == 0) return;
  CMapMat wm(w.data_as<float>(), K, RSC);
  const std::int64_t B = block_rows(g);
  float* col = scratch(static_cast<std::size_t>(B * RSC));
  for (std::int64_t m0 = 0; m0 < M; m0 += B) {
    const std::int64_t rows = std::min(B, M - m0);
    MapMat(col, rows, RSC).noalias() = CMapMat(dy.data_as<float>() + m0 * K, rows, K) * wm;
    col2im_add(col, g, m0, rows, dxp);
  }
}

void conv2d_backward(Context& ctx, const Tensor& x, const Tensor& dy, const Tensor& w, Tensor* dx, Tensor& dw,
                     const ops::Conv2dParams& p) {
  cpu::conv2d_backward_filter(ctx, x, dy, dw, p);
  if (dx != nullptr) cpu::conv2d_backward_data(ctx, dy, w, *dx, p);
}

void conv2d_backward_filter(Context&, const Tensor& x, const Tensor& dy, Tensor& dw,
                            const ops::Conv2dParams& p) {
  const Geometry g = make_geometry(x.shape(), dw.shape(), dy.shape(), p);
  const std::int64_t M = g.M(), K = g.K, RSC = g.cols();
  MapMat dwm(dw.data_as<float>(), K, RSC);
  if (M == 0 || K == 0 || RSC == 0) {
    dwm.setZero();
    return;
  }
  if (g.pointwise()) {
    dwm.noalias() = CMapMat(dy.data_as<float>(), M, K).transpose() * CMapMat(x.data_as<float>(), M, RSC);
    return;
  }
  const std::int64_t B = block_rows(g);
  float* col = scratch(static_cast<std::size_t>(B * RSC));
  for (std::int64_t m0 = 0; m0 < M; m0 += B) {
    const std::int64_t rows = std::min(B, M - m0);
    im2col(x.data_as<float>(), g, m0, rows, col);
    CMapMat dym(dy.data_as<float>() + m0 * K, rows, K);
    if (m0 == 0)
      dwm.noalias() = dym.transpose() * CMapMat(col, rows, RSC);
    else
      dwm.noalias() += dym.transpose() * CMapMat(col, rows, RSC);
  }
}

}  // namespace dstrain::kernels::cpu
