"""`python -m llava_agile.eval report`: table, % of the full-token run, CSV, PNG."""
import csv
import io
import json

import pytest
import torch

from llava_agile.eval import layout
from llava_agile.eval.__main__ import main
from llava_agile.eval.report import collect, relative, report

torch.set_num_threads(1)


def put(root, model, method, keep, bench, res):
    p = layout.results_path(layout.bench_dir(root, model, method, keep, bench))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(dict(res, benchmark=bench)))
    return p


@pytest.fixture
def results(tmp_path):
    m = "llava-v1.5-7b"
    put(tmp_path, m, "none", 576, "gqa", {"accuracy": 60.0})
    put(tmp_path, m, "none", 576, "mme", {"perception": 1500.0, "cognition": 300.0, "total": 1800.0})
    put(tmp_path, m, "none", 576, "pope", {"f1": 85.0, "accuracy": 86.0})
    put(tmp_path, m, "none", 576, "chair", {"chair_s": 50.0, "chair_i": 14.0, "recall": 78.0})
    put(tmp_path, m, "adaptive", 64, "gqa", {"accuracy": 57.0})
    put(tmp_path, m, "adaptive", 64, "mme", {"perception": 1400.0, "cognition": 300.0, "total": 1700.0})
    put(tmp_path, m, "adaptive", 64, "pope", {"f1": 84.0})
    put(tmp_path, m, "adaptive", 64, "chair", {"chair_s": 52.0, "chair_i": 15.9, "recall": 75.7})
    put(tmp_path, m, "adaptive", 128, "gqa", {"accuracy": 59.0})
    put(tmp_path, m, "random", 64, "gqa", {"accuracy": 50.0})
    put(tmp_path, m, "random", 64, "vqav2", {"server_scored": True, "n": 3})  # no score: skipped
    put(tmp_path, "other-model", "attention", 32, "gqa", {"accuracy": 40.0})
    return tmp_path


def test_relative_scores_both_mme_conventions(results):
    runs = collect([results])
    rel = relative(runs)
    k = ("llava-v1.5-7b", "adaptive", 64)
    assert runs[k] == {"GQA": 57.0, "MME": 1700.0, "MME-P": 1400.0, "POPE": 84.0,
                       "CHAIR_S": 52.0, "CHAIR_I": 15.9, "CHAIR-R": 75.7}
    assert rel[k]["GQA"] == pytest.approx(95.0)
    pc = (95.0 + 100 * 1700 / 1800 + 100 * 84 / 85) / 3
    p_only = (95.0 + 100 * 1400 / 1500 + 100 * 84 / 85) / 3
    assert rel[k]["Avg% (MME P+C)"] == pytest.approx(pc)
    assert rel[k]["Avg% (MME P)"] == pytest.approx(p_only)
    assert "CHAIR_S" not in rel[k]  # hallucination rates are not averaged
    assert rel[("llava-v1.5-7b", "none", 576)]["Avg% (MME P+C)"] == pytest.approx(100.0)
    assert rel[("llava-v1.5-7b", "adaptive", 128)] == {"GQA": pytest.approx(59 / 60 * 100),
                                                       "Avg% (MME P+C)": pytest.approx(59 / 60 * 100),
                                                       "Avg% (MME P)": pytest.approx(59 / 60 * 100)}
    assert rel[("other-model", "attention", 32)] == {}  # no full-token run for that model


def test_report_files_and_cli(results, capsys):
    assert main(["report", str(results)]) == 0
    md = capsys.readouterr().out
    assert md == (results / "report.md").read_text() + "\n"
    lines = md.splitlines()
    head = next(l for l in lines if l.startswith("| Method | Tokens | GQA"))
    assert head.split(" | ")[2:] == ["GQA", "POPE", "MME", "MME-P", "CHAIR_S", "CHAIR_I", "CHAIR-R",
                                     "Avg% (MME P+C)", "Avg% (MME P) |"]
    first = lines.index(head) + 2
    assert lines[first].startswith("| none | 576 | 60.00 | 85.00 | 1800.00 | 1500.00 | 50.00")
    assert lines[first + 1].startswith("| adaptive | 128 | 59.00 |")
    assert lines[first + 2].startswith("| adaptive | 64 | 57.00 | 84.00 | 1700.00 | 1400.00")
    assert "| random | 64 | 50.00 |" in md and "## other-model" in md and "no full-token run" in md
    table = list(csv.DictReader(io.StringIO((results / "report.csv").read_text())))
    gqa64 = next(r for r in table if r["method"] == "adaptive" and r["keep"] == "64" and r["column"] == "GQA")
    assert float(gqa64["value"]) == 57.0 and float(gqa64["pct_of_full"]) == pytest.approx(95.0)
    assert any(r["column"] == "Avg% (MME P)" for r in table)
    png = (results / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # same inputs: rerun is fine; changed inputs: refused without --overwrite
    assert main(["report", str(results)]) == 0
    put(results, "llava-v1.5-7b", "adaptive", 32, "gqa", {"accuracy": 55.0})
    capsys.readouterr()
    assert main(["report", str(results)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["report", str(results), "--overwrite"]) == 0
    assert "| adaptive | 32 | 55.00 |" in (results / "report.md").read_text()


def test_report_merges_dirs_and_rejects_conflicts(tmp_path, results):
    other = tmp_path / "other_root"
    put(other, "llava-v1.5-7b", "fps", 64, "gqa", {"accuracy": 56.0})
    out = tmp_path / "rep"
    res = report([results, other, results / "llava-v1.5-7b"], out=out, plot=False)
    assert "| fps | 64 | 56.00 |" in res["markdown_text"] and "png" not in res
    put(other, "llava-v1.5-7b", "none", 576, "gqa", {"accuracy": 61.0})
    with pytest.raises(ValueError, match="two results"):
        collect([results, other])
    with pytest.raises(ValueError, match="no <model>"):
        collect([tmp_path / "rep"])


def test_report_on_scored_results(tmp_path, capsys):
    """End to end: score answers into the layout with --out, then report."""
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({str(i): {"answer": "yes"} for i in range(4)}))
    for method, keep, n_right in (("none", 576, 4), ("adaptive", 64, 3)):
        d = layout.bench_dir(tmp_path / "out", "tiny-llava", method, keep, "gqa")
        d.mkdir(parents=True)
        layout.answers_path(d).write_text("".join(
            json.dumps({"question_id": str(i), "prompt": "q", "text": "Yes" if i < n_right else "No"}) + "\n"
            for i in range(4)))
        assert main(["score", "gqa", "--answers", str(layout.answers_path(d)), "--annotations", str(gt),
                     "--out", str(layout.results_path(d))]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out"), "--no-plot"]) == 0
    md = capsys.readouterr().out
    assert "| none | 576 | 100.00 | 100.0 | 100.0 |" in md
    assert "| adaptive | 64 | 75.00 | 75.0 | 75.0 |" in md
