"""AgilePruner's adaptive selection (SPEC §3)."""
from __future__ import annotations

import torch

from ..metrics import entropy_of, erank_from_singular_values, singular_values
from .common import attention_order, cosine_distances, round_half_up


def relative_complexity(x: torch.Tensor, a: torch.Tensor, signal: str, erank_avg: float,
               entropy_avg: float, center: bool) -> tuple[float, dict]:
    """The image's complexity relative to its calibration average, and the raw signals."""
    stats = {"erank": float(erank_from_singular_values(singular_values(x, center)))}
    if signal == "entropy":
        stats["entropy"] = float(entropy_of(a))
        return stats["entropy"] / entropy_avg, stats
    return stats["erank"] / erank_avg, stats


def count_for(k: int, c: float, n: int) -> int:
    """ours: K_i = round(K * clip(c, 0.5, 1.5)), kept within [1, N]."""
    return min(max(round_half_up(k * min(max(c, 0.5), 1.5)), 1), n)


def threshold_walk(dist: torch.Tensor, order: torch.Tensor, k: int,
                   taus: torch.Tensor) -> tuple[list[int], list[float]]:
    """Walk tokens in `order`; select each survivor i and remove alive j with d(i,j) < taus[rank i].

    Returns the selected tokens (in selection order) and the thresholds they used.
    """
    alive = torch.ones(dist.shape[0], dtype=torch.bool, device=dist.device)
    selected, used = [], []
    for rank0, i in enumerate(order.tolist()):
        if len(selected) == k:
            break
        if not alive[i]:
            continue
        selected.append(i)
        used.append(float(taus[rank0]))
        alive[i] = False
        alive &= ~(dist[i] < taus[rank0])
    return selected, used


def backfill(selected: list[int], order: torch.Tensor, k: int) -> list[int]:
    """Top up with the highest-attention tokens not yet selected (removed ones allowed)."""
    if len(selected) < k:
        taken = set(selected)
        for i in order.tolist():
            if len(selected) == k:
                break
            if i not in taken:
                selected.append(i)
    return selected


def adaptive(x: torch.Tensor, a: torch.Tensor, k: int, erank_avg: float = 90.0,
             tau_step: float = 0.01, tau_max: float = 0.25, tau: float | None = None,
             complexity: str = "erank", entropy_avg: float = 4.7, center: bool = True,
             adaptive_count: bool = False) -> tuple[torch.Tensor, dict]:
    """Select k tokens: attention order, suppressing near-duplicates with erank-scaled thresholds."""
    n = x.shape[0]
    c, stats = relative_complexity(x, a, complexity, erank_avg, entropy_avg, center)
    stats["complexity"] = c
    if adaptive_count:
        k = count_for(k, c, n)
    order = attention_order(a)
    dist = cosine_distances(x)
    # thresholds in float64, evaluated as written in SPEC: min(rank * c * tau_step, tau_max)
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=dist.device)
    if tau is None:
        taus = (ranks * c * tau_step).clamp_max(tau_max)
    else:
        taus = torch.full_like(ranks, float(tau))
    selected, used = threshold_walk(dist, order, k, taus)
    stats["walk_selected"] = len(selected)
    stats["tau_range"] = (min(used), max(used)) if used else (0.0, 0.0)
    return torch.tensor(backfill(selected, order, k), device=x.device), stats
