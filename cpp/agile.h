// llava_agile extension: declarations shared by the binding, the CPU and the CUDA kernels.
// Every function takes a whole batch: features [B, N, D], attention [B, N] (any float dtype, any
// strides). Computation happens in float32, or float64 for float64 features, as the reference.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace agile {

constexpr double kNormFloor = 1e-8;  // SPEC §3: cosine norms are floored at 1e-8

struct AdaptiveArgs {
  int64_t keep = 64;
  double erank_avg = 90.0, tau_step = 0.01, tau_max = 0.25, tau = 0.0, entropy_avg = 4.7;
  bool has_tau = false;       // constant threshold `tau` instead of the rank-scaled one
  bool use_entropy = false;   // complexity signal: entropy / entropy_avg instead of erank / erank_avg
  bool center = true;
  bool adaptive_count = false;
  bool need_erank = true;     // compute erank (needed for stats or the thresholds)
  bool need_entropy = false;  // compute the attention entropy
};

// K_i = round_half_up(K * clip(c, 0.5, 1.5)) kept in [1, N] (SPEC §3, ours).
inline int64_t count_for(int64_t k, double c, int64_t n) {
  const double clipped = std::min(std::max(c, 0.5), 1.5);
  const double scaled = static_cast<double>(k) * clipped;
  const double rounded = std::floor(scaled + 0.5);
  return std::min(std::max(static_cast<int64_t>(rounded), int64_t{1}), n);
}

// tau for the token at 0-based attention rank r: min((r + 1) * c * tau_step, tau_max), or tau.
inline double tau_at(const AdaptiveArgs& o, double c, int64_t r) {
  if (o.has_tau) return o.tau;
  const double t = (static_cast<double>(r + 1) * c) * o.tau_step;
  return t > o.tau_max ? o.tau_max : t;
}

// Returns {indices [B, Kmax] int64 ascending, padded with -1; counts [B] int64; erank [B];
//          entropy [B]; walk_selected [B] int64; tau_lo [B] f64; tau_hi [B] f64}.
std::vector<at::Tensor> adaptive_cpu(const at::Tensor& x, const at::Tensor& a, const AdaptiveArgs& o);
at::Tensor erank_cpu(const at::Tensor& x, bool center);   // [B]
at::Tensor entropy_cpu(const at::Tensor& a);              // [B]
// Greedy max-min on cosine distance: DivPrune (fps=false) or farthest-point from the
// top-attention token (fps=true). Returns [B, k] ascending indices.
at::Tensor maxmin_cpu(const at::Tensor& x, const at::Tensor& a, int64_t k, bool fps);

#ifdef WITH_CUDA
std::vector<at::Tensor> adaptive_cuda(const at::Tensor& x, const at::Tensor& a, const AdaptiveArgs& o);
at::Tensor erank_cuda(const at::Tensor& x, bool center);
at::Tensor entropy_cuda(const at::Tensor& a);
at::Tensor maxmin_cuda(const at::Tensor& x, const at::Tensor& a, int64_t k, bool fps);
#endif

}  // namespace agile
