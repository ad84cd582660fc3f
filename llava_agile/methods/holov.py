"""HoloV (NeurIPS 2025): a per-chunk budget from [CLS] attention, the top tokens of each chunk.

Reproduces `HoloV` of github:obananas/HoloV (`llava/model/utils.py`, commit 1d2e65e9) on the N
tokens of one image (LLaVA: the projected tokens and the select layer's [CLS] row):
1. the tokens in raster order are cut into `chunks` contiguous pieces (`N // chunks` each, the
   first `N % chunks` one longer; empty ones dropped);
2. a chunk's score is the mean over its tokens of `1000 a + 0.09 v s`, where `v` is the variance
   of a token's cosine similarities to the chunk (diagonal zeroed, over n - 1) and
   `s = mean|1000 a| / (mean|v| + 1e-6)` (a chunk of one token: its attention, unscaled);
3. budgets `floor(K w)` with `w = score / (sum + 1e-6)`; the leftover slots go one each to the
   chunks of largest weight;
4. each chunk gives its top-attention tokens (descending attention); a chunk whose budget
   reaches its size gives all of them in raster order, and its excess is lost.
Output `[K, D]`: the chunks' tokens in chunk order, then, when budgets were lost (attention
peaked on a few chunks), the official code's zero rows (`overflow="zeros"`) or the
highest-attention tokens not yet kept (`overflow="backfill"`, ours).
"""
from __future__ import annotations

import torch

from ..metrics import compute_dtype
from .common import attention_order

ALPHA, SCALE, EPS = 0.09, 1e3, 1e-6  # the official constants
OVERFLOW = ("zeros", "backfill")


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """Contiguous `[start, end)` pieces: `n // chunks` tokens, the first `n % chunks` one more
    (the official comment says the last; its code gives the first), empty ones dropped."""
    size, extra = divmod(n, chunks)
    bounds, start = [], 0
    for p in range(chunks):
        end = start + size + (p < extra)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


def chunk_scores(x: torch.Tensor, a: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """The official per-chunk score (step 2), in x's compute dtype."""
    dt = compute_dtype(x)
    scores = []
    for s, e in bounds:
        at = a[s:e].to(dt)
        n = e - s
        if n == 1:
            scores.append(at.mean())
            continue
        t = x[s:e].to(dt)
        fn = t / (t.norm(dim=1, keepdim=True) + EPS)
        sim = (fn @ fn.T) * (1 - torch.eye(n, dtype=dt, device=x.device))
        mean = sim.sum(dim=1) / (n - 1)
        var = ((sim - mean[:, None]) ** 2).sum(dim=1) / (n - 1)
        scaled = at * SCALE
        var_scaled = var * (scaled.abs().mean() / (var.abs().mean() + EPS))
        scores.append((scaled + ALPHA * var_scaled).mean())
    return torch.stack(scores)


def holov(x: torch.Tensor, a: torch.Tensor, k: int, chunks: int = 16,
          overflow: str = "zeros") -> tuple[torch.Tensor, dict]:
    """`x [N, D]`, `a [N]` -> `[K, D]` in the official order (see the module docstring).

    Stats: `attention_indices` (the token of each output row, in order, as bat's),
    `chunk_budgets` and `zero_rows` (the official padding; 0 with `overflow="backfill"`)."""
    n = x.shape[0]
    bounds = chunk_bounds(n, chunks)
    scores = chunk_scores(x, a, bounds)
    weights = scores / (scores.sum() + EPS)
    budget = (weights * k).floor().long()
    left = k - int(budget.sum())
    if left > 0:  # largest weights first; ties: the lower chunk (ours; topk leaves them open)
        budget[attention_order(weights)[:left]] += 1
    kept = []
    for (s, e), b in zip(bounds, budget.tolist()):
        if b >= e - s:
            kept.append(torch.arange(s, e, device=x.device))
        elif b > 0:
            kept.append(s + attention_order(a[s:e])[:b])
    idx = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long, device=x.device)
    missing = k - idx.numel()
    stats = {"chunk_budgets": budget.tolist(), "zero_rows": 0}
    if missing and overflow == "backfill":
        free = torch.ones(n, dtype=torch.bool, device=x.device)
        free[idx] = False
        order = attention_order(a)
        idx = torch.cat([idx, order[free[order]][:missing]])
        missing = 0
    stats["attention_indices"] = idx.tolist()
    out = x[idx]
    if missing:
        stats["zero_rows"] = missing
        out = torch.cat([out, x.new_zeros(missing, x.shape[1])])
    return out, stats
