"""`python -m llava_agile.run`: LLaVA's unchanged eval modules with pruning, on CPU, tiny model."""
import ast
import json
import os
import subprocess
import sys

import pytest
import torch

from llava_agile.run import MODULES, CudaToCpu, main, parser, pruned_loader

sys.path.insert(0, os.path.dirname(__file__))
from llava_probe import make_inputs, run_probe  # noqa: E402

torch.set_num_threads(1)
N_TOKENS = 576   # 336 / 14 squared


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from llava_agile.assets import build_tiny_llava

    root = tmp_path_factory.mktemp("runner")
    model = build_tiny_llava(str(root / "model"), seed=0)
    work = root / "work"
    work.mkdir()
    return {"model": model, "work": str(work), **make_inputs(str(root))}


def _answers(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _check_prefill(records, keep, n=3):
    assert len(records) == n
    for r in records:
        # the prompt holds one <image> placeholder; the LLM sees keep tokens in its place
        assert r["prefill"] == r["prompt"] - 1 + keep, r
        assert r["dtype"] == "torch.float32" and r["device"] == "cpu"
        assert r["images"] == "torch.float32"


def _loader_args(setup, answers, *extra):
    return ["llava_agile.run", "llava.eval.model_vqa_loader", *extra,
            "--model-path", setup["model"], "--image-folder", setup["images"],
            "--question-file", setup["vqa"], "--answers-file", answers,
            "--temperature", "0", "--max_new_tokens", "4"]


@pytest.mark.parametrize("method,keep,extra", [("adaptive", 64, None),
                                               ("vispruner", 32, "ratio=0.25"),
                                               ("attention", 16, "stats=full")])
def test_loader_three_questions_pruned(setup, method, keep, extra, monkeypatch):
    answers = os.path.join(setup["work"], f"answers-{method}.jsonl")
    stats_file = os.path.join(setup["work"], f"stats-{method}.jsonl")
    monkeypatch.setenv("LLAVA_AGILE_STATS_FILE", stats_file)  # the runner logs each generate
    flags = ["--pruning", method, "--keep", str(keep)] + (["--pruning-args", extra] if extra else [])
    rc, out, err, data = run_probe(setup["work"], _loader_args(setup, answers, *flags))
    assert rc == 0, err[-3000:]
    logged = _answers(stats_file)
    assert [(x["images"], x["kept"]) for x in logged] == [(1, [keep])] * 3
    assert all(len(x["prune_ms"]) == 1 and x["prune_ms"][0] > 0 and x["s"] > 0 for x in logged)
    _check_prefill(data["records"], keep)
    assert all(r["kept"] == [keep] for r in data["records"])
    # --pruning-args stats=full reaches enable: every image's stats then hold the entropy too
    full = extra == "stats=full"
    assert all(("entropy" in k) == full for r in data["records"] for k in r["stat_keys"])
    rows = _answers(answers)
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2"]
    assert all(isinstance(r["text"], str) and r["model_id"] == "tiny-llava-v1.5" for r in rows)
    assert "no GPU visible" in err and f"pruning {method}, keep {keep}" in err


def test_loader_without_pruning_keeps_all_tokens(setup):
    answers = os.path.join(setup["work"], "answers-full.jsonl")
    rc, out, err, data = run_probe(setup["work"], _loader_args(setup, answers))
    assert rc == 0, err[-3000:]
    _check_prefill(data["records"], N_TOKENS)
    assert len(_answers(answers)) == 3


def test_science_and_model_vqa_and_run_llava(setup):
    work = setup["work"]
    sqa = os.path.join(work, "sqa-answers.jsonl")
    rc, _, err, data = run_probe(work, [
        "llava_agile.run", "llava.eval.model_vqa_science", "--pruning", "attention", "--keep", "16",
        "--model-path", setup["model"], "--image-folder", setup["images"], "--question-file",
        setup["sqa"], "--answers-file", sqa, "--conv-mode", "vicuna_v1", "--single-pred-prompt",
        "--temperature", "0"])
    assert rc == 0, err[-3000:]
    _check_prefill(data["records"], 16)
    assert [r["question_id"] for r in _answers(sqa)] == ["0", "1", "2"]

    vqa = os.path.join(work, "vqa-answers.jsonl")
    rc, _, err, data = run_probe(work, [
        "llava_agile.run", "llava.eval.model_vqa", "--pruning", "diversity", "--keep", "8",
        "--model-path", setup["model"], "--image-folder", setup["images"], "--question-file",
        setup["vqa"], "--answers-file", vqa, "--temperature", "0"])
    assert rc == 0, err[-3000:]
    _check_prefill(data["records"], 8)
    assert len(_answers(vqa)) == 3

    image = os.path.join(setup["images"], setup["names"][1])
    rc, out, err, data = run_probe(work, [
        "llava_agile.run", "llava.eval.run_llava", "--pruning", "fps", "--keep", "20",
        "--model-path", setup["model"], "--image-file", image, "--query", "What is this?",
        "--temperature", "0", "--max_new_tokens", "4"])
    assert rc == 0, err[-3000:]
    _check_prefill(data["records"], 20, n=1)
    assert out.strip() != ""   # run_llava prints the answer


def test_mmbench(setup):
    pd = pytest.importorskip("pandas")
    import base64

    rows = []
    for i, name in enumerate(setup["names"]):
        with open(os.path.join(setup["images"], name), "rb") as f:
            rows.append({"index": i, "question": "Which color?", "hint": None, "A": "red",
                         "B": "blue", "C": None, "D": None,
                         "image": base64.b64encode(f.read()).decode()})
    tsv = os.path.join(setup["work"], "mmbench.tsv")
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    answers = os.path.join(setup["work"], "mmbench-answers.jsonl")
    rc, _, err, data = run_probe(setup["work"], [
        "llava_agile.run", "llava.eval.model_vqa_mmbench", "--pruning", "adaptive", "--keep", "64",
        "--model-path", setup["model"], "--question-file", tsv, "--answers-file", answers,
        "--single-pred-prompt", "--temperature", "0"])
    assert rc == 0, err[-3000:]
    _check_prefill(data["records"], 64)
    assert [r["question_id"] for r in _answers(answers)] == [0, 1, 2]


def _cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "llava_agile.run", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--pruning", "bogus", "--keep", "64"], "unknown pruning method 'bogus'"),
    (["--pruning", "adaptive", "--keep", "0"], "keep must be >= 1"),
])
def test_bad_flags_from_the_command_line(args, needle):
    proc = _cli("llava.eval.model_vqa_loader", *args, "--model-path", "/nonexistent")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("python -m llava_agile.run: error:") and needle in lines[0]


def _main_error(capsys, *args):
    """Call the runner in this process; returns (exit status, stderr lines)."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args,needle", [
    (["--pruning", "adaptive", "--keep", "-3"], "keep must be >= 1"),
    (["--keep", "64"], "--keep given without --pruning"),
    (["--pruning-args", "tau_max=0.3"], "--pruning-args given without --pruning"),
    (["--pruning", "adaptive", "--pruning-args", "nonsense"], "key=value"),
    (["--pruning", "attention", "--pruning-args", "tau_max=0.3"], "does not take parameter"),
    (["--pruning", "adaptive", "--pruning-args", "tau_max=-1"], "tau_max must be >= 0"),
    (["--pruning", "fps", "--erank-avg-file", "/nonexistent.json"], "does not use erank_avg"),
    (["--pruning", "adaptive", "--erank-avg-file", "/nonexistent.json"], "nonexistent.json"),
])
def test_bad_flags_give_one_error_line(capsys, args, needle):
    code, lines = _main_error(capsys, "llava.eval.model_vqa_loader", *args)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("python -m llava_agile.run: error:") and needle in lines[0]


@pytest.mark.parametrize("module", ["llava.eval.no_such_module", "no_such_package.x",
                                    "--pruning"])
def test_bad_module_gives_one_error_line(capsys, module):
    code, lines = _main_error(capsys, module, "--pruning", "adaptive")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("python -m llava_agile.run: error:")


def test_no_arguments_prints_usage(capsys):
    assert main([]) == 2
    assert "MODULE" in capsys.readouterr().out


def test_our_flags_are_stripped_in_order():
    ours, theirs = parser().parse_known_args(
        ["--question-file", "q.jsonl", "--pruning", "mix", "--answers-file=a.jsonl",
         "--keep", "32", "--pruning-args", "ratio=0.3", "--temperature", "0"])
    assert (ours.pruning, ours.keep, ours.pruning_args) == ("mix", 32, "ratio=0.3")
    assert theirs == ["--question-file", "q.jsonl", "--answers-file=a.jsonl", "--temperature", "0"]
    with pytest.raises(SystemExit):   # no abbreviations: --prun is not --pruning
        parser().parse_args(["--prun", "mix"])


@pytest.mark.parametrize("module", MODULES)
def test_cuda_calls_rewritten(module):
    import importlib.util

    path = importlib.util.find_spec(module).origin
    with open(path) as f:
        source = f.read()
    visitor = CudaToCpu()
    tree = ast.fix_missing_locations(visitor.visit(ast.parse(source)))
    assert visitor.count >= 2     # every module moves tensors to 'cuda' and casts to float16
    text = ast.unparse(tree)
    for gone in (".cuda(", ".half(", "torch.float16", "'cuda'", '"cuda"'):
        assert gone not in text, (module, gone)
    compile(tree, path, "exec")


def test_cuda_rewrite_rules():
    src = ("x.cuda(); x.cuda(0, non_blocking=True); x.half(); x.to(device='cuda:1', "
           "dtype=torch.float16); torch.cuda.manual_seed(0); torch.bfloat16; y = 'cuda'")
    visitor = CudaToCpu()
    out = ast.unparse(visitor.visit(ast.parse(src)))
    assert out.splitlines() == ["x.cpu()", "x.cpu()", "x.float()",
                                "x.to(device='cpu', dtype=torch.float32)",
                                "torch.cuda.manual_seed(0)", "torch.float32", "y = 'cuda'"]
    assert visitor.count == 6


def test_finish_model_logs_generate_calls(tmp_path, monkeypatch):
    from llava_agile import patch_hooks

    class Fake(torch.nn.Module):
        def generate(self, ids, images=None, max_new_tokens=None):
            self.agile_stats = [{"kept": 5, "prune_ms": 1.5}] * (0 if images is None else len(images))
            return max_new_tokens

    stats = tmp_path / "s.jsonl"
    monkeypatch.setenv(patch_hooks.STATS_ENV, str(stats))
    monkeypatch.setenv(patch_hooks.MAX_NEW_TOKENS_ENV, "3")
    model = patch_hooks.finish_model(Fake())
    assert model.generate(None, images=torch.zeros(2, 3, 4, 4), max_new_tokens=10) == 3
    assert model.generate(None, max_new_tokens=2) == 2            # text only: no stale stats
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    assert [(x["images"], x["kept"], x["prune_ms"]) for x in lines] == \
        [(2, [5, 5], [1.5, 1.5]), (0, [], [])]
    monkeypatch.setenv(patch_hooks.MAX_NEW_TOKENS_ENV, "0")
    with pytest.raises(ValueError, match="LLAVA_AGILE_MAX_NEW_TOKENS"):
        patch_hooks.finish_model(Fake())
    monkeypatch.delenv(patch_hooks.STATS_ENV)
    monkeypatch.delenv(patch_hooks.MAX_NEW_TOKENS_ENV)
    assert "generate" not in patch_hooks.finish_model(Fake()).__dict__  # unset: untouched


def test_pruned_loader_restores_the_builder():
    import llava.model.builder as builder

    original = builder.load_pretrained_model
    with pruned_loader(None, on_cpu=True):
        assert builder.load_pretrained_model is not original
        assert builder.load_pretrained_model.__wrapped__ is original
    assert builder.load_pretrained_model is original


def test_flags_build_the_config(tmp_path):
    import argparse

    from llava_agile.cli_flags import add_pruning_args, config_from_args, parse_args_with_pruning

    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps({"erank": {"mean": 77.5}}))
    args = add_pruning_args(argparse.ArgumentParser()).parse_args(
        ["--pruning", "adaptive", "--pruning-args", "tau_max=0.3,anyres_mode=per_crop",
         "--erank-avg-file", str(calib)])
    config = config_from_args(args)
    assert (config.method, config.keep, config.anyres_mode) == ("adaptive", 64, "per_crop")
    assert config.params == {"tau_max": 0.3, "erank_avg": 77.5}
    assert config_from_args(argparse.Namespace()) is None      # a caller's own Namespace
    args = parse_args_with_pruning(argparse.ArgumentParser(), ["--pruning", "none", "--keep", "5"])
    assert args.pruning_config.method == "none" and args.pruning_config.keep == 5
    assert parse_args_with_pruning(argparse.ArgumentParser(), []).pruning_config is None


@pytest.mark.parametrize("method,extra,counts", [
    ("fastv", None, [576, 576, 64, 64]), ("pdrop", "layers=1/3", [576, 64, 64, 7]),
    ("dart", "layer=3", [576, 576, 576, 68]),
    ("sparsevlm", "layers=1/2,schedule=64/20", [576, 576, 64 + 16, 20 + 2])])
def test_loader_in_llm_methods(setup, tmp_path, method, extra, counts, monkeypatch):
    """FastV / PDrop / DART / SparseVLM (kept + merged tokens) through LLaVA's eval module: the LLM gets every image token and
    drops them between its decoder layers (a 4-layer tiny LLaVA)."""
    from llava_agile.assets import build_tiny_llava

    model = build_tiny_llava(str(tmp_path / "model"), llm_layers=4)
    keep = 68 if method == "dart" else 64
    answers, stats_file = str(tmp_path / "answers.jsonl"), str(tmp_path / "stats.jsonl")
    monkeypatch.setenv("LLAVA_AGILE_STATS_FILE", stats_file)
    flags = ["--pruning", method, "--keep", str(keep)] + (["--pruning-args", extra] if extra else [])
    args = _loader_args(dict(setup, model=model), answers, *flags)
    rc, out, err, data = run_probe(str(tmp_path), args)
    assert rc == 0, err[-3000:]
    _check_prefill(data["records"], N_TOKENS)          # the LLM's input: every image token
    assert all(r["kept"] == [keep] for r in data["records"])
    logged = _answers(stats_file)
    assert [(x["kept"], x["avg_tokens"]) for x in logged] == [([keep], [sum(counts) / 4])] * 3
    assert len(_answers(answers)) == 3


@pytest.mark.parametrize("method,keep,question", [
    ("cdpruner", 16, "What is in this image?"),   # its loader drops the answer-format line
    ("trim", 9, "What is in this image? Answer the question using a single word or phrase.")])
def test_loader_question_methods(setup, method, keep, question):
    """The question reaches cdpruner / trim from the prompt LLaVA's loader builds (the tiny
    tokenizer turns the newline into a space); the text tower comes from --pruning-args."""
    from llava_agile.assets.tiny import build_tiny_text_tower

    text = os.path.join(setup["work"], "clip-text")
    if not os.path.isdir(text):
        build_tiny_text_tower(os.path.join(setup["model"], "clip-vision"), text)
    answers = os.path.join(setup["work"], f"answers-{method}.jsonl")
    rc, out, err, data = run_probe(setup["work"], _loader_args(
        setup, answers, "--pruning", method, "--keep", str(keep), "--pruning-args",
        f"text_tower={text}"))
    assert rc == 0, err[-3000:]
    _check_prefill(data["records"], keep)
    assert [r["questions"] for r in data["records"]] == [[question]] * 3
