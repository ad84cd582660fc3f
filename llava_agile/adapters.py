"""One public `enable` / `disable` / `generate` for every supported model family.

- haotian-liu's LLaVA classes (`prepare_inputs_labels_for_multimodal`, `get_vision_tower`):
  `llava_agile.llava.runtime`;
- transformers' `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration`
  (config.model_type "llava" / "llava_next"): `llava_agile.hf`, imported only then;
- transformers' `Qwen2_5_VLForConditionalGeneration` / `Qwen3VLForConditionalGeneration`
  (model_type "qwen2_5_vl" / "qwen3_vl", transformers 5.x):
  `llava_agile.hf.qwen`.
"""
from __future__ import annotations

SUPPORTED = ("LLaVA's own LlavaLlamaForCausalLM (llava.model.builder.load_pretrained_model), "
             "transformers' LlavaForConditionalGeneration, LlavaNextForConditionalGeneration "
             "and Qwen2_5_VLForConditionalGeneration / Qwen3VLForConditionalGeneration")


def model_family(model) -> str | None:
    """"original", "hf", "qwen" or None."""
    if hasattr(model, "prepare_inputs_labels_for_multimodal") and hasattr(model, "get_vision_tower"):
        return "original"
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in ("llava", "llava_next") and hasattr(model, "generate"):
        return "hf"
    if kind in ("qwen2_5_vl", "qwen3_vl") and hasattr(model, "generate"):
        return "qwen"
    return None


def _refuse(model):
    raise ValueError(f"enable() needs a LLaVA model; {type(model).__name__} is none of the "
                     f"supported: {SUPPORTED}")


def enable(model, *args, processor=None, **kwargs):
    """Prune the visual tokens of a loaded LLaVA model; returns the model.

    LLaVA's own classes: `enable(model, "adaptive", 64, erank_avg=95)` (see
    `llava_agile.llava.runtime.enable`). transformers' classes also need their processor:
    `enable(model, processor=processor, method="adaptive", keep=64)` (`llava_agile.hf.enable`).
    """
    kind = model_family(model)
    if kind == "original":
        if processor is not None:
            raise ValueError("processor= is for transformers' LLaVA classes; LLaVA's own model "
                             "keeps its image processor: call enable(model, method, keep, ...)")
        from .llava.runtime import enable as original_enable
        return original_enable(model, *args, **kwargs)
    if kind == "hf":
        from . import hf
        return hf.enable(model, processor, *args, **kwargs)
    if kind == "qwen":
        from .hf import qwen
        return qwen.enable(model, processor, *args, **kwargs)
    _refuse(model)


def set_question(model, question):
    """cdpruner / trim: the question of the next call's images (a string, or one per image),
    instead of the text the prompt gives after each image; used by that call only."""
    kind = model_family(model)
    if kind == "original":
        from .llava.runtime import set_question as original_set_question
        return original_set_question(model, question)
    if kind == "hf":
        from . import hf
        return hf.set_question(model, question)
    raise ValueError(f"set_question: {type(model).__name__} has no question-conditioned "
                     f"method (cdpruner, trim run on LLaVA's own model and transformers' LLaVA)")


def disable(model, processor=None):
    """Undo `enable` (and its processor patch); returns the model. No-op if not enabled."""
    if model_family(model) == "hf":
        from . import hf
        return hf.disable(model, processor)
    if model_family(model) == "qwen":
        from .hf import qwen
        return qwen.disable(model, processor)
    from .llava.runtime import disable as original_disable
    return original_disable(model)


def generate(model, *args, **kwargs):
    """transformers' LLaVA with a variable number of tokens per image (`adaptive_count=True`,
    LLaVA-NeXT's `shared` / `per_crop` modes): `llava_agile.generate(model, **inputs,
    max_new_tokens=...)` returns (generate's output, prompt lengths); see `llava_agile.hf.generate`."""
    if model_family(model) == "qwen":
        from .hf import qwen
        return qwen.generate(model, *args, **kwargs)
    if model_family(model) != "hf":
        raise ValueError("llava_agile.generate is for transformers' LLaVA classes enabled with "
                         "llava_agile.enable(model, processor=..., ...); LLaVA's own model already "
                         "handles per-image lengths in its generate")
    from .hf.generate import generate as hf_generate
    return hf_generate(model, *args, **kwargs)
