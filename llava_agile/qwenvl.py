"""Qwen2.5-VL / Qwen3-VL selection shared by the transformers adapter (`llava_agile.hf.qwen`)
and the vLLM plugin (`llava_agile.vllm.qwen`); no framework import.

- `received_mean`: the mean softmax attention each patch receives in one vision block, over heads
  and over every query of its own `cu_seqlens` segment (Qwen's ViT has no [CLS]), from that
  block's rotated q / k.
- `select_images`: per image, the merged-token scores (mean over each merge group, renormalised
  to sum to 1 like a [CLS] row) drive `selection.select` on the merger's output (or its input
  under `feature_space="vision"`); the kept indices are sorted (raster order).
"""
from __future__ import annotations

import torch

from .metrics import compute_dtype
from .selection import select


def received_mean(q, k, cu_seqlens, scale: float, chunk: int = 512):
    """`q`, `k`: `[heads, seq, d]` (rotated) -> `[seq]`, float32 (float64 for float64 inputs)."""
    dtype = compute_dtype(q)
    q, k = q.to(dtype), k.to(dtype)
    n = q.shape[1]
    out = torch.zeros(n, dtype=dtype, device=q.device)
    bounds = [min(int(b), n) for b in cu_seqlens.tolist()]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:  # padding of a cu_seqlens buffer
            continue
        ks = k[:, s:e].transpose(1, 2)
        for c in range(s, e, chunk):  # chunks of queries: memory heads * chunk * L
            p = torch.softmax(q[:, c:min(c + chunk, e)] @ ks * scale, dim=-1)
            out[s:e] += p.sum((0, 1))
        out[s:e] /= q.shape[0] * (e - s)
    return out


def merged_scores(patch_scores, unit: int):
    """Patch scores (the ViT's order) -> one score per merged token (mean over its group)."""
    return patch_scores.view(-1, unit).mean(1)


def select_images(cfg, projs, scores, visions):
    """Per image: `projs[i]` the merger's output `[n, D]`, `scores[i]` `[n]`, `visions[i]` the
    merger's input `[n, unit * C]`. Returns (kept features, stats, kept indices) per image."""
    feats, stats, kept = [], [], []
    for proj, a, v in zip(projs, scores, visions):
        a = a / a.sum()
        space = v if cfg.feature_space == "vision" else proj
        res, ms = select(cfg, space[None], a[None], v[None], cfg.keep)
        idx = res.indices[0].sort().values
        stats.append(dict(res.stats[0], prune_ms=ms, indices=idx.tolist(), tokens=int(idx.numel())))
        feats.append(proj[idx.to(proj.device)])
        kept.append(idx)
    return feats, stats, kept


def too_few(cfg, counts) -> int | None:
    """The smallest of the images' token `counts` when `cfg.keep` exceeds it (every token kept:
    the callers warn once), else None."""
    small = min(counts, default=None)
    return small if cfg.method != "none" and small is not None and cfg.keep > small else None
