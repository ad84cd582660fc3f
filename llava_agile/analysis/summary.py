"""Summaries of per-image records: the paper's Table 1 (erank of the kept tokens per method) and
Table 4 (attention entropy and erank per image group), as markdown and CSV; calibration stats."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

ALL = "all"


def spread(values) -> dict:
    """mean, std (sample, 0 for one value), min, max, median, n."""
    v = sorted(float(x) for x in values)
    n = len(v)
    if n == 0:
        raise ValueError("no values to summarise")
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    median = v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
    return {"mean": mean, "std": std, "min": v[0], "max": v[-1], "median": median, "n": n}


def categories(records) -> list[str]:
    return list(dict.fromkeys(r["category"] for r in records))


def _groups(records):
    yield from ((c, [r for r in records if r["category"] == c]) for c in categories(records))
    yield ALL, list(records)


def table4(records) -> list[dict]:
    """Per category (then 'all'): n, entropy mean/std, erank mean/std."""
    rows = []
    for cat, recs in _groups(records):
        h, e = spread(r["entropy"] for r in recs), spread(r["erank"] for r in recs)
        rows.append({"category": cat, "n": len(recs), "entropy_mean": h["mean"],
                     "entropy_std": h["std"], "erank_mean": e["mean"], "erank_std": e["std"]})
    return rows


def runs_of(records):
    """(method, K) pairs in first-seen order."""
    return list(dict.fromkeys((run["method"], run["keep"]) for r in records for run in r["runs"]))


def table1(records) -> list[dict]:
    """Per method, K and category (then 'all'): n, retained erank mean/std, mean tokens kept."""
    rows = []
    for method, keep in runs_of(records):
        for cat, recs in _groups(records):
            runs = [run for r in recs for run in r["runs"]
                    if run["method"] == method and run["keep"] == keep]
            if not runs:
                continue
            s = spread(run["retained_erank"] for run in runs)
            rows.append({"method": method, "keep": keep, "category": cat, "n": len(runs),
                         "retained_erank_mean": s["mean"], "retained_erank_std": s["std"],
                         "kept_mean": sum(run["kept"] for run in runs) / len(runs)})
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pm(mean, std, digits=1):
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table1_markdown(rows: list[dict]) -> str:
    keeps = list(dict.fromkeys(r["keep"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cats = [c for c in dict.fromkeys(r["category"] for r in rows) if c != ALL]
    get = {(r["method"], r["keep"], r["category"]): r for r in rows}
    out = ["Mean erank of the kept tokens (± std over images), all images:\n\n",
           md_table(["method"] + [f"K={k}" for k in keeps],
                    [[m] + [_pm(get[m, k, ALL]["retained_erank_mean"],
                                get[m, k, ALL]["retained_erank_std"]) if (m, k, ALL) in get else "-"
                            for k in keeps] for m in methods])]
    if len(cats) > 1:
        for k in keeps:
            out.append(f"\nBy category, K={k}:\n\n")
            out.append(md_table(["method"] + cats,
                                [[m] + [f"{get[m, k, c]['retained_erank_mean']:.1f}"
                                        if (m, k, c) in get else "-" for c in cats]
                                 for m in methods]))
    return "".join(out)


def table4_markdown(rows: list[dict]) -> str:
    return md_table(["image group", "images", "attention entropy (nats)", "erank (full)"],
                    [[r["category"], r["n"], _pm(r["entropy_mean"], r["entropy_std"], 3),
                      _pm(r["erank_mean"], r["erank_std"])] for r in rows])


def write_summary(records: list[dict], out: str | Path, title: str = "Analysis") -> dict:
    """summary.md, table1_retained_erank.csv, table4_complexity.csv in `out`; returns paths."""
    out = Path(out)
    if not records:
        raise ValueError("no records to summarise")
    t4 = table4(records)
    t1 = table1(records)
    space = records[0].get("feature_space", "projected")
    paths = {"table4": out / "table4_complexity.csv", "summary": out / "summary.md"}
    paths["table4"].write_text(to_csv(t4))
    md = [f"# {title}\n\n{len(records)} images; erank measured on the {space} features "
          f"(centred), entropy of the [CLS] attention of LLaVA's select layer.\n",
          "\n## Image complexity per group (the paper's Table 4)\n\n", table4_markdown(t4)]
    if t1:
        paths["table1"] = out / "table1_retained_erank.csv"
        paths["table1"].write_text(to_csv(t1))
        md += ["\n## Erank of the kept tokens per method (the paper's Table 1)\n\n",
               table1_markdown(t1)]
    paths["summary"].write_text("".join(md))
    return paths
