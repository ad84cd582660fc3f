"""Question-side inputs for the tensor-level tests that run every method (cdpruner, trim)."""
import torch

from llava_agile.methods import TEXT


def question_params(method: str, x: torch.Tensor, scope: str = "batch") -> dict:
    """image_embeds = the features themselves, one fixed text row: {} for other methods."""
    if method not in TEXT:
        return {}
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, x.shape[-1], generator=g, dtype=torch.float64).to(x.dtype)
    return dict(image_embeds=x, text_embeds=text, scope=scope)
