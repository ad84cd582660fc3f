"""MMBench / MMBench-CN dev: circular accuracy from the TSV's answers, and the upload .xlsx
LLaVA's convert_mmbench_for_submission.py writes (for dev and test).

Circular evaluation: a question counts only if every presentation of it is answered right -
the rotated copies in the TSV (index + k * 1e6) and the rounds of --all-rounds (round r shows
the options rotated left by r, letters staying A, B, ...). Answers are letters; they are
parsed without a language model (bare letter, 'X.'/'X)'/'X:', 'The answer is X', or the option
text itself), anything else is wrong."""
from __future__ import annotations

import re

from .answers import question_id, read_tsv
from .benchmarks import require
from .common import check_answers, pct

LETTERS = ("A", "B", "C", "D")
# pandas.read_table's default missing-value strings (what LLaVA's loader treats as no option)
NA_STRINGS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
              "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
DROP_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
CIRCULAR_STRIDE = 1_000_000
_LEAD = re.compile(r"^\(?([A-D])(?:[.:)]|$)")
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-D])\b", re.IGNORECASE)


def is_none(v) -> bool:
    return v is None or (isinstance(v, str) and (v in NA_STRINGS or v.lower() in ("nan", "none")))


def options(row: dict) -> list[str]:
    out = []
    for c in LETTERS:
        if c not in row or is_none(row[c]):
            break
        out.append(row[c])
    return out


def parse_letter(text: str, opts: list[str]) -> str | None:
    t = text.strip()
    letters = LETTERS[:len(opts)]
    if t in letters:
        return t
    for rx in (_LEAD, _ANSWER_IS):
        m = rx.search(t)
        if m and m.group(1) in letters:
            return m.group(1)
    low = t.rstrip(".").strip().lower()
    hits = [letters[i] for i, o in enumerate(opts) if str(o).strip().rstrip(".").lower() == low]
    return hits[0] if len(hits) == 1 else None


def score(answers: list[dict], annotations: str, bench: str = "mmbench") -> dict:
    """`annotations`: the MMBench TSV (dev: with an `answer` column)."""
    check_answers(answers, bench)
    rows = {int(float(r["index"])): r for r in read_tsv(require(annotations, bench, "MMBench TSV"))}
    if not any(not is_none(r.get("answer")) for r in rows.values()):
        raise ValueError(f"{bench}: {annotations} has no answers (a test split); only the upload "
                         f"file can be written")
    groups: dict[int, list[bool]] = {}
    first_round: dict[int, bool] = {}
    for rec in answers:
        idx = int(question_id(rec))
        if idx not in rows:
            raise ValueError(f"{bench}: answer index {idx} is not in {annotations}")
        row, rnd = rows[idx], int(rec.get("round_id", 0) or 0)
        opts = options(row)
        if is_none(row.get("answer")) or row["answer"] not in LETTERS[:len(opts)]:
            raise ValueError(f"{bench}: row {idx} has no valid answer letter ({row.get('answer')!r})")
        letter = parse_letter(rec["text"], opts)
        ok = letter is not None and (LETTERS.index(letter) + rnd) % len(opts) == LETTERS.index(row["answer"])
        groups.setdefault(idx % CIRCULAR_STRIDE, []).append(ok)
        if rnd == 0 and idx < CIRCULAR_STRIDE:
            first_round[idx] = ok
    answered = {int(question_id(r)) for r in answers}
    incomplete = {i % CIRCULAR_STRIDE for i in rows if i not in answered}
    complete = {g: v for g, v in groups.items() if g not in incomplete}
    if not complete:
        raise ValueError(f"{bench}: no question has answers for all its circular copies")
    cats: dict[str, list[bool]] = {}
    for g, v in complete.items():
        row = rows.get(g) or next(r for i, r in rows.items() if i % CIRCULAR_STRIDE == g)
        cats.setdefault(row.get("category", ""), []).append(all(v))
    return {"benchmark": bench,
            "circular_accuracy": pct(sum(all(v) for v in complete.values()), len(complete)),
            "accuracy": pct(sum(first_round.values()), len(first_round)),
            "categories": {c: pct(sum(v), len(v)) for c, v in sorted(cats.items())},
            "n": len(complete), "n_records": len(answers),
            "missing": len({i % CIRCULAR_STRIDE for i in rows} - set(complete))}


def upload_rows(answers: list[dict], annotations: str, bench: str = "mmbench") -> tuple[list, list]:
    """LLaVA's upload table: the TSV read as LLaVA reads it (pandas.read_table, so a column is
    numeric only when all its cells are, e.g. index; option texts like '3' stay text), without
    hint/category/source/image/comment/l2-category and with `prediction` inserted as the 7th
    column (round 0 answer; empty when unanswered)."""
    import pandas as pd

    df = pd.read_table(require(annotations, bench, "MMBench TSV"))
    if "index" not in df.columns or "A" not in df.columns:
        raise ValueError(f"{annotations}: not an MMBench TSV (needs index, question, A, B, ... columns)")
    cols = [c for c in df.columns if c not in DROP_COLUMNS]
    header = cols[:6] + ["prediction"] + cols[6:]
    pred = {}
    for rec in answers:
        if int(rec.get("round_id", 0) or 0) == 0:
            pred[int(question_id(rec))] = rec["text"]
    table = df[cols].astype(object).where(df[cols].notna(), None)
    rows = []
    for idx, vals in zip(df["index"], table.values.tolist()):
        rows.append(vals[:6] + [pred.get(int(idx))] + vals[6:])
    return header, rows
