"""Inputs shared by `record_selection.py` (the official code) and `test_selection_official.py`.

Every input is drawn with numpy's Generator (the same numbers on every CPU) in float64, so the
official functions and ours see identical tensors.
"""
from __future__ import annotations

import numpy as np
import torch


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


# HoloV: (seed, N, D, K, chunks, how the attention is drawn)
HOLOV = [
    (0, 576, 64, 64, 16, "normal"), (1, 576, 64, 128, 16, "normal"),
    (2, 576, 64, 192, 16, "normal"), (3, 576, 64, 64, 16, "peaked"),
    (4, 576, 48, 192, 16, "peaked"), (5, 100, 32, 30, 16, "normal"),
    (6, 10, 8, 5, 16, "normal"), (7, 576, 64, 7, 16, "normal"), (8, 576, 64, 128, 8, "normal"),
]


def holov_inputs(seed: int, n: int, d: int, attention: str):
    """`x [N, D]`, `a [N]` (float64); "peaked": the first 72 tokens hold most of the attention,
    so the first chunks' budgets exceed their size (the official zero rows)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    z = rng.standard_normal(n) * 1.5
    if attention == "peaked":
        z[:72] += 6.0
    return torch.from_numpy(x), torch.from_numpy(softmax(z))


# CDPruner: (seed, B, N, D, E, M, K); image 1 of a batch is shifted toward the text (it holds
# the lowest relevance), so the official min-max over the whole batch differs from per image
# (D above K: the official greedy produces NaN once K exceeds the kernel's rank)
CDPRUNER = [(0, 1, 576, 96, 32, 1, 64), (1, 1, 576, 256, 32, 3, 128),
            (2, 2, 576, 256, 32, 1, 96), (3, 2, 300, 48, 16, 2, 32), (4, 1, 100, 128, 16, 1, 30)]


def cdpruner_inputs(seed: int, b: int, n: int, d: int, e: int, m: int):
    """Projected tokens `[B, N, D]`, CLIP patch embeddings `[B, N, E]`, text rows `[M, E]`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n, d))
    text = rng.standard_normal((m, e))
    image = rng.standard_normal((b, n, e))
    image[1:] += 0.5 * text.mean(0)  # later images: more similar to the text (the batch minimum)
    return torch.from_numpy(x), torch.from_numpy(image), torch.from_numpy(text)


# TRIM: (seed, B, N, D, the official `mm_vision_token_reduce_func`)
TRIM = [(0, 1, 576, 32, "TRIM:-1"), (1, 1, 576, 32, "TRIM:0.11"), (2, 3, 576, 32, "TRIM:-1"),
        (3, 1, 100, 16, "TRIM:0.3"), (4, 2, 576, 24, "TRIM:0.22")]


def trim_inputs(seed: int, b: int, n: int, d: int):
    """CLIP features `[B, N, D]` (also their joint-space embeddings: the official projection is
    replaced by the identity) and the text embedding `[1, D]`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n, d))
    return torch.from_numpy(x), torch.from_numpy(rng.standard_normal((1, d)) * 0.3)


# PruMerge+: (seed, D, how many tokens the [CLS] query leans toward, its strength, the query's
# scale); N = 576 (the official hard-codes 24 layers and a 24 x 24 grid). Outliers: 116 (every
# token sampled), 72, 46, 13, 20
PRUMERGE = [(0, 32, 12, 3.0, 1.0), (1, 32, 40, 2.0, 1.0), (3, 32, 80, 1.5, 1.0),
            (1, 32, 4, 0.5, 0.2), (6, 32, 4, 1.0, 0.2)]


def prumerge_inputs(seed: int, d: int, lean: int, strength: float, scale: float):
    """The select layer's hidden states `[1, 577, D]` ([CLS] first) and the next layer's q / k
    outputs `[1, 577, D]`: the [CLS] query leans toward `lean` random patches' keys."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((1, 577, d))
    k = rng.standard_normal((1, 577, d))
    q = rng.standard_normal((1, 577, d))
    picked = rng.choice(np.arange(1, 577), lean, replace=False)
    q[0, 0] = scale * (strength * k[0, picked].mean(0) * np.sqrt(d) + 0.3 * q[0, 0])
    return tuple(torch.from_numpy(t) for t in (hidden, q, k))


def cls_row(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """PruMerge+'s [CLS] row: one head over the full width, the [CLS] column dropped."""
    return torch.softmax(q[0, 0] @ k[0].T * q.shape[-1] ** -0.5, dim=-1)[1:]


def fingerprint(rows: torch.Tensor) -> torch.Tensor:
    """`[L, D]` merged rows -> `[L, 2]`: their projections on two fixed random directions (equal
    rows, equal fingerprints; a different merge moves them far beyond round-off)."""
    d = rows.shape[1]
    directions = np.random.default_rng(1234).standard_normal((d, 2))
    return rows @ torch.from_numpy(directions)
