"""What the patched trees (patches/) and the runner call: CPU fallback, enabling pruning on a
freshly loaded model, and the FasterVLM selector. Kept out of the patches so they stay small.
"""
from __future__ import annotations

import torch

from .llava import as_config


def cpu_fallback(device, device_map):
    """LLaVA's builder defaults to device="cuda". With no GPU visible, load on the CPU instead.

    Returns `(device, device_map, on_cpu)`; `on_cpu` is True only when the fallback was taken.
    """
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        return "cpu", "cpu", True
    return device, device_map, False


def is_fastervlm(model) -> bool:
    """FasterVLM's LLaVA fork (its generate returns a tuple, its encoder returns attentions)."""
    return hasattr(model, "get_visual_token_num")


def finish_model(model, pruning=None, float32: bool = False):
    """After LLaVA's builder: cast to float32 (the CPU fallback) and enable pruning."""
    if float32:
        model.float()
    config = None if pruning is None else as_config(pruning)
    if config is not None:
        if is_fastervlm(model):
            set_fastervlm_pruning(model, config)
        else:
            from . import enable
            enable(model, config)
    return model


# ---- FasterVLM (Theia-4869/FasterVLM f5d5f12) -------------------------------------------------

def set_fastervlm_pruning(model, pruning) -> None:
    """Make FasterVLM's `encode_images` select with llava_agile instead of its top-K attention."""
    config = None if pruning is None else as_config(pruning)
    if config is not None and config.method == "bat":
        raise ValueError("method 'bat' merges tokens, which FasterVLM's keep-mask path cannot "
                         "express; use the LLaVA tree (patches/ or llava_agile.run) for bat")
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
    result = prune(space.float(), attn.float(), config.keep, config.method, **params)
    masks = torch.zeros(attn.shape, dtype=torch.bool, device=attn.device)
    for b, idx in enumerate(result.indices):
        masks[b, idx.to(attn.device)] = True
    model.agile_stats = result.stats
    return projected, masks, attn
