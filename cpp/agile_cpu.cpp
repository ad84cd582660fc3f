// CPU kernels (C++17, at::parallel_for over images). Where the reference (llava_agile/metrics.py,
// methods/*.py) is reproducible with the same ATen calls on the same tensor views (Gram products,
// eigenvalues, norms, entropy), we make exactly those calls, so results are bit-identical on CPU.
// The greedy loops, thresholds and walks are plain C++ over the Gram matrix.
#include "agile.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <utility>

namespace agile {
namespace {

at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x @ x.T of one image, as the reference computes it (same op on the same view).
at::Tensor gram(const at::Tensor& xb) { return at::matmul(xb, xb.t()).contiguous(); }

// metrics.erank_from_singular_values(metrics.singular_values(...)) of the (centred) tokens xc;
// g_nn is xc @ xc.T when the caller already has it (undefined otherwise).
double erank_of(const at::Tensor& xc, const at::Tensor& g_nn) {
  at::Tensor s;
  if (xc.scalar_type() == at::kDouble) {
    s = at::linalg_svdvals(xc);
  } else if (xc.size(0) <= xc.size(1)) {
    s = at::linalg_eigvalsh(g_nn.defined() ? g_nn : gram(xc)).clamp_min(0).sqrt();
  } else {
    s = at::linalg_eigvalsh(at::matmul(xc.t(), xc)).clamp_min(0).sqrt();
  }
  const at::Tensor total = s.sum();
  if (total.item<double>() <= 0) return 1.0;  // zero matrix: erank 1 (the reference's choice)
  const at::Tensor q = s / total;
  return at::exp(at::special_xlogy(q, q).sum().neg()).item<double>();
}

// metrics.entropy_of for one attention row (original dtype and strides).
double entropy_row(const at::Tensor& a_row) {
  const at::Tensor a = a_row.to(compute_type(a_row));
  const at::Tensor total = a.sum();
  if (total.item<double>() <= 0) {
    return at::log(at::scalar_tensor(static_cast<double>(a.numel()), a.options())).item<double>();
  }
  const at::Tensor p = a / total;
  return at::special_xlogy(p, p).sum().neg().item<double>();
}

// Per-token norms floored at 1e-8, as common.cosine_distances.
at::Tensor floored_norms(const at::Tensor& xb) {
  return at::linalg_vector_norm(xb, 2, {1}).clamp_min(kNormFloor).contiguous();
}

template <typename T>
inline T cos_dist(T dot, T ni, T nj) {  // clamped to [0, 2] like common.cosine_distances
  const T d = T(1) - dot / (ni * nj);
  return d < T(0) ? T(0) : (d > T(2) ? T(2) : d);
}

// min(p[0..n)) with eight independent accumulators (exact: min does not round; no NaN here).
template <typename T>
T min_of(const T* p, int64_t n) {
  T acc[8];
  std::fill_n(acc, 8, std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int u = 0; u < 8; ++u) acc[u] = p[j + u] < acc[u] ? p[j + u] : acc[u];
  }
  for (; j < n; ++j) acc[0] = p[j] < acc[0] ? p[j] : acc[0];
  for (int u = 1; u < 8; ++u) acc[0] = acc[u] < acc[0] ? acc[u] : acc[0];
  return acc[0];
}

// ---------------------------------------------------------------------------------------------
// Adaptive walk. A "rows" object returns the dot products x_i . x_j (all j) of a selected token i.

// Dot products from the centred Gram G_c (already computed for erank) by the rank-1 identity
// x_i.x_j = G_c[i,j] + r_i + r_j + m.m with r_i = (x_i - m).m, and the norms from its diagonal.
// Tokens whose centred norm exceeds twice their norm (near-zero tokens far from the mean) lose
// precision that way: their products and norms are computed directly instead. Uncentred, G is
// x @ x.T itself and the norms are the reference's.
template <typename T>
struct GramRows {
  const at::Tensor& xb;
  const T* g;
  int64_t n;
  std::vector<double> r;
  double mm = 0.0;
  std::vector<uint8_t> direct;   // token i's products are computed from x directly
  std::vector<int64_t> direct_ids;
  at::Tensor x_direct;           // rows of those tokens
  std::vector<T> nf;             // norms floored at 1e-8
  std::vector<T> buf;

  GramRows(const at::Tensor& xb_, const at::Tensor& g_, const at::Tensor& mean, const at::Tensor& xc)
      : xb(xb_), g(g_.data_ptr<T>()), n(xb_.size(0)), r(n, 0.0), direct(n, 0), nf(n), buf(n) {
    if (!mean.defined()) {
      const at::Tensor norms = floored_norms(xb);
      std::copy_n(norms.data_ptr<T>(), n, nf.begin());
      return;
    }
    const at::Tensor m = mean.reshape({-1}).contiguous();
    const T* mp = m.data_ptr<T>();
    for (int64_t d = 0; d < m.numel(); ++d) mm += static_cast<double>(mp[d]) * mp[d];
    const at::Tensor rv = at::mv(xc, m).contiguous();
    const T* rp = rv.data_ptr<T>();
    const T floor = static_cast<T>(kNormFloor);
    for (int64_t i = 0; i < n; ++i) {
      r[i] = rp[i];
      const double gii = g[i * n + i];
      const double n2 = gii + 2.0 * r[i] + mm;  // |x_i|^2
      if (gii > 4.0 * n2) {
        direct[i] = 1;
        direct_ids.push_back(i);
      }
      const T ni = static_cast<T>(std::sqrt(std::max(n2, 0.0)));
      nf[i] = ni < floor ? floor : ni;
    }
    if (!direct_ids.empty()) {
      x_direct = xb.index_select(0, at::tensor(direct_ids, at::kLong));
      const at::Tensor dn = floored_norms(x_direct);
      for (size_t q = 0; q < direct_ids.size(); ++q) nf[direct_ids[q]] = dn.data_ptr<T>()[q];
    }
  }

  const T* row(int64_t i, int64_t /*r*/, const std::vector<uint8_t>& /*alive*/, int64_t /*want*/) {
    if (direct[i]) {
      const at::Tensor d = at::mv(xb, xb.select(0, i)).contiguous();
      std::copy_n(d.data_ptr<T>(), n, buf.begin());
      return buf.data();
    }
    const T* gi = g + i * n;
    const double base = r[i] + mm;
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<T>(static_cast<double>(gi[j]) + base + r[j]);
    if (!direct_ids.empty()) {
      const at::Tensor d = at::mv(x_direct, xb.select(0, i)).contiguous();
      const T* dp = d.data_ptr<T>();
      for (size_t q = 0; q < direct_ids.size(); ++q) buf[direct_ids[q]] = dp[q];
    }
    return buf.data();
  }
};

// Dot products computed lazily (no erank needed): when a selected token has no row yet, one GEMM
// computes the rows of the next `want` alive tokens in attention order (>= 4, <= 64).
template <typename T>
struct LazyRows {
  const at::Tensor& xb;
  const int64_t* order;
  int64_t n;
  std::vector<std::pair<int, int64_t>> where;  // token -> (chunk, row), chunk -1: not computed
  std::vector<at::Tensor> chunks;

  LazyRows(const at::Tensor& xb_, const int64_t* order_)
      : xb(xb_), order(order_), n(xb_.size(0)), where(n, {-1, 0}) {}

  const T* row(int64_t i, int64_t r, const std::vector<uint8_t>& alive, int64_t want) {
    if (where[i].first < 0) {
      const int64_t size = std::min<int64_t>(std::max<int64_t>(want, 4), 64);
      std::vector<int64_t> ids;
      for (int64_t s = r; s < n && static_cast<int64_t>(ids.size()) < size; ++s) {
        const int64_t t = order[s];
        if (alive[t] && where[t].first < 0) ids.push_back(t);
      }
      const at::Tensor rows = at::matmul(xb.index_select(0, at::tensor(ids, at::kLong)), xb.t());
      const int c = static_cast<int>(chunks.size());
      chunks.push_back(rows.contiguous());
      for (size_t q = 0; q < ids.size(); ++q) where[ids[q]] = {c, static_cast<int64_t>(q)};
    }
    return chunks[where[i].first].data_ptr<T>() + where[i].second * n;
  }
};

struct ImageResult {
  std::vector<int64_t> idx;  // ascending
  double erank = 0.0, entropy = 0.0, tau_lo = 0.0, tau_hi = 0.0;
  int64_t walk = 0;
};

template <typename T, typename Rows>
void walk(Rows& rows, const T* nf, const int64_t* order, int64_t n, int64_t k, double c,
          const AdaptiveArgs& o, ImageResult& res) {
  std::vector<uint8_t> alive(n, 1);
  std::vector<int64_t> sel;
  sel.reserve(k);
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (int64_t r = 0; r < n && static_cast<int64_t>(sel.size()) < k; ++r) {
    const int64_t i = order[r];
    if (!alive[i]) continue;
    const double tau = tau_at(o, c, r);
    const T tc = static_cast<T>(tau);  // the reference compares in the distances' dtype
    const T* dot = rows.row(i, r, alive, k - static_cast<int64_t>(sel.size()));
    sel.push_back(i);
    lo = std::min(lo, tau);
    hi = std::max(hi, tau);
    alive[i] = 0;
    const T ni = nf[i];
    for (int64_t j = 0; j < n; ++j) {
      if (alive[j] && cos_dist(dot[j], ni, nf[j]) < tc) alive[j] = 0;
    }
  }
  res.walk = static_cast<int64_t>(sel.size());
  res.tau_lo = sel.empty() ? 0.0 : lo;
  res.tau_hi = sel.empty() ? 0.0 : hi;
  // backfill: highest-attention tokens not yet selected (removed ones allowed back)
  std::vector<uint8_t> taken(n, 0);
  for (int64_t i : sel) taken[i] = 1;
  for (int64_t r = 0; r < n && static_cast<int64_t>(sel.size()) < k; ++r) {
    if (!taken[order[r]]) {
      taken[order[r]] = 1;
      sel.push_back(order[r]);
    }
  }
  std::sort(sel.begin(), sel.end());
  res.idx = std::move(sel);
}

template <typename T>
void adaptive_image(const at::Tensor& x_in, const at::Tensor& a_in, const int64_t* order,
                    const AdaptiveArgs& o, ImageResult& res) {
  const int64_t n = x_in.size(0);
  const at::Tensor xb = x_in.to(compute_type(x_in));  // a view for float32/float64 input
  if (o.need_entropy) res.entropy = entropy_row(a_in);
  at::Tensor g, mean, xc;
  if (o.need_erank) {
    xc = xb;
    if (o.center) {
      mean = xb.mean({0}, true);
      xc = xb - mean;
    }
    g = gram(xc);
    res.erank = erank_of(xc, g);
  }
  const bool need_c = !o.has_tau || o.adaptive_count;
  const double c = !need_c ? 0.0 : (o.use_entropy ? res.entropy / o.entropy_avg : res.erank / o.erank_avg);
  const int64_t k = o.adaptive_count ? count_for(o.keep, c, n) : std::min(o.keep, n);
  if (o.need_erank) {
    GramRows<T> rows(xb, g, mean, xc);
    walk<T>(rows, rows.nf.data(), order, n, k, c, o, res);
  } else {
    const at::Tensor nf = floored_norms(xb);
    LazyRows<T> rows(xb, order);
    walk<T>(rows, nf.data_ptr<T>(), order, n, k, c, o, res);
  }
}

// ---------------------------------------------------------------------------------------------
// Greedy max-min (common.greedy_max_min) on the full cosine-distance matrix, computed row by row
// from x @ x.T exactly as the reference computes it.
template <typename T>
std::vector<int64_t> maxmin_image(const at::Tensor& x_in, int64_t first, int64_t k) {
  const at::Tensor xb = x_in.to(compute_type(x_in));
  const int64_t n = xb.size(0);
  const at::Tensor g_t = gram(xb), nf_t = floored_norms(xb);
  const T* g = g_t.data_ptr<T>();
  const T* nf = nf_t.data_ptr<T>();
  std::vector<T> row(n);
  auto fill = [&](int64_t i) {
    const T* gi = g + i * n;
    for (int64_t j = 0; j < n; ++j) row[j] = cos_dist(gi[j], nf[i], nf[j]);
  };
  if (first < 0) {  // DivPrune: the token whose nearest neighbour is farthest
    T best = -std::numeric_limits<T>::infinity();
    first = 0;
    for (int64_t i = 0; i < n; ++i) {
      fill(i);
      row[i] = std::numeric_limits<T>::infinity();  // j != i
      const T nn = min_of(row.data(), n);
      if (nn > best) {
        best = nn;
        first = i;
      }
    }
  }
  std::vector<int64_t> sel{first};
  std::vector<uint8_t> chosen(n, 0);
  chosen[first] = 1;
  fill(first);
  std::vector<T> min_d(row);
  while (static_cast<int64_t>(sel.size()) < k) {
    int64_t pick = -1;
    T best = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      if (!chosen[j] && (pick < 0 || min_d[j] > best)) {
        best = min_d[j];
        pick = j;
      }
    }
    sel.push_back(pick);
    chosen[pick] = 1;
    fill(pick);
    for (int64_t j = 0; j < n; ++j) min_d[j] = row[j] < min_d[j] ? row[j] : min_d[j];
  }
  std::sort(sel.begin(), sel.end());
  return sel;
}

at::Tensor to_tensor(const std::vector<double>& v, at::ScalarType dtype) {
  return at::tensor(v, at::kDouble).to(dtype);
}

}  // namespace

at::Tensor erank_cpu(const at::Tensor& x, bool center) {
  const int64_t B = x.size(0);
  std::vector<double> out(B);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const at::Tensor xb = x.select(0, b).to(compute_type(x));
      out[b] = erank_of(center ? xb - xb.mean({0}, true) : xb, at::Tensor());
    }
  });
  return to_tensor(out, compute_type(x));
}

at::Tensor entropy_cpu(const at::Tensor& a) {
  const int64_t B = a.size(0);
  std::vector<double> out(B);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) out[b] = entropy_row(a.select(0, b));
  });
  return to_tensor(out, compute_type(a));
}

std::vector<at::Tensor> adaptive_cpu(const at::Tensor& x, const at::Tensor& a, const AdaptiveArgs& o) {
  const int64_t B = x.size(0), n = x.size(1);
  const at::Tensor order = std::get<1>(at::sort(a, /*stable=*/true, /*dim=*/1, /*descending=*/true)).contiguous();
  const int64_t* ord = order.data_ptr<int64_t>();
  std::vector<ImageResult> res(B);
  AT_DISPATCH_FLOATING_TYPES(compute_type(x), "agile_adaptive_cpu", [&] {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        adaptive_image<scalar_t>(x.select(0, b), a.select(0, b), ord + b * n, o, res[b]);
      }
    });
  });
  int64_t kmax = 0;
  for (const auto& r : res) kmax = std::max<int64_t>(kmax, r.idx.size());
  at::Tensor idx = at::full({B, kmax}, -1, at::kLong);
  at::Tensor counts = at::empty({B}, at::kLong), walked = at::empty({B}, at::kLong);
  std::vector<double> er(B), en(B), lo(B), hi(B);
  for (int64_t b = 0; b < B; ++b) {
    std::copy(res[b].idx.begin(), res[b].idx.end(), idx.data_ptr<int64_t>() + b * kmax);
    counts.data_ptr<int64_t>()[b] = static_cast<int64_t>(res[b].idx.size());
    walked.data_ptr<int64_t>()[b] = res[b].walk;
    er[b] = res[b].erank;
    en[b] = res[b].entropy;
    lo[b] = res[b].tau_lo;
    hi[b] = res[b].tau_hi;
  }
  return {idx, counts, to_tensor(er, compute_type(x)), to_tensor(en, compute_type(a)), walked,
          to_tensor(lo, at::kDouble), to_tensor(hi, at::kDouble)};
}

at::Tensor maxmin_cpu(const at::Tensor& x, const at::Tensor& a, int64_t k, bool fps) {
  const int64_t B = x.size(0), n = x.size(1);
  k = std::min(std::max<int64_t>(k, 1), n);
  at::Tensor first;
  if (fps) first = std::get<1>(at::sort(a, /*stable=*/true, /*dim=*/1, /*descending=*/true)).select(1, 0).contiguous();
  at::Tensor out = at::empty({B, k}, at::kLong);
  AT_DISPATCH_FLOATING_TYPES(compute_type(x), "agile_maxmin_cpu", [&] {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = fps ? first.data_ptr<int64_t>()[b] : -1;
        const auto sel = maxmin_image<scalar_t>(x.select(0, b), start, k);
        std::copy(sel.begin(), sel.end(), out.data_ptr<int64_t>() + b * k);
      }
    });
  });
  return out;
}

}  // namespace agile
