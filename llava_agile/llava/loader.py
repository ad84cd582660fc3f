"""Loading LLaVA checkpoints: `load_pretrained_model` (LLaVA's builder, then `enable`) and the
identity-`pre_layrnorm` rule for vision towers whose config carries `identity_pre_layrnorm: true`.

CLIP ViTs apply a LayerNorm before the encoder; encoders converted to the CLIP format that have
none (DINOv2, `llava_agile.assets.dinov2`) mark their config, and every `CLIPVisionTransformer`
built from a marked config gets `nn.Identity()` there (LLaVA's `CLIPVisionTower` included).
Unmarked models are untouched. transformers and LLaVA are imported only when called.
"""
from __future__ import annotations

import functools

from torch import nn

from ..config import PruneConfig
from .runtime import as_config, enable

MARKER = "identity_pre_layrnorm"


def install_identity_pre_layrnorm_hook() -> None:
    """Make every `CLIPVisionTransformer` built from a config with `identity_pre_layrnorm: true`
    use `nn.Identity()` as `pre_layrnorm` (covers LLaVA's `CLIPVisionTower`). Idempotent; models
    whose config lacks the marker are untouched."""
    from transformers.models.clip import modeling_clip

    cls = modeling_clip.CLIPVisionTransformer
    if getattr(cls.__init__, "_llava_agile_identity_hook", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        if getattr(config, MARKER, False):
            self.pre_layrnorm = nn.Identity()

    __init__._llava_agile_identity_hook = True
    cls.__init__ = __init__


def apply_identity_pre_layrnorm(module: nn.Module) -> int:
    """After-the-fact fix for models loaded without the hook: replace `pre_layrnorm` of every
    marked `CLIPVisionTransformer` inside `module`; returns how many were replaced."""
    from transformers.models.clip.modeling_clip import CLIPVisionTransformer

    n = 0
    for m in module.modules():
        if isinstance(m, CLIPVisionTransformer) and getattr(m.config, MARKER, False) \
                and not isinstance(m.pre_layrnorm, nn.Identity):
            m.pre_layrnorm = nn.Identity()
            n += 1
    return n


def load_pretrained_model(model_path, model_base=None, model_name=None, *args, pruning=None,
                          **kwargs):
    """LLaVA's `load_pretrained_model` (same arguments and return value), then `enable` when
    `pruning` (a PruneConfig or a dict) is given. Vision towers marked `identity_pre_layrnorm`
    (the DINOv2 conversion) load with an identity `pre_layrnorm`."""
    if not isinstance(pruning, (PruneConfig, dict, type(None))):
        raise ValueError(f"pruning must be a PruneConfig, a dict or None, got "
                         f"{type(pruning).__name__} {pruning!r}")
    cfg = None if pruning is None else as_config(pruning)
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model as llava_load

    install_identity_pre_layrnorm_hook()
    if model_name is None:
        model_name = get_model_name_from_path(model_path)
    tokenizer, model, image_processor, context_len = llava_load(model_path, model_base,
                                                                model_name, *args, **kwargs)
    if cfg is not None:
        enable(model, cfg)
    return tokenizer, model, image_processor, context_len
