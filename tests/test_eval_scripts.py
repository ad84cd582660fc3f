"""eval_scripts/*.sh end to end on the CPU: the tiny random LLaVA, a generated data root in each
benchmark's exact LLaVA layout and formats (as in /work/shared/llava_eval_samples), inference
through the runner, merge, scoring. Also resume, the overwrite refusal and bad input."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_agile.eval import layout
from llava_agile.eval.answers import load_questions, read_jsonl
from llava_agile.eval.scoring import score

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "eval_scripts"
BENCHES = ("gqa", "textvqa", "pope", "mme", "sqa", "mmbench", "mmbench_cn", "vqav2", "vizwiz",
           "seed", "mmvet", "chair")
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
MODEL_NAME = "tiny-llava-v1.5"


# ---------------------------------------------------------------- generated data (LLaVA layout)

def _img(path, seed, size=(96, 64)):
    from llava_agile.assets.tiny import tiny_image

    path.parent.mkdir(parents=True, exist_ok=True)
    tiny_image(seed, size).save(path)


def _jsonl(path, recs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _vqa(d, sub, qs, names):
    """Question records + one image per distinct image name."""
    for i, n in enumerate(sorted(set(names))):
        _img(d / sub / n, i)
    return qs


def _mmbench_tsv(path, rows):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
            "source", "l2-category", "comment", "split"]
    lines = ["\t".join(cols)] + ["\t".join(str(r.get(c, "")) for c in cols) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _png_b64(seed):
    from llava_agile.assets.tiny import tiny_image

    buf = io.BytesIO()
    tiny_image(seed, (80, 60)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def build_data(d: Path) -> None:
    """2-4 questions per benchmark under data root `d`, ground truth included."""
    # GQA
    qs = [{"question_id": "201307251", "image": "n161313.jpg", "text": "Is it overcast?" + SHORT,
           "category": "default"},
          {"question_id": "201640614", "image": "n235859.jpg", "text": "Who is wearing the dress?" + SHORT,
           "category": "default"},
          {"question_id": "202225914", "image": "n161313.jpg", "text": "Is the table clean?" + SHORT,
           "category": "default"}]
    _jsonl(d / "gqa/llava_gqa_testdev_balanced.jsonl", qs)
    _vqa(d, "gqa/data/images", qs, [q["image"] for q in qs])
    _json(d / "gqa/data/testdev_balanced_questions.json",
          {"201307251": {"answer": "no"}, "201640614": {"answer": "woman"}, "202225914": {"answer": "yes"}})
    # TextVQA: the 3-line prompt with OCR tokens; question_id = image id
    qs = [{"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "category": "default",
           "text": "What is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL" + SHORT},
          {"question_id": "b9dc400eb20bad64", "image": "b9dc400eb20bad64.jpg", "category": "default",
           "text": "What does the small white text spell?\nReference OCR token: D, RUPALCON" + SHORT}]
    _jsonl(d / "textvqa/llava_textvqa_val_v051_ocr.jsonl", qs)
    _vqa(d, "textvqa/train_images", qs, [q["image"] for q in qs])
    _json(d / "textvqa/TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"image_id": "003a8ae2ef43b901", "question_id": 34602, "question": "what is the brand of this camera?",
         "answers": ["dakota"] * 10},
        {"image_id": "b9dc400eb20bad64", "question_id": 34603, "question": "what does the small white text spell?",
         "answers": ["drupalcon"] * 8 + ["rupalcon"] * 2}]})
    # POPE: one question per category, labels in coco/coco_pope_<category>.json
    cats = ("adversarial", "popular", "random")
    qs = [{"question_id": i + 1, "image": f"COCO_val2014_00000031019{i}.jpg",
           "text": f"Is there a {o} in the image?" + SHORT, "category": c}
          for i, (o, c) in enumerate(zip(("snowboard", "person", "car"), cats))]
    _jsonl(d / "pope/llava_pope_test.jsonl", qs)
    _vqa(d, "pope/val2014", qs, [q["image"] for q in qs])
    for i, (q, label) in enumerate(zip(qs, ("no", "yes", "yes"))):
        _jsonl(d / f"pope/coco/coco_pope_{q['category']}.json",
               [{"question_id": 1, "image": q["image"], "text": q["text"].split("\n")[0], "label": label}])
    # MME: two questions share one id (one image); ground truth *.txt beside the images
    root = d / "MME/MME_Benchmark_release_version"
    qs = [{"question_id": "code_reasoning/0020.png", "image": "code_reasoning/0020.png",
           "text": "Is a python code shown in the picture?" + SHORT, "category": "code_reasoning"},
          {"question_id": "code_reasoning/0020.png", "image": "code_reasoning/0020.png",
           "text": "Is a c++ code shown in the picture?" + SHORT, "category": "code_reasoning"},
          {"question_id": "existence/000000006040.jpg", "image": "existence/000000006040.jpg",
           "text": "Is there a train in this image?" + SHORT, "category": "existence"}]
    _jsonl(d / "MME/llava_mme.jsonl", qs)
    _vqa(d, "MME/MME_Benchmark_release_version", qs, [q["image"] for q in qs])
    (root / "code_reasoning/0020.txt").write_text(
        "Is a python code shown in the picture? Please answer yes or no.\tYes\n"
        "Is a c++ code shown in the picture? Please answer yes or no.\tNo\n")
    (root / "existence/000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n")
    # ScienceQA (LLaVA's llava_test_CQM-A.json): the truth letter in the "gpt" turn; one without image
    qs = [{"id": "5", "image": "5/image.png", "conversations": [
               {"from": "human", "value": "<image>\nContext: A wind tunnel.\nWhich vent size?\nA. 1 m\nB. 2 m"},
               {"from": "gpt", "value": "B"}]},
          {"id": "4", "conversations": [
               {"from": "human", "value": "Which figure of speech is used in this text?\nSing, O goddess.\nA. chiasmus\nB. apostrophe"},
               {"from": "gpt", "value": "B"}]},
          {"id": "11", "image": "11/image.png", "conversations": [
               {"from": "human", "value": "<image>\nWhat is the name of the colony shown?\nA. Maryland\nB. New Hampshire\nC. Rhode Island\nD. Vermont"},
               {"from": "gpt", "value": "B"}]}]
    _json(d / "scienceqa/llava_test_CQM-A.json", qs)
    _vqa(d, "scienceqa/images/test", qs, [q["image"] for q in qs if "image" in q])
    # MMBench / MMBench-CN dev TSVs (base64 images, answers; 1000000 + i is a circular copy of i)
    for name, lang_q in (("mmbench/mmbench_dev_20230712.tsv", "Which color is the box?"),
                         ("mmbench_cn/mmbench_dev_cn_20231003.tsv", "盒子是什么颜色？")):
        _mmbench_tsv(d / name, [
            {"index": 0, "question": lang_q, "hint": "nan", "A": "red", "B": "blue", "C": "green",
             "answer": "A", "category": "color", "image": _png_b64(0), "source": "s",
             "l2-category": "l2", "comment": "nan", "split": "dev"},
            {"index": 1, "question": lang_q, "hint": "A hint.", "A": "yes", "B": "no",
             "answer": "B", "category": "color", "image": _png_b64(1), "source": "s",
             "l2-category": "l2", "comment": "nan", "split": "dev"},
            {"index": 1000000, "question": lang_q, "hint": "nan", "A": "blue", "B": "green", "C": "red",
             "answer": "C", "category": "color", "image": _png_b64(0), "source": "s",
             "l2-category": "l2", "comment": "nan", "split": "dev"}])
    # VQAv2 test-dev questions; the full test2015 split (a superset) for the upload file
    qs = [{"question_id": 262144000 + i, "image": f"COCO_test2015_00000026214{i}.jpg",
           "text": q + SHORT, "category": "default"}
          for i, q in enumerate(("Is the ball flying towards the batter?", "What color is the sky?"))]
    _jsonl(d / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", qs)
    _jsonl(d / "vqav2/llava_vqav2_mscoco_test2015.jsonl",
           qs + [{"question_id": 262145000, "image": "COCO_test2015_000000262145.jpg",
                  "text": "How many?" + SHORT, "category": "default"}])
    _vqa(d, "vqav2/test2015", qs, [q["image"] for q in qs])
    # VizWiz
    vz = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    qs = [{"question_id": i, "image": f"VizWiz_test_0000000{i}.jpg", "text": t + vz + SHORT,
           "category": "default"} for i, t in enumerate(("What is this?", "What color is it?"))]
    _jsonl(d / "vizwiz/llava_test.jsonl", qs)
    _vqa(d, "vizwiz/test", qs, [q["image"] for q in qs])
    # SEED-Bench (image questions; images under seed_bench/SEED-Bench-image)
    qs = [{"image": f"SEED-Bench-image/145442{i}_259111198{i}.jpg", "category": "Scene Understanding",
           "question_id": str(101669 + i),
           "text": "How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four" + LETTER}
          for i in range(2)]
    _jsonl(d / "seed_bench/llava-seed-bench.jsonl", qs)
    _vqa(d, "seed_bench", qs, [q["image"] for q in qs])
    _json(d / "seed_bench/SEED-Bench.json", {"question_type": {"Scene Understanding": 1}, "questions": [
        {"question_id": q["question_id"], "answer": "AB"[i], "data_type": "image", "question_type_id": 1,
         "data_id": q["image"].split("/")[1]} for i, q in enumerate(qs)]})
    # MM-Vet
    qs = [{"image": "v1_0.png", "text": "What is x in the equation?", "category": "conv", "question_id": 0},
          {"image": "v1_1.png", "text": "What is d in the last equation?", "category": "conv", "question_id": 1}]
    _jsonl(d / "mm-vet/llava-mm-vet.jsonl", qs)
    _vqa(d, "mm-vet/images", qs, [q["image"] for q in qs])
    # CHAIR: question file as `chair-questions` writes it, COCO instances for the truth
    ids = (42, 73, 139)
    qs = [{"question_id": i, "image": f"COCO_val2014_{i:012d}.jpg",
           "text": "Please describe this image in detail.", "category": "default"} for i in ids]
    _jsonl(d / "chair/llava_chair_val2014_500.jsonl", qs)
    _vqa(d, "chair/val2014", qs, [q["image"] for q in qs])
    _json(d / "chair/annotations/instances_val2014.json", {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in ids],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
        "annotations": [{"id": 1, "image_id": 42, "category_id": 1}, {"id": 2, "image_id": 73, "category_id": 18},
                        {"id": 3, "image_id": 139, "category_id": 3}]})



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from llava_agile.assets import build_tiny_llava
    from llava_agile.eval import benchmarks

    root = tmp_path_factory.mktemp("evalscripts")
    model = build_tiny_llava(str(root / "model"), seed=0)
    data = root / "eval"
    build_data(data)
    qfiles = {b: benchmarks.paths(b, str(data))["questions"] for b in BENCHES}
    return {"root": root, "model": model, "data": data, "qfiles": qfiles}


def run_script(env, bench, *flags, out=None, gpus="", data=None, script=None):
    e = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES=gpus, OMP_NUM_THREADS="1",
             TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = ["bash", str(SCRIPTS / (script or f"{bench}.sh")), *([bench] if script else []), *flags,
           "--model-path", env["model"], "--data-root", str(data or env["data"]),
           "--out", str(out or env["root"] / "out")]
    return subprocess.run(cmd, cwd=env["root"], env=e, capture_output=True, text=True, timeout=600)


def bench_dir(env, bench, method, keep, out=None):
    return layout.bench_dir(out or env["root"] / "out", MODEL_NAME, method, keep, bench)


def expected_keys(bench, questions):
    """(question id, prompt or None) of every question, in order, as the answers must have them."""
    if bench == "sqa":
        return [(q["id"], None) for q in questions]
    if bench in ("mmbench", "mmbench_cn"):
        return [(int(q["index"]), None) for q in questions]
    return [(q["question_id"], q["text"]) for q in questions]


# ---------------------------------------------------------------- every script, end to end

# CUDA_VISIBLE_DEVICES: "-1,-2" names two devices that no machine has, so even on a GPU machine
# the driver runs two chunks in parallel on the CPU and merges them in question order
CASES = [  # bench, method, keep, extra flags, CUDA_VISIBLE_DEVICES
    ("gqa", "adaptive", 32, [], "-1,-2"),
    ("textvqa", "attention", 16, [], ""),
    ("pope", "diversity", 24, [], ""),
    ("mme", "none", None, [], ""),
    ("sqa", "vispruner", 32, [], ""),
    ("mmbench", "fps", 16, [], ""),
    ("mmbench_cn", "random", 8, [], ""),
    ("vqav2", "mix", 20, [], "-1"),
    ("vizwiz", "adaptive", 64, ["--pruning-args", "tau_max=0.3,stats=full"], ""),
    ("seed", "attention", 48, [], ""),
    ("mmvet", "diversity", 12, [], ""),
    ("chair", "adaptive", 64, [], ""),
]


@pytest.mark.parametrize("bench,method,keep,extra,gpus", CASES, ids=[c[0] for c in CASES])
def test_script_end_to_end(env, bench, method, keep, extra, gpus):
    flags = ["--pruning", method] + (["--keep", str(keep)] if keep else []) + extra
    proc = run_script(env, bench, *flags, "--max-new-tokens", "3", gpus=gpus)
    assert proc.returncode == 0, proc.stderr[-4000:]
    keep = keep or 576
    bdir = bench_dir(env, bench, method, keep)
    questions = load_questions(env["qfiles"][bench])
    n = len(questions)

    # every question answered once, in question order, by the tiny model
    answers = read_jsonl(layout.answers_path(bdir))
    got = [(a["question_id"], a["prompt"] if bench not in ("sqa", "mmbench", "mmbench_cn") else None)
           for a in answers]
    assert got == expected_keys(bench, questions)
    assert all(isinstance(a["text"], str) and a["model_id"] == MODEL_NAME for a in answers)
    parts = layout.chunk_parts(bdir)
    assert [p.name for p in parts] == (["2_0.jsonl", "2_1.jsonl"] if "," in gpus else ["1_0.jsonl"])
    assert "(the CPU: no GPU visible)" in proc.stderr
    assert sum(len(read_jsonl(p)) for p in parts) == n

    # results.json is the scorer's output on the merged answers
    results = json.loads(layout.results_path(bdir).read_text())
    again = score(bench, layout.answers_path(bdir), env["qfiles"][bench], None,
                  env["root"] / "rescore" / bench / "upload", True, str(env["data"]))
    if "upload_file" in results:
        assert Path(results["upload_file"]) == layout.upload_path(bdir, bench)
        assert layout.upload_path(bdir, bench).is_file()
        again["upload_file"] = results["upload_file"]
    assert results == again

    # pruning really ran: every image got `keep` tokens (576 = all for `none`)
    stats = [json.loads(l) for p in (bdir / "stats").glob("*.jsonl") for l in p.read_text().splitlines()]
    assert len(stats) == n
    kept = [k for s in stats for k in s["kept"]]
    n_images = sum(1 for q in questions if bench in ("mmbench", "mmbench_cn") or "image" in q)
    assert kept == [keep] * n_images and sum(s["images"] for s in stats) == n_images
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"[{bench}] {n} questions ({n} answered now) | {float(keep):.1f} kept tokens/image")
    assert "s/sample" in line and str(layout.results_path(bdir)) in line
    record = json.loads((bdir / "run.json").read_text())
    assert record["pruning"]["method"] == method and record["pruning"]["keep"] == keep
    assert record["pruning"]["stats"] == ("full" if "tau_max=0.3,stats=full" in extra else "basic")
    assert record["conv_mode"] == "vicuna_v1" and record["temperature"] == 0
    _check_results(bench, results, n, bdir)


def _check_results(bench, r, n, bdir):
    """Benchmark-specific fields (the tiny model's answers are noise, so mostly counts)."""
    if bench in ("gqa", "textvqa"):
        assert r["n"] == n and r["missing"] == 0 and 0 <= r["accuracy"] <= 100
    elif bench == "pope":
        assert set(r["categories"]) == {"adversarial", "popular", "random"} and r["n"] == n
        assert 0 <= r["f1"] <= 100
    elif bench == "mme":
        assert set(r["tasks"]) == {"code_reasoning", "existence"} and r["n"] == n and r["missing"] == 0
        assert r["total"] == pytest.approx(r["perception"] + r["cognition"])
    elif bench == "sqa":
        assert (r["n"], r["n_img"], r["missing"]) == (3, 2, 0)
    elif bench in ("mmbench", "mmbench_cn"):
        assert r["n"] == 2 and r["missing"] == 0 and 0 <= r["circular_accuracy"] <= 100
    elif bench == "seed":
        assert r["n_img"] == n and r["missing"] == 0
        assert len(layout.upload_path(bdir, bench).read_text().splitlines()) == n
    elif bench == "vqav2":
        up = json.loads(layout.upload_path(bdir, bench).read_text())
        assert [u["question_id"] for u in up] == [262144000, 262144001, 262145000]
        assert up[-1]["answer"] == "" and r["n"] == n and r["server_scored"]
    elif bench == "vizwiz":
        up = json.loads(layout.upload_path(bdir, bench).read_text())
        assert [u["image"] for u in up] == ["VizWiz_test_00000000.jpg", "VizWiz_test_00000001.jpg"]
    elif bench == "mmvet":
        assert list(json.loads(layout.upload_path(bdir, bench).read_text())) == ["v1_0", "v1_1"]
    elif bench == "chair":
        assert r["n"] == n and 0 <= r["chair_s"] <= 100 and r["gt_sources"] == ["instances"]


# ---------------------------------------------------------------- resume

def test_resume_answers_only_the_rest(env):
    """A killed run leaves a chunk file with some answers and a cut last line: the rerun answers
    only the other questions (MME: two questions share one id, told apart by their prompt)."""
    out = env["root"] / "out-resume"
    bdir = bench_dir(env, "mme", "attention", 8, out)
    questions = load_questions(env["qfiles"]["mme"])
    first = {"question_id": questions[0]["question_id"], "prompt": questions[0]["text"], "text": "Yes",
             "answer_id": "kept-from-before", "model_id": MODEL_NAME, "metadata": {}}
    part0 = bdir / "chunks" / "1_0.jsonl"
    part0.parent.mkdir(parents=True)
    cut = json.dumps(dict(first, prompt=questions[1]["text"], answer_id="cut"))[:40]
    part0.write_text(json.dumps(first) + "\n" + cut)
    proc = run_script(env, "mme", "--pruning", "attention", "--keep", "8", "--max-new-tokens", "2", out=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{len(questions) - 1} of {len(questions)} questions to answer" in proc.stderr
    new = read_jsonl(bdir / "chunks" / "1_0.1.jsonl")
    assert [(a["question_id"], a["prompt"]) for a in new] == expected_keys("mme", questions[1:])
    merged = read_jsonl(layout.answers_path(bdir))
    assert [(a["question_id"], a["prompt"]) for a in merged] == expected_keys("mme", questions)
    assert merged[0] == first                      # the earlier answer is kept as it was
    assert not (bdir / "chunks" / "pending.jsonl").exists()
    assert proc.stdout.strip().splitlines()[-1].startswith(
        f"[mme] {len(questions)} questions ({len(questions) - 1} answered now) | 8.0 kept tokens/image")


# ---------------------------------------------------------------- rerun, refusal, --overwrite

def test_rerun_is_a_noop_and_nothing_is_overwritten(env):
    out = env["root"] / "out-overwrite"
    flags = ["--pruning", "attention", "--keep", "16"]
    bdir = bench_dir(env, "vizwiz", "attention", 16, out)
    proc = run_script(env, "vizwiz", *flags, "--max-new-tokens", "3", out=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = {p: p.read_bytes() for p in bdir.rglob("*") if p.is_file()}

    # a finished run: nothing to answer, nothing changes
    proc = run_script(env, "vizwiz", *flags, "--max-new-tokens", "3", out=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(0 answered now)" in proc.stdout
    assert {p: p.read_bytes() for p in bdir.rglob("*") if p.is_file()} == files

    # answers from another configuration are not mixed in or replaced
    proc = run_script(env, "vizwiz", *flags, "--max-new-tokens", "2", out=out)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "max_new_tokens" in err[0] and "--overwrite" in err[0]
    assert {p: p.read_bytes() for p in bdir.rglob("*") if p.is_file()} == files

    # a results file that differs is kept
    layout.results_path(bdir).write_text("{}\n")
    proc = run_script(env, "vizwiz", *flags, "--max-new-tokens", "3", out=out)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert layout.results_path(bdir).read_text() == "{}\n"

    # --overwrite starts over
    proc = run_script(env, "vizwiz", *flags, "--max-new-tokens", "2", "--overwrite", out=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((bdir / "run.json").read_text())["max_new_tokens"] == 2
    assert [p.name for p in layout.chunk_parts(bdir)] == ["1_0.jsonl"]
    assert json.loads(layout.results_path(bdir).read_text())["n"] == 2


# ---------------------------------------------------------------- bad input (no model is loaded)

def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_bad_input(env, tmp_path):
    err = _one_line_error(run_script(env, "foo", "--pruning", "adaptive", "--keep", "64", script="common.sh"))
    assert "unknown benchmark 'foo'" in err and "gqa, textvqa, pope" in err and "chair" in err
    err = _one_line_error(run_script(env, "gqa", "--pruning", "fastest", "--keep", "64"))
    assert "unknown pruning method 'fastest'" in err and "adaptive, attention" in err
    err = _one_line_error(run_script(env, "gqa", "--pruning", "adaptive"))
    assert "--keep" in err
    err = _one_line_error(run_script(env, "gqa", "--pruning", "adaptive", "--keep", "64",
                                     data=tmp_path / "empty"))
    assert str(tmp_path / "empty" / "gqa" / "llava_gqa_testdev_balanced.jsonl") in err
    assert "download GQA" in err
    # a missing image: named, with the download step, and nothing written
    data = tmp_path / "eval"
    shutil.copytree(env["data"] / "pope", data / "pope")
    (data / "pope/val2014/COCO_val2014_000000310191.jpg").unlink()
    out = tmp_path / "out"
    err = _one_line_error(run_script(env, "pope", "--pruning", "adaptive", "--keep", "64", data=data, out=out))
    assert "pope/val2014/COCO_val2014_000000310191.jpg" in err and "POPE step 1" in err
    assert not out.exists()


# ---------------------------------------------------------------- LLAVA_DIR: a patched checkout

@pytest.mark.skipif(shutil.which("git") is None, reason="patches/apply.sh needs git")
def test_llava_dir_runs_the_patched_checkout(env, tmp_path):
    import llava

    checkout = tmp_path / "LLaVA"
    shutil.copytree(Path(llava.__file__).parent, checkout / "llava",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    # not patched yet: refused before any answer is written
    proc = run_script(env, "textvqa", "--pruning", "attention", "--keep", "8", "--max-new-tokens", "2",
                      "--llava-dir", str(checkout), out=out)
    err = _one_line_error(proc)
    assert "is not patched" in err and "patches/apply.sh" in err and not out.exists()
    applied = subprocess.run(["bash", str(ROOT / "patches/apply.sh"), str(checkout)],
                             capture_output=True, text=True, timeout=120)
    assert applied.returncode == 0, applied.stderr
    proc = run_script(env, "textvqa", "--pruning", "attention", "--keep", "8", "--max-new-tokens", "2",
                      "--llava-dir", str(checkout), out=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    bdir = bench_dir(env, "textvqa", "attention", 8, out)
    log = (bdir / "logs" / "1_0.log").read_text()
    assert "--llava-dir" in log and "llava_agile.run" not in log   # the checkout's own module ran
    questions = load_questions(env["qfiles"]["textvqa"])
    answers = read_jsonl(layout.answers_path(bdir))
    assert [(a["question_id"], a["prompt"]) for a in answers] == expected_keys("textvqa", questions)
    assert "| 8.0 kept tokens/image |" in proc.stdout
