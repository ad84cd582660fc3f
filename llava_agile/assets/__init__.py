"""Test and demo assets: a tiny random LLaVA built offline (`build_tiny_llava`, `load_tiny`)."""
from .tiny import build_tiny_llava, load_tiny, tiny_image, tiny_prompt

__all__ = ["build_tiny_llava", "load_tiny", "tiny_image", "tiny_prompt"]
