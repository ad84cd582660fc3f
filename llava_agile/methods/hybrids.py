"""Hybrids: an attention share of the budget plus a diversity or merging part (SPEC §4).

The attention share R follows the image's erank under `ratio_rule` (ours: the paper's
"erank-guided linear mapping" with a slope and range of our choosing).
"""
from __future__ import annotations

import torch

from ..metrics import compute_dtype, erank_from_singular_values, singular_values
from .common import NORM_FLOOR, attention_order, cosine_distances, greedy_max_min, round_half_up

VISPRUNER_STEP = 8  # at most this many tokens dropped per de-duplication round (VisPruner)


def effective_ratio(x: torch.Tensor, ratio: float, ratio_rule: str, ratio_slope: float,
                    ratio_min: float, ratio_max: float, erank_avg: float,
                    center: bool) -> tuple[float, dict]:
    """R = clip(R0 -/+ s * (erank/erank_avg - 1), Rmin, Rmax), or R0 for the fixed rule."""
    if ratio_rule == "fixed":
        return ratio, {"ratio": ratio}
    e = float(erank_from_singular_values(singular_values(x, center)))
    sign = -1.0 if ratio_rule == "adaptive" else 1.0
    r = min(max(ratio + sign * ratio_slope * (e / erank_avg - 1.0), ratio_min), ratio_max)
    return r, {"ratio": r, "erank": e}


def _split(x, a, k, ratio_args, count=round_half_up):
    """(top `count(K*R)` attention tokens, the rest in attention order, K - that, stats)."""
    r, stats = effective_ratio(x, **ratio_args)
    k_att = min(count(k * r), k)
    order = attention_order(a)
    return order[:k_att], order[k_att:], k - k_att, stats


def vispruner(x: torch.Tensor, a: torch.Tensor, k: int, similarity_features=None,
              **ratio_args) -> tuple[torch.Tensor, dict]:
    """VisPruner as the official `encode_images` (Theia-4869/VisPruner, llava_arch.py).

    The int(K*R) tokens of largest attention are kept; the rest (descending attention) are
    de-duplicated in rounds until K - int(K*R) remain: split alternately into A (even positions)
    and B (odd), score each A token by its largest cosine similarity to B, drop the
    r = min(8, excess) best-scored A tokens and continue on [the other A tokens by descending
    score, then B]. Ours (README, Our choices) where the official indexing breaks: a round drops
    all of A when A has fewer than r tokens, and exactly r when the list is odd; equal scores
    keep the earlier A token first (the official argsort is unstable).
    """
    important, rest, k_div, stats = _split(x, a, k, ratio_args, count=int)
    if k_div == 0:
        return important, stats
    f = (x if similarity_features is None else similarity_features)[rest]
    f = f.to(compute_dtype(f))
    f = f / f.norm(dim=1, keepdim=True).clamp_min(NORM_FLOOR)
    sim = f @ f.T  # over the rest only, indexed by position in `rest`
    cand = torch.arange(rest.numel(), device=rest.device)
    while (r := min(VISPRUNER_STEP, cand.numel() - k_div)) > 0:
        part_a, part_b = cand[0::2], cand[1::2]
        score = sim[part_a][:, part_b].max(dim=1).values
        ranked = torch.sort(score, descending=True, stable=True).indices
        cand = torch.cat([part_a[ranked[r:]], part_b])
    return torch.cat([important, rest[cand]]), stats


def mix(x: torch.Tensor, a: torch.Tensor, k: int, **ratio_args) -> tuple[torch.Tensor, dict]:
    """FasterVLM + DivPrune: R*K by attention, then greedy max-min counting those as selected."""
    important, _, _, stats = _split(x, a, k, ratio_args)
    chosen = greedy_max_min(cosine_distances(x), important.tolist(), k)
    return torch.tensor(chosen, device=x.device), stats


def dpc_knn(x: torch.Tensor, n_clusters: int, knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster rows of x with DPC-KNN; returns (each row's cluster id, the centres' rows).

    Density: exp(-mean squared distance to the k nearest neighbours); delta: distance to the
    nearest denser token (the densest takes its largest distance); centres: largest
    density x delta; every token joins its nearest centre. Euclidean distance / sqrt(D) (ours).
    Density ties: the lower index counts as denser (ours).
    """
    n, d = x.shape
    dist = torch.cdist(x, x) / d ** 0.5
    knn = max(1, min(knn, n - 1))
    near = dist.topk(knn + 1, dim=1, largest=False).values[:, 1:]
    density = torch.exp(-(near ** 2).mean(dim=1))
    idx = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    delta = dist.masked_fill(~denser, float("inf")).min(dim=1).values
    top = torch.isinf(delta)
    delta[top] = dist[top].max(dim=1).values
    centres = torch.sort(density * delta, descending=True, stable=True).indices[:n_clusters]
    assign = dist[:, centres].argmin(dim=1)
    assign[centres] = torch.arange(n_clusters, device=x.device)
    return assign, centres


def bat(x: torch.Tensor, a: torch.Tensor, k: int, similarity_features=None, bat_knn: int = 5,
        **ratio_args) -> tuple[torch.Tensor, dict]:
    """BAT: keep R*K attentive tokens; merge the rest into K - R*K clusters (DPC-KNN).

    Returns features `[K, D]`: kept tokens in raster order, then one attention-weighted mean
    per cluster, clusters ordered by their centre's index (ours). Stats name the attention-kept
    tokens (`attention_indices`).
    """
    important, rest, n_clusters, stats = _split(x, a, k, ratio_args)
    stats["attention_indices"] = sorted(important.tolist())
    kept = x[torch.sort(important).values]
    if n_clusters == 0:
        return kept, stats
    rest = torch.sort(rest).values
    sim_x = x if similarity_features is None else similarity_features
    assign, centres = dpc_knn(sim_x[rest].to(compute_dtype(sim_x)), n_clusters, bat_knn)
    xf = x[rest].to(compute_dtype(x))
    w = a[rest].to(xf.dtype)
    merged = []
    for c in torch.argsort(centres).tolist():
        members = assign == c
        wc = w[members]
        wc = wc / wc.sum() if wc.sum() > 0 else torch.full_like(wc, 1.0 / wc.numel())
        merged.append((wc[:, None] * xf[members]).sum(dim=0))
    return torch.cat([kept, torch.stack(merged).to(x.dtype)]), stats
