"""TextVQA val accuracy with the installed LLaVA's m4c_evaluator (as llava.eval.eval_textvqa)."""
from __future__ import annotations

import re

from .common import check_answers, llava_m4c, load_json

_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_of_prompt(prompt: str) -> str:
    """The question inside an answer's prompt, lower-cased, in the three prompt styles LLaVA's
    eval_textvqa accepts (OCR-prefixed, the 3-line 'Reference OCR token' prompt, 2-line)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = _OCR_QUESTION.search(prompt)
        if m is None:
            raise ValueError(f"textvqa: no 'Question: ... Short answer:' in prompt {prompt[:80]!r}")
        q = m.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        q = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        q = lines[0]
    else:
        raise ValueError(f"textvqa: unrecognised prompt layout ({len(lines)} lines): {prompt[:80]!r}")
    return q.lower()


def score(answers: list[dict], annotations: str, questions: list[dict] | None = None) -> dict:
    """`annotations`: `TextVQA_0.5.1_val.json`; answers are matched by (image id, question)."""
    check_answers(answers, "textvqa")
    data = load_json(annotations, "textvqa", "TextVQA annotation file (TextVQA_0.5.1_val.json)")
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"textvqa: {annotations} has no 'data' list (expected TextVQA_0.5.1_val.json)")
    gt = {(a["image_id"], a["question"].lower()): a["answers"] for a in data["data"]}
    pred_list = []
    for rec in answers:
        if not isinstance(rec.get("prompt"), str):
            raise ValueError(f"textvqa: answer {rec.get('question_id')!r} has no prompt")
        key = (rec["question_id"], question_of_prompt(rec["prompt"]))
        if key not in gt:
            raise ValueError(f"textvqa: no annotation for image {key[0]!r} question {key[1]!r}")
        pred_list.append({"pred_answer": rec["text"], "gt_answers": gt[key]})
    acc = llava_m4c().TextVQAAccuracyEvaluator().eval_pred_list(pred_list)
    n_q = len(questions) if questions is not None else len(gt)
    return {"benchmark": "textvqa", "accuracy": round(100.0 * acc, 6), "n": len(pred_list),
            "missing": max(n_q - len(pred_list), 0)}
