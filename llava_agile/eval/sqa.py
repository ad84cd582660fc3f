"""ScienceQA (test split, CQM-A prompts): accuracy and img_accuracy as LLaVA's eval_science_qa.py.

Ground truth from `problems.json` + `pid_splits.json` (LLaVA's --base-dir), or from LLaVA's
`llava_test_CQM-A.json` (answer letter in the "gpt" turn, options counted from the prompt).
Unanswered problems count as failed, as in LLaVA. A problem is an image problem when it has an
image (LLaVA tests '<image>' in the answer's prompt, which holds exactly for those on all 4241
problems; an unanswered image problem, which LLaVA leaves out of IMG-accuracy, counts as failed
there too)."""
from __future__ import annotations

import re
from pathlib import Path

from .answers import question_id
from .benchmarks import require
from .common import check_answers, load_json, pct

OPTIONS = ["A", "B", "C", "D", "E"]
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_OPTION_LINE = re.compile(r"^([A-E])\. ")


def parse_answer(text: str) -> str:
    """A bare letter, 'X. ...', or exactly one 'The answer is X.'; else 'FAILED'."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def pred_index(answer: str, n_choices: int) -> int:
    return OPTIONS.index(answer) if answer in OPTIONS[:n_choices] else -1


def count_options(prompt: str) -> int:
    """Options listed at the end of a CQM-A prompt: the 'A. ', 'B. ', ... lines from the last
    'A. ' line on, consecutive letters. An option's text may span lines (a letter's closing,
    then the name on the next line): lines that start no option continue the one above."""
    marks = [m.group(1) for line in prompt.split("\n") if (m := _OPTION_LINE.match(line))]
    start = len(marks) - 1 - marks[::-1].index("A") if "A" in marks else None
    letters = marks[start:] if start is not None else []
    if not letters or letters != OPTIONS[:len(letters)]:
        raise ValueError(f"sqa: cannot count the options (lines 'A. ...', 'B. ...') at the end of "
                         f"{prompt[-120:]!r}")
    return len(letters)


def _from_problems(base: Path) -> dict[str, dict]:
    problems = load_json(base / "problems.json", "sqa", "ScienceQA problems.json")
    split = load_json(base / "pid_splits.json", "sqa", "ScienceQA pid_splits.json")
    if "test" not in split:
        raise ValueError(f"sqa: {base / 'pid_splits.json'} has no 'test' split")
    return {str(pid): {"n": len(problems[pid]["choices"]), "answer": int(problems[pid]["answer"]),
                       "image": bool(problems[pid].get("image"))} for pid in split["test"]}


def _from_llava_json(entries: list[dict], source) -> dict[str, dict]:
    gt = {}
    for e in entries:
        try:
            human, gpt = e["conversations"][0]["value"], e["conversations"][1]["value"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"sqa: {source}: entry {e.get('id')!r} lacks human/gpt turns") from None
        letter = gpt.strip() if gpt.strip() in OPTIONS else parse_answer(gpt.strip())
        if letter not in OPTIONS:
            raise ValueError(f"sqa: {source}: entry {e['id']!r}: no answer letter in {gpt[:60]!r}")
        gt[str(e["id"])] = {"n": count_options(human), "answer": OPTIONS.index(letter),
                            "image": "image" in e}
    return gt


def ground_truth(annotations: str | None, questions: list[dict] | None) -> tuple[dict, str]:
    """problems.json mode when `annotations` is a folder holding problems.json; the LLaVA
    CQM-A format when it is a file, or from the question list when there is no problems.json."""
    if annotations is not None:
        ann = require(annotations, "sqa", "ScienceQA ground truth (folder with problems.json, "
                      "or llava_test_CQM-A.json)")
        if ann.is_file():
            return _from_llava_json(load_json(ann, "sqa"), ann), ann.name
        if (ann / "problems.json").exists() or questions is None:
            return _from_problems(ann), "problems.json"
    if questions is None:
        raise ValueError("sqa: give --annotations (folder with problems.json + pid_splits.json, or "
                         "llava_test_CQM-A.json) or --questions llava_test_CQM-A.json")
    return _from_llava_json(questions, "question file"), "llava_test_CQM-A.json"


def score(answers: list[dict], annotations: str | None, questions: list[dict] | None = None) -> dict:
    check_answers(answers, "sqa")
    gt, source = ground_truth(annotations, questions)
    preds = {str(question_id(r)): r["text"] for r in answers}
    unknown = [q for q in preds if q not in gt]
    if unknown:
        raise ValueError(f"sqa: {len(unknown)} answered ids are not test problems (first: {unknown[:5]})")
    correct = img_correct = n_img = 0
    for pid, g in gt.items():
        ok = pred_index(parse_answer(preds.get(pid, "FAILED")), g["n"]) == g["answer"]
        correct += ok
        if g["image"]:
            n_img += 1
            img_correct += ok
    return {"benchmark": "sqa", "accuracy": pct(correct, len(gt)), "img_accuracy": pct(img_correct, n_img),
            "correct": correct, "n": len(gt), "img_correct": img_correct, "n_img": n_img,
            "missing": len(set(gt) - set(preds)), "ground_truth": source}
