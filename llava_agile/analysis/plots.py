"""Figures (matplotlib, Agg): kept patches on the patch grid; erank-vs-entropy scatter;
retained-erank bars per method."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

DIM = 0.28          # brightness of pruned patches
EDGE = (1.0, 0.85, 0.0)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def keep_mask(indices, n_tokens: int) -> np.ndarray:
    """`[side, side]` bool grid of the kept patches (raster order, like LLaVA's tokens)."""
    side = int(round(math.sqrt(n_tokens)))
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} tokens do not form a square patch grid")
    mask = np.zeros(n_tokens, dtype=bool)
    idx = np.asarray(indices if indices is not None else [], dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n_tokens):
        raise ValueError(f"kept index out of range 0..{n_tokens - 1}")
    mask[idx] = True
    return mask.reshape(side, side)


def highlight(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`image` (HxWx3 uint8) with the patches outside `mask` dimmed to DIM brightness."""
    h, w = image.shape[:2]
    side = mask.shape[0]
    rows = np.minimum(np.arange(h) * side // h, side - 1)
    cols = np.minimum(np.arange(w) * side // w, side - 1)
    full = mask[rows][:, cols]
    scale = np.where(full, 1.0, DIM)[..., None]
    return (image.astype(np.float32) * scale).round().astype(np.uint8)


def _fmt(run: dict, erank: float, entropy: float) -> str:
    lines = [f"{run['method']}  K={run['keep']} (kept {run['kept']})",
             f"erank {erank:.1f} -> kept {run['retained_erank']:.1f}, H {entropy:.2f}"]
    if run.get("tau_range"):
        lo, hi = run["tau_range"]
        lines.append(f"tau {lo:.3f}..{hi:.3f}")
    elif run.get("ratio") is not None:
        lines.append(f"attention ratio {run['ratio']:.2f}")
    return "\n".join(lines)


def overlay_figure(image: np.ndarray, record: dict, path: str | Path, title: str | None = None,
                   runs: list | None = None) -> Path:
    """One PNG: the model's input image, then per run the kept patches highlighted on the grid.
    Merging methods (bat) show the patches they keep by attention (the rest are merged)."""
    plt = _plt()
    runs = record["runs"] if runs is None else runs
    n = 1 + len(runs)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.9 * rows), squeeze=False,
                             layout="constrained")
    side = int(round(math.sqrt(record["n_tokens"])))
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title((f"{title}\n" if title else "") +
                           f"input ({side}x{side} = {record['n_tokens']} patches)\n"
                           f"erank {record['erank']:.1f}, entropy {record['entropy']:.3f}",
                           fontsize=8.5)
    h, w = image.shape[:2]
    for ax, run in zip(list(axes.flat)[1:], runs):
        idx = run.get("indices")
        if idx is not None and idx and isinstance(idx[0], list):
            idx = idx[0]          # LLaVA-NeXT: the base crop
        merged = idx is None      # bat: the patches kept by attention; the rest are merged
        if merged:
            idx = run.get("attention_indices") or []
        mask = keep_mask(idx, record["n_tokens"])
        ax.imshow(highlight(image, mask))
        ys, xs = np.nonzero(mask)
        ph, pw = h / side, w / side
        for y, x in zip(ys, xs):
            ax.add_patch(plt.Rectangle((x * pw - 0.5, y * ph - 0.5), pw, ph, fill=False,
                                       lw=0.5, ec=EDGE))
        if merged:
            ax.text(w / 2, h - 2, f"{len(idx)} kept by attention,\nthe rest merged", ha="center",
                    va="bottom", color="white", fontsize=7)
        ax.set_title(_fmt(run, record["erank"], record["entropy"]), fontsize=8.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def scatter(records: list[dict], path: str | Path) -> Path:
    """Full-image erank vs attention entropy, one colour per category."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    cats = list(dict.fromkeys(r["category"] for r in records))
    for i, cat in enumerate(cats):
        rs = [r for r in records if r["category"] == cat]
        ax.scatter([r["entropy"] for r in rs], [r["erank"] for r in rs], s=22, label=cat,
                   color=plt.get_cmap("tab10")(i % 10))
    ax.set_xlabel("[CLS]-attention entropy (nats)")
    ax.set_ylabel(f"erank of all tokens ({records[0].get('feature_space', 'projected')})")
    ax.set_title("Image complexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def retained_bars(table1_rows: list[dict], path: str | Path) -> Path:
    """Mean erank of the kept tokens per method (all images), one bar group per K."""
    plt = _plt()
    rows = [r for r in table1_rows if r["category"] == "all"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keeps = list(dict.fromkeys(r["keep"] for r in rows))
    get = {(r["method"], r["keep"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(methods) * max(1, len(keeps)) + 1), 4))
    width = 0.8 / len(keeps)
    x = np.arange(len(methods))
    for j, k in enumerate(keeps):
        vals = [get[m, k]["retained_erank_mean"] if (m, k) in get else 0 for m in methods]
        errs = [get[m, k]["retained_erank_std"] if (m, k) in get else 0 for m in methods]
        ax.bar(x + (j - (len(keeps) - 1) / 2) * width, vals, width, yerr=errs, capsize=2,
               label=f"K={k}")
    ax.set_xticks(x, methods, rotation=30, ha="right")
    ax.set_ylabel("erank of the kept tokens")
    ax.set_title("Diversity of the kept tokens per method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
