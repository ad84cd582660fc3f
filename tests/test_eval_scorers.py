"""Scorers and upload converters (llava_agile.eval): hand-made cases with known answers, and
the real LLaVA sample files in /work/shared/llava_eval_samples with synthetic ground truth
written in the official formats. Where LLaVA ships the scorer as a plain script (POPE,
ScienceQA) its output on the same files is the reference."""
import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import openpyxl
import pytest
import torch

from llava_agile.eval import chair, mmbench, pope, sqa, xlsx
from llava_agile.eval.__main__ import main
from llava_agile.eval.answers import load_questions, read_jsonl
from llava_agile.eval.common import llava_m4c
from llava_agile.eval.scoring import score
from llava_agile.eval.textvqa import question_of_prompt

torch.set_num_threads(1)
from conftest import EVAL_SAMPLES

SAMPLES = EVAL_SAMPLES
DATA = Path(__file__).resolve().parent / "data"  # a few real records that broke a scorer
LLAVA_EVAL = Path(llava_m4c().__file__).parent
ANS = {b: SAMPLES / f"{b}_answers_llava-v1.5-13b.jsonl" for b in ("gqa", "textvqa", "pope", "mme", "mmbench")}


def wjsonl(path, recs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def wjson(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def ans(qid, text, prompt="q", **kw):
    return dict({"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x",
                 "model_id": "m", "metadata": {}}, **kw)


# ---------------------------------------------------------------- GQA
def test_gqa_hand_made(tmp_path):
    gt = wjson(tmp_path / "testdev_balanced_questions.json", {
        "1": {"answer": "yes"}, "2": {"answer": "left"}, "3": {"answer": "dog"},
        "4": {"answer": "blue"}, "5": {"answer": "no"}, "6": {"answer": "red", "isBalanced": False}})
    a = wjsonl(tmp_path / "a.jsonl", [ans("1", "Yes."), ans("2", "Left"), ans("3", "The dog"),
                                      ans("4", "blue..")])
    r = score("gqa", a, annotations=str(gt))
    assert r["accuracy"] == 75.0 and r["n"] == 4 and r["missing"] == 1  # "5" unanswered; "6" unbalanced
    with pytest.raises(ValueError, match="not in"):
        score("gqa", wjsonl(tmp_path / "b.jsonl", [ans("99", "x")]), annotations=str(gt))


def test_gqa_sample_files_via_cli(tmp_path, capsys):
    answers = read_jsonl(ANS["gqa"])
    gt = {str(a["question_id"]): {"answer": a["text"].rstrip(".").lower() if i % 4 else "zzz",
                                  "isBalanced": True} for i, a in enumerate(answers)}
    gt["999"] = {"answer": "yes", "isBalanced": True}
    ann = wjson(tmp_path / "testdev_balanced_questions.json", gt)
    out = tmp_path / "results.json"
    argv = ["score", "gqa", "--answers", str(ANS["gqa"]), "--annotations", str(ann),
            "--questions", str(SAMPLES / "gqa_questions.jsonl"), "--out", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["accuracy"] == 75.0 and printed["n"] == 40 and printed["missing"] == 0
    assert main(argv) == 0  # same result again: no conflict
    gt["201640614"]["answer"] = "zzz"
    wjson(ann, gt)
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


# ---------------------------------------------------------------- TextVQA
def test_textvqa_prompt_parsing_matches_llava():
    from llava.eval.eval_textvqa import prompt_processor  # the installed LLaVA (imports torch)
    prompts = [r["prompt"] for r in read_jsonl(ANS["textvqa"])]
    prompts += ["What is it?\nAnswer the question using a single word or phrase.",
                "Reference OCR token: A, B\nWhat is it?\nAnswer briefly.",
                "OCR tokens: a b Question: What is the brand? Short answer:"]
    for p in prompts:
        assert question_of_prompt(p) == prompt_processor(p)
    with pytest.raises(ValueError, match="unrecognised"):
        question_of_prompt("one line only")


def test_textvqa_soft_scores(tmp_path):
    ann = wjson(tmp_path / "TextVQA_0.5.1_val.json", {"data": [
        {"image_id": "i1", "question": "What brand?", "answers": ["dakota"] * 2 + ["x"] * 8},
        {"image_id": "i1", "question": "How many?", "answers": ["2"] * 3 + ["x"] * 7},
        {"image_id": "i2", "question": "Who?", "answers": ["the king"] * 4 + ["x"] * 6},
        {"image_id": "i3", "question": "What?", "answers": ["y"] * 10}]})
    p = "{}\nAnswer the question using a single word or phrase."
    a = wjsonl(tmp_path / "a.jsonl", [ans("i1", "Dakota.", p.format("What brand?")),  # 2 of 10 -> 0.6
                                      ans("i1", "Two", p.format("How many?")),        # 3 of 10 -> 0.9
                                      ans("i2", "King", p.format("Who?")),            # article dropped -> 1
                                      ans("i3", "no", p.format("What?"))])            # -> 0
    r = score("textvqa", a, annotations=str(ann))
    assert r["accuracy"] == pytest.approx(100 * (0.6 + 0.9 + 1 + 0) / 4)
    assert r["n"] == 4 and r["missing"] == 0
    bad = wjsonl(tmp_path / "b.jsonl", [ans("i9", "x", p.format("Where?"))])
    with pytest.raises(ValueError, match="no annotation"):
        score("textvqa", bad, annotations=str(ann))


def test_textvqa_sample_files(tmp_path):
    answers = read_jsonl(ANS["textvqa"])
    data = []
    for i, a in enumerate(answers):
        q = a["prompt"].split("\n")[0]
        good = a["text"] if i % 2 == 0 else "zzz"
        data.append({"image_id": a["question_id"], "question": q, "answers": [good] * 4 + ["other"] * 6})
    ann = wjson(tmp_path / "TextVQA_0.5.1_val.json", {"data": data})
    r = score("textvqa", ANS["textvqa"], questions=str(SAMPLES / "textvqa_questions.jsonl"),
              annotations=str(ann))
    assert r["accuracy"] == 50.0 and r["n"] == 40 and r["missing"] == 0


# ---------------------------------------------------------------- POPE
def test_pope_yes_no_rule():
    assert pope.yes_no("Yes") == "yes" and pope.yes_no("No") == "no"
    assert pope.yes_no("No, there is not.") == "no"
    assert pope.yes_no("There is no dog.") == "no"
    assert pope.yes_no("Yes. No cat though") == "yes"   # only the first sentence counts
    assert pope.yes_no("Not sure") == "yes"             # LLaVA's rule: 'Not' is not in its list


def test_pope_hand_made(tmp_path):
    qs = [{"question_id": i + 1, "image": "a.jpg", "text": f"Is there a {o} in the image?\nAnswer.",
           "category": "random"} for i, o in enumerate(["dog", "cat", "car", "cup"])]
    qf = wjsonl(tmp_path / "q.jsonl", qs)
    wjsonl(tmp_path / "coco" / "coco_pope_random.json",
           [{"question_id": i + 1, "text": q["text"].split("\n")[0], "label": l}
            for i, (q, l) in enumerate(zip(qs, ["yes", "yes", "no", "no"]))])
    a = wjsonl(tmp_path / "a.jsonl", [ans(1, "Yes"), ans(2, "No, there is not."),
                                      ans(3, "Yes, there is a car."), ans(4, "no")])
    r = score("pope", a, questions=str(qf), annotations=str(tmp_path / "coco"))
    c = r["categories"]["random"]
    assert (c["TP"], c["FN"], c["FP"], c["TN"]) == (1, 1, 1, 1)
    assert c["accuracy"] == c["precision"] == c["recall"] == c["f1"] == c["yes_ratio"] == 50.0
    assert r["f1"] == 50.0 and r["n"] == 4


def _pope_fixture(tmp_path):
    qs = load_questions(SAMPLES / "pope_questions.jsonl")
    labels = {}
    for cat in ("adversarial", "popular", "random"):
        cq = [q for q in qs if q["category"] == cat]
        labels[cat] = [{"question_id": i + 1, "image": q["image"], "text": q["text"].split("\n")[0],
                        "label": "yes" if (i * 7 + len(cat)) % 3 else "no"} for i, q in enumerate(cq)]
        wjsonl(tmp_path / "coco" / f"coco_pope_{cat}.json", labels[cat])
    return qs, labels


def _llava_eval_pope(coco, questions, answers) -> dict:
    """LLaVA's eval_pope.py on the files: {category: {metric: percent}}."""
    out = subprocess.run([sys.executable, str(LLAVA_EVAL / "eval_pope.py"), "--annotation-dir", str(coco),
                          "--question-file", str(questions), "--result-file", str(answers)],
                         capture_output=True, text=True, check=True).stdout
    ref = {}
    for block in out.split("Category: ")[1:]:
        cat = block.split(",")[0]
        vals = dict(re.findall(r"^(Accuracy|Precision|Recall|F1 score|Yes ratio): ([\d.]+)$", block, re.M))
        ref[cat] = {k: 100 * float(v) for k, v in vals.items()}
    return ref


POPE_KEYS = [("Accuracy", "accuracy"), ("Precision", "precision"), ("Recall", "recall"), ("F1 score", "f1"),
             ("Yes ratio", "yes_ratio")]


def test_pope_sample_matches_llava_eval_pope(tmp_path):
    _pope_fixture(tmp_path)
    r = score("pope", ANS["pope"], questions=str(SAMPLES / "pope_questions.jsonl"),
              annotations=str(tmp_path / "coco"))
    ref = _llava_eval_pope(tmp_path / "coco", SAMPLES / "pope_questions.jsonl", ANS["pope"])
    assert set(ref) == {"adversarial", "popular", "random"}
    for cat, v in ref.items():
        c = r["categories"][cat]
        assert c["n"] == 20
        for k, key in POPE_KEYS:
            assert c[key] == pytest.approx(v[k], abs=1e-6), (cat, k)
    assert r["f1"] == pytest.approx(sum(v["F1 score"] for v in ref.values()) / 3)


def test_pope_pairs_by_question_order_and_checks_alignment(tmp_path):
    qs, labels = _pope_fixture(tmp_path)
    full = score("pope", ANS["pope"], questions=str(SAMPLES / "pope_questions.jsonl"),
                 annotations=str(tmp_path / "coco"))
    recs = read_jsonl(ANS["pope"])
    shuffled = wjsonl(tmp_path / "s.jsonl", recs[::-1])
    assert score("pope", shuffled, questions=str(SAMPLES / "pope_questions.jsonl"),
                 annotations=str(tmp_path / "coco"))["categories"] == full["categories"]
    # a missing answer does not shift the pairing of the others
    part = score("pope", wjsonl(tmp_path / "p.jsonl", recs[1:]), questions=str(SAMPLES / "pope_questions.jsonl"),
                 annotations=str(tmp_path / "coco"))
    assert part["missing"] == 1 and part["categories"]["random"] == full["categories"]["random"]
    # labels in another order than the questions are refused
    lab = labels["popular"]
    wjsonl(tmp_path / "coco" / "coco_pope_popular.json", lab[1:] + lab[:1])
    with pytest.raises(ValueError, match="keep the question order"):
        score("pope", ANS["pope"], questions=str(SAMPLES / "pope_questions.jsonl"), annotations=str(tmp_path / "coco"))
    wjsonl(tmp_path / "coco" / "coco_pope_popular.json", lab[:-1])
    with pytest.raises(ValueError, match="20 questions but 19 labels"):
        score("pope", ANS["pope"], questions=str(SAMPLES / "pope_questions.jsonl"), annotations=str(tmp_path / "coco"))


def test_pope_needs_questions(tmp_path):
    with pytest.raises(ValueError, match="--questions"):
        score("pope", ANS["pope"], annotations=str(tmp_path))


def _pope_real(root, version, n):
    """The first n random-split questions of LLaVA's llava_pope_test.jsonl, LLaVA-1.5-13B's
    answers, and the same lines of coco_pope_random.json of a POPE version (tests/data)."""
    d = json.loads((DATA / "pope_head_vs_e3e39262.json").read_text())
    qf = wjsonl(root / "llava_pope_test.jsonl", d["questions"][:n])
    a = wjsonl(root / "answers.jsonl", d["answers"][:n])
    wjsonl(root / "coco" / "coco_pope_random.json", d[f"labels_{version}"][:n])
    return qf, a, root / "coco", d[f"labels_{version}"]


def test_pope_real_label_versions(tmp_path):
    """LLaVA's questions with AoiDragon/POPE's label files: e3e39262 (LLaVA's) matches line for line;
    POPE's head fixed the 'imange' typo (line 11: matched by image and object, counted, same
    numbers) and regenerated the random split (line 18 is another image: refused, naming the fix)."""
    qf, a, coco, _ = _pope_real(tmp_path / "old", "e3e39262", 17)
    old = score("pope", a, questions=str(qf), annotations=str(coco))
    ref = _llava_eval_pope(coco, qf, a)["random"]
    assert old["matched_by_image_object"] == 0 and old["n"] == 17
    for k, key in POPE_KEYS:
        assert old["categories"]["random"][key] == pytest.approx(ref[k], abs=1e-6), k
    qf, a, coco, head = _pope_real(tmp_path / "head", "head", 17)
    assert head[10]["text"] == "Is there an umbrella in the image?" and "imange" in read_jsonl(qf)[10]["text"]
    new = score("pope", a, questions=str(qf), annotations=str(coco))
    assert new["matched_by_image_object"] == new["categories"]["random"]["matched_by_image_object"] == 1
    assert dict(new["categories"]["random"], matched_by_image_object=0) == old["categories"]["random"]
    qf, a, coco, head = _pope_real(tmp_path / "head18", "head", 18)
    with pytest.raises(ValueError, match=r"random: question 18 .*keep the question order.*commit e3e39262"):
        score("pope", a, questions=str(qf), annotations=str(coco))
    wjsonl(coco / "coco_pope_random.json", head[:17])
    with pytest.raises(ValueError, match=r"18 questions but 17 labels .*AoiDragon/POPE commit e3e39262"):
        score("pope", a, questions=str(qf), annotations=str(coco))


# ---------------------------------------------------------------- MME
def _mme_tree(root, entries):
    """entries: {(category, file stem): [(question, answer)]}; artwork uses images/ + questions_answers_YN/."""
    for (cat, stem), qa in entries.items():
        d = root / cat / "questions_answers_YN" if cat == "artwork" else root / cat
        d.mkdir(parents=True, exist_ok=True)
        (root / cat / "images").mkdir(exist_ok=True) if cat == "artwork" else None
        (d / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qa))


def test_mme_hand_made(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    ins = "\nAnswer the question using a single word or phrase."
    _mme_tree(root, {
        ("artwork", "10002"): [("Is this made by Monet? Please answer yes or no.", "Yes"),
                               ("Is this made by Dali?  Please answer yes or no.", "No")],  # two spaces
        ("artwork", "10003"): [("Is this a painting? Please answer yes or no.", "Yes"),
                               ("Is this a photo? Please answer yes or no.", "No")],
        ("code_reasoning", "0001"): [("Is the output 1? Please answer yes or no.", "No"),
                                     ("Is the output 2? Please answer yes or no.", "Yes")]})
    a = wjsonl(tmp_path / "a.jsonl", [
        ans("artwork/10002.jpg", "Yes, it is", "Is this made by Monet?" + ins),
        ans("artwork/10002.jpg", "Nope", "Is this made by Dali?" + ins),
        ans("artwork/10003.jpg", "Yes", "Is this a painting?" + ins),
        ans("artwork/10003.jpg", "I think yes", "Is this a photo?" + ins),   # 'other' -> wrong
        ans("code_reasoning/0001.png", "no", "Is the output 1?" + ins),
        ans("code_reasoning/0001.png", "yes", "Is the output 2?" + ins)])
    r = score("mme", a, annotations=str(root))
    assert r["tasks"]["artwork"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "n": 4}
    assert r["tasks"]["code_reasoning"]["score"] == 200.0
    assert (r["perception"], r["cognition"], r["total"]) == (125.0, 200.0, 325.0)
    assert "OCR" in r["tasks_missing"] and r["n"] == 6
    bad = wjsonl(tmp_path / "b.jsonl", [ans("artwork/10002.jpg", "Yes", "Is this made by Klee?" + ins)])
    with pytest.raises(ValueError, match="no ground truth"):
        score("mme", bad, annotations=str(root))
    with pytest.raises(ValueError, match="unknown category"):
        score("mme", wjsonl(tmp_path / "c.jsonl", [ans("foo/1.png", "Yes", "x")]), annotations=str(root))


def test_mme_sample_files(tmp_path):
    answers = read_jsonl(ANS["mme"])
    ins = "\nAnswer the question using a single word or phrase."
    entries, expect = {}, {}
    for i, a in enumerate(answers):
        stem = a["question_id"].split("/")[1].split(".")[0]
        gt = ("No" if a["text"] == "Yes" else "Yes") if i % 5 == 0 else a["text"]
        entries.setdefault(("code_reasoning", stem), []).append((a["prompt"].replace(ins, "") +
                                                                 " Please answer yes or no.", gt))
        expect.setdefault(stem, []).append(gt == a["text"])
    _mme_tree(tmp_path / "MME", entries)
    r = score("mme", ANS["mme"], questions=str(SAMPLES / "mme_questions.jsonl"), annotations=str(tmp_path / "MME"))
    flags = [f for v in expect.values() for f in v]
    acc, acc_plus = sum(flags) / len(flags), sum(all(v) for v in expect.values()) / len(expect)
    assert len(expect) == 20 and r["tasks"]["code_reasoning"]["n"] == 40
    assert r["cognition"] == pytest.approx(100 * (acc + acc_plus)) and r["perception"] == 0
    assert r["total"] == r["cognition"] and r["missing"] == 0


# ---------------------------------------------------------------- ScienceQA
def test_sqa_answer_parsing():
    assert sqa.parse_answer("B") == "B"
    assert sqa.parse_answer("A. hyperbole") == "A"
    assert sqa.parse_answer("The answer is C.") == "C"
    assert sqa.parse_answer("The answer is C. No, the answer is D.") == "C"  # case-sensitive, as LLaVA
    assert sqa.parse_answer("The answer is C. The answer is D.") == "FAILED"
    assert sqa.parse_answer("b") == "FAILED" and sqa.parse_answer("A.") == "FAILED"
    assert sqa.pred_index("E", 2) == -1 and sqa.pred_index("B", 2) == 1
    assert sqa.count_options("Q?\nContext: x\nA. one\nB. two\nC. three") == 3
    with pytest.raises(ValueError):
        sqa.count_options("no options here")


def test_sqa_hand_made_cqm_a(tmp_path):
    def entry(i, n, gt, image):
        e = {"id": str(i), "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + "Q?\n" +
             "\n".join(f"{'ABCDE'[j]}. opt{j}" for j in range(n))}, {"from": "gpt", "value": gt}]}
        return dict(e, image=f"{i}/image.png") if image else e
    qs = [entry(1, 2, "B", True), entry(2, 3, "A", True), entry(3, 2, "A", False),
          entry(4, 2, "B", False), entry(5, 4, "D", True)]
    qf = wjson(tmp_path / "llava_test_CQM-A.json", qs)
    a = wjsonl(tmp_path / "a.jsonl", [ans("1", "B"), ans("2", "The answer is A."), ans("3", "A. opt0"),
                                      ans("4", "C")])  # "4": C is not among 2 options; "5" unanswered
    r = score("sqa", a, questions=str(qf))
    assert (r["correct"], r["n"], r["img_correct"], r["n_img"]) == (3, 5, 2, 3)
    assert r["accuracy"] == 60.0 and r["img_accuracy"] == pytest.approx(200 / 3) and r["missing"] == 1
    # the same file given as --annotations
    assert score("sqa", a, annotations=str(qf))["accuracy"] == 60.0


def test_sqa_sample_matches_llava_eval_science_qa(tmp_path):
    qs = load_questions(SAMPLES / "sqa_questions_CQM-A_first60.json")
    problems, with_prompt = {}, []
    for q in qs:
        human = q["conversations"][0]["value"]
        n = sqa.count_options(human)
        problems[q["id"]] = {"choices": [f"c{j}" for j in range(n)], "image": "image.png" if "image" in q else None,
                             "answer": "ABCDE".index(q["conversations"][1]["value"])}
    base = tmp_path / "scienceqa"
    wjson(base / "problems.json", problems)
    wjson(base / "pid_splits.json", {"test": list(problems), "val": []})
    for r in read_jsonl(SAMPLES / "sqa_answers_llava-v1.5-13b_first60.jsonl"):
        img = "image" in next(q for q in qs if q["id"] == r["question_id"])
        with_prompt.append(dict(r, prompt=("<image>\n" if img else "") + "question"))
    a = wjsonl(tmp_path / "answers.jsonl", with_prompt)
    out = subprocess.run([sys.executable, str(LLAVA_EVAL / "eval_science_qa.py"), "--base-dir", str(base),
                          "--result-file", str(a), "--output-file", str(tmp_path / "o.json"),
                          "--output-result", str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True).stdout
    ref_acc, ref_img = map(float, re.search(r"Accuracy: ([\d.]+)%, IMG-Accuracy: ([\d.]+)%", out).groups())
    mine = score("sqa", a, annotations=str(base))
    assert mine["ground_truth"] == "problems.json"
    assert round(mine["accuracy"], 2) == ref_acc and round(mine["img_accuracy"], 2) == ref_img
    assert mine["correct"] == json.loads((tmp_path / "r.json").read_text())["correct"]
    # the CQM-A route (letter in the gpt turn, options counted from the prompt) agrees
    cqm = score("sqa", SAMPLES / "sqa_answers_llava-v1.5-13b_first60.jsonl",
                questions=str(SAMPLES / "sqa_questions_CQM-A_first60.json"))
    assert (cqm["accuracy"], cqm["img_accuracy"], cqm["n"], cqm["n_img"]) == \
        (mine["accuracy"], mine["img_accuracy"], 60, 28)


def test_sqa_real_options_spanning_lines(tmp_path):
    """Real CQM-A prompts whose option text spans lines (a letter's closing and name; an
    ecosystem's list) stopped count_options. Counts agree with problems.json, predictions with
    the per-problem results LLaVA's eval_science_qa.py recorded, scores with that script."""
    d = json.loads((DATA / "sqa_multiline_options.json").read_text())
    n = {q["id"]: sqa.count_options(q["conversations"][0]["value"]) for q in d["questions"]}
    assert n["512"] == n["2634"] == n["2740"] == 2
    assert {i: len(p["choices"]) for i, p in d["problems"].items()} == {i: n[i] for i in d["problems"]}
    assert {a["question_id"]: sqa.pred_index(sqa.parse_answer(a["text"]), n[a["question_id"]])
            for a in d["answers"]} == d["llava_results"]
    qf = wjson(tmp_path / "llava_test_CQM-A.json", d["questions"])
    a = wjsonl(tmp_path / "answers.jsonl", d["answers"])
    r = score("sqa", a, questions=str(qf))
    assert (r["correct"], r["n"], r["missing"]) == (sum(d["llava_is_correct"].values()), 8, 0)
    base = tmp_path / "scienceqa"
    wjson(base / "problems.json", d["problems"])
    wjson(base / "pid_splits.json", {"test": list(d["problems"])})
    a6 = wjsonl(tmp_path / "a6.jsonl", [x for x in d["answers"] if x["question_id"] in d["problems"]])
    out = subprocess.run([sys.executable, str(LLAVA_EVAL / "eval_science_qa.py"), "--base-dir", str(base),
                          "--result-file", str(a6), "--output-file", str(tmp_path / "o.json"),
                          "--output-result", str(tmp_path / "r.json")],
                         capture_output=True, text=True, check=True).stdout
    ref_acc, ref_img = map(float, re.search(r"Accuracy: ([\d.]+)%, IMG-Accuracy: ([\d.]+)%", out).groups())
    mine = score("sqa", a6, annotations=str(base))
    assert (round(mine["accuracy"], 2), round(mine["img_accuracy"], 2)) == (ref_acc, ref_img)
    assert mine["n_img"] == 2 and mine["img_correct"] == 1
    cqm = wjson(tmp_path / "cqm6.json", [q for q in d["questions"] if q["id"] in d["problems"]])
    assert {k: v for k, v in score("sqa", a6, questions=str(cqm)).items() if k != "ground_truth"} == \
        {k: v for k, v in mine.items() if k != "ground_truth"}
    with pytest.raises(ValueError, match="cannot count the options"):
        sqa.count_options("Which is correct?\nB. one\nC. two")


# ---------------------------------------------------------------- MMBench
TSV_COLS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
            "source", "l2-category", "comment", "split"]
IMG = base64.b64encode(b"\x89PNG fake image bytes" * 50).decode()


def _tsv(path, rows):
    lines = ["\t".join(TSV_COLS)]
    for r in rows:
        lines.append("\t".join(str(r.get(c, "")) for c in TSV_COLS))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _row(idx, opts, answer, cat="cat1"):
    r = {"index": idx, "question": f"Question {idx}?", "hint": "nan", "answer": answer, "category": cat,
         "image": IMG, "source": "src", "l2-category": "l2", "comment": "nan", "split": "dev"}
    r.update({"ABCD"[j]: o for j, o in enumerate(opts)})
    return r


def test_mmbench_letter_parsing():
    opts = ["red", "blue", "green"]
    assert mmbench.parse_letter("B", opts) == "B"
    assert mmbench.parse_letter("C. green", opts) == "C"
    assert mmbench.parse_letter("(A)", opts) == "A"
    assert mmbench.parse_letter("The answer is B.", opts) == "B"
    assert mmbench.parse_letter("Green.", opts) == "C"
    assert mmbench.parse_letter("D", opts) is None   # only 3 options
    assert mmbench.parse_letter("A cat", opts) is None
    assert mmbench.is_none("nan") and mmbench.is_none("") and mmbench.is_none("None")


def test_mmbench_sample_files_and_upload(tmp_path):
    answers = read_jsonl(ANS["mmbench"])
    rows, expect = [], 0
    for i, a in enumerate(answers):
        right = a["text"] if i % 3 else ("A" if a["text"] == "B" else "B")
        expect += i % 3 != 0
        rows.append(_row(a["question_id"], a["options"], right, cat=f"c{i % 2}"))
    tsv = _tsv(tmp_path / "mmbench_dev_20230712.tsv", rows)
    up = tmp_path / "answers_upload.xlsx"
    r = score("mmbench", ANS["mmbench"], annotations=str(tsv), upload_file=up)
    assert r["circular_accuracy"] == r["accuracy"] == pytest.approx(100 * expect / 20)
    assert r["n"] == 20 and r["missing"] == 0 and set(r["categories"]) == {"c0", "c1"}
    got = xlsx.read_rows(up.read_bytes())
    assert got[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert [row[0] for row in got[1:]] == [a["question_id"] for a in answers]
    assert [row[6] for row in got[1:]] == [a["text"] for a in answers]
    assert got[1][4] is None and got[1][2] == answers[0]["options"][0]
    ws = openpyxl.load_workbook(up).active
    assert ws.title == "Sheet1" and [c.value for c in next(ws.iter_rows())] == got[0]


def test_mmbench_circular_copies_and_all_rounds(tmp_path):
    opts = ["w", "x", "y", "z"]
    rows = [_row(1, opts, "C"), _row(2, opts, "A")]
    for k in (1, 2, 3):  # circular copies: options rotated left by k, answer letter follows
        rot = opts[k:] + opts[:k]
        rows.append(_row(k * 1_000_000 + 1, rot, "ABCD"[rot.index("y")]))
        rows.append(_row(k * 1_000_000 + 2, rot, "ABCD"[rot.index("w")]))
    tsv = _tsv(tmp_path / "dev.tsv", rows)
    recs = [ans(r["index"], r["answer"]) for r in rows]
    assert recs[-1]["text"] == "B"
    recs[-1]["text"] = "D"  # one copy of question 2 wrong
    a = wjsonl(tmp_path / "a.jsonl", recs)
    r = score("mmbench", a, annotations=str(tsv), upload_file=tmp_path / "u.xlsx")
    assert r["circular_accuracy"] == 50.0 and r["accuracy"] == 100.0 and r["n"] == 2
    # missing copies: question 2 is incomplete and left out of the circular score
    r = score("mmbench", wjsonl(tmp_path / "b.jsonl", recs[:-1]), annotations=str(tsv),
              upload_file=tmp_path / "u2.xlsx")
    assert r["circular_accuracy"] == 100.0 and r["n"] == 1 and r["missing"] == 1
    # --all-rounds: round r shows the options rotated left by r with letters A, B, ...
    tsv1 = _tsv(tmp_path / "one.tsv", [_row(7, opts, "C")])
    good = [ans(7, "ABCD"[(2 - r) % 4], round_id=r) for r in range(4)]
    assert score("mmbench", wjsonl(tmp_path / "c.jsonl", good), annotations=str(tsv1),
                 upload_file=tmp_path / "u3.xlsx")["circular_accuracy"] == 100.0
    good[3]["text"] = "C"
    assert score("mmbench", wjsonl(tmp_path / "d.jsonl", good), annotations=str(tsv1),
                 upload_file=tmp_path / "u4.xlsx")["circular_accuracy"] == 0.0


def test_mmbench_test_split_writes_upload_only(tmp_path):
    tsv = _tsv(tmp_path / "mmbench_test.tsv", [_row(1, ["a", "b"], ""), _row(2, ["a", "b"], "")])
    a = wjsonl(tmp_path / "a.jsonl", [ans(1, "A"), ans(2, "B")])
    r = score("mmbench_cn", a, annotations=str(tsv))
    assert "circular_accuracy" not in r and Path(r["upload_file"]).name == "answers_upload.xlsx"
    assert [row[6] for row in xlsx.read_rows(Path(r["upload_file"]).read_bytes())[1:]] == ["A", "B"]


def test_mmbench_upload_real_rows_as_llava(tmp_path):
    """Real rows of LLaVA's own MMBench upload: options such as '3' are text there (pandas keeps
    an object column's cells as read), the index a number, missing options empty cells."""
    d = json.loads((DATA / "mmbench_upload_rows.json").read_text())
    rows = [dict(zip(d["header"], r)) for r in d["rows"]]
    tsv = _tsv(tmp_path / "mmbench_dev_20230712.tsv",
               [dict(_row(r["index"], [r[c] for c in "ABCD" if r[c] is not None], r["answer"]),
                     question=r["question"]) for r in rows])
    a = wjsonl(tmp_path / "a.jsonl", [ans(r["index"], r["prediction"], round_id=0) for r in rows])
    up = tmp_path / "answers_upload.xlsx"
    score("mmbench", a, annotations=str(tsv), upload_file=up)
    got = [list(r) for r in openpyxl.load_workbook(up).active.iter_rows(values_only=True)]
    assert got == [d["header"]] + d["rows"]
    assert [type(v) for v in got[1]] == [int] + [str] * 8


def test_xlsx_is_deterministic_and_readable():
    header, rows = ["index", "text", "x"], [[1, "a\x01b", None], [2, "", 2.5], [3, True, "<&>"]]
    data = xlsx.to_bytes(header, rows)
    assert data == xlsx.to_bytes(header, rows)
    wb = openpyxl.load_workbook(__import__("io").BytesIO(data))
    assert wb.sheetnames == ["Sheet1"] and wb.properties.modified.year == 1980
    assert xlsx.read_rows(data) == [header, [1, "ab"], [2, None, 2.5], [3, "True", "<&>"]]


# ---------------------------------------------------------------- SEED
def test_seed_image_accuracy_and_upload(tmp_path):
    gt = wjson(tmp_path / "SEED-Bench.json", {"question_type": {"Scene": 1}, "questions": [
        {"question_id": "1", "answer": "A", "data_type": "image", "question_type_id": 1},
        {"question_id": "2", "answer": "B", "data_type": "image", "question_type_id": 1},
        {"question_id": "3", "answer": "C", "data_type": "image", "question_type_id": 1},
        {"question_id": "4", "answer": "D", "data_type": "video", "question_type_id": 1}]})
    a = wjsonl(tmp_path / "a.jsonl", [ans(1, "A"), ans(2, "B."), ans(4, "D")])  # "3" unanswered = wrong
    r = score("seed", a, annotations=str(gt))
    assert r["img_accuracy"] == pytest.approx(100 / 3) and r["video_accuracy"] == 100.0
    assert r["accuracy"] == 50.0 and r["n_img"] == 3 and r["missing"] == 1
    up = [json.loads(l) for l in Path(r["upload_file"]).read_text().splitlines()]
    assert up == [{"question_id": "1", "prediction": "A"}, {"question_id": "2", "prediction": "B."},
                  {"question_id": "4", "prediction": "D"}]


# ---------------------------------------------------------------- server-scored converters
def test_vqav2_upload(tmp_path):
    split = wjsonl(tmp_path / "llava_vqav2_mscoco_test2015.jsonl",
                   [{"question_id": i, "image": f"{i}.jpg", "text": "q"} for i in (10, 11, 12, 13)])
    a = wjsonl(tmp_path / "answers.jsonl", [ans(10, "Two."), ans(11, "Yes"), ans(13, "The dog's bone")])
    r = score("vqav2", a, annotations=str(split))
    up = json.loads(Path(r["upload_file"]).read_text())
    assert up == [{"question_id": 10, "answer": "2"}, {"question_id": 11, "answer": "yes"},
                  {"question_id": 12, "answer": ""}, {"question_id": 13, "answer": "dog 's bone"}]
    assert r["server_scored"] and r["n"] == 3 and r["split_questions"] == 4


def test_vizwiz_upload_sample_questions(tmp_path):
    qs = load_questions(SAMPLES / "vizwiz_questions.jsonl")
    recs = [ans(q["question_id"], "Unanswerable." if i % 2 else "A red Can", q["text"]) for i, q in enumerate(qs)]
    a = wjsonl(tmp_path / "answers.jsonl", recs)
    r = score("vizwiz", a, annotations=str(SAMPLES / "vizwiz_questions.jsonl"))
    up = json.loads(Path(r["upload_file"]).read_text())
    assert [u["image"] for u in up] == [q["image"] for q in qs]
    assert up[0]["answer"] == "red can" and up[1]["answer"] == "unanswerable"
    with pytest.raises(ValueError, match="unanswered"):
        score("vizwiz", wjsonl(tmp_path / "b.jsonl", recs[1:]), annotations=str(SAMPLES / "vizwiz_questions.jsonl"),
              upload_file=tmp_path / "u.json")


def test_mmvet_results_file(tmp_path):
    qs = load_questions(SAMPLES / "mmvet_questions.jsonl")
    a = wjsonl(tmp_path / "answers.jsonl", [ans(q["question_id"], f"answer {i}", q["text"]) for i, q in enumerate(qs)])
    r = score("mmvet", a)
    got = json.loads(Path(r["upload_file"]).read_text())
    assert list(got) == [f"v1_{q['question_id']}" for q in qs] and got["v1_0"] == "answer 0"


# ---------------------------------------------------------------- CHAIR
def _coco(tmp_path, captions=None):
    cats = [(1, "person"), (2, "bicycle"), (3, "car"), (18, "dog"), (22, "elephant"), (61, "cake"),
            (67, "dining table"), (58, "hot dog")]
    objs = {1: [1, 18], 2: [3], 3: [61, 67, 2]}
    inst = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in objs],
            "categories": [{"id": c, "name": n} for c, n in cats],
            "annotations": [{"image_id": i, "category_id": c, "id": 100 * i + c} for i, cs in objs.items() for c in cs]}
    wjson(tmp_path / "annotations" / "instances_val2014.json", inst)
    if captions:
        wjson(tmp_path / "annotations" / "captions_val2014.json",
              {"annotations": [{"image_id": i, "caption": c} for i, c in captions]})
    return tmp_path / "annotations"


def test_chair_word_matching():
    voc = chair.vocabulary()
    assert len(voc.categories) == 80
    assert voc.mentions("Two men walk their dogs past hot dogs and a teddy bear.") == \
        ["person", "dog", "hot dog", "teddy bear"]
    assert voc.mentions("A baby elephant and a passenger train.") == ["elephant", "train"]
    assert voc.mentions("Knives, skis and buses; a cell-phone on the dining table.") == \
        ["knife", "skis", "bus", "cell phone", "dining table"]
    assert voc.mentions("The puppies chase the ponies.") == ["dog", "horse"]


def test_chair_hand_made(tmp_path):
    ann = _coco(tmp_path)
    a = wjsonl(tmp_path / "a.jsonl", [
        ans(1, "A man walks his dogs next to a baby elephant."),       # elephant hallucinated
        ans("COCO_val2014_000000000002.jpg", "Two hot dogs on a table near a car."),  # hot dog, table
        ans(3, "A birthday cake with candles sits on the desk.")])     # all correct
    r = score("chair", a, annotations=str(ann))
    assert r["chair_s"] == pytest.approx(200 / 3) and r["chair_i"] == 37.5   # 3 of 8 mentions
    assert r["recall"] == pytest.approx(500 / 6)  # bicycle of image 3 never mentioned
    assert r["length"] == pytest.approx((10 + 9 + 9) / 3) and r["gt_sources"] == ["instances"]
    # with the human captions beside it, their objects count as present too
    ann = _coco(tmp_path, captions=[(2, "A hot dog on a plate on a table.")])
    r = score("chair", a, annotations=str(ann))
    assert r["gt_sources"] == ["instances", "captions"] and r["chair_i"] == 12.5
    with pytest.raises(ValueError, match="not in the COCO"):
        score("chair", wjsonl(tmp_path / "b.jsonl", [ans(77, "a dog")]), annotations=str(ann))


def test_chair_sample_is_deterministic(tmp_path, capsys):
    inst = {"images": [{"id": i * 3 + 1, "file_name": f"COCO_val2014_{i * 3 + 1:012d}.jpg"} for i in range(2000)],
            "categories": [{"id": 1, "name": "person"}], "annotations": []}
    p = wjson(tmp_path / "instances_val2014.json", inst)
    q1, q2 = chair.questions(p), chair.questions(p)
    assert q1 == q2 and len(q1) == 500 and len({q["question_id"] for q in q1}) == 500
    assert [q["question_id"] for q in q1] == sorted(q["question_id"] for q in q1)
    assert q1[0]["text"] == "Please describe this image in detail."
    assert q1[0]["image"] == f"COCO_val2014_{q1[0]['question_id']:012d}.jpg"
    assert chair.questions(p, seed=1) != q1
    assert main(["chair-questions", "--annotations", str(p), "--out", str(tmp_path / "q.jsonl")]) == 0
    assert read_jsonl(tmp_path / "q.jsonl") == q1
    with pytest.raises(ValueError, match="cannot sample"):
        chair.sample_image_ids(range(10), 11)


# ---------------------------------------------------------------- CLI errors
def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["score", "nope", "--answers", str(ANS["gqa"])]) == 2
    err = capsys.readouterr().err
    assert "valid: gqa, textvqa, pope, mme, sqa, mmbench, mmbench_cn, vqav2, vizwiz, seed, mmvet, chair" in err
    assert main(["score", "textvqa", "--answers", str(ANS["textvqa"]), "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TextVQA_0.5.1_val.json" in err and "dl.fbaipublicfiles.com" in err
    assert main(["score", "gqa", "--answers", str(tmp_path / "none.jsonl"), "--annotations", "x"]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    assert main(["score", "pope", "--answers", str(ANS["pope"]), "--questions", str(SAMPLES / "pope_questions.jsonl"),
                 "--annotations", str(tmp_path / "coco")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "coco") in err and "AoiDragon/POPE" in err


def test_cli_paths(tmp_path, capsys):
    assert main(["paths", "sqa", "--data-root", "/d"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["questions"] == "/d/scienceqa/llava_test_CQM-A.json"
    assert info["module"] == "llava.eval.model_vqa_science" and info["extra_args"] == "--single-pred-prompt"
    assert main(["paths", "mmbench_cn", "--get", "extra_args"]) == 0
    assert capsys.readouterr().out.strip() == "--single-pred-prompt --lang cn"
    assert main(["paths", "gqa", "--data-root", str(tmp_path), "--check"]) == 2
    assert "llava_gqa_testdev_balanced.jsonl" in capsys.readouterr().err
