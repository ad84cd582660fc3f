"""PruneConfig.stats: "basic" (default) reports what the method computed; "full" also measures
every image's full-token erank and attention entropy (issue 15 §5)."""
import argparse
import json

import pytest
import torch

import llava_agile
from llava_agile import PruneConfig, api, backend, metrics, prune
from llava_agile.cli_flags import add_pruning_args, config_from_args

torch.set_num_threads(1)

BACKENDS = ["torch"] + (["ext"] if backend.ext_available() else [])


# ---------------------------------------------------------------- configuration

def test_default_is_basic_and_full_is_accepted():
    assert PruneConfig().stats == "basic"
    assert PruneConfig("attention", 8, stats="full").stats == "full"


@pytest.mark.parametrize("bad", ["fast", "Full", "", None, True])
def test_bad_stats_value_names_the_choices(bad):
    with pytest.raises(ValueError, match=r"stats must be 'basic' .* or 'full'"):
        PruneConfig("attention", 8, stats=bad)


def test_from_args_and_flags_move_stats_out_of_params():
    cfg = PruneConfig.from_args("adaptive", 32, "tau_max=0.3,stats=full")
    assert (cfg.params, cfg.stats) == ({"tau_max": 0.3}, "full")
    assert PruneConfig.from_args("fps", 32, "").stats == "basic"
    with pytest.raises(ValueError, match="stats must be"):
        PruneConfig.from_args("fps", 32, "stats=true")
    args = add_pruning_args(argparse.ArgumentParser()).parse_args(
        ["--pruning", "attention", "--keep", "16", "--pruning-args", "stats=full"])
    cfg = config_from_args(args)
    assert (cfg.method, cfg.keep, cfg.params, cfg.stats) == ("attention", 16, {}, "full")


def test_to_dict_and_dict_forms_carry_stats():
    from llava_agile.llava import as_config

    cfg = PruneConfig("mix", 24, {"ratio": 0.25}, stats="full")
    d = cfg.to_dict()
    assert d["stats"] == "full" and PruneConfig(**json.loads(json.dumps(d))) == cfg
    assert as_config(d) == cfg
    assert as_config({"method": "mix", "keep": 24, "ratio": 0.25, "stats": "full"}) == cfg  # flat
    assert as_config("mix", 24, stats="full", ratio=0.25) == cfg
    with pytest.raises(ValueError, match="not both"):
        as_config(cfg, stats="basic")


# ---------------------------------------------------------------- api.prune keeps its bool

def _image(seed=0, n=96, d=48):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.rand(n, generator=g)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("method,params,computed", [
    ("attention", {}, set()), ("fps", {}, set()), ("diversity", {}, set()),
    ("random", {}, set()),
    ("adaptive", {}, {"erank", "complexity", "walk_selected", "tau_range"}),
    ("adaptive", {"complexity": "entropy"},
     {"erank", "entropy", "complexity", "walk_selected", "tau_range"}),
    ("mix", {}, {"ratio"}), ("mix", {"ratio_rule": "adaptive"}, {"ratio", "erank"}),
    ("vispruner", {"ratio_rule": "inverse"}, {"ratio", "erank"})])
def test_prune_without_stats_returns_what_the_method_computed(name, method, params, computed):
    x, a = _image()
    llava_agile.set_backend(name)
    try:
        basic = prune(x, a, 16, method, stats=False, **params).stats[0]
        full = prune(x, a, 16, method, stats=True, **params).stats[0]
    finally:
        backend._choice = None
    assert set(basic) == computed | {"kept"}
    assert set(full) == computed | {"kept", "erank", "entropy"}
    assert all(full[k] == basic[k] for k in basic)  # same numbers, only fewer of them


# ---------------------------------------------------------------- the LLaVA runtime

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from llava.mm_utils import process_images

    from llava_agile.assets import build_tiny_llava, load_tiny, tiny_image, tiny_prompt

    tokenizer, model, processor, _ = load_tiny(build_tiny_llava(str(tmp_path_factory.mktemp("m"))))
    pixels = process_images([tiny_image(0)], processor, model.config)
    yield model, tiny_prompt(tokenizer), pixels
    llava_agile.disable(model)


def _generate(tiny, method, stats, **params):
    model, ids, pixels = tiny
    llava_agile.enable(model, method, 32, stats=stats, **params)
    try:
        with torch.inference_mode():
            model.generate(ids, images=pixels, attention_mask=torch.ones_like(ids),
                           do_sample=False, max_new_tokens=1, use_cache=True)
        (st,) = model.agile_stats
    finally:
        llava_agile.disable(model)
    return st


@pytest.mark.parametrize("method", ["attention", "fps", "diversity", "random"])
def test_basic_mode_computes_no_erank_or_entropy(tiny, method, monkeypatch):
    """No singular values, eigendecomposition or entropy for a method that needs none."""
    calls = []

    def counted(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    # the reference signals live in metrics; the public, checked erank / attention_entropy (and
    # prune's own references to the metrics functions) in api
    for module in (metrics, api):
        for name in ("singular_values", "erank_from_singular_values", "entropy_of", "erank",
                     "attention_entropy"):
            if hasattr(module, name):
                counted(module, name)
    for name in ("eigvalsh", "eigh", "svdvals", "svd"):
        counted(torch.linalg, name)
    st = _generate(tiny, method, "basic")
    assert calls == [] and st["kept"] == 32 and len(st["indices"]) == 32
    st = _generate(tiny, method, "full")   # the counters do see the full mode's measurements
    assert {"singular_values", "eigvalsh", "entropy_of"} <= set(calls) and "erank" in st


def test_adaptive_basic_keeps_its_erank_and_thresholds(tiny):
    basic, full = _generate(tiny, "adaptive", "basic"), _generate(tiny, "adaptive", "full")
    assert "entropy" not in basic and basic["erank"] == full["erank"] > 1
    assert basic["tau_range"] == full["tau_range"] and basic["indices"] == full["indices"]
    mix = _generate(tiny, "mix", "basic", ratio_rule="adaptive")
    assert mix["erank"] == pytest.approx(full["erank"], rel=1e-12) and 0 <= mix["ratio"] <= 1


# ---------------------------------------------------------------- eval driver record

def test_driver_passes_stats_on_and_resumes_old_records(tmp_path):
    from llava_agile.eval import driver

    opts = argparse.Namespace(
        bench="gqa", model_path="/m/llava-v1.5-7b", model_base=None, conv_mode="vicuna_v1",
        max_new_tokens=None, llava_dir=None, pruning="attention", keep=16,
        pruning_args="stats=full", erank_avg_file=None)
    config = PruneConfig.from_args(opts.pruning, opts.keep, opts.pruning_args)
    record = driver.run_record(opts, config)
    assert record["pruning"]["stats"] == "full"
    cmd = driver.chunk_command(opts, "llava.eval.model_vqa_loader", (), "q.jsonl", "img",
                               tmp_path / "p.jsonl", tmp_path / "s.jsonl", 1, 0)
    assert cmd[cmd.index("--pruning-args") + 1] == "stats=full"
    # a record written before the option existed resumes; a different choice does not
    old = dict(record, pruning={k: v for k, v in record["pruning"].items() if k != "stats"})
    (tmp_path / driver.RECORD_NAME).write_text(json.dumps(old))
    driver.check_record(tmp_path, record)
    (tmp_path / driver.RECORD_NAME).write_text(json.dumps(record))
    basic = driver.run_record(opts, PruneConfig.from_args("attention", 16))
    with pytest.raises(FileExistsError, match="different pruning"):
        driver.check_record(tmp_path, basic)


@pytest.mark.parametrize("mode", ["basic", "full"])
def test_fastervlm_path_follows_the_choice(mode):
    from types import SimpleNamespace

    from llava_agile.patch_hooks import fastervlm_encode, set_fastervlm_pruning

    inner = SimpleNamespace(mm_projector=torch.nn.Identity())
    model = SimpleNamespace(get_model=lambda: inner)
    set_fastervlm_pruning(model, PruneConfig("attention", 8, stats=mode))
    x, a = _image()
    _, masks, _ = fastervlm_encode(model, x[None], a[None, None].expand(1, 4, -1))
    assert masks.sum() == 8 and model.agile_stats[0]["kept"] == 8
    assert ("erank" in model.agile_stats[0]) == (mode == "full")
