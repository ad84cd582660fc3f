"""PruMerge+ (Shang et al., 2024): outlier tokens by [CLS] attention plus spatial samples, each
merged with its key-nearest tokens, plus one token for the rest.

Reproduces `CLIPVisionTower.token_prune_merge_advanced_plus` of github:42Shawn/LLaVA-PruMerge
(`llava/model/multimodal_encoder/clip_encoder.py`, commit 097c0411) on the N tokens of one image:
- `a`: the [CLS] row of the attention the layer after the select layer computes on the select
  layer's output, as one head over the full width (`softmax(q k^T / sqrt(C))`, [CLS] column
  dropped), and `keys`: that layer's `k_proj` output (LLaVA: layer 23; the hook gives both);
- `count="iqr"` (official): n = the attention values above `Q3 + 1.5 IQR` (over the batch with
  `scope="batch"`, as the official), the n largest in descending order, then every
  `int(int(N / n) / 3)`-th token of `0 .. N - 2` not among them (raster order);
  `count="fixed"` (ours; the official has no budget): `round((K - 1) / 4)` by attention, then
  `K - 1` in all with evenly spaced samples of the other tokens (the official's ~1 : 3 split);
- each kept token + the attention-weighted sum (weights unnormalised) of its 32 nearest other
  tokens by key cosine (kept tokens included; features as they came in), in kept order, then
  the attention-weighted sum of every token not kept.
Output `[L + 1, D]`. Ours where the official fails: no outlier (its ZeroDivisionError) keeps
the top-attention token; a sampling step of 0 (more than N / 3 outliers) becomes 1; fewer than
33 tokens merge with all the others; ties go to the lower index.
"""
from __future__ import annotations

import torch

from ..metrics import compute_dtype
from .common import NORM_FLOOR, attention_order, iqr_counts, round_half_up

NEIGHBOURS = 32


def batch_counts(params: dict, attn: torch.Tensor) -> list[dict]:
    """The batch step: with `count="iqr"` each image's outlier count `n` (`scope="batch"`: the
    official `int(N * outliers / (B N))` for every image)."""
    count, scope = params.pop("count"), params.pop("scope")
    if count == "fixed":
        return [{} for _ in range(attn.shape[0])]
    return [{"outliers": k} for k in iqr_counts(attn, scope)]


def centres(a: torch.Tensor, k: int, outliers: int | None) -> torch.Tensor:
    """The kept tokens, in the official order (attention outliers, then spatial samples)."""
    n = a.shape[0]
    order = attention_order(a)
    if outliers is None:  # fixed: K - 1 centres, a quarter by attention
        top = order[:max(1, round_half_up((k - 1) / 4))][:k - 1]
        free = torch.ones(n, dtype=torch.bool, device=a.device)
        free[top] = False
        rest = free.nonzero().flatten()
        want = min(k - 1 - top.numel(), rest.numel())
        pick = torch.linspace(0, rest.numel() - 1, want, device=a.device).round().long() \
            if want else rest[:0]
        return torch.cat([top, rest[pick] if want else rest[:0]])
    top = order[:max(outliers, 1)]
    step = max(int(int(n / top.numel()) / 3), 1)  # the official int(1 / ratio), int(step / 3)
    samples = torch.arange(0, n - 1, step, device=a.device)
    taken = torch.zeros(n, dtype=torch.bool, device=a.device)
    taken[top] = True
    return torch.cat([top, samples[~taken[samples]]])


def nearest(sim: torch.Tensor, m: int) -> torch.Tensor:
    """`[L, N]` similarities -> `[L, N]` 0/1 weights of each row's m largest (ties: the lower
    index, whatever order `topk` returns them in)."""
    kth = torch.topk(sim, m, dim=1).values[:, -1:]
    above, tied = sim > kth, sim == kth
    room = m - above.sum(dim=1, keepdim=True)
    return (above | (tied & (tied.cumsum(dim=1) <= room))).to(sim.dtype)


def prumerge_plus(x: torch.Tensor, a: torch.Tensor, k: int, keys: torch.Tensor | None = None,
                  outliers: int | None = None) -> tuple[torch.Tensor, dict]:
    """`x [N, D]`, `a [N]` single-head [CLS] row, `keys [N, Dk]` (None: `x`) -> `[L + 1, D]`.

    Stats: `attention_indices` (the kept tokens, in output order, as bat's) and `outliers`
    (with `count="iqr"`)."""
    n = x.shape[0]
    idx = centres(a, k, outliers)
    dt = compute_dtype(x)
    xf, af = x.to(dt), a.to(dt)
    kn = (x if keys is None else keys).to(dt)
    kn = kn / kn.norm(dim=1, keepdim=True).clamp_min(NORM_FLOOR)
    sim = kn[idx] @ kn.T  # [L, N]
    sim[torch.arange(idx.numel(), device=x.device), idx] = float("-inf")  # not itself
    merged = xf[idx] + (nearest(sim, min(NEIGHBOURS, n - 1)) * af) @ xf
    rest = torch.ones(n, dtype=torch.bool, device=x.device)
    rest[idx] = False
    extra = (af[rest, None] * xf[rest]).sum(dim=0, keepdim=True)
    stats = {"attention_indices": idx.tolist()}
    if outliers is not None:
        stats["outliers"] = outliers
    return torch.cat([merged, extra]).to(x.dtype), stats
