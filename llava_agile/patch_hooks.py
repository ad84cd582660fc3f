"""What the patched trees (patches/) and the runner call: CPU fallback, enabling pruning on a
freshly loaded model, per-generate stats logging, and the FasterVLM selector. Kept out of the
patches so they stay small.

With `LLAVA_AGILE_STATS_FILE` set, every `model.generate` call of a model loaded this way
appends one flushed JSON line to that file: `{"images": n, "kept": [visual tokens kept per
image], "prune_ms": [milliseconds of pruning per image], "avg_tokens": [image tokens per decoder
layer, averaged: `kept` unless the method prunes inside the LLM], "s": seconds}`;
`LLAVA_AGILE_MAX_NEW_TOKENS` caps `max_new_tokens` (the eval driver sets both).
"""
from __future__ import annotations

import json
import os
import time

import torch

from .llava import as_config

STATS_ENV, MAX_NEW_TOKENS_ENV = "LLAVA_AGILE_STATS_FILE", "LLAVA_AGILE_MAX_NEW_TOKENS"


def cpu_fallback(device, device_map):
    """LLaVA's builder defaults to device="cuda". With no GPU visible, load on the CPU instead.

    Returns `(device, device_map, on_cpu)`; `on_cpu` is True only when the fallback was taken.
    The patched builder calls this before loading, so it also installs the DINOv2 conversions'
    identity `pre_layrnorm` hook (`llava_agile.llava.loader`).
    """
    from .llava.loader import install_identity_pre_layrnorm_hook

    install_identity_pre_layrnorm_hook()
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        return "cpu", "cpu", True
    return device, device_map, False


def is_fastervlm(model) -> bool:
    """FasterVLM's LLaVA fork (its generate returns a tuple, its encoder returns attentions)."""
    return hasattr(model, "get_visual_token_num")


def finish_model(model, pruning=None, float32: bool = False):
    """After LLaVA's builder: cast to float32 (the CPU fallback), enable pruning, and log each
    generate call when `LLAVA_AGILE_STATS_FILE` / `LLAVA_AGILE_MAX_NEW_TOKENS` are set."""
    if float32:
        model.float()
    config = None if pruning is None else as_config(pruning)
    if config is not None:
        if is_fastervlm(model):
            set_fastervlm_pruning(model, config)
        else:
            from . import enable
            enable(model, config)
    stats_file, cap = os.environ.get(STATS_ENV), os.environ.get(MAX_NEW_TOKENS_ENV)
    if stats_file or cap:
        if cap is not None and not (cap.isdigit() and int(cap) >= 1):
            raise ValueError(f"{MAX_NEW_TOKENS_ENV} must be an integer >= 1, got {cap!r}")
        log_generate(model, stats_file or None, int(cap) if cap else None)
    return model


def _n_images(images) -> int:
    if images is None:
        return 0
    return len(images) if isinstance(images, (list, tuple)) else int(images.shape[0])


def log_generate(model, stats_file: str | None, max_new_tokens: int | None = None):
    """Wrap `model.generate`: cap `max_new_tokens`, append one stats line per call (see above)."""
    generate = model.generate
    out = open(stats_file, "a", encoding="utf-8") if stats_file else None

    def logged_generate(*args, **kwargs):
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens") or max_new_tokens,
                                           max_new_tokens)
        if "agile_stats" in model.__dict__:
            model.agile_stats = []          # a text-only question must not report stale stats
        start = time.perf_counter()
        result = generate(*args, **kwargs)
        seconds = time.perf_counter() - start
        if out is not None:
            stats = getattr(model, "agile_stats", None) or []
            out.write(json.dumps({"images": _n_images(kwargs.get("images")),
                                  "kept": [s.get("kept", s.get("tokens")) for s in stats],
                                  "prune_ms": [s.get("prune_ms") for s in stats],
                                  "avg_tokens": [s.get("avg_tokens", s.get("kept", s.get(
                                      "tokens"))) for s in stats],
                                  "s": round(seconds, 6)}) + "\n")
            out.flush()
        return result

    model.generate = logged_generate
    return model


# ---- FasterVLM (Theia-4869/FasterVLM f5d5f12) -------------------------------------------------

def set_fastervlm_pruning(model, pruning) -> None:
    """Make FasterVLM's `encode_images` select with llava_agile instead of its top-K attention."""
    config = None if pruning is None else as_config(pruning)
    from .methods import MERGING

    if config is not None and config.method in MERGING:
        raise ValueError(f"method {config.method!r} {MERGING[config.method]}, which FasterVLM's "
                         f"keep-mask "
                         f"path cannot express; use the LLaVA tree (patches/ or llava_agile.run) "
                         f"for {config.method}")
    model.agile_pruning = config


def fastervlm_encode(model, image_features: torch.Tensor, image_attentions: torch.Tensor):
    """Replacement body of FasterVLM's `encode_images` when `--pruning` is given.

    `image_features` [B, N, C] are the CLIP features of the select layer, `image_attentions`
    [B, H, N] the [CLS] rows per head. Returns FasterVLM's triple: projected features [B, N, D],
    keep masks [B, N] (bool) and the head-mean attention [B, N].
    """
    from .api import prune
    from .methods import REGISTRY

    config = model.agile_pruning
    attn = image_attentions.mean(dim=1)
    projected = model.get_model().mm_projector(image_features)
    space = projected if config.feature_space == "projected" else image_features
    params = dict(config.params)
    if "similarity_features" in REGISTRY[config.method][1]:  # vispruner: CLIP-space similarity
        params["similarity_features"] = image_features.float()
    result = prune(space.float(), attn.float(), config.keep, config.method,
                   stats=config.stats == "full", **params)
    masks = torch.zeros(attn.shape, dtype=torch.bool, device=attn.device)
    for b, idx in enumerate(result.indices):
        masks[b, idx.to(attn.device)] = True
    model.agile_stats = result.stats
    return projected, masks, attn
