"""GQA testdev-balanced accuracy, as LLaVA's convert_gqa_for_eval.py + GQA's eval.py compute it."""
from __future__ import annotations

from .answers import question_id
from .common import check_answers, load_json, pct


def normalize(text: str) -> str:
    """LLaVA's conversion: strip trailing periods, lower-case."""
    return text.rstrip(".").lower()


def score(answers: list[dict], annotations: str, questions: list[dict] | None = None) -> dict:
    """`annotations`: GQA's `testdev_balanced_questions.json` ({qid: {"answer": ...}}).
    Scores the answered balanced questions; `missing` counts unanswered ones (of `questions`
    when given, else of the ground truth)."""
    check_answers(answers, "gqa")
    gt = load_json(annotations, "gqa", "GQA questions file (testdev_balanced_questions.json)")
    if not isinstance(gt, dict) or not all(isinstance(v, dict) and "answer" in v for v in gt.values()):
        raise ValueError(f"gqa: {annotations} is not GQA's {{question_id: {{\"answer\": ...}}}} file")
    preds = {str(question_id(r)): normalize(r["text"]) for r in answers}
    unknown = [q for q in preds if q not in gt]
    if unknown:
        raise ValueError(f"gqa: {len(unknown)} answered ids are not in {annotations} "
                         f"(first: {unknown[:5]}); wrong split?")
    scored = [q for q in preds if gt[q].get("isBalanced", True)]
    if not scored:
        raise ValueError("gqa: none of the answered questions is a balanced question")
    correct = sum(preds[q] == gt[q]["answer"] for q in scored)
    universe = ({str(question_id(q)) for q in questions} if questions is not None
                else {q for q, v in gt.items() if v.get("isBalanced", True)})
    return {"benchmark": "gqa", "accuracy": pct(correct, len(scored)), "correct": correct,
            "n": len(scored), "missing": len(universe - set(preds))}
