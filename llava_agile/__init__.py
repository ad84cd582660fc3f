"""llava_agile: adaptive visual-token pruning (AgilePruner) and its baselines for LLaVA."""
from .api import PruneResult, attention_entropy, erank, prune, select_tokens
from .backend import ext_available, set_backend
from .config import METHODS, PruneConfig
from .adapters import disable, enable, generate, set_question
from .llava import load_pretrained_model

__all__ = ["select_tokens", "prune", "erank", "attention_entropy", "METHODS", "PruneConfig",
           "PruneResult", "ext_available", "set_backend", "enable", "disable", "generate",
           "load_pretrained_model", "set_question"]
__version__ = "0.1.0"
