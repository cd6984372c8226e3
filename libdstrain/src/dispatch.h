// DSTRAIN_DISPATCH(fn, args...): runs kernels::cuda::fn on a CUDA context and kernels::cpu::fn on
// a CPU one (a CUDA context in a build without CUDA raises Unsupported). Expects a `ctx` in scope.
// Internal to libdstrain/src.
#pragma once
#include "dstrain/error.h"

#ifdef DSTRAIN_HAVE_CUDA
#define DSTRAIN_DISPATCH(fn, ...)          \
  do {                                     \
    if (ctx.is_cuda())                     \
      kernels::cuda::fn(ctx, __VA_ARGS__); \
    else                                   \
      kernels::cpu::fn(ctx, __VA_ARGS__);  \
  } while (0)
#else
#define DSTRAIN_DISPATCH(fn, ...)                                                                      \
  do {                                                                                                 \
    if (ctx.is_cuda()) DSTRAIN_THROW(::dstrain::ErrorCode::Unsupported, #fn ": a CUDA context in a build without CUDA"); \
    kernels::cpu::fn(ctx, __VA_ARGS__);                                                                \
  } while (0)
#endif
