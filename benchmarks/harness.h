// Small pieces shared by the benchmarks: nccl-tests style size flags, medians, and a least-squares
// line for alpha-beta fits.
#pragma once
#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dstrain/context.h"
#include "dstrain/device.h"
#include "dstrain/error.h"

namespace dstrain::bench {

// "64", "8K", "1M", "2G" (binary multiples, as nccl-tests reads them).
inline std::size_t parse_size(const std::string& text) {
  std::size_t pos = 0;
  unsigned long long value = 0;
  try {
    value = std::stoull(text, &pos);
  } catch (...) {
    DSTRAIN_THROW(ErrorCode::InvalidArgument, "size '" + text + "': expected a number with an optional K, M or G");
  }
  std::string suffix = text.substr(pos);
  for (char& c : suffix) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (suffix == "B") suffix.clear();
  if (!suffix.empty() && suffix.back() == 'B') suffix.pop_back();
  if (suffix.empty()) return value;
  if (suffix == "K") return value << 10;
  if (suffix == "M") return value << 20;
  if (suffix == "G") return value << 30;
  DSTRAIN_THROW(ErrorCode::InvalidArgument, "size '" + text + "': expected a number with an optional K, M or G");
}

inline double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Median time in microseconds of one `fn` on the context's stream, timed with CUDA events. Each
// repeat times `batch` back-to-back calls and divides, so that a short kernel is not charged the
// host's launch latency between the start event and its own start.
inline double time_us(Context& ctx, int warmup, int iters, int batch, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  Event start = Event::create(ctx.device().index), stop = Event::create(ctx.device().index);
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    start.record(ctx.stream());
    for (int j = 0; j < batch; ++j) fn();
    stop.record(ctx.stream());
    stop.synchronize();
    t.push_back(1000.0 * stop.elapsed_ms(start) / batch);
  }
  return median(t);
}

// y = intercept + slope * x by least squares of the relative error (weights 1/y^2), so that small
// messages (latency) count as much as large ones (bandwidth); false when fewer than two distinct x.
inline bool fit_line(const std::vector<double>& x, const std::vector<double>& y, double& intercept, double& slope) {
  const std::size_t n = std::min(x.size(), y.size());
  if (n < 2) return false;
  double sw = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double w = y[i] > 0 ? 1.0 / (y[i] * y[i]) : 1.0;
    sw += w;
    sx += w * x[i];
    sy += w * y[i];
    sxx += w * x[i] * x[i];
    sxy += w * x[i] * y[i];
  }
  const double den = sw * sxx - sx * sx;
  if (!(den > 0)) return false;
  slope = (sw * sxy - sx * sy) / den;
  intercept = (sy - slope * sx) / sw;
  return true;
}

}  // namespace dstrain::bench
