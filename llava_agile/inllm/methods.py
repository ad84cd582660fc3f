"""In-LLM pruning methods as pure tensor functions and budget arithmetic (no framework import).

Each method drops image tokens between two decoder layers; what differs is where, how many and
from which scores (each as its authors' code does it: README "Pruning inside the LLM",
docs/in_llm_notes.md):

- fastv (pkunlp-icler/FastV, lmms-eval `fastv_kvcache.py`): before layer `layer`, the `keep`
  image tokens with the largest head-mean attention from the last prompt token in layer
  `layer - 1`; kept tokens keep their original positions.
- pdrop (Cooperx521/PyramidDrop): before each layer of `layers`, the image tokens with the
  largest head-mean attention from the last prompt token, recomputed with that layer's own
  norm / q / k; stage s keeps `int(N * ratios[s])` (default ratios: (keep/N)^(s+1), so the first
  stage keeps `keep`); positions renumbered contiguously.
- dart (ZichenWen1/DART): before layer `layer`, pivots = the `pivot_image` image and
  `pivot_text` text tokens with the largest L1 key norm in layer `layer - 1`; each pivot in turn
  takes the remaining image tokens least similar to it; original positions kept.

`keep` is one thing for every method: the image tokens per image that the layers after the
(first) pruning layer see (PDrop given its own `ratios` takes its counts from them instead). `layer_tokens` / `average_tokens` give the image tokens each decoder
layer sees and their mean; `keep_for_average` converts a per-layer average budget into `keep`.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

METHODS = ("fastv", "pdrop", "dart")
RENUMBER = frozenset({"pdrop"})  # methods that renumber positions after a drop
DEFAULTS = {
    "fastv": dict(layer=2),
    "pdrop": dict(layers=(8, 16, 24), ratios=None),
    "dart": dict(layer=2, pivot_image=4, pivot_text=4),
}


# ---------------------------------------------------------------- parameters and budgets

def _int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_params(method: str, keep: int | None, params: dict) -> dict:
    """Validate the method's parameters (and `keep` against them, when given; unknown names are
    refused by the caller); returns the full set with defaults."""
    full = {**DEFAULTS[method], **params}
    if method in ("fastv", "dart"):
        _int("layer", full["layer"], 1)
    if method == "dart":
        pi = _int("pivot_image", full["pivot_image"], 1)
        pt = _int("pivot_text", full["pivot_text"], 1)
        if keep is not None and (keep <= pi or (keep - pi) % (pi + pt)):
            step = pi + pt
            low = pi + max(step, (keep - pi) // step * step)
            raise ValueError(
                f"dart keeps pivot_image + (pivot_image + pivot_text) * t image tokens "
                f"({pi} + {step}t); keep={keep} is not of that form: use {low} or {low + step} "
                f"(DART's own 'max_num_trunction=M' keeps {pi} + {step} * (M // {step}), "
                f"e.g. M=128 keeps {pi + step * (128 // step)})")
    if method == "pdrop":
        layers = full["layers"]
        if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
            layers = (layers,)   # one stage ("layers=8" on a command line)
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError(f"layers must be a non-empty list of layer indices, got {layers!r}")
        layers = tuple(_int("layers[i]", v, 1) for v in layers)
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be strictly increasing, got {list(layers)}")
        full["layers"] = layers
        ratios = full["ratios"]
        if isinstance(ratios, numbers.Real) and not isinstance(ratios, bool):
            ratios = (ratios,)
        if ratios is not None:
            if not isinstance(ratios, (list, tuple)) or len(ratios) != len(layers):
                raise ValueError(f"ratios must list one kept fraction per layer of {list(layers)}, "
                                 f"got {ratios!r}")
            ok = all(isinstance(r, numbers.Real) and not isinstance(r, bool) and 0 < r <= 1
                     for r in ratios)
            if not ok or list(ratios) != sorted(ratios, reverse=True):
                raise ValueError(f"ratios must be non-increasing fractions in (0, 1], got "
                                 f"{list(ratios)}")
            full["ratios"] = tuple(float(r) for r in ratios)
    return full


def stages(method: str, keep: int, params: dict, n: int) -> list[tuple[int, int]]:
    """[(layer, kept image tokens from that layer on)] for one image of `n` tokens."""
    if method in ("fastv", "dart"):
        return [(params["layer"], min(keep, n))]
    ratios = params["ratios"]
    if ratios is None:  # geometric: the first stage keeps `keep`
        lam = min(keep, n) / n
        counts = [min(keep, n)] + [int(n * lam ** (s + 1)) for s in range(1, len(params["layers"]))]
    else:               # PDrop's own rule: int(N * ratio), against the original N at every stage
        counts = [int(n * r) for r in ratios]
    return list(zip(params["layers"], counts))


def layer_tokens(method: str, keep: int, params: dict, n: int, num_layers: int) -> list[int]:
    """Image tokens of one image that each of the `num_layers` decoder layers sees."""
    out, cur = [], n
    plan = dict(stages(method, keep, params, n))
    for i in range(num_layers):
        cur = plan.get(i, cur)
        out.append(cur)
    return out


def average_tokens(method: str, keep: int, params: dict, n: int, num_layers: int) -> float:
    return sum(layer_tokens(method, keep, params, n, num_layers)) / num_layers


def keep_for_average(method: str, average: float, params: dict, n: int, num_layers: int) -> int:
    """The largest `keep` whose per-layer average does not exceed `average` (FasterVLM's
    convention: FastV at an average of 64 on LLaVA-1.5-7B, layer 2 of 32, keeps 29)."""
    full = {**DEFAULTS[method], **params}
    valid = range(1, n + 1)
    if method == "dart":
        step = full["pivot_image"] + full["pivot_text"]
        valid = range(full["pivot_image"] + step, n + 1, step)
    best = None
    for k in valid:
        if average_tokens(method, k, full, n, num_layers) <= average:
            best = k
    if best is None:
        raise ValueError(f"no keep of {method} gives an average of at most {average} image "
                         f"tokens per layer ({n} tokens, {num_layers} layers)")
    return best


# ---------------------------------------------------------------- scores and selection

def attention_row(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Head-mean attention of one query over the keys, as transformers' eager LLaMA attention
    computes it: `softmax((q kᵀ) / sqrt(d) + mask, float32)` cast back to q's dtype, then the
    mean over heads in that dtype. q `[H, d]` (post-RoPE), k `[H, L, d]`, valid `[L]` bool."""
    w = torch.matmul(q[:, None, :], k.transpose(1, 2))[:, 0] / math.sqrt(q.shape[-1])
    w = w.masked_fill(~valid, torch.finfo(w.dtype).min)
    return F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype).mean(dim=0)


def top_sorted(scores: torch.Tensor, count: int, margins: list | None = None) -> torch.Tensor:
    """Indices of the `count` largest scores, ascending (FastV's and PDrop's `topk` + sort);
    `margins` (a list) receives the gap between the last kept and the first dropped score."""
    if margins is not None and 0 < count < len(scores):
        top = scores.topk(count + 1).values
        margins.append(float(top[count - 1] - top[count]))
    return scores.topk(count).indices.sort().values


def dart_select(keys: torch.Tensor, states: torch.Tensor, image: range, text: list[int],
                pivot_image: int, pivot_text: int, count: int, margins: list | None = None
                ) -> list[int]:
    """DART's `get_retained_image_token` for one image (positions in the unpadded sequence).

    keys `[L, H*d]`: layer K-1's post-RoPE keys, heads concatenated; states `[L, D]`: layer K-1's
    output through the model's final norm; image: the image's positions; text: the text
    positions after it (the text pivots' pool). Pivots are visited in Python set order and each
    pivot's picks leave the pool, as the official code does. Returns sorted positions; `margins`
    (a list) receives each `topk`'s gap between the last chosen and the first left-out score.
    """
    def topk(scores, k):
        if margins is not None and k < len(scores):
            top = scores.topk(k + 1).values
            margins.append(float(top[k - 1] - top[k]))
        return scores.topk(k).indices

    per = (count - pivot_image) // (pivot_image + pivot_text)
    img_norm = torch.norm(keys[image.start:image.stop], p=1, dim=-1)
    txt_norm = torch.norm(keys[text], p=1, dim=-1)
    image_idx = (topk(img_norm, pivot_image) + image.start).tolist()
    query_idx = [text[i] for i in topk(txt_norm, pivot_text).tolist()]
    chosen = set(image_idx + query_idx)
    valid = set(image) - set(image_idx)
    valid_list = list(valid)
    for item in list(chosen):
        sim = -F.cosine_similarity(states[item], states[valid_list], dim=-1)
        picked = [valid_list[i] for i in topk(sim, per)]
        chosen.update(picked)
        valid.difference_update(picked)
        valid_list = list(valid)
    chosen.difference_update(query_idx)
    return sorted(chosen)
