"""Hugging Face transformers adapter: `LlavaForConditionalGeneration` (LLaVA-1.5) and
`LlavaNextForConditionalGeneration` (LLaVA-NeXT) with the stock `generate()`.

Imported only when such a model is enabled (`llava_agile.enable` dispatches here), so
`import llava_agile` never imports transformers' new classes. Tested on transformers 4.57.6 and
5.24.0 (`pip install -e .[hf]`).
"""
from __future__ import annotations

import re
import warnings

from ..inllm import METHODS as INLLM_METHODS
from ..llava.runtime import as_config
from ..methods import MERGING, TEXT, variable_count
from . import llm as _inllm
from . import model as _model
from . import processor as _processor
from .generate import generate
from .model import SUPPORTED, family

TESTED = ("4.57.6", "5.24.0")
_TESTED_MINORS = {(4, 57), (5, 24)}

__all__ = ["enable", "disable", "generate", "is_enabled", "family", "SUPPORTED", "TESTED"]


def check_transformers(version: str | None = None) -> tuple[int, int]:
    """Warns outside the tested releases; the hook points themselves are checked by `enable`."""
    if version is None:
        import transformers
        version = transformers.__version__
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    major, minor = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if (major, minor) < (4, 52):
        raise RuntimeError(f"transformers {version} is too old for llava_agile's HF adapter (it "
                           f"patches LlavaModel, new in 4.52); install transformers=={TESTED[0]} "
                           f"or =={TESTED[1]} (pip install -e .[hf])")
    if (major, minor) not in _TESTED_MINORS:
        warnings.warn(f"transformers {version} is outside the versions llava_agile's HF adapter "
                      f"is tested on ({' and '.join(TESTED)}); install one of them "
                      f"(pip install -e .[hf]) if pruning misbehaves", stacklevel=3)
    return major, minor


def is_enabled(model) -> bool:
    return isinstance(getattr(model, "__dict__", {}).get("_agile_state"),
                      (_model.State, _inllm.InLLMState))


def enable(model, processor=None, method="adaptive", keep: int | None = None, *,
           feature_space: str | None = None, anyres_mode: str | None = None,
           text_tower: str | None = None, **params):
    """Prune the visual tokens of an HF LLaVA / LLaVA-NeXT model; returns the model.

    The processor instance is patched to emit K placeholders per image (LLaVA-NeXT: K in the
    `global` anyres mode, plus its newlines), so `model.generate(**processor(...))` feeds the LLM
    K tokens per image. `adaptive_count=True` and NeXT's `shared` / `per_crop` modes give
    data-dependent counts: use `llava_agile.generate(model, **inputs, ...)` for them.
    cdpruner / trim: `text_tower`, the CLIP checkpoint the vision tower comes from (with its text
    tower); the question is the prompt's text after each image (or `set_question`).
    Qwen2.5-VL (transformers 5.x): `llava_agile.hf.qwen.enable`.
    """
    if getattr(getattr(model, "config", None), "model_type", None) in ("qwen2_5_vl", "qwen3_vl"):
        if anyres_mode is not None:
            raise ValueError("anyres_mode is for LLaVA-NeXT; Qwen2.5-VL prunes each image")
        from . import qwen
        return qwen.enable(model, processor, method, keep, feature_space=feature_space,
                           text_tower=text_tower, **params)
    check_transformers()
    kind = family(model)
    if kind is None:
        raise ValueError(f"{type(model).__name__} is not a supported HF model; supported: "
                         f"{', '.join(SUPPORTED.values())}")
    cfg = as_config(method, keep, feature_space, anyres_mode, text_tower=text_tower, **params)
    if cfg.method in TEXT and cfg.text_tower is None:
        raise ValueError(f"{cfg.method} needs text_tower=: the CLIP checkpoint (folder or cached "
                         f"hub id) the vision tower comes from, e.g. "
                         f"openai/clip-vit-large-patch14-336 for LLaVA-1.5 (transformers' LLaVA "
                         f"does not record its name)")
    if cfg.method in MERGING and kind == "llava_next":
        raise ValueError(f"method {cfg.method!r} {MERGING[cfg.method]}, which have no grid "
                         f"position, so "
                         f"it cannot run on LLaVA-NeXT (anyres) crops; pick an index method")
    if cfg.method not in INLLM_METHODS:   # in-LLM: the processor runs unchanged
        _processor.check(processor, model, kind)
    if not hasattr(model, "model"):
        raise ValueError(f"{type(model).__name__} has no inner .model (LlavaModel, transformers "
                         f">= 4.52); install transformers=={TESTED[0]} or =={TESTED[1]}")
    if is_enabled(model):
        disable(model)
    if cfg.method in INLLM_METHODS:   # every image token reaches the LLM: no processor patch
        return _inllm.enable(model, cfg)
    state = _model.new_state(model, cfg, kind, processor)
    state.fixed_count = not variable_count(cfg.method, cfg.params) and \
        (kind == "llava" or cfg.anyres_mode == "global")
    try:
        _model.patch(model, state)
        _processor.patch(processor, model, state)
    except Exception:
        _processor.restore(state) if state.processor is not None else None
        _model.unpatch(state)
        raise
    model._agile_state = state
    model.agile_config = cfg
    model.agile_stats = []
    return model


def set_question(model, question):
    """cdpruner / trim: the question of the next call's images (see `llava_agile.set_question`)."""
    state = getattr(model, "__dict__", {}).get("_agile_state")
    if getattr(state, "questions", None) is None:
        raise ValueError(f"set_question is for a model enabled with a question-conditioned "
                         f"method ({', '.join(TEXT)})")
    state.questions.set(question)


def disable(model, processor=None):
    """Undo `enable` on the model and on the processor it patched; returns the model."""
    state = getattr(model, "__dict__", {}).get("_agile_state")
    if isinstance(state, _inllm.InLLMState):
        _inllm.disable(model)
        return model
    if state is not None and not isinstance(state, _model.State):  # Qwen2.5-VL
        from . import qwen
        return qwen.disable(model, processor)
    if state is None:
        return model
    if processor is not None and state.processor is not None and processor is not state.processor:
        raise ValueError("this processor is not the one llava_agile.enable patched for this "
                         "model; pass that one (or none)")
    model.__dict__.pop("_agile_state")
    _model.unpatch(state)
    if state.processor is not None:
        _processor.restore(state)
    for name in ("agile_config", "agile_stats"):
        model.__dict__.pop(name, None)
    return model
