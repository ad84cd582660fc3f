"""Results layout and resumable answer files (llava_agile.eval.layout / .answers)."""
import json
import random

import pytest
import torch

from llava_agile.eval import layout
from llava_agile.eval.answers import (dump_questions, finished_ids, load_questions, merge_answers,
                                      pending_questions, read_jsonl, record_key, repair_jsonl,
                                      write_output)

torch.set_num_threads(1)
from conftest import EVAL_SAMPLES

SAMPLES = str(EVAL_SAMPLES)


def _write(path, recs, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return path


def _answer(q, text="yes"):
    return {"question_id": q["question_id"], "prompt": q["text"], "text": text,
            "answer_id": "x", "model_id": "m", "metadata": {}}


# ---------------------------------------------------------------- layout
def test_layout_round_trip(tmp_path):
    d = layout.bench_dir(tmp_path, "llava-v1.5-7b", "adaptive", 64, "gqa")
    assert d == tmp_path / "llava-v1.5-7b" / "adaptive" / "k64" / "gqa"
    assert layout.parse_bench_dir(d) == ("llava-v1.5-7b", "adaptive", 64, "gqa")
    assert layout.answers_path(d).name == "answers.jsonl"
    assert layout.results_path(d).name == "results.json"
    assert layout.upload_path(d, "vqav2").name == "answers_upload.json"
    assert layout.upload_path(d, "mmbench").suffix == ".xlsx"
    with pytest.raises(ValueError, match="no upload file"):
        layout.upload_path(d, "gqa")


@pytest.mark.parametrize("bad", [dict(model="../x"), dict(method="a/b"), dict(keep=0),
                                 dict(keep="64"), dict(bench="")])
def test_layout_rejects_bad_names(tmp_path, bad):
    kw = dict(model="m", method="none", keep=576, bench="gqa", **{})
    kw.update(bad)
    with pytest.raises(ValueError):
        layout.bench_dir(tmp_path, **kw)


def test_model_name_from_path():
    assert layout.model_name_from_path("liuhaotian/llava-v1.5-7b") == "llava-v1.5-7b"
    assert layout.model_name_from_path("/ckpts/llava-x/checkpoint-500/") == "llava-x_checkpoint-500"
    with pytest.raises(ValueError):
        layout.model_name_from_path("/")


def test_chunk_parts_order_and_new_part(tmp_path):
    d = tmp_path / "b"
    p0 = layout.chunk_path(d, 2, 0)
    assert p0.name == "2_0.jsonl" and p0.parent.name == "chunks"
    assert layout.new_chunk_part(d, 2, 1) == layout.chunk_path(d, 2, 1)
    for name in ["2_1.jsonl", "2_0.jsonl", "2_0.1.jsonl", "2_0.10.jsonl", "2_0.2.jsonl", "junk.txt"]:
        _write(d / "chunks" / name, [])
    assert [p.name for p in layout.chunk_parts(d)] == ["2_0.jsonl", "2_0.1.jsonl", "2_0.2.jsonl",
                                                       "2_0.10.jsonl", "2_1.jsonl"]
    assert layout.new_chunk_part(d, 2, 0).name == "2_0.3.jsonl"
    with pytest.raises(ValueError):
        layout.chunk_path(d, 2, 2)


def test_iter_results_skips_other_files(tmp_path):
    good = layout.results_path(layout.bench_dir(tmp_path, "m", "none", 576, "pope"))
    _write(good, [])
    _write(tmp_path / "stray" / "results.json", [])
    assert [k for k, _ in layout.iter_results(tmp_path)] == [("m", "none", 576, "pope")]
    with pytest.raises(FileNotFoundError):
        list(layout.iter_results(tmp_path / "nope"))


# ---------------------------------------------------------------- reading / resuming
def test_truncated_last_line_is_skipped_and_repaired(tmp_path, capsys):
    p = _write(tmp_path / "a.jsonl", [{"question_id": 1, "text": "a"}, {"question_id": 2, "text": "b"}],
               tail='{"question_id": 3, "te')
    assert [r["question_id"] for r in read_jsonl(p)] == [1, 2]
    assert "truncated" in capsys.readouterr().err
    assert finished_ids(p) == {"1", "2"}
    assert repair_jsonl(p) == 2
    with open(p, "a") as f:
        f.write(json.dumps({"question_id": 3, "text": "c"}) + "\n")
    assert [r["question_id"] for r in read_jsonl(p)] == [1, 2, 3]


def test_repair_adds_missing_newline(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"question_id": 1, "text": "a"}')
    assert repair_jsonl(p) == 1
    assert p.read_text().endswith("\n")


def test_corrupt_middle_line_is_an_error(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"question_id": 1}\nnot json\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_jsonl(p)


def test_missing_answers_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    assert finished_ids(tmp_path / "nope.jsonl") == set()


def test_pending_with_shared_ids_textvqa_and_mme(tmp_path):
    """TextVQA and MME reuse one id for two questions of an image: match by prompt too."""
    for name in ("textvqa_questions.jsonl", "mme_questions.jsonl"):
        qs = load_questions(f"{SAMPLES}/{name}")
        ids = [q["question_id"] for q in qs]
        assert len(set(ids)) < len(ids)  # the samples do share ids
        for k in range(len(qs) + 1):  # every cut, including between the two questions of an image
            p = _write(tmp_path / name, [_answer(q) for q in qs[:k]])
            assert pending_questions(qs, [p, tmp_path / "missing.jsonl"]) == qs[k:]
        # answered out of order: exactly the unanswered ones stay pending
        p = _write(tmp_path / name, [_answer(q) for q in qs[1::2]])
        assert pending_questions(qs, p) == qs[0::2]


def test_pending_int_ids_and_str_ids_match(tmp_path):
    qs = load_questions(f"{SAMPLES}/pope_questions.jsonl")
    recs = [dict(_answer(q), question_id=str(q["question_id"])) for q in qs[::2]]
    p = _write(tmp_path / "a.jsonl", recs)
    assert pending_questions(qs, p) == qs[1::2]


def test_pending_sqa_json_questions(tmp_path):
    qs = load_questions(f"{SAMPLES}/sqa_questions_CQM-A_first60.json")
    ans = read_jsonl(f"{SAMPLES}/sqa_answers_llava-v1.5-13b_first60.jsonl")
    p = _write(tmp_path / "a.jsonl", ans[:25])
    assert pending_questions(qs, p) == qs[25:]
    again = json.loads(dump_questions("x.json", qs[25:]))
    assert again == qs[25:]


def test_finished_all_rounds(tmp_path):
    base = {"prompt": "q", "text": "A", "options": ["x", "y", "z"]}
    recs = [dict(base, question_id=1, round_id=r) for r in range(3)] + \
           [dict(base, question_id=2, round_id=r) for r in range(2)]
    p = _write(tmp_path / "a.jsonl", recs)
    assert finished_ids(p) == {"1", "2"}
    assert finished_ids(p, all_rounds=True) == {"1"}
    qs = [{"index": 1, "question": "q"}, {"index": 2, "question": "q"}]
    assert pending_questions(qs, p, all_rounds=True) == [qs[1]]


# ---------------------------------------------------------------- merging
def test_merge_chunks_in_question_order_no_loss_no_duplicates(tmp_path):
    qs = load_questions(f"{SAMPLES}/textvqa_questions.jsonl")
    ans = [_answer(q, text=f"a{i}") for i, q in enumerate(qs)]
    rng = random.Random(0)
    c0, c1 = ans[:20], ans[20:]
    rng.shuffle(c1)
    p0 = _write(tmp_path / "chunks" / "2_0.jsonl", c0)
    # chunk 1 was killed, resumed in part 1 that redid two answers
    p1 = _write(tmp_path / "chunks" / "2_1.jsonl", c1[:12], tail='{"question_id": "x')
    p1b = _write(tmp_path / "chunks" / "2_1.1.jsonl", c1[10:])
    out = tmp_path / "answers.jsonl"
    info = merge_answers([p0, p1, p1b], out, qs)
    assert info == {"records": 40, "missing": 0, "duplicates": 2}
    assert read_jsonl(out) == ans  # exactly question order, every answer once
    # re-merging is idempotent; an existing merged file is never lost
    assert merge_answers([p0, p1, p1b], out, qs)["records"] == 40
    assert read_jsonl(out) == ans
    merge_answers([p0], out, qs)
    assert read_jsonl(out) == ans
    info = merge_answers([p0], out, qs, overwrite=True)
    assert read_jsonl(out) == ans[:20] and info["missing"] == 20


def test_merge_without_questions_concatenates(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"question_id": 2, "text": "b"}, {"question_id": 1, "text": "a"}])
    b = _write(tmp_path / "b.jsonl", [{"question_id": 1, "text": "z"}, {"question_id": 3, "text": "c"}])
    merge_answers([a, b], tmp_path / "o.jsonl")
    assert [(r["question_id"], r["text"]) for r in read_jsonl(tmp_path / "o.jsonl")] == \
        [(2, "b"), (1, "a"), (3, "c")]


def test_merge_rejects_unknown_ids(tmp_path):
    qs = [{"question_id": 1, "text": "q"}]
    a = _write(tmp_path / "a.jsonl", [{"question_id": 9, "prompt": "q", "text": "x"}])
    with pytest.raises(ValueError, match="wrong question file"):
        merge_answers([a], tmp_path / "o.jsonl", qs)
    assert not (tmp_path / "o.jsonl").exists()


def test_merge_keeps_rounds_in_order(tmp_path):
    recs = [{"question_id": 5, "round_id": r, "prompt": "p", "text": "A"} for r in (2, 0, 1)]
    a = _write(tmp_path / "a.jsonl", recs)
    merge_answers([a], tmp_path / "o.jsonl", [{"index": 5}])
    assert [record_key(r)[1] for r in read_jsonl(tmp_path / "o.jsonl")] == [0, 1, 2]


def test_write_output_overwrite_policy(tmp_path):
    p = tmp_path / "r.json"
    write_output(p, "a")
    write_output(p, "a")  # identical: fine
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_output(p, "b")
    assert p.read_text() == "a"
    write_output(p, "b", overwrite=True)
    assert p.read_text() == "b"


# ---------------------------------------------------------------- CLI: pending + merge (the resume cycle)
def test_cli_resume_cycle(tmp_path, capsys):
    from llava_agile.eval.__main__ import main
    qs = load_questions(f"{SAMPLES}/mme_questions.jsonl")
    qf = f"{SAMPLES}/mme_questions.jsonl"
    d = layout.bench_dir(tmp_path, "m", "adaptive", 64, "mme")
    # first run: 2 chunks, chunk 1 killed after 5 answers (plus a torn line)
    _write(layout.chunk_path(d, 2, 0), [_answer(q) for q in qs[:20]])
    _write(layout.chunk_path(d, 2, 1), [_answer(q) for q in qs[20:25]], tail='{"quest')
    parts = [str(p) for p in layout.chunk_parts(d)]
    todo = tmp_path / "pending.jsonl"
    assert main(["pending", "--questions", qf, "--answers", *parts, "--out", str(todo)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pending"] == 15 and read_jsonl(todo) == qs[25:]
    # the resumed chunk writes a new part; merge puts everything in question order once
    part = layout.new_chunk_part(d, 2, 1)
    assert part.name == "2_1.1.jsonl"
    _write(part, [_answer(q) for q in read_jsonl(todo)])
    assert main(["merge", "--bench-dir", str(d), "--questions", qf]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"] == 40 and info["missing"] == 0 and info["duplicates"] == 0
    assert [(r["question_id"], r["prompt"]) for r in read_jsonl(layout.answers_path(d))] == \
        [(q["question_id"], q["text"]) for q in qs]
    # pending output is never silently replaced
    assert main(["pending", "--questions", qf, "--answers", str(layout.answers_path(d)), "--out", str(todo)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_layout(tmp_path, capsys):
    from llava_agile.eval.__main__ import main
    argv = ["layout", "--out", str(tmp_path), "--model-path", "liuhaotian/llava-v1.5-7b", "--method", "adaptive",
            "--keep", "64", "--bench", "vqav2", "--chunks", "2", "--idx", "1"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    d = layout.bench_dir(tmp_path, "llava-v1.5-7b", "adaptive", 64, "vqav2")
    assert info == {"model": "llava-v1.5-7b", "bench_dir": str(d), "answers": str(d / "answers.jsonl"),
                    "results": str(d / "results.json"), "upload": str(d / "answers_upload.json"),
                    "chunk": str(d / "chunks" / "2_1.jsonl")}
    _write(d / "chunks" / "2_1.jsonl", [])
    assert main(argv + ["--get", "chunk"]) == 0
    assert capsys.readouterr().out.strip() == str(d / "chunks" / "2_1.1.jsonl")
    assert main(argv[:-2] + ["--idx", "5"]) == 2
    assert "bad chunk" in capsys.readouterr().err
    assert main([a if a != "vqav2" else "nope" for a in argv]) == 2
    assert "valid: gqa" in capsys.readouterr().err
