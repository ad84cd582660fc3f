"""Framework-neutral selection steps shared by the original-LLaVA and the Hugging Face adapters.

Both adapters get, per image, the select layer's CLIP features `clip [B, N, Dv]`, the [CLS]
attention rows `attn [B, N]` (from `llava.attention.ClsAttentionHook`) and a projector; these
functions choose the tokens the LLM sees. No LLaVA or transformers import here.
"""
from __future__ import annotations

import time

import torch

from .api import prune
from .methods import MERGING, REGISTRY, TEXT


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def select(cfg, space, attn, clip, keep: int, keys=None, cls=None, text=None):
    """`prune` on `[B, N, .]`; returns (PruneResult, milliseconds it took, CUDA-synchronised).
    bat's and visionzip's stats carry `attention_indices`: the attention-kept tokens (the rest
    are merged). visionzip: `keys`, the select layer's patch keys `[B, N, .]`, and `cls`, its
    [CLS] token `[B, D]` in `space` (None: every dominant slot goes to a patch).
    cdpruner / trim: `text` = (CLIP patch embeddings `[B, N, E]`, B text embeddings `[M, E]`)."""
    params = dict(cfg.params)
    if cfg.method in TEXT:
        if text is None:
            raise ValueError(f"method {cfg.method!r} needs the question: this integration does "
                             f"not provide it (use llava_agile.enable with text_tower=)")
        params["image_embeds"], params["text_embeds"] = text[0].to(space.device), list(text[1])
    if "similarity_features" in REGISTRY[cfg.method][1]:
        params["similarity_features"] = clip
    if needs_keys(cfg.method):  # visionzip / prumerge_plus: keys recorded by the hook
        if keys is None:
            raise ValueError(f"method {cfg.method!r} needs the vision tower's keys; this "
                             f"integration does not record them (use llava_agile.enable)")
        params["keys"] = keys.to(space.device)
    if "cls_token" in REGISTRY[cfg.method][1] and cls is not None:
        params["cls_token"] = cls.to(space.device)
    attn = attn.to(space.device)
    _sync(space.device)
    t0 = time.perf_counter()
    res = prune(space, attn, keep, cfg.method, stats=cfg.stats == "full", **params)
    _sync(space.device)
    ms = 1000 * (time.perf_counter() - t0)
    if cfg.method in MERGING:  # K >= N: nothing merged, every token kept
        for st in res.stats:
            st.setdefault("attention_indices", list(range(st["kept"])))
    return res, ms


def needs_keys(method: str) -> bool:
    """Does `method` take keys recorded by the [CLS] hook (visionzip: the select layer's,
    prumerge_plus: the next block's; `llava.attention.hook_for` sets which)?"""
    return "keys" in REGISTRY[method][1]


def flat_tokens(cfg, projector, clip: torch.Tensor, attn: torch.Tensor, proj=None, keys=None,
                cls=None, text=None):
    """One crop per image (LLaVA-1.5): (list of `[K, D]` LLM tokens, list of per-image stats).

    Selection runs on the projected tokens (or, `feature_space="vision"`, on the CLIP features,
    which are then projected); merging methods return their merged features. visionzip: `keys`
    and `cls` (the select layer's [CLS] hidden state `[B, Dv]`) from the hook; cdpruner / trim:
    `text` (see `select`)."""
    vision = cfg.feature_space == "vision"
    if proj is None and not vision:
        proj = projector(clip)
    cls = cls if vision or cls is None else projector(cls)
    res, ms = select(cfg, clip if vision else proj, attn, clip, cfg.keep, keys, cls, text)
    feats, stats = [], []
    for b in range(clip.shape[0]):
        st = dict(res.stats[b], prune_ms=ms / clip.shape[0])  # one batched call: its mean
        if res.indices is None:
            f = projector(res.features[b]) if vision else res.features[b]
        else:
            idx = res.indices[b]
            f = projector(clip[b, idx]) if vision else proj[b, idx]
            st["indices"] = idx.tolist()
        st["tokens"] = int(f.shape[0])
        feats.append(f)
        stats.append(st)
    return feats, stats


def crop_mask(cfg, space, attn, clip, candidates=None, text=None):
    """Several crops of one image (LLaVA-NeXT anyres): which `[n, N]` positions to keep.

    `anyres_mode`: "shared" selects on the base crop and reuses its grid positions in every crop,
    "per_crop" selects K in every crop, "global" selects K over `candidates` (crop, patch): the
    base crop and the high-res cells that survive unpadding, in the LLM's order (every position
    when None). cdpruner: `text` = (the crops' CLIP patch embeddings `[n, N, E]`, the image's
    text embedding `[M, E]`); its relevance is normalised over the crops of one `select` call
    (official: over every crop of the image). Returns (mask, stats of the selection,
    milliseconds, extra stats)."""
    n, N = attn.shape
    if cfg.method in MERGING and n > 1:
        raise ValueError(f"method {cfg.method!r} {MERGING[cfg.method]} and cannot run on several "
                         f"crops per image; pick an index method")
    mask = torch.zeros(n, N, dtype=torch.bool, device=attn.device)
    mode = cfg.anyres_mode if n > 1 else "per_crop"
    extra = {}
    emb, question = text if text is not None else (None, None)
    if mode == "shared":
        res, ms = select(cfg, space[:1], attn[:1], clip[:1], cfg.keep,
                         text=None if text is None else (emb[:1], [question]))
        mask[:, res.indices[0]] = True
    elif mode == "per_crop":
        res, ms = select(cfg, space, attn, clip, cfg.keep,
                         text=None if text is None else (emb, [question] * n))
        for c in range(n):
            mask[c, res.indices[c]] = True
        if n > 1:
            extra["crop_stats"] = res.stats
    else:
        if candidates is None:
            dev = attn.device
            candidates = (torch.arange(n, device=dev).repeat_interleave(N),
                          torch.arange(N, device=dev).repeat(n))
        crop, patch = candidates
        res, ms = select(cfg, space[crop, patch][None], attn[crop, patch][None],
                         clip[crop, patch][None], cfg.keep,
                         text=None if text is None else (emb[crop, patch][None], [question]))
        idx = res.indices[0]
        mask[crop[idx], patch[idx]] = True
    return mask, res.stats[0], ms, dict(extra, mode=mode if n > 1 else None)


def crop_stats(st: dict, extra: dict, fed: torch.Tensor, tokens: int, ms: float) -> dict:
    """One multi-crop image's stats: `fed` `[crops, N]` marks the patches that reach the LLM,
    `tokens` counts them with the newlines."""
    n = fed.shape[0]
    kept = int(fed.sum())
    indices = [fed[c].nonzero().flatten().tolist() for c in range(n)]
    return dict(st, **extra, crops=n, kept=kept, prune_ms=ms, tokens=tokens,
                newlines=tokens - kept, indices=indices[0] if n == 1 else indices)
