"""llava_agile: adaptive visual-token pruning (AgilePruner) and its baselines for LLaVA."""
from .api import PruneResult, prune, select_tokens
from .config import PruneConfig
from .methods import METHODS
from .metrics import attention_entropy, erank

__all__ = ["select_tokens", "prune", "erank", "attention_entropy", "METHODS", "PruneConfig",
           "PruneResult"]
__version__ = "0.1.0"
