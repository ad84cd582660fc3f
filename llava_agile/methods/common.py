"""Small shared pieces of the selection methods (pure tensor code, no LLaVA)."""
from __future__ import annotations

import math

import torch

from ..metrics import compute_dtype

NORM_FLOOR = 1e-8


def round_half_up(x: float) -> int:
    """ours: SPEC's round() rounds halves up (Python's round() would round 0.5 to 0)."""
    return int(math.floor(x + 0.5))


def attention_order(a: torch.Tensor) -> torch.Tensor:
    """Token indices by descending attention; ties: the lower index first (ours)."""
    return torch.sort(a, descending=True, stable=True).indices


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """`[N, D]` -> `[N, N]` with d(i, j) = 1 - <x_i, x_j> / (|x_i| |x_j|), norms floored.

    Clamped to [0, 2] (ours): round-off must not make a duplicate's distance negative, or a
    zero threshold would remove it.
    """
    x = x.to(compute_dtype(x))
    norms = x.norm(dim=1).clamp_min(NORM_FLOOR)
    return (1 - (x @ x.T) / (norms[:, None] * norms[None, :])).clamp(0, 2)


def greedy_max_min(dist: torch.Tensor, selected: list[int], k: int) -> list[int]:
    """Extend `selected` to k tokens, each time taking the token farthest from the set.

    Distance to the set is the minimum over its members; ties go to the lower index.
    With an empty start, the first pick is the token whose nearest neighbour is farthest.
    """
    n = dist.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=dist.device)
    selected = list(selected)
    if not selected:
        if n == 1:
            return [0][:k]
        off_diag = dist.clone()
        off_diag.fill_diagonal_(float("inf"))
        selected = [int(off_diag.min(dim=1).values.argmax())]
    chosen[selected] = True
    min_d = dist[selected].min(dim=0).values
    while len(selected) < k:
        score = min_d.masked_fill(chosen, float("-inf"))
        i = int(score.argmax())
        selected.append(i)
        chosen[i] = True
        min_d = torch.minimum(min_d, dist[i])
    return selected


def iqr_outliers(values: torch.Tensor) -> int:
    """How many values lie strictly above `Q3 + 1.5 (Q3 - Q1)` (linear quantiles, float64)."""
    v = values.flatten().double()
    q1, q3 = torch.quantile(v, 0.25), torch.quantile(v, 0.75)
    return int((v > q3 + 1.5 * (q3 - q1)).sum())


def iqr_counts(values: torch.Tensor, scope: str) -> list[int]:
    """Per row of `[B, N]`: how many tokens TRIM / PruMerge+ keep by the IQR rule. "batch" (both
    official codes): one count for every image, `int(N * outliers / (B N))` over the flattened
    batch (float rounding as written); "image": each row's own outliers."""
    b, n = values.shape
    if scope == "batch":
        return [int(n * (iqr_outliers(values) / values.numel()))] * b
    return [iqr_outliers(values[i]) for i in range(b)]


def question_embeds(params: dict, n_images: int) -> tuple[torch.Tensor, list]:
    """Pops cdpruner / trim's `image_embeds` (-> `[B, N, E]`) and `text_embeds` (-> one
    `[M, E]` per image: one tensor given for every image, or one each)."""
    image, text = params.pop("image_embeds"), params.pop("text_embeds")
    texts = [text] if isinstance(text, torch.Tensor) and text.dim() == 2 else list(text)
    return (image if image.dim() == 3 else image[None]), \
        texts * n_images if len(texts) == 1 else texts
