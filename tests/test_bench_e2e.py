"""bench/e2e.py in its CPU mode (--tiny) and bench/gpu_check.sh's control flow (issue 7)."""
import importlib.util
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
FAST = ["--threads", "1", "--decode-tokens", "2", "--repeat", "1", "--warmup", "0"]


def _load():
    path = os.path.join(ROOT, "bench", "e2e.py")
    spec = importlib.util.spec_from_file_location("bench_e2e", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


e2e = _load()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("e2e") / "e2e.json")
    rc = e2e.main(["--tiny", "--batches", "1", "2", "--keeps", "128", "64", "32",
                   "--methods", "adaptive", "attention", "vispruner", "bat", "none",
                   "--text-tokens", "20", "--json", path, *FAST])
    assert rc == 0
    with open(path) as f:
        return json.load(f)


def test_tiny_run_structure_and_checks(run):
    meta = run["meta"]
    assert meta["shape"] == "tiny" and meta["dtype"] == "fp32" and meta["timer"] == "perf_counter"
    assert meta["visual_tokens"] == 576 and meta["text_tokens"] == 20
    assert set(run["batches"]) == {"1", "2"}
    for b, sec in run["batches"].items():
        batch = int(b)
        assert set(sec["vision"]) == set(e2e.VISION_VARIANTS)
        for row in sec["vision"].values():
            assert row["ms"] > 0 and row["ms_per_image"] == pytest.approx(row["ms"] / batch)
        c = sec["checks"]
        # the hook's [CLS] row is the one output_attentions gives; SDPA computes the same tower
        assert c["hook_row_max_abs_err"] < 1e-6 and c["sdpa_row_max_abs_err"] < 1e-6
        assert c["sdpa_feature_rel_err"] < 1e-5 and c["hook_feature_rel_err"] == 0.0
        assert c["row_sums"] == pytest.approx(1.0, abs=0.05) and c["features_finite"]
        assert c["ttft_sequence_ok"]
        assert set(sec["prune"]) == {"adaptive", "attention", "vispruner", "bat", "none"}
        want = {"ext", "torch"} if e2e.backend.ext_available("cpu") else {"torch"}
        assert set(sec["prune"]["adaptive"]) == want and set(sec["prune"]["bat"]) == {"torch"}
        assert set(sec["prune_adaptive_by_k"]) == {"128", "64", "32"}
        assert set(sec["prefill"]) == {"576", "128", "64", "32"}
        for n, row in sec["prefill"].items():
            assert row["tokens"] == 20 + int(n) and row["ms"] > 0
            assert row["roofline"]["bound_ms"] > 0 and "graph" not in row  # no graphs on the CPU
        for k, s in sec["prefill_speedup"].items():
            assert s["bound"] > 1 and s["measured"] > 0
            assert s["of_bound"] == pytest.approx(s["measured"] / s["bound"])
        assert sec["ttft"]["576"]["sequence"] == 596 and "kept" not in sec["ttft"]["576"]
        for k in (128, 64, 32):
            assert sec["ttft"][str(k)]["sequence"] == 20 + k
            assert sec["ttft"][str(k)]["kept"] == [k] * batch
        assert set(sec["decode"]) == {"576", "64"}
        for row in sec["decode"].values():
            assert row["tokens_per_s"] == pytest.approx(batch * 2 / (row["ms"] / 1e3))
    assert {"prefill_speedup_b1", "prefill_of_bound_b1", "adaptive_step_share_of_ttft_b1",
            "vision_sdpa_hook_vs_eager_attn_b1", "vision_sdpa_hook_vs_eager_attn_b2"} == \
        set(run["targets"])


def test_roofline_counts_llava_7b():
    cfg = types.SimpleNamespace(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                                vocab_size=32000, num_attention_heads=32, num_key_value_heads=32)
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert layer == 202_375_168
    matmul = 32 * layer + 4096 * 32000
    c = e2e.llm_cost(cfg, 1, 636)
    assert c["weight_bytes"] == 2 * (matmul + 32 * 2 * 4096 + 4096) == 13_214_687_232
    assert c["flops"] == 2 * 636 * matmul + 2 * 32 * 4096 * 636 ** 2
    io = 636 * 4096 * 2 + 2 * 32 * 636 * 4096 * 2 + 636 * 32000 * 6
    assert c["bytes"] == c["weight_bytes"] + io
    # H100 numbers: 636 tokens are compute-bound, 124 (K=64) memory-bound (weights streamed)
    long, short = (e2e.roofline(cfg, 1, t, 989e12, 3.35e12) for t in (636, 124))
    assert long["bound_by"] == "compute" and short["bound_by"] == "memory"
    assert short["bound_ms"] == pytest.approx(c["weight_bytes"] / 3.35e12 * 1e3, rel=0.02)
    assert 2.0 < long["bound_ms"] / short["bound_ms"] < 2.3
    b8 = [e2e.roofline(cfg, 8, t, 989e12, 3.35e12)["bound_ms"] for t in (636, 124)]
    assert 5.0 < b8[0] / b8[1] < 5.6


def test_sdpa_patch_is_exact_and_undone():
    model = e2e.build_model("tiny", "cpu", torch.float32)
    mods = e2e.clip_attention_modules(model)
    images = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        ref = model.get_vision_tower()(images)
        with e2e.tower_attention(model, "sdpa"):
            assert all("_agile_eager_forward" in m.__dict__ for m in mods)
            out = model.get_vision_tower()(images)
            # output_attentions still works (falls back to eager inside the patch)
            att = model.get_vision_tower().vision_tower(images, output_attentions=True).attentions
        assert all("forward" not in m.__dict__ for m in mods)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5) and out.abs().sum() > 0
    assert len(att) == 4 and att[0].shape == (2, 4, 577, 577)
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        e2e.set_tower_attention(model, "flash")


def test_model_shapes_match_llava_1_5_7b():
    spec = e2e.SHAPES["7b"]
    assert spec["vision"]["num_hidden_layers"] == 24 and spec["vision"]["hidden_size"] == 1024
    assert spec["vision"]["image_size"] // spec["vision"]["patch_size"] == 24  # 576 patches
    assert spec["llm"]["num_hidden_layers"] == 32 and spec["llm"]["hidden_size"] == 4096
    assert spec["llm"]["intermediate_size"] == 11008 and spec["llm"]["vocab_size"] == 32000
    model = e2e.build_model("tiny", "cpu", torch.float32)
    assert model.get_vision_tower().is_loaded and model.get_vision_tower().select_layer == -2
    assert model.config.mm_projector_type == "mlp2x_gelu"
    assert isinstance(model.get_model().mm_projector[1], torch.nn.GELU)


@pytest.mark.parametrize("argv, msg", [
    (["--batches", "0"], "--batches 0"),
    (["--keeps", "64", "-1"], "--keeps -1"),
    (["--repeat", "0"], "--repeat 0"),
    (["--bandwidth-tbs", "0"], "--bandwidth-tbs 0"),
    (["--device", "cpu", "--dtype", "fp16"], "fp16 on the CPU"),
])
def test_cli_rejects_bad_input(argv, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.main(["--tiny", *argv])
    assert exc.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_needs_a_gpu_without_tiny(capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.main([])
    assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_keeps_all_too_large(capsys):
    assert e2e.main(["--tiny", "--keeps", "576", "600", *FAST]) == 2
    assert "every --keeps value" in capsys.readouterr().err


# ---------------------------------------------------------------- gpu_check.sh

def _script(tmp_path, *args, **env):
    full = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, **env)
    t0 = time.monotonic()
    p = subprocess.run(["bash", SCRIPT, *args], env=full, capture_output=True, text=True,
                       timeout=120)
    return p, time.monotonic() - t0, (tmp_path / "summary.txt").read_text()


def test_gpu_check_dry_run_lists_every_step(tmp_path):
    p, _, summary = _script(tmp_path, "--dry-run")
    assert p.returncode == 0, p.stderr
    for step in ("wheels", "build", "tests", "e2e", "select", "parity"):
        assert f"== [{step}]" in p.stdout
        assert any(line.startswith(step) and "DRY-RUN" in line for line in summary.splitlines())
    assert "bench/e2e.py" in p.stdout and "pip install" in p.stdout
    assert "LLAVA_AGILE_CUDA" in p.stdout and "pytest" in p.stdout
    assert not (tmp_path / "e2e.json").exists()


def test_gpu_check_goes_on_after_a_failed_step(tmp_path):
    e2e_args = " ".join(["--batches", "1", "--keeps", "64", "--methods", "adaptive", "none", *FAST])
    p, _, summary = _script(tmp_path, "--cpu", "--steps", "wheels e2e",
                            WHEELS=str(tmp_path / "none"), E2E_ARGS=e2e_args)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = {ln.split()[0]: ln.split()[1] for ln in summary.splitlines()
             if ln.split() and ln.split()[0] in ("wheels", "e2e")}
    assert lines == {"wheels": "FAILED", "e2e": "OK"}
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert data["meta"]["shape"] == "tiny" and set(data["batches"]) == {"1"}
    assert "no wheels in" in (tmp_path / "setup.log").read_text()
    assert sorted(f.name for f in tmp_path.iterdir()) == \
        ["e2e.json", "e2e.log", "setup.log", "summary.txt"]
    assert "== e2e figures" in p.stdout and "prefill" in p.stdout


def test_gpu_check_budget_stops_a_hung_step(tmp_path):
    # 200 repeats of every stage take far longer than 20 s: cut at the budget, then reported
    # (20 s leaves the e2e step its 5-s minimum even when a loaded machine starts it slowly)
    p, took, summary = _script(tmp_path, "--cpu", "--steps", "e2e select", "--budget", "20",
                               E2E_ARGS="--repeat 200 --warmup 5")
    assert p.returncode == 1
    assert any(ln.startswith("e2e") and "TIMEOUT" in ln for ln in summary.splitlines())
    assert any(ln.startswith("select") and "SKIPPED" in ln for ln in summary.splitlines())
    assert took < 60


@pytest.mark.parametrize("args, msg", [(["--steps", "e2e bogus"], "unknown step 'bogus'"),
                                       (["--budget", "soon"], "whole seconds"),
                                       (["--frobnicate"], "unknown argument")])
def test_gpu_check_rejects_bad_arguments(tmp_path, args, msg):
    p = subprocess.run(["bash", SCRIPT, *args], env=dict(os.environ, OUT=str(tmp_path)),
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and msg in p.stderr


def test_full_size_model_builds_on_meta():
    # the GPU run's construction path at full size, without memory: 7.06 B parameters, fp16
    model = e2e.build_model("7b", "meta", torch.float16)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == 7_062_902_784
    assert {p.dtype for p in params} == {torch.float16}
    assert {p.device.type for p in params} == {"meta"}
    assert model.config._attn_implementation == "sdpa"
    tower = model.get_vision_tower()
    assert tower.num_patches == 576 and sum(p.numel() for p in tower.parameters()) == 303_507_456


def test_a_failing_stage_is_recorded_and_the_rest_still_measured(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("decode exploded")

    monkeypatch.setattr(e2e, "decode_stage", broken)
    path = tmp_path / "e2e.json"
    rc = e2e.main(["--tiny", "--batches", "1", "--keeps", "64", "--methods", "attention",
                   "--json", str(path), *FAST])
    assert rc == 1 and "decode exploded" in capsys.readouterr().err
    sec = json.loads(path.read_text())["batches"]["1"]
    assert sec["errors"] == {"decode": "RuntimeError: decode exploded"}
    assert "decode" not in sec and {"vision", "prune", "prefill", "ttft"} <= set(sec)


def test_measure_ceilings_counts_flops_and_bytes(monkeypatch):
    timer = e2e.Timer("cpu", 0, 1)
    calls = iter([{"ms": 2.0}, {"ms": 0.5}])  # matmul, then copy
    monkeypatch.setattr(timer, "run", lambda fn: (fn(), next(calls))[1])
    c = e2e.measure_ceilings("cpu", torch.float32, timer, n=64, copy_bytes=4096)
    assert c["matmul_tflops"] == pytest.approx(2 * 64 ** 3 / 2e-3 / 1e12)
    assert c["copy_bytes"] == 4096 and c["copy_tbs"] == pytest.approx(2 * 4096 / 0.5e-3 / 1e12)


def test_inllm_stage_at_equal_average_budgets(monkeypatch):
    """The in-LLM rows: each method's keep gives at most the budget's average per layer (the
    README budgets table), and the stage times them against no pruning."""
    calls = e2e.inllm_calls([192, 64], 576, 32)
    assert calls[("fastv", 64)] == ("fastv", 29, {"layer": 2})
    assert calls[("pdrop", 64)] == ("pdrop", 110, {"layers": (2, 8, 16)})
    assert calls[("dart", 192)][1] == 164 and calls[("adaptive", 64)] == ("adaptive", 64, {})
    assert calls[("sparsevlm", 192)] == ("sparsevlm", 300, {})  # its own "192" (avg 206.5)
    assert calls[("sparsevlm", 64)] == ("sparsevlm", 66, {})
    assert ("sparsevlm", 192) not in e2e.inllm_calls([192], 576, 16)  # layer 15 is the last
    llm = dict(e2e.SHAPES["tiny"]["llm"], num_hidden_layers=4)
    monkeypatch.setitem(e2e.SHAPES, "tiny", dict(e2e.SHAPES["tiny"], llm=llm))
    model = e2e.build_model("tiny", "cpu", torch.float32)
    images, ids = e2e.make_inputs(model, 1, 60, "cpu", torch.float32, 0)
    with torch.inference_mode():
        res = e2e.inllm_stage(model, images, ids, 576, [400, 128], e2e.Timer("cpu", 0, 1))
    # pdrop (layers 2, 8, 16) needs 17 layers; at 128 the first two layers alone average 288
    assert set(res) == {"none", "adaptive@400", "fastv@400", "dart@400", "adaptive@128"}
    for name, row in res.items():
        assert row["ms"] > 0 and (name == "none" or row["avg_tokens"] <= int(name[-3:]))
    assert 0 < res["fastv@400"]["prune_share_of_ttft"] < 1
