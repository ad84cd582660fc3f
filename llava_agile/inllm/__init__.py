"""Pruning inside the LLM (FastV, PDrop, DART, SparseVLM): pure methods (`methods`) and the one
engine every framework adapter shares (`engine`)."""
from .methods import (DEFAULTS, METHODS, RENUMBER, average_tokens, check_params,
                      keep_for_average, layer_tokens, stages)

__all__ = ["DEFAULTS", "METHODS", "RENUMBER", "average_tokens", "check_params",
           "keep_for_average", "layer_tokens", "stages"]

