"""VisionZip (Yang et al., CVPR 2025): dominant tokens by [CLS] attention, the rest merged.

Reproduces `CLIPVisionTower_VisionZip.forward` of github:dvlab-research/VisionZip
(`visionzip/clip_encoder.py`, `visionzip/utils.py`) on the N patch tokens of one image:
1. dominant: the `K - C` patches the [CLS] query of the select layer attends to most (`K - C - 1`
   and the [CLS] token itself when `cls_token` is given);
2. the other M patches, in raster order, are split into `C` targets (positions
   `0, s, 2s, ...` with `s = max(1, M // C)`, the first C of them) and the rest; each of the rest
   joins the target whose key is most cosine-similar (keys: the select layer's `k_proj` output,
   averaged over heads, L2-normalised; ties: the first target);
3. contextual token = the target's feature + the mean of the features merged onto it (the
   target itself is not part of that mean; a target nothing joined stays as it is).
Output `[K, D]`: dominant tokens in raster order ([CLS] first when `cls_token` is given: the
official code counts it as a dominant token), then the contextual tokens in target order.
C defaults to `round(K * 10 / 64)`: the official 54 + 10 at K = 64 (the only split its code
states), 108 + 20 at 128, 162 + 30 at 192; README lists where we differ from the official code.
"""
from __future__ import annotations

import torch

from ..metrics import compute_dtype
from .common import NORM_FLOOR, attention_order, round_half_up

CONTEXTUAL_SHARE = 10 / 64  # official LLaVA-1.5 setting: 54 dominant + 10 contextual at K = 64


def contextual_count(k: int, contextual: int | None) -> int:
    """Number of contextual (merged) tokens out of K."""
    if contextual is None:
        return round_half_up(k * CONTEXTUAL_SHARE)
    if contextual > k:
        raise ValueError(f"visionzip: contextual={contextual} exceeds the {k} tokens kept; "
                         f"pass contextual <= keep (or None for round(keep * 10 / 64))")
    return contextual


def visionzip(x: torch.Tensor, a: torch.Tensor, k: int, keys: torch.Tensor | None = None,
              contextual: int | None = None,
              cls_token: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """`x [N, D]` features, `a [N]` [CLS] attention, `keys [N, Dk]` (default: `x`) -> `[K, D]`.

    `cls_token [D]`: the [CLS] token's feature in x's space; given, it takes the first of the
    K - C dominant slots, as in the official code (LLaVA: the select layer's CLS hidden state).
    Stats: `attention_indices` (the dominant patches, raster order, as bat's), `target_indices`
    (the contextual tokens' targets) and `contextual` (C).
    """
    n = x.shape[0]
    c = contextual_count(k, contextual)
    with_cls = cls_token is not None and k > c
    dominant = torch.sort(attention_order(a)[:k - c - with_cls]).values
    stats = {"attention_indices": dominant.tolist(), "contextual": c}
    rest_mask = torch.ones(n, dtype=torch.bool, device=x.device)
    rest_mask[dominant] = False
    rest = rest_mask.nonzero().flatten()  # raster order
    head = [cls_token.to(x.dtype)[None]] if with_cls else []
    if c == 0:
        stats["target_indices"] = []
        return torch.cat(head + [x[dominant]]), stats
    m = rest.numel()
    step = max(1, m // c)
    pos = torch.arange(0, m, step, device=x.device)[:c]
    is_target = torch.zeros(m, dtype=torch.bool, device=x.device)
    is_target[pos] = True
    targets, others = rest[is_target], rest[~is_target]
    stats["target_indices"] = targets.tolist()
    kf = (x if keys is None else keys).to(compute_dtype(x if keys is None else keys))
    kn = kf / kf.norm(dim=1, keepdim=True).clamp_min(NORM_FLOOR)
    assign = (kn[others] @ kn[targets].T).argmax(dim=1)  # first maximum on ties
    xf = x.to(compute_dtype(x))
    sums = torch.zeros(c, x.shape[1], dtype=xf.dtype, device=x.device).index_add_(
        0, assign, xf[others])
    counts = torch.bincount(assign, minlength=c).clamp_min(1).to(xf.dtype)
    ctx = xf[targets] + sums / counts[:, None]
    return torch.cat(head + [x[dominant], ctx.to(x.dtype)]), stats
