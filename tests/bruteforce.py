"""Independent float64 brute-force versions of every method and metric, written from SPEC §2-4.

Naive loops over tokens on numpy float64 arrays; nothing here imports llava_agile. Every method
returns `(result, info)`: `result` is the sorted list of kept indices (or, for the merging
`bat` and `visionzip`, a `[K, D]` array), `info["margin"]` the smallest gap of any decision
the method took (distance vs. its threshold, best vs. runner-up score, ...). A case whose
margin is below a tolerance is *ambiguous*: round-off in another implementation may
legitimately decide it the other way.

Conventions from SPEC and the project's documented choices (marked "(ours)" there):
attention ties -> lower index first; round() rounds halves up; erank of a zero matrix is 1;
max-min ties -> lower index; vispruner as described in `vispruner` below (VisPruner's
official code); bat as described in `bat` below.
`random` has no brute force (a seeded generator: only its determinism is specified).
"""
from __future__ import annotations

import math

import numpy as np

NORM_FLOOR = 1e-8
INF = float("inf")
VISPRUNER_STEP = 8
# erank is specified to this relative accuracy (the Gram route vs. the SVD); decisions that
# depend on it (thresholds, R*K, K_i) have their margin reduced by what such an error can move
ERANK_RTOL = 1e-5


# ---------------------------------------------------------------- signals (SPEC §2)

def round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def half_gap(v: float) -> float:
    """Distance of v from the nearest rounding boundary (x.5)."""
    return abs((v - math.floor(v)) - 0.5)


def erank(x, center: bool = True) -> float:
    """Roy & Vetterli effective rank from the singular values (numpy SVD, float64)."""
    x = np.array(x, dtype=np.float64)
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)
    total = float(s.sum())
    if total <= 0:
        return 1.0
    h = 0.0
    for si in s:
        q = float(si) / total
        if q > 0:
            h -= q * math.log(q)
    return math.exp(h)


def entropy(a) -> float:
    """-sum p log p of p = a / sum(a), nats; an all-zero row counts as uniform (ours)."""
    a = [float(v) for v in a]
    total = sum(a)
    if total <= 0:
        return math.log(len(a))
    h = 0.0
    for v in a:
        p = v / total
        if p > 0:
            h -= p * math.log(p)
    return h


def attention_order(a) -> list[int]:
    """Indices by descending attention; ties: the lower index first."""
    return sorted(range(len(a)), key=lambda i: (-float(a[i]), i))


def cosine_distance_matrix(x) -> np.ndarray:
    """d(i, j) = 1 - <x_i, x_j> / (|x_i| |x_j|), norms floored at 1e-8; pair by pair.

    Round-off can push 1 - cos just outside [0, 2] (duplicates give -1e-16); it is clipped
    there, since the distance of a token to its duplicate is 0 and never below a threshold 0.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    norms = [max(math.sqrt(float(np.dot(x[i], x[i]))), NORM_FLOOR) for i in range(n)]
    d = np.empty((n, n))
    for i in range(n):
        for j in range(i, n):
            cos = float(np.dot(x[i], x[j])) / (norms[i] * norms[j])
            d[i, j] = d[j, i] = min(max(1.0 - cos, 0.0), 2.0)  # exact range of 1 - cos
    return d


def euclidean_matrix(x) -> np.ndarray:
    """|x_i - x_j| / sqrt(D) (bat's distance, ours), pair by pair; exact 0 on the diagonal."""
    x = np.asarray(x, dtype=np.float64)
    n, dim = x.shape
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            diff = x[i] - x[j]
            d[i, j] = d[j, i] = math.sqrt(float(np.dot(diff, diff))) / math.sqrt(dim)
    return d


def _pick_max(scores: dict) -> tuple[int, float]:
    """The key with the largest score (ties: lowest key) and its gap to the runner-up."""
    best = min(scores, key=lambda j: (-scores[j], j))
    others = [abs(scores[best] - s) for j, s in scores.items() if j != best]
    return best, (min(others) if others else INF)


# ---------------------------------------------------------------- adaptive (SPEC §3)

def adaptive(x, a, k, erank_avg=90.0, tau_step=0.01, tau_max=0.25, tau=None,
             complexity="erank", entropy_avg=4.7, center=True, adaptive_count=False):
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    margin = INF
    e = erank(x, center)
    h = entropy(a)
    c = h / entropy_avg if complexity == "entropy" else e / erank_avg
    c_tol = ERANK_RTOL if complexity == "erank" else 0.0
    if adaptive_count:
        v = k * min(max(c, 0.5), 1.5)
        if 0.5 - c_tol * c < c < 1.5 + c_tol * c:  # clipped: v = K/2 or 3K/2 exactly
            margin = min(margin, half_gap(v) - c_tol * v)
        k = min(max(round_half_up(v), 1), n)
    k = min(k, n)
    order = attention_order(a)
    d = cosine_distance_matrix(x)
    removed = [False] * n
    visited = [False] * n
    selected, used = [], []
    for rank, i in enumerate(order, start=1):
        if len(selected) == k:
            break
        visited[i] = True
        if removed[i]:
            continue
        t = float(tau) if tau is not None else min(rank * c * tau_step, tau_max)
        t_tol = 0.0 if tau is not None else c_tol * t
        selected.append(i)
        used.append(t)
        if len(selected) == k:  # the walk stops here; this token removes nothing
            break
        for j in range(n):
            if visited[j] or removed[j]:
                continue
            margin = min(margin, abs(d[i, j] - t) - t_tol)
            if d[i, j] < t:
                removed[j] = True
    walk = len(selected)
    for i in order:  # backfill: highest attention first, removed tokens allowed back
        if len(selected) == k:
            break
        if i not in selected:
            selected.append(i)
    info = dict(margin=margin, walk_selected=walk, backfilled=k - walk, k=k, erank=e,
                entropy=h, complexity=c,
                tau_range=(min(used), max(used)) if used else (0.0, 0.0))
    return sorted(selected), info


# ---------------------------------------------------------------- baselines (SPEC §4)

def attention(x, a, k):
    # compares the given values only (no arithmetic): exact ties follow the tie rule
    k = min(k, len(a))
    return sorted(attention_order(a)[:k]), dict(margin=INF)


def none(x, a, k):
    return list(range(len(a))), dict(margin=INF)


def greedy_max_min(d: np.ndarray, selected: list[int], k: int):
    """Max-min selection; empty start -> the token whose nearest neighbour is farthest.

    Returns (selected, margin, alternatives). A mutual nearest pair farthest from the rest ties
    exactly here (d is symmetric), but not in an implementation: its d(i, j) and d(j, i) come
    from two dot products (x @ x.T is not exactly symmetric on every CPU), so round-off, not the
    lower-index rule, picks the pair's first token there. `alternatives` then holds the sorted
    result of every such start (the rule's own first), else it is empty; the margin covers the
    decisions after each of them.
    """
    n = d.shape[0]
    selected = list(selected)
    margin = INF
    starts = [selected]
    if not selected:
        if n == 1:
            return [0], margin, []
        nn = {i: min(d[i, j] for j in range(n) if j != i) for i in range(n)}
        first = min(nn, key=lambda i: (-nn[i], i))
        tied = [j for j in nn if j != first and nn[j] == nn[first] == d[j, first]]
        gaps = [abs(nn[first] - nn[j]) for j in nn if j != first and j not in tied]
        margin = min(margin, min(gaps, default=INF))
        starts = [[first]] + [[j] for j in tied]
    results = []
    for start in starts:
        sel, m = _max_min_from(d, start, k)
        margin = min(margin, m)
        results.append(sel)
    alternatives = [sorted(sel) for sel in results] if len(results) > 1 else []
    return results[0], margin, alternatives


def _max_min_from(d: np.ndarray, selected: list[int], k: int):
    """Extend a non-empty `selected` to k tokens by max-min; returns (selected, margin)."""
    n = d.shape[0]
    selected = list(selected)
    margin = INF
    min_dist = {j: min(d[s, j] for s in selected) for j in range(n) if j not in selected}
    while len(selected) < k:
        best, gap = _pick_max(min_dist)
        margin = min(margin, gap)
        selected.append(best)
        del min_dist[best]
        for j in min_dist:
            min_dist[j] = min(min_dist[j], d[best, j])
    return selected, margin


def diversity(x, a, k):
    k = min(k, len(a))
    sel, margin, alternatives = greedy_max_min(cosine_distance_matrix(x), [], k)
    return sorted(sel), dict(margin=margin, alternatives=alternatives)


def fps(x, a, k):
    k = min(k, len(a))
    order = attention_order(a)
    sel, margin, _ = greedy_max_min(cosine_distance_matrix(x), [order[0]], k)
    return sorted(sel), dict(margin=margin)


def effective_ratio(x, ratio=0.5, ratio_rule="fixed", ratio_slope=0.5, ratio_min=0.0,
                    ratio_max=1.0, erank_avg=90.0, center=True) -> float:
    if ratio_rule == "fixed":
        return ratio
    e = erank(x, center)
    sign = -1.0 if ratio_rule == "adaptive" else 1.0
    return min(max(ratio + sign * ratio_slope * (e / erank_avg - 1.0), ratio_min), ratio_max)


def _split(x, a, k, ratio_args):
    r = effective_ratio(x, **ratio_args)
    margin = INF
    if ratio_args.get("ratio_rule", "fixed") != "fixed":
        e_rel = erank(x, ratio_args.get("center", True)) / ratio_args.get("erank_avg", 90.0)
        margin = half_gap(r * k) - ERANK_RTOL * ratio_args.get("ratio_slope", 0.5) * e_rel * k
    k_att = min(round_half_up(r * k), k)
    order = attention_order(a)
    return r, k_att, order, margin


def floor_count(x, k, ratio_args):
    """VisPruner's int(K * R) (a floor) and the margin of that count against erank round-off.

    R moves by at most ERANK_RTOL * slope * erank / erank_avg; a clipped R is the bound
    exactly, whatever the erank's last digits.
    """
    r = effective_ratio(x, **ratio_args)
    count = min(int(k * r), k)
    rule = ratio_args.get("ratio_rule", "fixed")
    if rule == "fixed":
        return r, count, INF
    slope = ratio_args.get("ratio_slope", 0.5)
    e_rel = erank(x, ratio_args.get("center", True)) / ratio_args.get("erank_avg", 90.0)
    slack = ERANK_RTOL * slope * e_rel
    sign = -1.0 if rule == "adaptive" else 1.0
    free = ratio_args.get("ratio", 0.5) + sign * slope * (e_rel - 1.0)
    if free < ratio_args.get("ratio_min", 0.0) - slack or \
            free > ratio_args.get("ratio_max", 1.0) + slack:
        return r, count, INF
    v = k * r
    return r, count, min(v - math.floor(v), math.ceil(v) - v) - slack * k


def vispruner(x, a, k, similarity_features=None, **ratio_args):
    """VisPruner, read from Theia-4869/VisPruner llava/model/llava_arch.py `encode_images`.

    K_imp = int(K * R) tokens of largest attention (ties: lower index) are kept; K_div = K - K_imp.
    The others, by descending attention, form a list L. While r = min(8, len(L) - K_div) > 0:
    A = L[0], L[2], ...; B = L[1], L[3], ...; score(A_i) = max_j cos(A_i, B_j) of the
    similarity features (default x; norms floored at 1e-8); A ranked by descending score (ties:
    earlier in A first); the first r of the ranking are dropped and L = (the rest of A in
    ranking order) + (B in its order). When A has fewer than r tokens all of A is dropped;
    an odd list drops exactly r (ours: the official indexing fails or miscounts there).
    K_div = 0: the K_imp tokens only. info["short_rounds"] counts the rounds where A had fewer
    than r tokens. Margin: the score gap at the drop boundary and, when another round follows,
    between every two neighbours of the kept part of the ranking (their order makes the next
    A/B split).
    """
    n = len(a)
    k = min(k, n)
    r_eff, k_imp, margin = floor_count(x, k, ratio_args)
    order = attention_order(a)
    important, cand, k_div = order[:k_imp], order[k_imp:], k - k_imp
    sx = np.asarray(x if similarity_features is None else similarity_features, dtype=np.float64)
    norms = [max(math.sqrt(float(np.dot(v, v))), NORM_FLOOR) for v in sx]
    cos = [[0.0] * n for _ in range(n)]
    for i in cand:
        for j in cand:
            if i <= j:
                cos[i][j] = cos[j][i] = float(np.dot(sx[i], sx[j])) / (norms[i] * norms[j])
    short_rounds = 0
    while k_div > 0 and min(VISPRUNER_STEP, len(cand) - k_div) > 0:
        r = min(VISPRUNER_STEP, len(cand) - k_div)
        part_a, part_b = cand[0::2], cand[1::2]
        short_rounds += len(part_a) < r
        score = [max(cos[i][j] for j in part_b) for i in part_a]
        ranked = sorted(range(len(part_a)), key=lambda p: (-score[p], p))
        survivors = ranked[r:]
        more = len(survivors) + len(part_b) > k_div  # another round reads the order
        for pos in range(r, len(ranked) if more else min(r + 1, len(ranked))):
            margin = min(margin, abs(score[ranked[pos - 1]] - score[ranked[pos]]))
        cand = [part_a[p] for p in survivors] + part_b
    kept = important + (cand if k_div > 0 else [])
    return sorted(kept), dict(margin=margin, ratio=r_eff, short_rounds=short_rounds)


def mix(x, a, k, **ratio_args):
    k = min(k, len(a))
    r, k_att, order, margin = _split(x, a, k, ratio_args)
    sel, m2, alternatives = greedy_max_min(cosine_distance_matrix(x), order[:k_att], k)
    return sorted(sel), dict(margin=min(margin, m2), ratio=r, alternatives=alternatives)


def bat(x, a, k, similarity_features=None, bat_knn=5, **ratio_args):
    """BAT (ours where SPEC is silent): keep round(R*K) attentive tokens, DPC-KNN the rest.

    On the rest (ascending index): distance |x_i - x_j| / sqrt(D) of the similarity features;
    density exp(-mean squared distance to the k = clamp(bat_knn, 1, n-1) nearest others);
    a token's delta = distance to its nearest denser token (equal density: the lower index is
    denser); the densest takes its largest distance; centres = the n_clusters largest
    density * delta (ties: lower index); each token joins its nearest centre (ties: the centre
    ranked first), a centre its own cluster. Output: kept tokens in ascending index order, then
    per cluster (by centre index) the attention-weighted mean (uniform if the weights sum to 0).
    keep >= N keeps every token in raster order (no merging). Margins here are relative (a
    decision gap divided by the compared values' size).
    """
    x = np.asarray(x, dtype=np.float64)
    a = [float(v) for v in a]
    n = len(a)
    if k >= n:  # keep >= N keeps every token, in raster order
        return x.copy(), dict(margin=INF, ratio=None)
    r, k_att, order, margin = _split(x, a, k, ratio_args)
    important, n_clusters = sorted(order[:k_att]), k - k_att
    kept = [x[i] for i in important]
    if n_clusters == 0:
        return np.array(kept).reshape(k, x.shape[1]), dict(margin=margin, ratio=r)
    rest = sorted(order[k_att:])
    sx = x if similarity_features is None else np.asarray(similarity_features, np.float64)
    m = len(rest)
    dist = euclidean_matrix(sx[rest])
    knn = max(1, min(bat_knn, m - 1))
    density = []
    for p in range(m):
        near = sorted(dist[p, q] for q in range(m) if q != p)[:knn]
        density.append(math.exp(-sum(v * v for v in near) / knn))
    delta = []
    for p in range(m):
        denser = [q for q in range(m)
                  if density[q] > density[p] or (density[q] == density[p] and q < p)]
        delta.append(min(dist[p, q] for q in denser) if denser
                     else max(dist[p, q] for q in range(m)))
    for p in range(m):  # a near tie in density matters where it can change a delta
        for q in range(p + 1, m):
            if dist[p, q] <= max(delta[p], delta[q]):
                margin = min(margin, abs(density[p] - density[q]) / max(density[p], density[q]))
    gamma = [density[p] * delta[p] for p in range(m)]
    ranked = sorted(range(m), key=lambda p: (-gamma[p], p))
    centres = ranked[:n_clusters]
    if n_clusters < m:
        lo, hi = gamma[ranked[n_clusters - 1]], gamma[ranked[n_clusters]]
        margin = min(margin, abs(lo - hi) / max(abs(lo), abs(hi), 1e-300))
    members = {c: [] for c in centres}
    for p in range(m):
        if p in members:
            members[p].append(p)
            continue
        ds = [dist[p, c] for c in centres]
        best = min(range(n_clusters), key=lambda t: (ds[t], t))
        for t in range(n_clusters):
            if t != best:
                margin = min(margin, abs(ds[t] - ds[best]) / max(ds[t], 1e-300))
        members[centres[best]].append(p)
    merged = []
    for c in sorted(centres):
        toks = [rest[p] for p in members[c]]
        w = [a[i] for i in toks]
        total = sum(w)
        w = [v / total for v in w] if total > 0 else [1.0 / len(toks)] * len(toks)
        merged.append(sum(wi * x[i] for wi, i in zip(w, toks)))
    return np.array(kept + merged), dict(margin=margin, ratio=r)


def visionzip(x, a, k, keys=None, contextual=None, cls_token=None):
    """VisionZip as dvlab-research/VisionZip's CLIPVisionTower_VisionZip.forward, on patches.

    C = contextual, or round(K * 10 / 64) (54 + 10 at K = 64); the K - C patches of largest
    attention (ties: lower index) are dominant, or, given `cls_token` (and K > C), that token
    first and K - C - 1 patches; the other M patches, ascending, give the
    targets at positions 0, s, 2s, ... (s = max(1, M // C), the first C); every other one joins
    the target of largest cosine similarity of the keys (default x; norms floored at 1e-8; ties:
    the first target); contextual token = target + mean of what joined it (target alone if
    nothing did). Output: dominant ascending, then contextual by target. keep >= N: every
    token in raster order. Margin: the smallest gap between a token's best and runner-up
    target similarity.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(a)
    if k >= n:
        return x.copy(), dict(margin=INF)
    c = round_half_up(k * 10 / 64) if contextual is None else contextual
    head = [np.asarray(cls_token, dtype=np.float64)] if cls_token is not None and k > c else []
    dominant = sorted(attention_order(a)[:k - c - len(head)])
    rest = [i for i in range(n) if i not in dominant]
    info = dict(margin=INF, attention_indices=dominant, target_indices=[], contextual=c)
    if c == 0:
        return np.array(head + [x[i] for i in dominant]).reshape(k, x.shape[1]), info
    step = max(1, len(rest) // c)
    positions = list(range(0, len(rest), step))[:c]
    targets = [rest[p] for p in positions]
    others = [rest[p] for p in range(len(rest)) if p not in positions]
    kx = x if keys is None else np.asarray(keys, dtype=np.float64)
    unit = [kx[i] / max(math.sqrt(float(np.dot(kx[i], kx[i]))), NORM_FLOOR) for i in range(n)]
    members = {t: [] for t in targets}
    for i in others:
        best, gap = _pick_max({j: float(np.dot(unit[i], unit[t])) for j, t in enumerate(targets)})
        info["margin"] = min(info["margin"], gap)
        members[targets[best]].append(i)
    ctx = []
    for t in targets:
        joined = members[t]
        ctx.append(x[t] + (sum(x[i] for i in joined) / len(joined) if joined else 0.0))
    info["target_indices"] = targets
    return np.array(head + [x[i] for i in dominant] + ctx), info


METHODS = dict(adaptive=adaptive, attention=attention, diversity=diversity, fps=fps,
               vispruner=vispruner, bat=bat, mix=mix, none=none,
               visionzip=visionzip)


# ---------------------------------------------------------------- test data

def make_case(rng: np.random.Generator, n: int, d: int, kind: str | None = None):
    """Random float64 features `[n, d]` shaped so that thresholds bite, and an attention row.

    kinds: "clusters" (near-duplicate clusters of varied tightness), "direction" (a common
    direction with a varied spread), "lowrank" (low-rank plus noise), "gauss" (isotropic).
    Attention: a softmax of varied temperature; sometimes quantised (ties) or with zeros.
    """
    kind = kind or rng.choice(["clusters", "direction", "lowrank", "gauss"])
    if kind == "clusters":
        n_c = int(rng.integers(1, max(2, min(n, 12)) + 1))
        centres = rng.standard_normal((n_c, d))
        sigma = 10 ** rng.uniform(-2.5, -0.2, size=n_c)
        lab = rng.integers(0, n_c, size=n)
        x = centres[lab] + (sigma[lab, None] / math.sqrt(d)) * np.linalg.norm(
            centres[lab], axis=1, keepdims=True) * rng.standard_normal((n, d))
    elif kind == "direction":
        u = rng.standard_normal(d)
        spread = 10 ** rng.uniform(-2, 0.5, size=n)
        x = u[None, :] * rng.uniform(0.5, 2.0, size=(n, 1)) + spread[:, None] * \
            np.linalg.norm(u) / math.sqrt(d) * rng.standard_normal((n, d))
    elif kind == "lowrank":
        r = int(rng.integers(1, min(8, d) + 1))
        x = rng.standard_normal((n, r)) @ rng.standard_normal((r, d)) + \
            10 ** rng.uniform(-3, -0.5) * rng.standard_normal((n, d))
    else:
        x = rng.standard_normal((n, d))
    logits = rng.standard_normal(n) * rng.uniform(0.1, 4.0)
    a = np.exp(logits - logits.max())
    a /= a.sum()
    style = rng.uniform()
    if style < 0.15:
        a = np.round(a * 10 * n) / (10 * n)   # quantised: many exact ties (and zeros)
    elif style < 0.25:
        a[rng.uniform(size=n) < 0.2] = 0.0
    return x.astype(np.float64), a.astype(np.float64), str(kind)
