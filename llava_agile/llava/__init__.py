"""LLaVA integration: `enable` / `disable` pruning on a loaded model, `load_pretrained_model`.

LLaVA itself is imported only when a model is loaded or enabled, so `import llava_agile` works
without it.
"""
from .loader import load_pretrained_model
from .runtime import as_config, disable, enable, is_enabled, visual_tokens

__all__ = ["enable", "disable", "is_enabled", "load_pretrained_model", "as_config", "visual_tokens"]
