"""Diversity baselines: DivPrune (greedy max-min) and farthest-point sampling."""
from __future__ import annotations

import torch

from .common import attention_order, cosine_distances, greedy_max_min


def diversity(x: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
    """DivPrune: greedy max-min diversity on cosine distance; no attention term."""
    return torch.tensor(greedy_max_min(cosine_distances(x), [], k), device=x.device), {}


def fps(x: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
    """Farthest-point sampling on cosine distance, starting at the top-attention token."""
    start = int(attention_order(a)[0])
    return torch.tensor(greedy_max_min(cosine_distances(x), [start], k), device=x.device), {}
