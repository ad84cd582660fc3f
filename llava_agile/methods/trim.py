"""TRIM (COLING 2025): the tokens least similar to the question, plus the mean of the rest.

Reproduces `CLIPVisionTower.token_reduction` of github:FreedomIntelligence/TRIM
(`llava/model/multimodal_encoder/clip_encoder.py`, commit f5a232d5) on the tokens of one image:
- score = softmax over the image's tokens of minus the dot product between each token's CLIP
  joint-space embedding (LLaVA: `visual_projection(post_layernorm(select layer))`, not
  normalised) and the question's CLIP text embedding (one row; the official truncates at 77);
- `count="fixed"`: the K - 1 tokens of largest score (official `TRIM:k` with k = (K - 1) / N);
  `count="iqr"` (official `TRIM:-1`): the scores above `Q3 + 1.5 IQR` counted over the whole batch
  (`scope="batch"`, official: every image keeps `int(N * outliers / (B N))`) or per image;
- output: the kept tokens in raster order, then the mean of the dropped ones (of `x`: LLaVA's
  pre-projector CLIP features).
Ours where the official fails: no token above the fence keeps the mean token only; ties go to
the lower index (`torch.topk` leaves them open).
"""
from __future__ import annotations

import torch

from ..metrics import compute_dtype
from .common import attention_order, iqr_counts, question_embeds


def scores(image_embeds: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """`[N, E]` embeddings, `[E]` text embedding -> `[N]` softmax of minus their dot products."""
    ie = image_embeds.to(compute_dtype(image_embeds))
    return torch.softmax(-(ie @ text.to(ie.dtype)), dim=-1)


def batch_scores(params: dict, attn: torch.Tensor) -> list[dict]:
    """The batch step: per-image `scores` and, with `count="iqr"`, the kept count `n` (over the
    whole batch with `scope="batch"`: the same for every image). Pops the embeddings."""
    image, texts = question_embeds(params, attn.shape[0])
    n_images = attn.shape[0]
    s = torch.stack([scores(image[b], texts[b][0]) for b in range(n_images)])
    count, scope = params.pop("count"), params.pop("scope")
    if count == "fixed":
        return [{"scores": s[b]} for b in range(n_images)]
    kept = iqr_counts(s, scope)
    return [{"scores": s[b], "kept": kept[b]} for b in range(n_images)]


def trim(x: torch.Tensor, a: torch.Tensor, k: int, scores: torch.Tensor | None = None,
         kept: int | None = None) -> tuple[torch.Tensor, dict]:
    """`x [N, D]`, `scores [N]` (from `batch_scores`) -> `[n + 1, D]`: n = `kept`, or K - 1.

    Stats: `attention_indices` (the kept tokens, raster order, as bat's) and `outliers` (n,
    with `count="iqr"`)."""
    if scores is None:
        raise ValueError("trim needs image_embeds and text_embeds (the question)")
    n = k - 1 if kept is None else kept
    idx = torch.sort(attention_order(scores)[:n]).values
    rest = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    rest[idx] = False
    xf = x.to(compute_dtype(x))
    mean = xf[rest].mean(dim=0, keepdim=True).to(x.dtype)
    stats = {"attention_indices": idx.tolist()}
    if kept is not None:
        stats["outliers"] = kept
    return torch.cat([x[idx], mean]), stats
