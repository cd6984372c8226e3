// Mixed-precision building blocks: dynamic loss scaling (GradScaler), fused multi-tensor
// optimizers over fp32 master weights (FusedSGD, FusedAdamW), FP8 delayed scaling (Fp8Meta and
// its cast), and FP8/BF16 GEMMs through cuBLASLt.
//
// Everything a training step updates lives in small tensors on the context's device (host
// tensors on the CPU), read and written by kernels, so a step issues no host synchronisation:
// the found-inf flag set by GradScaler::unscale_and_check is read on the device by the optimizers
// (which then skip the whole update) and by GradScaler::update (which then backs the scale off).
//
// A step under loss scaling reads:
//   loss * scale -> backward -> scaler.unscale_and_check(ctx, grads)
//   -> scaler.agree_found_inf(comm, ctx)   (data parallel: every rank skips together)
//   -> opt.step(ctx, grads, &scaler.found_inf()) -> scaler.update(ctx)
#pragma once
#include <cstdint>
#include <vector>

#include "dstrain/comm.h"
#include "dstrain/context.h"
#include "dstrain/ops.h"
#include "dstrain/tensor.h"

namespace dstrain::amp {

// PyTorch's torch.amp.GradScaler defaults.
struct GradScalerOptions {
  float init_scale = 65536.0f;
  float growth_factor = 2.0f;
  float backoff_factor = 0.5f;
  int growth_interval = 2000;  // consecutive clean steps before the scale grows
};

class GradScaler {
 public:
  // State on `device`: scale, found-inf flag and growth counter (an fp32 tensor of 4 values).
  explicit GradScaler(Device device, const GradScalerOptions& options = {});

  GradScaler(GradScaler&&) noexcept = default;
  GradScaler& operator=(GradScaler&&) noexcept = default;
  GradScaler(const GradScaler&) = delete;
  GradScaler& operator=(const GradScaler&) = delete;

  // Multiplies every fp32 gradient (on the context's device) by 1/scale in place, and sets the
  // found-inf flag when any of them holds an inf or NaN. One fused launch for up to 198 tensors.
  // The flag is only ever set here; update() clears it.
  void unscale_and_check(Context& ctx, const std::vector<Tensor*>& grads);
  // Multiplies an fp32 tensor (the loss gradient, on the context's device) by the current scale
  // in place, read on the device: no host synchronisation.
  void scale_gradient(Context& ctx, Tensor& grad) const;
  // Allreduce (Max) of the found-inf flag over `comm`, on the device, so that all ranks skip the
  // same steps. `comm` must work on this scaler's device.
  void agree_found_inf(Communicator& comm, Context& ctx);
  // Backs the scale off (and zeroes the growth counter) when found-inf is set, else counts a clean
  // step and grows the scale after growth_interval of them; then clears found-inf. On the device.
  void update(Context& ctx);

  // The device scalars: the loss scale, and the flag (1.0f: skip this step) optimizers read.
  const Tensor& scale_tensor() const { return scale_view_; }
  const Tensor& found_inf() const { return found_inf_view_; }
  const Tensor& state_tensor() const { return state_; }
  const GradScalerOptions& options() const { return options_; }

  // Host reads for logging and tests: these wait for the context's queued work.
  float scale(Context& ctx) const;
  bool found_inf_set(Context& ctx) const;
  int growth_tracker(Context& ctx) const;

  // Checkpoint bytes (scale and growth counter), read with a blocking copy that waits for the
  // device's queued work; load_state writes the same way and clears found-inf.
  std::vector<char> state() const;
  // Raises Corrupt when the bytes are not a state() of this format.
  void load_state(const std::vector<char>& bytes);

 private:
  GradScalerOptions options_;
  Tensor state_;  // [scale, found_inf, growth_tracker, unused]
  Tensor scale_view_;
  Tensor found_inf_view_;
};

// Low-precision working copies an optimizer may write in the same pass as the fp32 update.
struct FusedSGDOptions {
  float lr = 0.1f;
  float momentum = 0.0f;
  float weight_decay = 0.0f;
  bool nesterov = false;
};

// PyTorch's SGD (as ops::sgd_step) over many fp32 tensors in few launches.
class FusedSGD {
 public:
  // params: fp32 master weights, all on one device, kept by the caller for the optimizer's
  // lifetime; momentum buffers (zero) are allocated there.
  FusedSGD(std::vector<Tensor*> params, const FusedSGDOptions& options);

  // One step with `grads` (fp32, shapes of the params). When `found_inf` (a device fp32 scalar,
  // e.g. GradScaler::found_inf()) is nonzero, nothing is written at all. When `low_precision` is
  // given (one entry per parameter), each updated parameter is also written, rounded, to the
  // fp16/bf16 tensor at the same index (all of one dtype), in the same pass; a null entry: that
  // parameter has no such copy (see nn::working_copy_per_parameter).
  void step(Context& ctx, const std::vector<Tensor*>& grads, const Tensor* found_inf = nullptr,
            const std::vector<Tensor*>* low_precision = nullptr);

  void set_lr(float lr) { options_.lr = lr; }
  const FusedSGDOptions& options() const { return options_; }
  std::vector<Tensor>& momentum_buffers() { return momentum_; }

 private:
  std::vector<Tensor*> params_;
  std::vector<Tensor> momentum_;
  FusedSGDOptions options_;
};

struct FusedAdamWOptions {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 1e-2f;
};

// PyTorch's AdamW: p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
// p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), t the step count starting at 1.
// The step count lives on the device (an i32 scalar) and does not advance on a skipped step.
class FusedAdamW {
 public:
  // params as for FusedSGD; exp_avg, exp_avg_sq (zero) and the step count live on their device.
  FusedAdamW(std::vector<Tensor*> params, const FusedAdamWOptions& options);

  void step(Context& ctx, const std::vector<Tensor*>& grads, const Tensor* found_inf = nullptr,
            const std::vector<Tensor*>* low_precision = nullptr);

  void set_lr(float lr) { options_.lr = lr; }
  const FusedAdamWOptions& options() const { return options_; }
  std::vector<Tensor>& exp_avg() { return exp_avg_; }
  std::vector<Tensor>& exp_avg_sq() { return exp_avg_sq_; }
  Tensor& step_count() { return step_; }  // i32 [1]

 private:
  std::vector<Tensor*> params_;
  std::vector<Tensor> exp_avg_;
  std::vector<Tensor> exp_avg_sq_;
  Tensor step_;
  FusedAdamWOptions options_;
};

// ---- FP8 delayed scaling -------------------------------------------------------------------

enum class AmaxAlgo { Max, MostRecent };

struct Fp8MetaOptions {
  DType format = DType::F8E4M3;  // E4M3 for forward tensors, F8E5M2 for gradients
  int history_len = 16;
  AmaxAlgo algo = AmaxAlgo::Max;
  int margin = 0;
};

// Largest finite value of an fp8 format: 448 (E4M3), 57344 (E5M2).
float fp8_max(DType format);

// Per-tensor FP8 scaling state, on the device: an fp32 tensor
// [scale, scale_inv, amax (of this step, raised by casts), history[0..L) (history[0] most recent)].
class Fp8Meta {
 public:
  Fp8Meta(Device device, const Fp8MetaOptions& options = {});

  const Fp8MetaOptions& options() const { return options_; }
  Tensor& state() { return state_; }
  const Tensor& state() const { return state_; }
  const Tensor& scale() const { return scale_view_; }          // x_fp8 = x * scale
  const Tensor& scale_inv() const { return scale_inv_view_; }  // what a GEMM multiplies back
  const Tensor& amax() const { return amax_view_; }

  // Rolls the history (the step's amax enters as history[0], the oldest leaves), reduces it
  // (max or most recent) and sets scale = (fp8_max / amax) / 2^margin and scale_inv = 1/scale;
  // an amax of 0, inf or NaN, or a scale that would not be finite and positive, keeps the
  // previous scale. Then zeroes the step's amax. One small kernel on the device.
  void update_scale(Context& ctx);

 private:
  Fp8MetaOptions options_;
  Tensor state_;
  Tensor scale_view_, scale_inv_view_, amax_view_;
};

// dst (fp8 of meta's format) = saturate(src * scale), src fp32 or bf16 of the same shape; in
// the same pass meta's amax becomes max(amax, max |src|) (a NaN in src makes it NaN). Values
// past the format's largest finite value saturate to it (E5M2 too: delayed scaling lags the
// data, and a saturated value hurts less than an inf); NaN stays NaN.
void cast_to_fp8(Context& ctx, const Tensor& src, Tensor& dst, Fp8Meta& meta);

// Agrees each meta's step amax over `comm` (allreduce Max, so every rank gets the same scales and
// data-parallel replicas stay identical; comm may be null or of one rank) and then calls
// update_scale on each: once per training step, after the step's casts.
void update_fp8_scales(Context& ctx, const std::vector<Fp8Meta*>& metas, Communicator* comm);

// ---- FP8 operands for gemm_nt --------------------------------------------------------------

// The size fp8 operands are padded to: a multiple of 32. cuBLASLt needs multiples of 16, and on
// sm_90 its heuristic offers algorithms for a K of 16 that the launch then refuses (Hopper's FP8
// MMA steps K by 32).
inline std::int64_t fp8_padded_size(std::int64_t n) { return (n + 31) / 32 * 32; }

enum class Fp8Layout { AsIs, Transposed };

// The padded fp8 copy of a 2-d src [R,C] (fp32 or bf16) that gemm_nt takes: dst is
// [fp8_padded_size(R), fp8_padded_size(C)] with dst[r][c] = fp8(src[r][c]) (AsIs), or
// [fp8_padded_size(C), fp8_padded_size(R)] with dst[c][r] = fp8(src[r][c]) (Transposed: the
// K-contiguous operand the backward GEMMs need). Padding is zero, which adds nothing to a
// product. Values, saturation and amax as cast_to_fp8, in the same pass.
void cast_to_fp8_padded(Context& ctx, const Tensor& src, Tensor& dst, Fp8Meta& meta, Fp8Layout layout);

// dst [M,N] (fp32 or bf16) = src[0..M, 0..N] (+ bias[N] when given), src fp32 [M', N'] with
// M' >= M, N' >= N: the valid part of a GEMM output computed on padded operands.
void crop_padded(Context& ctx, const Tensor& src, Tensor& dst, const Tensor* bias = nullptr);

// dst[c] = sum over r of src[r][c] (fp32 [R,C] -> fp32 [C]), accumulated in row order in fp32
// (the same bits on the CPU and on CUDA).
void column_sums(Context& ctx, const Tensor& src, Tensor& dst);

// ---- GEMM ----------------------------------------------------------------------------------

struct GemmOptions {
  // fp8 only (required there): device fp32 scalars multiplied into the product, normally the
  // operands' Fp8Meta::scale_inv().
  const Tensor* a_scale_inv = nullptr;
  const Tensor* b_scale_inv = nullptr;
  // Optional device fp32 scalar set to max |d| (fp8 only).
  Tensor* d_amax = nullptr;
  // fp8 only: Hopper's fast accumulation (partial sums kept in lower precision; faster, less exact).
  bool fast_accumulate = false;
};

// d[M,N] = a_scale_inv * b_scale_inv * a[M,K] * b[N,K]^T: row-major, both operands K-contiguous
// (the "TN" layout cuBLASLt needs for FP8 on Hopper). a and b are both fp8 (E4M3 x E4M3, E4M3 x
// E5M2 or E5M2 x E4M3) or both bf16; d is bf16 or fp32. fp8 needs M, N, K multiples of 16.
// The CPU path dequantises and multiplies in fp32 (the reference).
void gemm_nt(Context& ctx, const Tensor& a, const Tensor& b, Tensor& d, const GemmOptions& options = {});

// ---- FP8 convolution -----------------------------------------------------------------------

// y (bf16 [N,Ho,Wo,K]) = conv2d(x, w) * x_scale_inv * w_scale_inv with x [N,H,W,C] and w [K,R,S,C]
// in E4M3 (an Fp8Meta's cast), fp32 accumulation; the descales are fp32 device scalars (normally
// the metas' scale_inv()). On the GPU it runs as one cuDNN graph (sm_90; cuDNN offers FP8
// convolutions only there); returns false, writing nothing, where cuDNN has no plan for the shape
// (or in deterministic mode), so the caller computes in bf16 instead. The CPU path dequantises
// and convolves in fp32 (the reference) and always returns true.
bool conv2d_forward_fp8(Context& ctx, const Tensor& x, const Tensor& w, const Tensor& x_scale_inv,
                        const Tensor& w_scale_inv, Tensor& y, const ops::Conv2dParams& params);

}  // namespace dstrain::amp
