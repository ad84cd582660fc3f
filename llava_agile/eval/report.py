"""`report DIR...`: models x methods x budgets x benchmarks as markdown + CSV, each score also as
% of the model's full-token run (method `none`, 576 tokens) like the paper's "Avg %" column
(with MME both as P+C - the paper's scale - and as P alone), and a PNG of score vs kept tokens."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .answers import write_output
from .layout import FULL_KEEP, FULL_METHOD, iter_results

# (benchmark, results key, column, counts in Avg %, higher is better); paper column order first
COLUMNS = [
    ("vqav2", "accuracy", "VQAv2", True, True), ("gqa", "accuracy", "GQA", True, True),
    ("vizwiz", "accuracy", "VizWiz", True, True), ("sqa", "img_accuracy", "SQA-IMG", True, True),
    ("textvqa", "accuracy", "TextVQA", True, True), ("pope", "f1", "POPE", True, True),
    ("mme", "total", "MME", True, True), ("mme", "perception", "MME-P", True, True),
    ("mmbench", "circular_accuracy", "MMB", True, True),
    ("mmbench_cn", "circular_accuracy", "MMB-CN", True, True),
    ("seed", "img_accuracy", "SEED-I", True, True), ("mmvet", "score", "MM-Vet", True, True),
    ("chair", "chair_s", "CHAIR_S", False, False), ("chair", "chair_i", "CHAIR_I", False, False),
    ("chair", "recall", "CHAIR-R", False, True),
]
AVG = {"Avg% (MME P+C)": "MME-P", "Avg% (MME P)": "MME"}  # avg column -> MME column it leaves out


def collect(dirs) -> dict[tuple[str, str, int], dict[str, float]]:
    """{(model, method, keep): {column: value}} from every results.json under `dirs`."""
    runs: dict[tuple, dict] = {}
    origin: dict[tuple, Path] = {}
    for d in dirs:
        for key, path in iter_results(d):
            path = path.resolve()
            k = (key.model, key.method, key.keep, key.bench)
            if origin.get(k) == path:
                continue  # the same file reached through overlapping directories
            if k in origin:
                raise ValueError(f"two results for {'/'.join(map(str, k))}: {origin[k]} and {path}")
            origin[k] = path
            data = json.loads(path.read_text(encoding="utf-8"))
            row = runs.setdefault((key.model, key.method, key.keep), {})
            for bench, field, col, _, _ in COLUMNS:
                if bench == key.bench and isinstance(data.get(field), (int, float)):
                    row[col] = float(data[field])
    if not runs:
        raise ValueError(f"no <model>/<method>/k<K>/<bench>/results.json under {', '.join(map(str, dirs))}")
    return runs


def baselines(runs) -> dict[str, tuple]:
    """model -> key of its full-token run (method none; 576 tokens if present, else the most)."""
    out = {}
    for model, method, keep in runs:
        if method == FULL_METHOD:
            cur = out.get(model)
            if cur is None or (keep == FULL_KEEP) or (cur[2] != FULL_KEEP and keep > cur[2]):
                out[model] = (model, method, keep)
    return out


def relative(runs) -> dict[tuple, dict[str, float]]:
    """% of full for every column counted in the average, plus the two Avg % columns."""
    base, rel = baselines(runs), {}
    avg_cols = [c for _, _, c, avg, _ in COLUMNS if avg]
    for key, row in runs.items():
        full = runs.get(base.get(key[0]), {})
        per = {c: 100.0 * row[c] / full[c] for c in avg_cols if c in row and full.get(c)}
        r = dict(per)
        for name, left_out in AVG.items():
            vals = [v for c, v in per.items() if c != left_out]
            if vals:
                r[name] = sum(vals) / len(vals)
        rel[key] = r
    return rel


def _order(runs):
    return sorted(runs, key=lambda k: (k[0], k[1] != FULL_METHOD, k[1], -k[2]))


TOKENS_NOTE = ("Tokens = `keep`: image tokens per image that the LLM layers after the pruning "
               "point see (every layer for methods that prune before the LLM; FastV, PDrop and "
               "DART prune inside it: see the README's budgets table for per-layer averages)")


def markdown(runs, rel) -> str:
    cols = [c for _, _, c, _, _ in COLUMNS if any(c in r for r in runs.values())]
    out = []
    for model in sorted({k[0] for k in runs}):
        keys = [k for k in _order(runs) if k[0] == model]
        base = baselines(runs).get(model)
        note = (f"% of full = score / score of `{base[1]}` at {base[2]} tokens" if base
                else "no full-token run (method none) found, so no % of full")
        out += [f"## {model}", "", note, "", TOKENS_NOTE, "",
                "| Method | Tokens | " + " | ".join(cols) + " | " + " | ".join(AVG) + " |",
                "|---|---:|" + "---:|" * (len(cols) + len(AVG))]
        for k in keys:
            cells = [f"{runs[k][c]:.2f}" if c in runs[k] else "" for c in cols]
            cells += [f"{rel[k][a]:.1f}" if a in rel[k] else "" for a in AVG]
            out.append(f"| {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
        pcols = [c for c in cols if any(c in rel[k] for k in keys)]
        if pcols:
            out += ["", f"% of full ({model}):", "",
                    "| Method | Tokens | " + " | ".join(pcols) + " |", "|---|---:|" + "---:|" * len(pcols)]
            for k in keys:
                out.append(f"| {k[1]} | {k[2]} | " +
                           " | ".join(f"{rel[k][c]:.1f}" if c in rel[k] else "" for c in pcols) + " |")
        out.append("")
    return "\n".join(out)


def csv_text(runs, rel) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "method", "keep", "benchmark", "metric", "column", "value", "pct_of_full"])
    for k in _order(runs):
        for bench, field, col, _, _ in COLUMNS:
            if col in runs[k]:
                p = rel[k].get(col)
                w.writerow([k[0], k[1], k[2], bench, field, col, f"{runs[k][col]:.6f}",
                            "" if p is None else f"{p:.6f}"])
        for a in AVG:
            if a in rel[k]:
                w.writerow([k[0], k[1], k[2], "", "avg_pct_of_full", a, "", f"{rel[k][a]:.6f}"])
    return buf.getvalue()


def plot_png(runs, rel) -> bytes:
    """Score vs kept tokens, one line per method, one panel per model x column (+ Avg %)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    models = sorted({k[0] for k in runs})
    cols = [c for _, _, c, _, _ in COLUMNS if any(c in r for r in runs.values())]
    if any(rel.values()):
        cols.append(next(iter(AVG)))
    fig, axes = plt.subplots(len(models), len(cols), squeeze=False,
                             figsize=(3.2 * len(cols), 2.8 * len(models)))
    for i, model in enumerate(models):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            src = rel if col in AVG else runs
            methods = sorted({k[1] for k in runs if k[0] == model})
            for m in methods:
                pts = sorted((k[2], src[k][col]) for k in runs if k[0] == model and k[1] == m and col in src[k])
                if not pts:
                    continue
                if m == FULL_METHOD:
                    ax.axhline(pts[-1][1], color="k", ls="--", lw=1, label=f"{m} ({pts[-1][0]})")
                else:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax.set_xscale("log", base=2)
            ticks = sorted({k[2] for k in runs if k[0] == model})
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_major_formatter(FixedFormatter([str(t) for t in ticks]))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{model}: {col}" if len(models) > 1 else col, fontsize=9)
            ax.set_xlabel("kept visual tokens", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def report(dirs, out: str | Path | None = None, overwrite: bool = False, plot: bool = True) -> dict:
    """Write report.md, report.csv (and report.png) to `out` (default: the first dir)."""
    runs = collect(dirs)
    rel = relative(runs)
    out = Path(out or dirs[0])
    md = markdown(runs, rel)
    files = {"markdown": write_output(out / "report.md", md, overwrite),
             "csv": write_output(out / "report.csv", csv_text(runs, rel), overwrite)}
    if plot:
        files["png"] = write_output(out / "report.png", plot_png(runs, rel), True)
    return {"markdown_text": md, **{k: str(v) for k, v in files.items()}}
