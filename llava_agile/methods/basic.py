"""Single-signal baselines: attention top-K (FasterVLM), random, none."""
from __future__ import annotations

import torch

from .common import attention_order


def attention(x: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
    """FasterVLM: the K tokens the [CLS] query attends to most."""
    return attention_order(a)[:k], {}


def random(x: torch.Tensor, a: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """K tokens uniformly without replacement, from a generator seeded with `seed` per image."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(a.shape[0], generator=generator)[:k].to(a.device), {}


def none(x: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
    """No pruning: every token (keep is ignored)."""
    return torch.arange(a.shape[0], device=a.device), {}
