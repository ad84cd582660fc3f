// CUDA kernels. Gram products, norms and eigenvalues use ATen (cuBLAS / cuSOLVER); the sequential
// selection loops run one thread block per image, the inner loops over tokens spread across its
// threads. Built with --fmad=false so distances and thresholds round as in the reference.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "agile.h"

namespace agile {
namespace {

constexpr int kThreads = 256;  // a power of two: the block reductions halve it
constexpr int64_t kSharedBytes = 40 * 1024;  // per-image scratch in shared memory up to this size

__host__ __device__ inline int64_t round16(int64_t v) { return (v + 15) / 16 * 16; }
inline int64_t walk_scratch(int64_t n) { return round16(2 * n) + 4 * n; }  // alive, taken, order (int32)

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// d(i, j) = 1 - <x_i, x_j> / (|x_i| |x_j|) from row i of the Gram matrix and floored norms.
template <typename T>
__device__ __forceinline__ T cos_dist(const T* gi, const T* nf, T ni, int64_t j) {
  const T d = T(1) - gi[j] / (ni * nf[j]);  // clamped to [0, 2] like common.cosine_distances
  return d < T(0) ? T(0) : (d > T(2) ? T(2) : d);
}

// Largest value, ties to the lowest index, across the block; every thread gets the index.
template <typename T>
__device__ int64_t block_argmax(T v, int64_t idx, T* sv, int64_t* si) {
  const int tid = threadIdx.x;
  sv[tid] = v;
  si[tid] = idx;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) {
      const T ov = sv[tid + s];
      const int64_t oi = si[tid + s];
      if (ov > sv[tid] || (ov == sv[tid] && oi < si[tid])) {
        sv[tid] = ov;
        si[tid] = oi;
      }
    }
    __syncthreads();
  }
  const int64_t best = si[0];
  __syncthreads();  // sv / si are reused by the next call
  return best;
}

template <typename T>
__device__ T block_min(T v, T* sv) {
  const int tid = threadIdx.x;
  sv[tid] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s && sv[tid + s] < sv[tid]) sv[tid] = sv[tid + s];
    __syncthreads();
  }
  const T m = sv[0];
  __syncthreads();
  return m;
}

__device__ double block_sum(double v, double* sv) {
  const int tid = threadIdx.x;
  sv[tid] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) sv[tid] += sv[tid + s];
    __syncthreads();
  }
  const double total = sv[0];
  __syncthreads();
  return total;
}

// Entropy of each attention row (renormalised; all-zero row: log N). One block per row.
template <typename T>
__global__ void entropy_kernel(const T* __restrict__ a, int64_t n, T* __restrict__ out) {
  __shared__ double sv[kThreads];
  const T* row = a + blockIdx.x * n;
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += static_cast<double>(row[j]);
  const T total = static_cast<T>(block_sum(s, sv));
  if (!(total > T(0))) {  // uniform across the block
    if (threadIdx.x == 0) out[blockIdx.x] = static_cast<T>(log(static_cast<double>(n)));
    return;
  }
  double h = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const T p = row[j] / total;
    if (p > T(0)) h -= static_cast<double>(p) * log(static_cast<double>(p));
  }
  h = block_sum(h, sv);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<T>(h);
}

// The adaptive walk (SPEC §3), one block per image: visit tokens in attention order; select each
// survivor i and remove every alive j with d(i, j) < tau_i; then backfill by attention and write
// the selected indices in ascending order (-1 padded to kmax). Scratch (alive / taken flags and an
// int32 copy of the order) lives in shared memory when `in_shared` (walk_scratch(n) bytes), else
// alive / taken in the global buffers and the order is read from global memory.
template <typename T>
__global__ void walk_kernel(const T* __restrict__ gram, const T* __restrict__ norms,
                            const int64_t* __restrict__ order_all, const double* __restrict__ cval,
                            const int64_t* __restrict__ kval, int64_t n, bool has_tau, double tau,
                            double tau_step, double tau_max, bool in_shared,
                            uint8_t* __restrict__ alive_all, uint8_t* __restrict__ taken_all,
                            int64_t* __restrict__ out, int64_t kmax, int64_t* __restrict__ walked,
                            double* __restrict__ lo_out, double* __restrict__ hi_out) {
  extern __shared__ __align__(16) unsigned char agile_smem[];
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const T* g = gram + b * n * n;
  const T* nf = norms + b * n;
  const int64_t* order_g = order_all + b * n;
  uint8_t* alive = in_shared ? agile_smem : alive_all + b * n;
  uint8_t* taken = in_shared ? agile_smem + n : taken_all + b * n;
  int32_t* order_s = reinterpret_cast<int32_t*>(agile_smem + round16(2 * n));
  const double c = cval[b];
  const int64_t k = kval[b];
  for (int64_t j = tid; j < n; j += blockDim.x) {
    alive[j] = 1;
    taken[j] = 0;
    if (in_shared) order_s[j] = static_cast<int32_t>(order_g[j]);
  }
  __syncthreads();
  int64_t nsel = 0;
  double lo = INFINITY, hi = -INFINITY;
  for (int64_t r = 0; r < n && nsel < k; ++r) {
    const int64_t i = in_shared ? order_s[r] : order_g[r];
    if (!alive[i]) continue;  // uniform: alive only changes between two barriers below
    double t = tau;
    if (!has_tau) {
      t = (static_cast<double>(r + 1) * c) * tau_step;
      t = t > tau_max ? tau_max : t;
    }
    const T tc = static_cast<T>(t);  // the reference compares in the distances' dtype
    const T* gi = g + i * n;
    const T ni = nf[i];
    __syncthreads();  // every thread has read alive[i] before any thread clears it
    for (int64_t j = tid; j < n; j += blockDim.x) {
      if (alive[j] && (j == i || cos_dist(gi, nf, ni, j) < tc)) alive[j] = 0;
    }
    if (tid == 0) taken[i] = 1;
    lo = fmin(lo, t);
    hi = fmax(hi, t);
    ++nsel;
    __syncthreads();
  }
  if (tid == 0) {
    walked[b] = nsel;
    lo_out[b] = nsel ? lo : 0.0;
    hi_out[b] = nsel ? hi : 0.0;
    int64_t count = nsel;
    for (int64_t r = 0; r < n && count < k; ++r) {  // backfill, removed tokens allowed back
      const int64_t i = in_shared ? order_s[r] : order_g[r];
      if (!taken[i]) {
        taken[i] = 1;
        ++count;
      }
    }
    int64_t* o = out + b * kmax;
    int64_t w = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (taken[j]) o[w++] = j;
    }
    for (; w < kmax; ++w) o[w] = -1;
  }
}

// Nearest-neighbour cosine distance of every token (j != i). Grid (N, B).
template <typename T>
__global__ void nearest_kernel(const T* __restrict__ gram, const T* __restrict__ norms, int64_t n,
                               T* __restrict__ nn) {
  __shared__ T sv[kThreads];
  const int64_t i = blockIdx.x, b = blockIdx.y;
  const T* gi = gram + (b * n + i) * n;
  const T* nf = norms + b * n;
  const T ni = nf[i];
  T m = INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    if (j == i) continue;
    const T d = cos_dist(gi, nf, ni, j);
    m = d < m ? d : m;
  }
  m = block_min(m, sv);
  if (threadIdx.x == 0) nn[b * n + i] = m;
}

// Greedy max-min, one block per image: start at argmax(score0) (DivPrune: nearest-neighbour
// distance; fps: attention), then repeatedly take the token farthest from the selected set.
// Scratch (min distances, chosen flags) in shared memory when `in_shared` (n * (sizeof(T) + 1)
// bytes), else in the global buffers.
template <typename T>
__global__ void maxmin_kernel(const T* __restrict__ gram, const T* __restrict__ norms,
                              const T* __restrict__ score0, int64_t n, int64_t k, bool in_shared,
                              T* __restrict__ mind_all, uint8_t* __restrict__ chosen_all,
                              int64_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char agile_smem[];
  __shared__ T sv[kThreads];
  __shared__ int64_t si[kThreads];
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const T* g = gram + b * n * n;
  const T* nf = norms + b * n;
  const T* s0 = score0 + b * n;
  T* mind = in_shared ? reinterpret_cast<T*>(agile_smem) : mind_all + b * n;
  uint8_t* chosen = in_shared ? agile_smem + n * sizeof(T) : chosen_all + b * n;

  T bv = -INFINITY;
  int64_t bi = INT64_MAX;
  for (int64_t j = tid; j < n; j += blockDim.x) {
    if (bi == INT64_MAX || s0[j] > bv) {
      bv = s0[j];
      bi = j;
    }
  }
  const int64_t first = block_argmax(bv, bi, sv, si);
  for (int64_t j = tid; j < n; j += blockDim.x) {
    mind[j] = cos_dist(g + first * n, nf, nf[first], j);
    chosen[j] = j == first;
  }
  __syncthreads();
  for (int64_t t = 1; t < k; ++t) {
    bv = -INFINITY;
    bi = INT64_MAX;
    for (int64_t j = tid; j < n; j += blockDim.x) {
      if (!chosen[j] && (bi == INT64_MAX || mind[j] > bv)) {
        bv = mind[j];
        bi = j;
      }
    }
    const int64_t p = block_argmax(bv, bi, sv, si);
    if (tid == 0) chosen[p] = 1;
    const T* gp = g + p * n;
    const T np = nf[p];
    for (int64_t j = tid; j < n; j += blockDim.x) {
      const T d = cos_dist(gp, nf, np, j);
      mind[j] = d < mind[j] ? d : mind[j];
    }
    __syncthreads();
  }
  if (tid == 0) {
    int64_t* o = out + b * k;
    int64_t w = 0;
    for (int64_t j = 0; j < n && w < k; ++j) {
      if (chosen[j]) o[w++] = j;
    }
  }
}

at::Tensor erank_batched(const at::Tensor& xf, bool center) {
  const at::Tensor xc = center ? xf - xf.mean({1}, true) : xf;
  // as metrics.singular_values: svdvals in float64, else the smaller Gram's eigenvalues
  const at::Tensor s = xc.scalar_type() == at::kDouble ? at::linalg_svdvals(xc)
      : xc.size(1) <= xc.size(2) ? at::linalg_eigvalsh(at::bmm(xc, xc.transpose(1, 2))).clamp_min(0).sqrt()
                                 : at::linalg_eigvalsh(at::bmm(xc.transpose(1, 2), xc)).clamp_min(0).sqrt();
  const at::Tensor total = s.sum(-1, true);
  const at::Tensor q = s / total;
  const at::Tensor e = at::exp(at::special_xlogy(q, q).sum(-1).neg());
  return at::where(total.squeeze(-1) > 0, e, at::ones_like(e));  // zero matrix: erank 1
}

// x @ x.T per image and the floored norms, in the compute dtype.
std::pair<at::Tensor, at::Tensor> gram_and_norms(const at::Tensor& xf) {
  return {at::bmm(xf, xf.transpose(1, 2)).contiguous(),
          at::linalg_vector_norm(xf, 2, {2}).clamp_min(kNormFloor).contiguous()};
}

}  // namespace

at::Tensor erank_cuda(const at::Tensor& x, bool center) {
  const c10::cuda::CUDAGuard guard(x.device());
  return erank_batched(x.to(compute_type(x)).contiguous(), center);
}

at::Tensor entropy_cuda(const at::Tensor& a) {
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor af = a.to(compute_type(a)).contiguous();
  at::Tensor out = at::empty({a.size(0)}, af.options());
  if (a.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(af.scalar_type(), "agile_entropy_cuda", [&] {
    entropy_kernel<scalar_t><<<static_cast<unsigned>(a.size(0)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        af.data_ptr<scalar_t>(), a.size(1), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> adaptive_cuda(const at::Tensor& x, const at::Tensor& a, const AdaptiveArgs& o) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), n = x.size(1);
  const at::Tensor xf = x.to(compute_type(x)).contiguous();
  const at::Tensor er = o.need_erank ? erank_batched(xf, o.center) : at::zeros({B}, xf.options());
  const at::Tensor en = o.need_entropy ? entropy_cuda(a)
                                       : at::zeros({B}, a.options().dtype(compute_type(a)));
  // complexity and per-image K on the host: the same double arithmetic as the reference
  std::vector<double> c(B, 0.0);
  std::vector<int64_t> k(B, std::min(o.keep, n));
  if (!o.has_tau || o.adaptive_count) {
    const at::Tensor sig = (o.use_entropy ? en : er).to(at::kDouble).cpu().contiguous();
    const double avg = o.use_entropy ? o.entropy_avg : o.erank_avg;
    for (int64_t b = 0; b < B; ++b) {
      c[b] = sig.data_ptr<double>()[b] / avg;
      if (o.adaptive_count) k[b] = count_for(o.keep, c[b], n);
    }
  }
  int64_t kmax = 0;
  for (int64_t kb : k) kmax = std::max(kmax, kb);
  const auto dev = x.device();
  const at::Tensor c_dev = at::tensor(c, at::kDouble).to(dev), k_dev = at::tensor(k, at::kLong).to(dev);
  const auto gn = gram_and_norms(xf);
  const at::Tensor order = std::get<1>(at::sort(a, /*stable=*/true, /*dim=*/1, /*descending=*/true)).contiguous();
  const auto byte = xf.options().dtype(at::kByte), lng = xf.options().dtype(at::kLong);
  const bool in_shared = walk_scratch(n) <= kSharedBytes;
  const int64_t scratch = in_shared ? 0 : B * n;
  at::Tensor alive = at::empty({scratch}, byte), taken = at::empty({scratch}, byte);
  at::Tensor out = at::empty({B, kmax}, lng), walked = at::empty({B}, lng);
  at::Tensor lo = at::empty({B}, xf.options().dtype(at::kDouble)), hi = at::empty_like(lo);
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "agile_walk_cuda", [&] {
      const size_t smem = in_shared ? static_cast<size_t>(walk_scratch(n)) : 0;
      walk_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
          gn.first.data_ptr<scalar_t>(), gn.second.data_ptr<scalar_t>(), order.data_ptr<int64_t>(),
          c_dev.data_ptr<double>(), k_dev.data_ptr<int64_t>(), n, o.has_tau, o.tau, o.tau_step,
          o.tau_max, in_shared, alive.data_ptr<uint8_t>(), taken.data_ptr<uint8_t>(), out.data_ptr<int64_t>(),
          kmax, walked.data_ptr<int64_t>(), lo.data_ptr<double>(), hi.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out, at::tensor(k, at::kLong), er, en, walked, lo, hi};
}

at::Tensor maxmin_cuda(const at::Tensor& x, const at::Tensor& a, int64_t k, bool fps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), n = x.size(1);
  k = std::min(std::max<int64_t>(k, 1), n);
  const at::Tensor xf = x.to(compute_type(x)).contiguous();
  const auto gn = gram_and_norms(xf);
  at::Tensor out = at::empty({B, k}, xf.options().dtype(at::kLong));
  if (B == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(xf.scalar_type(), "agile_maxmin_cuda", [&] {
    const int64_t smem = n * static_cast<int64_t>(sizeof(scalar_t) + 1);
    const bool in_shared = smem <= kSharedBytes;
    const int64_t scratch = in_shared ? 0 : B * n;
    at::Tensor mind = at::empty({scratch}, xf.options());
    at::Tensor chosen = at::empty({scratch}, xf.options().dtype(at::kByte));
    at::Tensor score;
    if (fps) {
      score = a.to(xf.scalar_type()).contiguous();  // exact and order-preserving: same argmax
    } else {
      score = at::empty({B, n}, xf.options());
      nearest_kernel<scalar_t><<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(B)), kThreads, 0, stream>>>(
          gn.first.data_ptr<scalar_t>(), gn.second.data_ptr<scalar_t>(), n, score.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    maxmin_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, in_shared ? static_cast<size_t>(smem) : 0, stream>>>(
        gn.first.data_ptr<scalar_t>(), gn.second.data_ptr<scalar_t>(), score.data_ptr<scalar_t>(), n, k,
        in_shared, mind.data_ptr<scalar_t>(), chosen.data_ptr<uint8_t>(), out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace agile
