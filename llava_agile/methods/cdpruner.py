"""CDPruner (NeurIPS 2025): a conditional DPP over the visual tokens, relevance from the question.

Reproduces `encode_images` of github:Theia-4869/CDPruner (`llava/model/llava_arch.py`, commit
9541616c) on the tokens of one image:
- relevance `r` = minus the mean cosine similarity between the image's CLIP joint-space patch
  embeddings `[N, E]` (LLaVA: `visual_projection(post_layernorm(select layer))`) and the rows of
  the question's CLIP text embeddings `[M, E]` (one row per 77-token chunk), min-max normalised
  as `(r - min + 1e-6) / (max - min)` over the whole batch (official) or per image;
- kernel `L = r_i cos(x_i, x_j) r_j` on the tokens `x` (LLaVA: the projected tokens);
- the fast greedy MAP inference of Chen et al. (2018): K steps, each taking the token of largest
  residual gain `d_j^2` (the first maximum), then indices sorted.
Ours where the official computes NaN: zero norms are floored; equal min and max make every
relevance 1; once no residual gain exceeds round-off (1e-6 of the largest diagonal entry in
float32, 1e-12 in float64: K above the kernel's rank) the remaining slots go to the unpicked
tokens of largest relevance (the official goes on into NaN and repeats indices, keeping fewer
than K).
"""
from __future__ import annotations

import torch

from ..metrics import compute_dtype
from .common import NORM_FLOOR, attention_order, question_embeds

# a residual gain at or below this share of the largest diagonal is round-off: the kernel's
# rank is spent (the official goes on, into NaN once a gain turns negative)
EXHAUSTED = {torch.float32: 1e-6, torch.float64: 1e-12}


def _unit(t: torch.Tensor) -> torch.Tensor:
    t = t.to(compute_dtype(t))
    return t / t.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)


def relevance(image_embeds: torch.Tensor, text_embeds: list, scope: str = "batch"):
    """`[B, N, E]` patch embeddings and one `[M_b, E]` text embedding per image -> `[B, N]`."""
    ie = _unit(image_embeds)
    r = torch.stack([-(ie[b] @ _unit(t).to(ie.dtype).T).mean(dim=-1)
                     for b, t in enumerate(text_embeds)])
    if scope == "batch":
        lo, hi = r.min(), r.max()
    else:
        lo, hi = r.min(dim=1, keepdim=True).values, r.max(dim=1, keepdim=True).values
    span = hi - lo
    out = (r - lo + 1e-6) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.ones_like(out))


def batch_relevance(params: dict, attn: torch.Tensor) -> list[dict]:
    """The batch step (what couples images): per-image `relevance`; pops the embeddings."""
    image_embeds, texts = question_embeds(params, attn.shape[0])
    r = relevance(image_embeds, texts, params.pop("scope"))
    return [{"relevance": row} for row in r]


@torch.no_grad()
def greedy_map(kernel: torch.Tensor, k: int) -> tuple[list[int], int]:
    """Fast greedy MAP inference on `[N, N]`: (picks in order, how many had a gain above
    round-off). The K steps run without a host sync (the index stays a tensor; a GPU queues
    them all); the steps after the first spent one are then dropped."""
    n = kernel.shape[0]
    cis = torch.zeros(k, n, dtype=kernel.dtype, device=kernel.device)
    di2s = torch.diagonal(kernel).clone()
    floor = di2s.max() * EXHAUSTED[kernel.dtype]
    picks = torch.empty(k, dtype=torch.long, device=kernel.device)
    gains = torch.empty(k, dtype=kernel.dtype, device=kernel.device)
    for i in range(k):
        j = torch.argmax(di2s)
        picks[i], gains[i] = j, di2s[j]
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j].clamp_min(floor))
        cis[i] = eis
        di2s -= eis * eis
        di2s[j] = float("-inf")
    steps = int((gains > floor).cumprod(0).sum())  # up to the first spent step
    return picks[:steps].tolist(), steps


def cdpruner(x: torch.Tensor, a: torch.Tensor, k: int, relevance: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, dict]:
    """`x [N, D]` tokens, `relevance [N]` (from `batch_relevance`) -> K indices (picking order).

    Stats: `dpp_steps`, the picks made by the DPP (below K only when the kernel ran out of rank)."""
    if relevance is None:
        raise ValueError("cdpruner needs image_embeds and text_embeds (the question)")
    xn = _unit(x)
    r = relevance.to(xn.dtype)
    kernel = r[:, None] * (xn @ xn.T) * r[None, :]
    picks, steps = greedy_map(kernel, k)
    if steps < k:  # no positive gain left: the most relevant unpicked tokens (ours)
        free = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        free[picks] = False
        order = attention_order(r)
        picks += order[free[order]][:k - steps].tolist()
    return torch.tensor(picks, dtype=torch.long, device=x.device), {"dpp_steps": steps}
