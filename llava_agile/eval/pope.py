"""POPE: accuracy, precision, recall, F1 and yes-ratio per category, as LLaVA's eval_pope.py.

LLaVA pairs the i-th answer of a category with the i-th line of `coco_pope_<category>.json`;
here the i-th *question* of the category (question-file order) is paired with the i-th label,
which is the same for a complete run and stays aligned when answers are missing or reordered.

The label files must be the version LLaVA's `llava_pope_test.jsonl` was made from: AoiDragon/POPE
commit e3e39262 (linked from LLaVA's docs/Evaluation.md). Later POPE commits fixed a typo
("imange") in some questions (accepted here: such lines are matched by image and object and
counted) and regenerated `coco_pope_random.json` (3000 questions for LLaVA's 2910: refused).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .answers import QuestionIndex, question_id
from .benchmarks import require
from .common import check_answers, pct

CATEGORIES = ("adversarial", "popular", "random")
POPE_COMMIT = "e3e39262c85a6a83f26cf5094022a782cb0df58d"
_FIX = (f"use the label files LLaVA's questions were made from: output/coco/coco_pope_*.json of "
        f"AoiDragon/POPE commit {POPE_COMMIT[:8]} (https://github.com/AoiDragon/POPE/tree/{POPE_COMMIT}"
        f"/output/coco, as LLaVA's docs/Evaluation.md says); POPE's later commits regenerated "
        f"coco_pope_random.json (3000 questions, LLaVA's file has 2910)")
_OBJECT = re.compile(r"^Is there an? (.+?) in the \w+\?")


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


def _object(text: str) -> str | None:
    """'Is there an umbrella in the imange?' -> 'umbrella' (None for another question form)."""
    m = _OBJECT.match(text)
    return m.group(1) if m else None


def align(cat: str, questions: list[dict], labels: list[dict]) -> int:
    """Check that label line j belongs to the category's question j: same text (the question may
    add LLaVA's answer instruction) and image, or, where only the wording differs (POPE's later
    typo fix), the same image and object. Returns how many lines matched the second way."""
    if len(labels) != len(questions):
        raise ValueError(f"pope: {cat}: {len(questions)} questions but {len(labels)} labels in "
                         f"coco_pope_{cat}.json; they must match one to one: {_FIX}")
    retyped = 0
    for j, (q, lab) in enumerate(zip(questions, labels)):
        qtext, ltext = q.get("text", ""), lab.get("text")
        if not isinstance(ltext, str):
            continue
        same_image = "image" not in lab or "image" not in q or lab["image"] == q["image"]
        if same_image and qtext.startswith(ltext):
            continue
        if same_image and _object(ltext) is not None and _object(ltext) == _object(qtext):
            retyped += 1
            continue
        raise ValueError(f"pope: {cat}: question {j + 1} ({q.get('image')}) {qtext[:60]!r} does not "
                         f"match label line {j + 1} ({lab.get('image')}) {ltext[:60]!r}; keep the "
                         f"question order, and {_FIX}")
    return retyped


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
        retyped = align(cat, [questions[p] for p in positions], labels)
        preds, gts = [], []
        for j, p in enumerate(positions):
            if p in by_pos:
                preds.append(yes_no(by_pos[p]["text"]))
                gts.append(labels[j]["label"])
        out[cat] = dict(metrics(preds, gts), matched_by_image_object=retyped)
    present = [c for c in CATEGORIES if c in out]
    return {"benchmark": "pope",
            "f1": round(sum(out[c]["f1"] for c in present) / len(present), 6),
            "accuracy": round(sum(out[c]["accuracy"] for c in present) / len(present), 6),
            "categories": {c: out[c] for c in present}, "n": len(by_pos), "missing": missing,
            "matched_by_image_object": sum(out[c]["matched_by_image_object"] for c in present)}
