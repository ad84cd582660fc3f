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
- sparsevlm (Gumpest/SparseVLMs v1.5, ICML'25): raters = the text tokens after the image whose
  mean softmax relation to the image's LLM input embeddings is above average; after each layer of
  `layers`, the image tokens (merged ones included) with the largest attention from the raters in
  that layer's own attention probabilities stay (`min(count, v - 1)` of the v there), and the best
  30% of the dropped ones are clustered (DPC-kNN) into merged tokens placed after the kept ones;
  positions renumbered contiguously. Stage s keeps `schedule[s]` (+ merged tokens); its official
  schedules are 300/200/110 ("192"), 303/110/36 ("128"), 66/30/17 ("64") after layers 2, 6, 15.

`keep` is one thing for every method: the image tokens per image that the layers after the
(first) pruning layer see (PDrop given its own `ratios` takes its counts from them instead;
SparseVLM: the first stage's kept count, its merged tokens come on top). `layer_tokens` /
`average_tokens` give the image tokens each decoder layer sees and their mean;
`keep_for_average` converts a per-layer average budget into `keep`.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

METHODS = ("fastv", "pdrop", "dart", "sparsevlm")
RENUMBER = frozenset({"pdrop", "sparsevlm"})  # methods that renumber positions after a drop
DEFAULTS = {
    "fastv": dict(layer=2),
    "pdrop": dict(layers=(8, 16, 24), ratios=None),
    "dart": dict(layer=2, pivot_image=4, pivot_text=4),
    "sparsevlm": dict(layers=(2, 6, 15), schedule=None),
}
# SparseVLM's `score.sparse_token_dict` (v1.5): its budget name -> kept image tokens per stage
SPARSEVLM_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}


# ---------------------------------------------------------------- parameters and budgets

def _int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _layers(layers, low):
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = (layers,)   # one stage ("layers=8" on a command line)
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"layers must be a non-empty list of layer indices, got {layers!r}")
    layers = tuple(_int("layers[i]", v, low) for v in layers)
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"layers must be strictly increasing, got {list(layers)}")
    return layers


def _schedule(schedule, layers):
    if isinstance(schedule, numbers.Integral) and not isinstance(schedule, bool):
        schedule = (schedule,)
    if not isinstance(schedule, (list, tuple)) or len(schedule) != len(layers):
        raise ValueError(f"schedule must list one kept count per layer of {list(layers)}, got "
                         f"{schedule!r}")
    return tuple(_int("schedule[i]", v, 1) for v in schedule)


def sparsevlm_schedule(keep: int, params: dict) -> tuple:
    """SparseVLM's kept image tokens per stage: `schedule` when given (its first count is
    `keep`), else the official schedule whose first count is `keep` (300, 303 or 66)."""
    layers = params["layers"]
    if params.get("schedule") is not None:
        sched = _schedule(params["schedule"], layers)
        if sched[0] != keep:
            raise ValueError(f"sparsevlm: keep is the first stage's count; keep={keep} but "
                             f"schedule={list(sched)}")
        return sched
    official = {v[0]: v for v in SPARSEVLM_SCHEDULES.values()}
    names = ", ".join(f"keep={v[0]} ({'/'.join(map(str, v))}, its '{k}')"
                      for k, v in SPARSEVLM_SCHEDULES.items())
    if keep not in official or len(layers) != 3:
        raise ValueError(f"sparsevlm: its official schedules are {names} over 3 layers; for "
                         f"keep={keep} with layers={list(layers)} give schedule=(keep, ...) with "
                         f"one count per layer")
    return official[keep]


def sparsevlm_counts(schedule, n: int) -> list[tuple[int, int, int]]:
    """Per stage (kept, merged, seen after it) for an image of `n` tokens: SparseVLM keeps
    `min(count, v - 1)` of the v image tokens there and merges the `int(0.3 * dropped) + 1` best
    dropped ones into `int(that / 10) + 1` tokens."""
    out, v = [], n
    for c in schedule:
        kept = min(c, v - 1)
        merged = int((int((v - kept) * 0.3) + 1) / 10) + 1
        v = kept + merged
        out.append((kept, merged, v))
    return out


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
    if method == "sparsevlm":
        full["layers"] = _layers(full["layers"], 0)
        full["schedule"] = sparsevlm_schedule(keep, full) if keep is not None else \
            (None if full["schedule"] is None else _schedule(full["schedule"], full["layers"]))
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
    if method == "sparsevlm":   # scored with layer s, dropped before layer s + 1
        counts = sparsevlm_counts(sparsevlm_schedule(keep, params), n)
        return [(s + 1, seen) for s, (_, _, seen) in zip(params["layers"], counts)]
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
    if method == "sparsevlm":   # the first counts of its schedules (given, or official)
        valid = [full["schedule"][0]] if full["schedule"] is not None else \
            sorted(v[0] for v in SPARSEVLM_SCHEDULES.values())
    best, most = None, None
    for k in valid:   # the largest average within the budget (SparseVLM's firsts: 66, 300, 303
        avg = average_tokens(method, k, full, n, num_layers)   # are not in average order)
        if avg <= average and (most is None or avg >= most):
            best, most = k, avg
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


# ---------------------------------------------------------------- SparseVLM

def sparsevlm_raters(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters (`LlamaDynamicvitModel.forward`, v1.5): of the text tokens after the
    image, those whose softmax relation to the image's LLM input embeddings, averaged over the
    image tokens, is above the mean. image `[V, D]`, text `[T, D]`; returns a `[T]` bool mask."""
    m = (image @ text.T).softmax(dim=1).mean(dim=0)
    return m > m.mean()


def rater_attention(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Head-mean attention probabilities of some query rows, as SparseVLM's scoring attention
    computes them: `softmax(q kᵀ * (1 / sqrt(d)) + bias)` in the model's dtype (no float32
    upcast), bias -inf where a key is not `allowed`. q `[H, R, d]` (post-RoPE), k `[H, L, d]`,
    allowed `[R, L]` bool; returns `[R, L]`."""
    w = torch.matmul(q, k.transpose(1, 2)) * (1 / math.sqrt(q.shape[-1]))
    w = w.masked_fill(~allowed, float("-inf"))
    return torch.softmax(w, dim=-1).mean(dim=0)


def merge_clusters(x: torch.Tensor, assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """The merged tokens of SparseVLM's `cluster_and_merge`: per cluster the sum of its members'
    rows, each times `1 / (members + 1e-6)`, added in row order. x `[N, C]`, assign `[N]`."""
    weight = x.new_zeros(clusters, 1).index_add_(0, assign, x.new_ones(len(x), 1)) + 1e-6
    return x.new_zeros(clusters, x.shape[1]).index_add_(0, assign, x * (1 / weight[assign]))


def dpc_knn(x: torch.Tensor, clusters: int, margins: dict | None = None) -> torch.Tensor:
    """SparseVLM's DPC-kNN clustering (`utils.cluster_and_merge`) of the rows of x `[N, C]` into
    `clusters` clusters; returns each row's cluster `[N]` (cluster j: the j-th centre in the
    order of its centre score). As its code: distances / sqrt(C); density = exp(-mean squared
    distance to the `clusters` nearest rows, itself included) plus `torch.rand * 1e-6` drawn from
    the global RNG (its tie-breaker); each row's distance to the nearest denser row (the largest
    distance for the densest); centres = the largest distance * density; every row joins its
    nearest centre. `margins` (a dict) receives the smallest noise-free density gap between two
    rows (`density`; mutual nearest neighbours tie exactly when `clusters` is 2), a bound on what
    the noise can change in the centres and their order (`centre`: > 0, it cannot change them;
    below, see the code) and the smallest gap between a row's nearest and second-nearest centre
    (`assign`), where they exist."""
    N, C = x.shape
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / (C ** 0.5)
    near = torch.topk(dist, k=clusters, dim=-1, largest=False).values
    clean = (-(near ** 2).mean(dim=-1)).exp()
    density = clean + torch.rand(clean.shape, device=clean.device, dtype=clean.dtype) * 1e-6
    denser = (density[None, :] > density[:, None]).type(x.dtype)
    parent = (dist * denser + dist.max() * (1 - denser)).min(dim=-1).values
    score = parent * density
    centres = torch.topk(score, k=clusters).indices
    assign = dist[centres].argmin(dim=0)
    assign[centres] = torch.arange(clusters, device=x.device)
    if margins is not None:
        if N > 1:
            gaps = (clean[:, None] - clean[None, :]).abs()
            margins["density"] = float(gaps[~torch.eye(N, dtype=torch.bool,
                                                       device=x.device)].min())
        # what the noise (< 1e-6 per density) could move: each row's score within [low, high]
        # (its nearest row that is denser whatever the noise / that may be denser); the centres
        # and their order are the noise's only if no low of the k-th centre is under a high
        # ranked after it. "centre" = the smallest such gap (> 0: the noise cannot decide)
        eps = 1e-6
        diff = clean[None, :] - clean[:, None]          # [i, j]: d_j - d_i
        big = dist.max()
        sure = torch.where(diff >= eps, dist, big).min(dim=-1).values
        maybe = torch.where((diff > -eps) & ~torch.eye(N, dtype=torch.bool, device=x.device),
                            dist, big).min(dim=-1).values
        low, high = maybe * clean, sure * (clean + eps)
        order = score.argsort(descending=True)
        m = min(clusters, N - 1)
        after = high[order].flip(0).cummax(0).values.flip(0)   # [j]: max of high from rank j on
        if m > 0 and clusters > 1:   # one cluster takes every row, whichever is its centre
            margins["centre"] = float((low[order[:m]] - after[1:m + 1]).min())
        if clusters > 1:
            other = torch.ones(N, dtype=torch.bool, device=x.device)
            other[centres] = False
            if other.any():
                two = dist[centres][:, other].topk(2, dim=0, largest=False).values
                margins["assign"] = float((two[1] - two[0]).min())
    return assign
