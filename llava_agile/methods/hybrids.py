"""Hybrids: an attention share of the budget plus a diversity or merging part (SPEC §4).

The attention share R follows the image's erank under `ratio_rule` (ours: the paper's
"erank-guided linear mapping" with a slope and range of our choosing).
"""
from __future__ import annotations

import torch

from ..metrics import compute_dtype, erank_from_singular_values, singular_values
from .common import attention_order, cosine_distances, greedy_max_min, round_half_up

VISPRUNER_STEP = 8  # tokens dropped per de-duplication round (VisPruner's r)


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


def _split(x, a, k, ratio_args):
    r, stats = effective_ratio(x, **ratio_args)
    k_att = min(round_half_up(r * k), k)
    order = attention_order(a)
    return order[:k_att], order[k_att:], k - k_att, stats


def vispruner(x: torch.Tensor, a: torch.Tensor, k: int, similarity_features=None,
              **ratio_args) -> tuple[torch.Tensor, dict]:
    """VisPruner: top-R*K attention tokens, then ToMe-style de-duplication of the rest.

    The rest, in descending attention order, is split alternately into A and B; the A tokens
    most similar (cosine) to any B token are dropped, at most 8 per round, until K - R*K remain.
    Survivors keep their attention order (ours); ties drop the earlier A token first (ours).
    """
    important, rest, k_div, stats = _split(x, a, k, ratio_args)
    sim_x = x if similarity_features is None else similarity_features
    sim = 1 - cosine_distances(sim_x)
    cand = rest
    while cand.numel() > k_div and k_div > 0:
        a_part, b_part = cand[0::2], cand[1::2]
        excess = cand.numel() - k_div
        drop = min(VISPRUNER_STEP, excess, a_part.numel())
        score = sim[a_part][:, b_part].max(dim=1).values
        dropped = a_part[torch.sort(score, descending=True, stable=True).indices[:drop]]
        cand = cand[~torch.isin(cand, dropped)]
    kept = important if k_div == 0 else torch.cat([important, cand])
    return kept, stats


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
