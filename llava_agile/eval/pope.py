"""POPE: accuracy, precision, recall, F1 and yes-ratio per category, as LLaVA's eval_pope.py.

LLaVA pairs the i-th answer of a category with the i-th line of `coco_pope_<category>.json`;
here the i-th *question* of the category (question-file order) is paired with the i-th label,
which is the same for a complete run and stays aligned when answers are missing or reordered.
"""
from __future__ import annotations

import json
from pathlib import Path

from .answers import QuestionIndex, question_id
from .benchmarks import require
from .common import check_answers, pct

CATEGORIES = ("adversarial", "popular", "random")


def yes_no(text: str) -> str:
    """LLaVA's rule: first sentence, commas dropped; 'No'/'no'/'not' as a word -> no, else yes."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def metrics(preds: list[str], labels: list[str]) -> dict:
    tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(preds, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(preds, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(preds, labels))
    precision, recall = (tp / (tp + fp) if tp + fp else 0.0), (tp / (tp + fn) if tp + fn else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": pct(tp + tn, len(preds)), "precision": round(100 * precision, 6),
            "recall": round(100 * recall, 6), "f1": round(100 * f1, 6),
            "yes_ratio": pct(preds.count("yes"), len(preds)), "n": len(preds),
            "TP": tp, "FP": fp, "TN": tn, "FN": fn}


def read_labels(path: Path) -> list[dict]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            rec = json.loads(line)
            label = str(rec.get("label", "")).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"pope: {path}:{i + 1}: label must be yes/no, got {rec.get('label')!r}")
            out.append(dict(rec, label=label))
    return out


def score(answers: list[dict], annotations: str, questions: list[dict] | None) -> dict:
    """`annotations`: the folder with `coco_pope_<category>.json`; `questions`: llava_pope_test."""
    check_answers(answers, "pope")
    if questions is None:
        raise ValueError("pope: --questions (llava_pope_test.jsonl) is required for the categories")
    adir = require(annotations, "pope", "POPE annotation folder (coco/)")
    index = QuestionIndex(questions)
    by_pos = {}
    for rec in answers:
        pos = index.position(rec)
        if pos is None:
            raise ValueError(f"pope: answer {question_id(rec)!r} is not in the question file")
        by_pos[pos] = rec
    cats = {}
    for pos, q in enumerate(questions):
        cats.setdefault(q.get("category"), []).append(pos)
    out, missing = {}, 0
    for cat, positions in cats.items():
        answered = [p for p in positions if p in by_pos]
        missing += len(positions) - len(answered)
        if not answered:
            continue
        if cat not in CATEGORIES:
            raise ValueError(f"pope: unknown category {cat!r}; valid: {', '.join(CATEGORIES)}")
        labels = read_labels(require(Path(adir) / f"coco_pope_{cat}.json", "pope", "POPE label file"))
        if len(labels) != len(positions):
            raise ValueError(f"pope: {cat}: {len(positions)} questions but {len(labels)} labels in "
                             f"coco_pope_{cat}.json; they must match one to one (LLaVA uses POPE commit "
                             f"e3e39262, whose coco_pope_random.json has 2910 lines; newer POPE has 3000)")
        preds, gts = [], []
        for j, p in enumerate(positions):
            lab, qtext = labels[j], questions[p].get("text", "")
            if isinstance(lab.get("text"), str) and not qtext.startswith(lab["text"]):
                raise ValueError(f"pope: {cat}: question {j + 1} {qtext[:60]!r} does not match label "
                                 f"line {j + 1} {lab['text'][:60]!r}; keep the question order")
            if p in by_pos:
                preds.append(yes_no(by_pos[p]["text"]))
                gts.append(lab["label"])
        out[cat] = metrics(preds, gts)
    present = [c for c in CATEGORIES if c in out]
    return {"benchmark": "pope",
            "f1": round(sum(out[c]["f1"] for c in present) / len(present), 6),
            "accuracy": round(sum(out[c]["accuracy"] for c in present) / len(present), 6),
            "categories": {c: out[c] for c in present}, "n": len(by_pos), "missing": missing}
