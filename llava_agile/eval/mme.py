"""MME: per-task acc + acc+ (x100), perception and cognition totals, as LLaVA's
convert_answer_to_mme.py and MME's eval_tool/calculation.py compute them.

Both conventions are reported: `perception` (P, max 2000) and `total` = P + C (max 2800;
the paper's "1862" scale for LLaVA-1.5-7B)."""
from __future__ import annotations

from pathlib import Path

from .answers import question_id
from .benchmarks import require
from .common import check_answers

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
INSTRUCTION = "Answer the question using a single word or phrase."
SUFFIX = " Please answer yes or no."


def load_ground_truth(root: str | Path) -> dict[tuple[str, str, str], str]:
    """{(category, 'file.txt', question): 'Yes'|'No'} from MME_Benchmark_release_version: each
    category holds `*.txt` files of 'question<TAB>answer' lines, either next to the images or
    in `questions_answers_YN/` (when an `images/` folder exists)."""
    root = require(root, "mme", "MME ground-truth folder (MME_Benchmark_release_version)")
    gt = {}
    for cdir in sorted(Path(root).iterdir()):
        if not cdir.is_dir():
            continue
        qa = cdir / "questions_answers_YN" if (cdir / "images").exists() else cdir
        if not qa.is_dir():
            raise ValueError(f"mme: {cdir} has images/ but no questions_answers_YN/")
        for txt in sorted(qa.glob("*.txt")):
            for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise ValueError(f"mme: {txt}:{n + 1}: expected 'question<TAB>answer'")
                gt[(cdir.name, txt.name, parts[0])] = parts[1]
    if not gt:
        raise ValueError(f"mme: no ground truth (*.txt) found under {root}")
    return gt


def _gt_question(prompt: str, category: str, file: str, gt: dict) -> str:
    """LLaVA's prompt -> MME question: drop the short-answer instruction, add ' Please answer
    yes or no.' (some MME files have two spaces before it)."""
    q = prompt.replace(INSTRUCTION, "").strip() if INSTRUCTION in prompt else prompt
    if "Please answer yes or no." not in q:
        q = q + SUFFIX
        if (category, file, q) not in gt:
            q = q.replace(SUFFIX, " " + SUFFIX)
    return q


def parse_yes_no(text: str) -> str:
    """calculation.py's rule on the lower-cased answer: yes/no, else 'yes'/'no' within the
    first 4 characters, else 'other'."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    return "yes" if "yes" in t[:4] else "no" if "no" in t[:4] else "other"


def score(answers: list[dict], annotations: str, questions: list[dict] | None = None) -> dict:
    check_answers(answers, "mme")
    gt = load_ground_truth(annotations)
    tasks: dict[str, dict[str, list[bool]]] = {}
    for rec in answers:
        qid = str(question_id(rec))
        category = qid.split("/")[0]
        if category not in PERCEPTION + COGNITION:
            raise ValueError(f"mme: unknown category {category!r} in id {qid!r}; valid: "
                             f"{', '.join(PERCEPTION + COGNITION)}")
        file = qid.split("/")[-1].split(".")[0] + ".txt"
        q = _gt_question(rec.get("prompt", ""), category, file, gt)
        if (category, file, q) not in gt:
            raise ValueError(f"mme: no ground truth for {qid!r} question {q!r}")
        ok = parse_yes_no(rec["text"]) == gt[(category, file, q)].lower()
        tasks.setdefault(category, {}).setdefault(qid, []).append(ok)
    detail = {}
    for task, images in tasks.items():
        flags = [f for fl in images.values() for f in fl]
        acc = sum(flags) / len(flags)
        acc_plus = sum(all(fl) for fl in images.values()) / len(images)
        detail[task] = {"acc": round(100 * acc, 6), "acc_plus": round(100 * acc_plus, 6),
                        "score": round(100 * (acc + acc_plus), 6), "n": len(flags)}
    p = sum(detail[t]["score"] for t in PERCEPTION if t in detail)
    c = sum(detail[t]["score"] for t in COGNITION if t in detail)
    n_q = len(questions) if questions is not None else len(gt)
    return {"benchmark": "mme", "perception": round(p, 6), "cognition": round(c, 6),
            "total": round(p + c, 6), "tasks": {t: detail[t] for t in PERCEPTION + COGNITION if t in detail},
            "tasks_missing": [t for t in PERCEPTION + COGNITION if t not in detail],
            "n": len(answers), "missing": max(n_q - len(answers), 0)}
