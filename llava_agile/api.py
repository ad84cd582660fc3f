"""Public entry points: `select_tokens`, `prune` (input checks, batching, stats) and the
complexity signals `erank`, `attention_entropy` (checked inputs, extension when built)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backend
from .config import check_keep, check_params, check_selection_method
from .methods import BATCH_STEPS, MERGING, TEXT, variable_count
from .metrics import entropy_of, erank_from_singular_values, singular_values

# tensor parameters with one row per token
PER_TOKEN = ("similarity_features", "keys", "image_embeds")


def _check_finite(name: str, t: torch.Tensor) -> None:
    # one aminmax pass (NaN propagates): ~40x cheaper than isfinite(t).all() on 576 x 4096
    if t.numel() and not all(torch.isfinite(v) for v in torch.aminmax(t)):
        raise ValueError(f"{name} contains NaN or Inf; check the vision tower's output "
                         f"(fp16 overflow?) before pruning")


def check_features(features, name: str = "features") -> torch.Tensor:
    """`[N, D]` or `[B, N, D]` float tensor -> `[B, N, D]`."""
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise ValueError(f"{name} must be a float tensor [N, D] or [B, N, D], got "
                         f"{type(features).__name__}{'' if not isinstance(features, torch.Tensor) else ' of ' + str(features.dtype)}")
    if features.dim() not in (2, 3):
        raise ValueError(f"{name} must be 2-D [N, D] or 3-D [B, N, D], got shape "
                         f"{tuple(features.shape)}")
    feats = features if features.dim() == 3 else features.unsqueeze(0)
    if feats.shape[1] == 0:
        raise ValueError(f"{name} has no tokens (N == 0); there is nothing to prune")
    if feats.shape[2] == 0:
        raise ValueError(f"{name} has zero feature dimensions (D == 0)")
    _check_finite(name, feats)
    return feats


def check_attention(cls_attn) -> torch.Tensor:
    """`[N]` or `[B, N]` non-negative float tensor -> `[B, N]`."""
    if not isinstance(cls_attn, torch.Tensor) or not cls_attn.is_floating_point():
        raise ValueError("cls_attn must be a float tensor [N] or [B, N] (the [CLS] attention row)")
    if cls_attn.dim() not in (1, 2):
        raise ValueError(f"cls_attn must be 1-D [N] or 2-D [B, N], got shape {tuple(cls_attn.shape)}")
    attn = cls_attn if cls_attn.dim() == 2 else cls_attn.unsqueeze(0)
    if attn.shape[1] == 0:
        raise ValueError("cls_attn has no tokens (N == 0); there is nothing to prune")
    _check_finite("cls_attn", attn)
    if (attn < 0).any():
        raise ValueError("cls_attn must be non-negative (softmax attention weights); "
                         "got negative values")
    return attn


def erank(features: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Effective rank (Roy & Vetterli) of `[N, D]` -> `[]` or `[B, N, D]` -> `[B]`."""
    feats = check_features(features)
    if backend.use_ext("erank", feats.device):
        out = backend.erank(feats, center)
        return out[0] if features.dim() == 2 else out
    out = torch.stack([erank_from_singular_values(singular_values(f, center)) for f in feats])
    return out[0] if features.dim() == 2 else out


def attention_entropy(cls_attn: torch.Tensor) -> torch.Tensor:
    """Entropy of `[N]` -> `[]` or `[B, N]` -> `[B]` [CLS]-attention rows (SPEC §2)."""
    attn = check_attention(cls_attn)
    if backend.use_ext("entropy", attn.device):
        out = backend.attention_entropy(attn)
        return out[0] if cls_attn.dim() == 1 else out
    out = torch.stack([entropy_of(a) for a in attn])
    return out[0] if cls_attn.dim() == 1 else out


def _check_inputs(features, cls_attn, keep, method, params):
    check_selection_method(method)
    keep = check_keep(keep)
    params = check_params(method, params)
    feats, attn = check_features(features), check_attention(cls_attn)
    if features.dim() - 1 != cls_attn.dim() or feats.shape[:2] != attn.shape:
        want = "[N]" if features.dim() == 2 else "[B, N]"
        raise ValueError(f"cls_attn shape {tuple(cls_attn.shape)} does not match features shape "
                         f"{tuple(features.shape)}: expected {want} = {tuple(feats.shape[:2]) if features.dim() == 3 else (feats.shape[1],)}")
    for name in PER_TOKEN:  # vispruner/bat's similarity features, visionzip's keys
        extra = params.get(name)
        if extra is not None:
            extra3 = check_features(extra, name)
            if extra.dim() != features.dim() or extra3.shape[:2] != feats.shape[:2]:
                raise ValueError(f"{name} shape {tuple(extra.shape)} must match features "
                                 f"{tuple(features.shape)} in every dimension but the last")
    if method in TEXT:
        _check_text(method, params, feats.shape[0])
    cls = params.get("cls_token")  # visionzip: one [CLS] feature per image, in x's space
    if cls is not None:
        want = tuple(features.shape[:-2]) + (feats.shape[2],)
        if not isinstance(cls, torch.Tensor) or not cls.is_floating_point() \
                or tuple(cls.shape) != want:
            raise ValueError(f"cls_token must be a float tensor of shape {want} (one [CLS] "
                             f"feature per image, in the features' space), got "
                             f"{tuple(cls.shape) if isinstance(cls, torch.Tensor) else type(cls).__name__}")
        _check_finite("cls_token", cls)
    return feats, attn, keep, params


def _check_text(method, params, batch):
    """cdpruner / trim: `image_embeds [.., N, E]` and `text_embeds` `[M, E]` (every image),
    `[B, M, E]` or a list of B `[M_b, E]` (one question per image), E alike; trim: M = 1."""
    image, text = params.get("image_embeds"), params.get("text_embeds")
    if image is None or text is None:
        raise ValueError(f"{method} is conditioned on the question: pass image_embeds (CLIP "
                         f"joint-space patch embeddings, [N, E] or [B, N, E]) and text_embeds "
                         f"(the question's CLIP text embeddings, [M, E]); at model level give "
                         f"text_tower= and a question")
    texts = [text] if isinstance(text, torch.Tensor) and text.dim() == 2 else list(text) \
        if isinstance(text, (list, tuple)) or isinstance(text, torch.Tensor) and text.dim() == 3 \
        else []
    rows = TEXT[method]
    if len(texts) not in (1, batch) or not all(
            isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2
            and t.shape[0] > 0 and t.shape[1] == image.shape[-1] for t in texts):
        raise ValueError(f"text_embeds must be a float tensor [M, E] (M >= 1 text rows, E = "
                         f"{image.shape[-1]} as image_embeds), [B, M, E] or a list of B such "
                         f"tensors (B = {batch})")
    if rows is not None and any(t.shape[0] != rows for t in texts):
        raise ValueError(f"{method} takes one text embedding per image (M = 1: the official "
                         f"truncates the question at the text tower's 77 tokens), got "
                         f"{[t.shape[0] for t in texts]} rows")
    for t in texts:
        _check_finite("text_embeds", t)


def _run(feats, attn, keep, method, params, with_stats=True):
    """Per image: (selected indices or merged features, method stats)."""
    n = feats.shape[1]
    if keep >= n and not variable_count(method, params):  # every method keeps every token
        return [(torch.arange(n, device=feats.device), {}) for _ in range(feats.shape[0])]
    batch = backend.batch_implementation(method, feats.device)  # C++/CUDA extension, whole batch
    if batch is not None:
        return batch(feats, attn, keep, params, with_stats)
    impl = backend.implementation(method, feats.device)
    step = BATCH_STEPS.get(method)  # statistics over the whole batch (cdpruner, trim, prumerge+)
    images = step(params, attn) if step else [{}] * feats.shape[0]
    per_token = {name: params.pop(name) for name in PER_TOKEN if params.get(name) is not None}
    cls = params.pop("cls_token", None)
    out = []
    for b in range(feats.shape[0]):
        extra = {name: (t if t.dim() == 3 else t[None])[b] for name, t in per_token.items()}
        if cls is not None:
            extra["cls_token"] = (cls if cls.dim() == 2 else cls[None])[b]
        res, stats = impl(feats[b], attn[b], keep, **params, **extra, **images[b])
        if method not in MERGING:
            res = torch.sort(res.to(torch.long)).values
        out.append((res, stats))
    return out


def select_tokens(features: torch.Tensor, cls_attn: torch.Tensor, keep: int,
                  method: str = "adaptive", **params):
    """Indices of the tokens to keep, ascending: `[K]`, `[B, K]`, or a list (adaptive_count=True).

    `features` are the visual tokens `[N, D]` / `[B, N, D]`; `cls_attn` the [CLS] attention over
    them `[N]` / `[B, N]`; `K = min(keep, N)`. Methods and parameters: see `METHODS` and README.
    """
    if method in MERGING:
        raise ValueError(f"method {method!r} {MERGING[method]}, so it has no indices to return; "
                         f"use llava_agile.prune(...) and read .features")
    feats, attn, keep, params = _check_inputs(features, cls_attn, keep, method, params)
    idx = [res for res, _ in _run(feats, attn, keep, method, params, with_stats=False)]
    if params.get("adaptive_count"):
        return idx if features.dim() == 3 else idx[0]
    return torch.stack(idx) if features.dim() == 3 else idx[0]


@dataclass
class PruneResult:
    """`features`: `[K, D]`, `[B, K, D]` or a list (variable K); `indices`: the same shapes, or
    None for merging methods; `stats`: one dict per image (erank, entropy, kept, ...)."""
    features: torch.Tensor | list
    indices: torch.Tensor | list | None
    stats: list


def prune(features: torch.Tensor, cls_attn: torch.Tensor, keep: int, method: str = "adaptive",
          stats: bool = True, **params) -> PruneResult:
    """Prune visual tokens with any method; returns the kept (or merged) features and stats.

    With `stats=True` every image's full-token erank and attention entropy are measured
    (`center` as the method's, default True) even when the method itself does not need them;
    with `stats=False` each image's stats hold `kept` and what the method computed anyway
    (adaptive's erank and thresholds, a hybrid's ratio and, for a non-fixed ratio rule, erank).
    """
    feats, attn, keep, params = _check_inputs(features, cls_attn, keep, method, params)
    center = params.get("center", True)
    results = _run(feats, attn, keep, method, dict(params))
    out_feats, out_idx, out_stats = [], [], []
    for b, (res, st) in enumerate(results):
        if method in MERGING and res.is_floating_point():
            out_feats.append(res)
            out_idx.append(None)
        else:
            out_feats.append(feats[b].index_select(0, res))  # ~6x cheaper than feats[b, res]
            out_idx.append(res)
        st = dict(st, kept=int(out_feats[-1].shape[0]))
        if stats:
            if "erank" not in st:
                st["erank"] = float(erank_from_singular_values(singular_values(feats[b], center)))
            st.setdefault("entropy", float(entropy_of(attn[b])))
        out_stats.append(st)
    variable = variable_count(method, params)
    merged = method in MERGING

    def pack(items):
        if features.dim() == 2:
            return items[0]
        if variable:
            return items
        return items[0][None] if len(items) == 1 else torch.stack(items)  # B = 1: no copy

    return PruneResult(features=pack(out_feats), indices=None if merged else pack(out_idx),
                       stats=out_stats)
