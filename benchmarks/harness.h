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

// Median times in microseconds of several paths on the context's stream, timed with CUDA events.
// Each repeat times `batch` back-to-back calls of every path in turn and divides, so that a short
// kernel is not charged the host's launch latency between the start event and its own start, and
// a slow spell of the device falls on one repeat of every path, which the medians drop, rather
// than on one path's whole block of repeats (about a millisecond for a small layer).
inline std::vector<double> time_interleaved_us(Context& ctx, int warmup, int iters, int batch,
                                               const std::vector<std::function<void()>>& paths) {
  if (paths.empty()) return {};
  for (const auto& fn : paths)
    for (int i = 0; i < warmup; ++i) fn();
  std::vector<Event> starts, stops;
  for (std::size_t p = 0; p < paths.size(); ++p) {
    starts.push_back(Event::create(ctx.device().index));
    stops.push_back(Event::create(ctx.device().index));
  }
  std::vector<std::vector<double>> t(paths.size());
  for (int i = 0; i < iters; ++i) {
    for (std::size_t p = 0; p < paths.size(); ++p) {
      starts[p].record(ctx.stream());
      for (int j = 0; j < batch; ++j) paths[p]();
      stops[p].record(ctx.stream());
    }
    stops.back().synchronize();
    for (std::size_t p = 0; p < paths.size(); ++p) t[p].push_back(1000.0 * stops[p].elapsed_ms(starts[p]) / batch);
  }
  std::vector<double> medians;
  for (const auto& v : t) medians.push_back(median(v));
  return medians;
}

// Median time in microseconds of one `fn` (time_interleaved_us with one path).
inline double time_us(Context& ctx, int warmup, int iters, int batch, const std::function<void()>& fn) {
  return time_interleaved_us(ctx, warmup, iters, batch, {fn}).front();
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
