// CPU reference of the fully connected layer, fp32, with Eigen GEMMs on row-major maps.
// GCC 12 reports a false -Wmaybe-uninitialized inside Eigen's AVX-512 GEMM packing.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <Eigen/Core>
#include <cstdint>

#include "ops_cpu.h"

namespace dstrain::kernels::cpu {
namespace {
using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapMat = Eigen::Map<RowMat>;
using CMapMat = Eigen::Map<const RowMat>;
using CMapRow = Eigen::Map<const Eigen::RowVectorXf>;
using MapRow = Eigen::Map<Eigen::RowVectorXf>;
}  // namespace

void linear_forward(Context&, const Tensor& x, const Tensor& w, const Tensor* b, Tensor& y) {
  const std::int64_t N = x.dim(0), I = x.dim(1), O = w.dim(0);
  MapMat ym(y.data_as<float>(), N, O);
  if (I == 0)
    ym.setZero();
  else
    ym.noalias() = CMapMat(x.data_as<float>(), N, I) * CMapMat(w.data_as<float>(), O, I).transpose();
  if (b != nullptr) ym.rowwise() += CMapRow(b->data_as<float>(), O);
}

void linear_backward(Context&, const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx,
                     Tensor& dw, Tensor* db) {
  const std::int64_t N = x.dim(0), I = x.dim(1), O = w.dim(0);
  CMapMat dym(dy.data_as<float>(), N, O);
  if (dx != nullptr) {
    MapMat dxm(dx->data_as<float>(), N, I);
    if (O == 0)
      dxm.setZero();
    else
      dxm.noalias() = dym * CMapMat(w.data_as<float>(), O, I);
  }
  MapMat dwm(dw.data_as<float>(), O, I);
  if (N == 0)
    dwm.setZero();
  else
    dwm.noalias() = dym.transpose() * CMapMat(x.data_as<float>(), N, I);
  if (db != nullptr) {
    MapRow dbm(db->data_as<float>(), O);
    if (N == 0)
      dbm.setZero();
    else
      dbm.noalias() = dym.colwise().sum();
  }
}

}  // namespace dstrain::kernels::cpu
