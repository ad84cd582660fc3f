"""Image-complexity signals (SPEC §2): effective rank and [CLS]-attention entropy.

Reference implementations in plain PyTorch, one image at a time, with no input checks and no
imports from the package: the methods use them; the public, checked `erank` /
`attention_entropy` (batched, extension when built) are in `llava_agile.api`.
Computation happens in float32, or float64 when the input is float64.
"""
from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other float type is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def singular_values(x: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Singular values of one `[N, D]` token matrix.

    float32: SPEC's cheap route, the eigenvalues of the smaller Gram matrix (N x N when N <= D,
    else D x D, so no round-off eigenvalues stand in for the exact zeros of the larger one).
    float64: `svdvals` (ours: the definition itself; the Gram route turns round-off into
    singular values near 1e-8 * s_max, which moves the erank of low-rank inputs by ~1e-5).
    """
    x = x.to(compute_dtype(x))
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    if x.dtype == torch.float64:
        return torch.linalg.svdvals(x)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()


def erank_from_singular_values(s: torch.Tensor) -> torch.Tensor:
    """exp(entropy of s / sum(s)); a zero matrix has erank 1 (ours: its rank-0 limit)."""
    total = s.sum()
    if total <= 0:
        return torch.ones((), dtype=s.dtype, device=s.device)
    q = s / total
    return torch.exp(-torch.special.xlogy(q, q).sum())


def entropy_of(a: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of one non-negative attention row, renormalised over its entries."""
    a = a.to(compute_dtype(a))
    total = a.sum()
    if total <= 0:
        # ours: an all-zero row carries no preference; treat it as uniform
        return torch.log(torch.tensor(float(a.numel()), dtype=a.dtype, device=a.device))
    p = a / total
    return -torch.special.xlogy(p, p).sum()
