"""PruneConfig: defaults, "k=v,..." parsing, from_args / to_dict round trips, validation."""
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import llava_agile
from llava_agile import PruneConfig, select_tokens
from llava_agile.methods import METHODS  # the tensor-level (pre-LLM) methods
from llava_agile.config import parse_pruning_args


def test_defaults():
    cfg = PruneConfig()
    assert (cfg.method, cfg.keep, cfg.params) == ("adaptive", 64, {})
    assert (cfg.feature_space, cfg.anyres_mode) == ("projected", "shared")
    assert PruneConfig.from_args() == cfg


@pytest.mark.parametrize("text,want", [
    ("erank_avg=95,tau_max=0.3", {"erank_avg": 95, "tau_max": 0.3}),
    (" ratio = 0.25 , ratio_rule = adaptive ", {"ratio": 0.25, "ratio_rule": "adaptive"}),
    ("tau=none,center=false,adaptive_count=True", {"tau": None, "center": False,
                                                  "adaptive_count": True}),
    ("tau_step=1e-3,", {"tau_step": 0.001}),
    ("seed=-7", {"seed": -7}),
    ("complexity=entropy,entropy_avg=4.5", {"complexity": "entropy", "entropy_avg": 4.5}),
    ("", {}), (None, {}), (",,", {}),
])
def test_parse_pruning_args(text, want):
    got = parse_pruning_args(text)
    assert got == want
    assert [type(v) for v in got.values()] == [type(v) for v in want.values()]


@pytest.mark.parametrize("text", ["erank_avg", "erank_avg=95,tau_max", "tau_max 0.3"])
def test_parse_rejects_items_without_a_value(text):
    with pytest.raises(ValueError, match=r"key=value"):
        parse_pruning_args(text)
    with pytest.raises(ValueError, match=r"key=value"):
        PruneConfig.from_args("adaptive", 8, text)


def test_from_args_rejects_an_empty_key():
    with pytest.raises(ValueError):
        PruneConfig.from_args("adaptive", 8, "=0.3")


def test_from_args_parses_and_validates():
    cfg = PruneConfig.from_args("vispruner", 32, "ratio=0.3,ratio_rule=inverse")
    assert cfg.method == "vispruner" and cfg.keep == 32
    assert cfg.params == {"ratio": 0.3, "ratio_rule": "inverse"}
    assert PruneConfig.from_args("vispruner", 32, {"ratio": 0.3, "ratio_rule": "inverse"}) == cfg
    with pytest.raises(ValueError, match=r"ratio must lie in \[0, 1\]"):
        PruneConfig.from_args("vispruner", 32, "ratio=1.3")
    with pytest.raises(ValueError, match=r"does not take parameter\(s\) tau"):
        PruneConfig.from_args("attention", 32, "tau=0.1")
    with pytest.raises(ValueError, match=r"keep must be >= 1"):
        PruneConfig.from_args("attention", 0)
    with pytest.raises(ValueError, match=r"unknown pruning method"):
        PruneConfig.from_args("topk", 8)


def test_from_args_moves_llava_options_out_of_params():
    cfg = PruneConfig.from_args("adaptive", 64, "feature_space=vision,anyres_mode=per_crop,tau=0.2")
    assert cfg.params == {"tau": 0.2}
    assert (cfg.feature_space, cfg.anyres_mode) == ("vision", "per_crop")
    with pytest.raises(ValueError, match=r"feature_space must be"):
        PruneConfig.from_args("adaptive", 64, "feature_space=clip")
    with pytest.raises(ValueError, match=r"anyres_mode must be"):
        PruneConfig(anyres_mode="tiles")


@pytest.mark.parametrize("method", METHODS)
def test_to_dict_round_trip(method):
    params = {"adaptive": {"erank_avg": 95.0, "tau": None, "center": False},
              "vispruner": {"ratio": 0.3, "ratio_rule": "adaptive"},
              "bat": {"bat_knn": 3}, "mix": {"ratio_min": 0.2},
              "random": {"seed": 11}}.get(method, {})
    cfg = PruneConfig(method, 32, params, feature_space="vision", anyres_mode="global")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain, serialisable values
    assert PruneConfig(**d) == cfg
    assert PruneConfig.from_args(d["method"], d["keep"], d["params"],
                                 feature_space=d["feature_space"],
                                 anyres_mode=d["anyres_mode"]) == cfg
    text = ",".join(f"{k}={v}" for k, v in d["params"].items())
    assert PruneConfig.from_args(d["method"], d["keep"], text, feature_space="vision",
                                 anyres_mode="global") == cfg
    d["params"]["extra"] = 1  # to_dict hands out a copy
    assert "extra" not in cfg.params


@given(st.fixed_dictionaries({}, optional={
    "erank_avg": st.floats(0.5, 500), "tau_step": st.floats(0, 1), "tau_max": st.floats(0, 2),
    "tau": st.none() | st.floats(0, 2), "complexity": st.sampled_from(["erank", "entropy"]),
    "entropy_avg": st.floats(0.1, 10), "center": st.booleans(),
    "adaptive_count": st.booleans()}), st.integers(1, 4096))
def test_string_round_trip_of_adaptive_params(params, keep):
    cfg = PruneConfig("adaptive", keep, params)
    # str() of a float round-trips exactly; None, bools and strings parse back
    text = ",".join(f"{k}={v}" for k, v in cfg.to_dict()["params"].items())
    assert PruneConfig.from_args("adaptive", keep, text) == cfg


def test_params_are_copied():
    params = {"tau": 0.1}
    cfg = PruneConfig("adaptive", 8, params)
    params["tau"] = 0.9
    assert cfg.params == {"tau": 0.1}


def test_erank_avg_file(tmp_path):
    flat, nested, empty = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    flat.write_text(json.dumps({"erank_avg": 81.5}))
    nested.write_text(json.dumps({"erank": {"mean": 77.25, "std": 9.0}}))
    empty.write_text(json.dumps({"erank": {"std": 9.0}}))
    assert PruneConfig.from_args("adaptive", 64, None, str(flat)).params == {"erank_avg": 81.5}
    assert PruneConfig.from_args("mix", 64, "", str(nested)).params == {"erank_avg": 77.25}
    # an explicit erank_avg wins over the file
    assert PruneConfig.from_args("adaptive", 64, "erank_avg=90", str(flat)).params == {
        "erank_avg": 90}
    with pytest.raises(ValueError, match=r"erank_avg"):
        PruneConfig.from_args("adaptive", 64, None, str(empty))
    with pytest.raises(ValueError, match=r"does not use erank_avg"):
        PruneConfig.from_args("attention", 64, None, str(flat))


def test_config_drives_the_api():
    cfg = PruneConfig.from_args("adaptive", 5, "erank_avg=2.0,tau_max=0.5")
    x, a = torch.randn(20, 6), torch.rand(20)
    idx = select_tokens(x, a, cfg.keep, method=cfg.method, **cfg.params)
    assert idx.shape == (5,)
    assert torch.equal(idx, select_tokens(x, a, 5, method="adaptive", erank_avg=2.0, tau_max=0.5))


@pytest.mark.parametrize("method,keep,params,text", [
    ("fastv", 29, {"layer": 2}, "layer=2"),
    ("dart", 132, {"layer": 2, "pivot_image": 4, "pivot_text": 4},
     "layer=2,pivot_image=4,pivot_text=4"),
    ("pdrop", 288, {"layers": (8, 16, 24), "ratios": (0.5, 0.25, 0.125)},
     "layers=8/16/24,ratios=0.5/0.25/0.125"),
    ("sparsevlm", 40, {"layers": (1, 3), "schedule": (40, 10)}, "layers=1/3,schedule=40/10")])
def test_in_llm_configs(method, keep, params, text):
    cfg = PruneConfig(method, keep, params)
    d = cfg.to_dict()
    assert PruneConfig(**json.loads(json.dumps(d))) == cfg   # JSON lists come back as tuples
    assert PruneConfig.from_args(method, keep, text) == cfg
    assert method in llava_agile.METHODS and method not in METHODS
    with pytest.raises(ValueError, match="prunes inside the LLM"):
        select_tokens(torch.randn(8, 4), torch.rand(8), 2, method=method)
