"""Upload files for the server-scored sets, as LLaVA's convert scripts write them:
VQAv2 test-dev (convert_vqav2_for_submission.py), VizWiz test (convert_vizwiz_for_submission.py),
MM-Vet (convert_mmvet_for_eval.py). Answers go through LLaVA's EvalAIAnswerProcessor."""
from __future__ import annotations

import json

from .answers import question_id, read_jsonl
from .benchmarks import require
from .common import check_answers, llava_m4c


def vqav2(answers: list[dict], annotations: str) -> tuple[str, dict]:
    """`annotations`: llava_vqav2_mscoco_test2015.jsonl (the full test split; unanswered
    questions get an empty answer, as in LLaVA)."""
    check_answers(answers, "vqav2")
    split = read_jsonl(require(annotations, "vqav2", "VQAv2 test split (llava_vqav2_mscoco_test2015.jsonl)"))
    preds = {str(question_id(r)): r["text"] for r in answers}
    known = {str(x["question_id"]) for x in split}
    unknown = [q for q in preds if q not in known]
    if unknown:
        raise ValueError(f"vqav2: {len(unknown)} answered ids are not in {annotations} (first: {unknown[:5]})")
    proc = llava_m4c().EvalAIAnswerProcessor()
    out = [{"question_id": x["question_id"],
            "answer": proc(preds[str(x["question_id"])]) if str(x["question_id"]) in preds else ""}
           for x in split]
    return json.dumps(out), {"n": len(preds), "split_questions": len(split)}


def vizwiz(answers: list[dict], annotations: str) -> tuple[str, dict]:
    """`annotations`: vizwiz/llava_test.jsonl; every question must be answered (as in LLaVA)."""
    check_answers(answers, "vizwiz")
    split = read_jsonl(require(annotations, "vizwiz", "VizWiz question file (llava_test.jsonl)"))
    preds = {str(question_id(r)): r["text"] for r in answers}
    missing = [x["question_id"] for x in split if str(x["question_id"]) not in preds]
    if missing:
        raise ValueError(f"vizwiz: {len(missing)} questions are unanswered (first: {missing[:5]}); "
                         f"the VizWiz server needs every test question")
    proc = llava_m4c().EvalAIAnswerProcessor()
    out = [{"image": x["image"], "answer": proc(preds[str(x["question_id"])])} for x in split]
    return json.dumps(out), {"n": len(out)}


def mmvet(answers: list[dict]) -> tuple[str, dict]:
    """{"v1_<question_id>": answer} for MM-Vet's GPT-4 grader."""
    check_answers(answers, "mmvet")
    out = {f"v1_{question_id(r)}": r["text"] for r in answers}
    return json.dumps(out, indent=2), {"n": len(out)}
