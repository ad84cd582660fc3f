"""Pruning inside the LLM (FastV, PDrop, DART): pure methods (`methods`) and the one engine every
framework adapter shares (`engine`)."""
from .methods import (DEFAULTS, METHODS, average_tokens, check_params, keep_for_average,
                      layer_tokens, stages)

__all__ = ["DEFAULTS", "METHODS", "average_tokens", "check_params", "keep_for_average",
           "layer_tokens", "refuse", "stages"]


def refuse(method: str, where: str) -> None:
    """A clear error for an in-LLM method where it does not run yet."""
    if method in METHODS:
        raise ValueError(f"{method!r} prunes inside the LLM, which {where} does not support yet; "
                         f"in-LLM methods run on LLaVA's own model (llava-torch) and "
                         f"transformers' LLaVA-1.5 / LLaVA-NeXT for now")
