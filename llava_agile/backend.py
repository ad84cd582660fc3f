"""Which implementation runs a method: the reference (plain PyTorch) or the C++/CUDA extension."""
from __future__ import annotations

import torch

from .methods import REGISTRY


def implementation(method: str, device: torch.device):
    """The function that runs `method` on one image on `device`."""
    return REGISTRY[method][0]
