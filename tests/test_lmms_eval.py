"""`python -m lmms_eval --model llava_agile` end to end on CPU with the tiny LLaVA and a tiny local
task (generated images in a local parquet; generate_until and multiple_choice variants).

Runs in .venv, where `make setup` installs lmms-eval 0.7.3 (--no-deps, requirements-lmms.txt).
"""
import glob
import json
import os

import pytest

import lmms_eval  # noqa: F401  (make setup installs it: a missing install must fail, not skip)
import torch
from lmms_helpers import QUESTION, lmms, samples, write_tasks

torch.set_num_threads(1)
KEEP = 16
N_TOKENS = 576  # 336 / 14 squared: the tiny LLaVA's visual tokens per image


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from llava_agile.assets import build_tiny_llava, tiny_image

    root = tmp_path_factory.mktemp("lmms")
    model = build_tiny_llava(str(root / "tiny-llava-v1.5"), seed=0)
    sizes = [(300, 200), (200, 320), (336, 336), (420, 260), (260, 260)]
    tasks = write_tasks(root, [tiny_image(i, s) for i, s in enumerate(sizes)],
                        ["red", "green", "blue", "red", "blue"])
    return {"root": root, "model": model, "tasks": tasks, "docs": len(sizes),
            "hf_home": str(root / "hf")}


def text_tokens(model_path, question=QUESTION):
    """Prompt tokens besides the image: LLaVA's template around '<image>\\n' + question."""
    from llava_agile.assets import tiny_prompt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, use_fast=False)
    return tiny_prompt(tok, question).shape[1] - 1


@pytest.fixture(scope="module")
def pruned(env):
    out = env["root"] / "out-pruned"
    rc, log, results = lmms(env, out, f"pretrained={env['model']},pruning=adaptive,keep={KEEP},"
                                      f"pruning_args=\"erank_avg=90;tau_max=0.3\"",
                            tasks="tiny_agile_gen,tiny_agile_mc")
    return {"rc": rc, "log": log, "results": results, "out": out}


def test_generate_until_pruned_results_written(env, pruned):
    assert pruned["rc"] == 0, pruned["log"][-4000:]
    res = pruned["results"]
    assert res is not None, pruned["log"][-4000:]
    assert "exact_match,none" in res["results"]["tiny_agile_gen"]
    assert "pruning=adaptive" in res["config"]["model_args"]
    assert f"keep={KEEP}" in res["config"]["model_args"]
    rows = samples(pruned["out"], "tiny_agile_gen")
    assert sorted(r["doc_id"] for r in rows) == list(range(env["docs"]))
    text = text_tokens(env["model"])
    for r in rows:  # prefill = text + K per image; output tokens counted
        (tc,) = r["token_counts"]
        assert tc["input_tokens"] == text + KEEP, r["token_counts"]
        assert 0 <= tc["output_tokens"] <= 4
    eff = res["efficiency"]["by_task"]["tiny_agile_gen"]
    assert eff["total_input_tokens"] == env["docs"] * (text + KEEP)


def test_multiple_choice_scores(env, pruned):
    assert pruned["rc"] == 0, pruned["log"][-4000:]
    acc = pruned["results"]["results"]["tiny_agile_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    rows = samples(pruned["out"], "tiny_agile_mc")
    assert sorted(r["doc_id"] for r in rows) == list(range(env["docs"]))
    choices = ["red", "green", "blue"]
    for r in rows:  # one (loss, greedy) pair per choice reached the scorer (logged as text)
        assert len(r["filtered_resps"]) == 3
        losses = [float(loss) for loss, greedy in r["filtered_resps"]]
        assert all(loss > 0 for loss in losses)
        assert all(greedy in ("True", "False") for _, greedy in r["filtered_resps"])
        # lmms-eval picks the choice with the lowest loss
        assert r["acc"] == float(choices[losses.index(min(losses))] == r["target"])
    assert acc == sum(r["acc"] for r in rows) / len(rows)


def test_agile_stats_written(env, pruned):
    assert pruned["rc"] == 0, pruned["log"][-4000:]
    (folder,) = glob.glob(os.path.join(str(pruned["out"]), "*"))
    with open(os.path.join(folder, "agile_stats.json")) as f:
        stats = json.load(f)
    assert stats["pruning"]["method"] == "adaptive" and stats["pruning"]["keep"] == KEEP
    assert stats["pruning"]["params"] == {"erank_avg": 90, "tau_max": 0.3}
    gen, mc = stats["summary"]["tiny_agile_gen"], stats["summary"]["tiny_agile_mc"]
    assert gen["requests"] == gen["images"] == env["docs"]
    assert mc["requests"] == mc["images"] == 3 * env["docs"]
    for t in (gen, mc):
        assert t["kept_per_image_mean"] == t["kept_per_image_min"] == KEEP
        assert t["kept_per_image_max"] == KEEP
    assert os.path.exists(os.path.join(folder, "agile_stats_rank0.json"))


def test_pruning_none_matches_lmms_llava_wrapper(env):
    """`pruning=none` keeps all 576 tokens; answers equal lmms-eval's own `llava` wrapper's on
    the same model. The wrapper runs on CPU only with device_map=auto (LLaVA's builder: float16
    LLM, float32 CLIP tower); ours loads the same way with device_map=auto (the tiny model's
    top-2 logit margins are as small as 0.006, so the numerics must match, not just the dtype).
    Exact by construction, so round-off cannot decide it on any CPU: `pruning=none` runs LLaVA's
    own tower, projector and LLM on the same batch and splices every token unchanged, in a
    process like the wrapper's (same torch, dtype, threads and ATen kernels)."""
    ours, theirs = env["root"] / "out-none", env["root"] / "out-llava"
    rc, log, res = lmms(env, ours, f"pretrained={env['model']},pruning=none,device_map=auto")
    assert rc == 0 and res is not None, log[-4000:]
    rc, log2, res2 = lmms(env, theirs, f"pretrained={env['model']},device_map=auto",
                          model="llava")
    assert rc == 0 and res2 is not None, log2[-4000:]
    a, b = samples(ours, "tiny_agile_gen"), samples(theirs, "tiny_agile_gen")
    text = text_tokens(env["model"])
    assert all(r["token_counts"][0]["input_tokens"] == text + N_TOKENS for r in a)
    assert {r["doc_id"]: r["filtered_resps"] for r in a} == \
        {r["doc_id"]: r["filtered_resps"] for r in b}


def test_torchrun_two_processes_gather_all_samples(env):
    out = env["root"] / "out-ddp"
    rc, log, res = lmms(env, out, f"pretrained={env['model']},pruning=attention,keep=8", nproc=2)
    assert rc == 0 and res is not None, log[-4000:]
    rows = samples(out, "tiny_agile_gen")
    assert sorted(r["doc_id"] for r in rows) == list(range(env["docs"]))
    (folder,) = glob.glob(os.path.join(str(out), "*"))
    per_rank = []
    for rank in (0, 1):
        with open(os.path.join(folder, f"agile_stats_rank{rank}.json")) as f:
            per_rank.append(json.load(f))
    # 5 docs on 2 ranks: rank 1 runs a padding copy that is not counted
    assert [len(s["samples"]) for s in per_rank] == [3, 2]
    with open(os.path.join(folder, "agile_stats.json")) as f:
        every = json.load(f)
    assert sorted(s["doc_id"] for s in every["samples"]) == list(range(env["docs"]))
    assert every["summary"]["tiny_agile_gen"]["kept_per_image_mean"] == 8


@pytest.mark.parametrize("bad,message", [
    ("pruning=nosuch", "unknown pruning method 'nosuch'"),
    ("pruning=adaptive,keep=0", "keep must be >= 1"),
    ("pruning=adaptive,pruning_args=\"erank_avg=-1\"", "erank_avg must be > 0"),
    ("keep=32", "keep given without pruning=METHOD"),
    ("pruning=adaptive,kepp=32", "unknown --model_args kepp"),
    ("dtype=float8", "dtype must be one of float32, float16, bfloat16"),
    ("device_map=balanced", "device_map must be 'auto'"),
])
def test_bad_model_args_one_clear_error(bad, message):
    from lmms_eval.models import get_model

    cls = get_model("llava_agile")
    assert cls.__name__ == "LlavaAgile"
    with pytest.raises(ValueError, match=message):  # before any model is loaded
        cls.create_from_arg_string(f"pretrained=/nonexistent,{bad}", {"device": "cpu"})


def test_bad_model_args_cli(env):
    out = env["root"] / "out-bad"
    rc, log, res = lmms(env, out, f"pretrained={env['model']},pruning=nosuch")
    assert res is None  # lmms-eval exits 0 on a failed run: check that results were written
    assert "ValueError: llava_agile --model_args: unknown pruning method 'nosuch'; valid " \
           "methods: adaptive" in log, log[-3000:]


INJECT = '''
import os

if os.environ.get("RANK") == "1":  # a pruning error on rank 1 only
    import llava_agile.selection as selection  # where every adapter calls prune

    def _fail(*args, **kwargs):
        raise RuntimeError("injected pruning failure")

    selection.prune = _fail
'''


def test_pruning_error_on_one_rank_ends_the_run(env):
    """Fail fast: rank 1 raises in pruning; the run ends (no 52-week wait at a barrier) with a
    non-zero exit, the error in the log and no results."""
    site = env["root"] / "inject"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(INJECT)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    out = env["root"] / "out-fail"
    rc, log, res = lmms(env, out, f"pretrained={env['model']},pruning=adaptive,keep=8", nproc=2,
                        more_env={"PYTHONPATH": path}, timeout=300)
    assert rc != 0 and res is None, log[-3000:]
    assert "llava_agile: rank 1/2: generate_until failed; ending the run (exit 1)" in log
    assert "RuntimeError: injected pruning failure" in log


def test_in_llm_method_generates_and_refuses_the_loss(env):
    """FastV through `--model llava_agile` (a 4-layer tiny LLaVA): the LLM's prefill holds every
    image token (they leave between its layers); a multiple-choice loss is refused clearly."""
    from llava_agile.assets import build_tiny_llava

    model = build_tiny_llava(str(env["root"] / "tiny-llava-4"), llm_layers=4)
    out = env["root"] / "out-fastv"
    rc, log, res = lmms(env, out, f"pretrained={model},pruning=fastv,keep={KEEP}")
    assert rc == 0, log[-4000:]
    text = text_tokens(model)
    for r in samples(out, "tiny_agile_gen"):
        assert r["token_counts"][0]["input_tokens"] == text + N_TOKENS
    (folder,) = glob.glob(os.path.join(str(out), "*"))
    with open(os.path.join(folder, "agile_stats.json")) as f:
        gen = json.load(f)["summary"]["tiny_agile_gen"]
    assert gen["kept_per_image_mean"] == gen["kept_per_image_max"] == KEEP
    rc, log, _ = lmms(env, env["root"] / "out-fastv-mc", f"pretrained={model},pruning=fastv,"
                      f"keep={KEEP}", tasks="tiny_agile_mc")
    assert rc != 0 and "computing a loss is not supported" in log


def test_question_method_reads_the_request(env):
    """CDPruner through `--model llava_agile`: the text tower from pruning_args, the question
    from each request's prompt (recorded per image), K tokens per image."""
    from llava_agile.assets.tiny import build_tiny_text_tower

    text = build_tiny_text_tower(os.path.join(env["model"], "clip-vision"),
                                 str(env["root"] / "clip-text"))
    out = env["root"] / "out-cdpruner"
    rc, log, res = lmms(env, out, f"pretrained={env['model']},pruning=cdpruner,keep={KEEP},"
                                  f"pruning_args=\"text_tower={text}\"")
    assert rc == 0, log[-4000:]
    text_len = text_tokens(env["model"])
    for r in samples(out, "tiny_agile_gen"):
        assert r["token_counts"][0]["input_tokens"] == text_len + KEEP
    (folder,) = glob.glob(os.path.join(str(out), "*"))
    with open(os.path.join(folder, "agile_stats.json")) as f:
        records = json.load(f)["samples"]
    assert records and all(r["questions"] == [QUESTION] for r in records)
