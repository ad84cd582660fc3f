"""SEED-Bench: image accuracy (exact letter match) as LLaVA's convert_seed_for_submission.py,
and its upload file (one {"question_id", "prediction"} per line). Unanswered questions count
as wrong, as in LLaVA."""
from __future__ import annotations

import json

from .answers import question_id
from .common import check_answers, load_json, pct


def _ground_truth(annotations: str) -> list[dict]:
    data = load_json(annotations, "seed", "SEED-Bench annotation file (SEED-Bench.json)")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"seed: {annotations} has no 'questions' list (expected SEED-Bench.json)")
    return data["questions"]


def score(answers: list[dict], annotations: str, questions: list[dict] | None = None) -> dict:
    """Over the ground-truth questions (those in `questions` when given)."""
    check_answers(answers, "seed")
    gt = _ground_truth(annotations)
    if questions is not None:
        keep = {str(question_id(q)) for q in questions}
        gt = [q for q in gt if str(q["question_id"]) in keep]
    preds = {str(question_id(r)): r["text"] for r in answers}
    known = {str(q["question_id"]) for q in gt}
    unknown = [q for q in preds if q not in known]
    if unknown:
        raise ValueError(f"seed: {len(unknown)} answered ids are not SEED-Bench questions (first: {unknown[:5]})")
    stats: dict[str, list[int]] = {}
    for q in gt:
        ok = preds.get(str(q["question_id"])) == q["answer"]
        for key in ("all", q.get("data_type", "image")):
            s = stats.setdefault(key, [0, 0])
            s[0] += ok
            s[1] += 1
    out = {"benchmark": "seed"}
    for key, name in (("image", "img_accuracy"), ("video", "video_accuracy"), ("all", "accuracy")):
        if key in stats:
            out[name] = pct(*stats[key])
    out.update(n=len(gt), n_img=stats.get("image", [0, 0])[1], missing=len(known - set(preds)))
    return out


def upload(answers: list[dict], annotations: str) -> str:
    """JSONL upload in ground-truth order (answered questions only)."""
    preds = {str(question_id(r)): r["text"] for r in answers}
    return "".join(json.dumps({"question_id": q["question_id"], "prediction": preds[str(q["question_id"])]}) + "\n"
                   for q in _ground_truth(annotations) if str(q["question_id"]) in preds)
