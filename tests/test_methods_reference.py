"""Every method of the reference backend against the brute-force float64 loops of bruteforce.py.

Inputs are float64, so the library and the loops compute in the same precision. A case whose
smallest decision gap (`info["margin"]`) is below AMBIGUOUS may be decided either way by
round-off; such cases are counted and skipped, and must stay rare. AMBIGUOUS = 1e-9 is over
10^4 times the float64 round-off of these decisions (D <= 64: a cosine distance rounds by
less than 1e-14), so round-off decides none of the cases compared. The one exact tie the
brute force settles by rule but round-off settles in the library (the first max-min pick from
a mutual nearest pair, `bf.greedy_max_min`) accepts either start's result.
Where the C++ extension is built, the methods it accelerates are checked on it too.
"""
import contextlib
import math

import numpy as np
import pytest
import torch

import bruteforce as bf
from llava_agile import backend, prune, select_tokens

AMBIGUOUS = 1e-9
MAX_AMBIGUOUS_SHARE = 0.05
N_CASES = 120


def draw_size(rng):
    """N mostly small to medium, sometimes up to 200; K from 1 to N (and beyond N)."""
    n = int(rng.integers(2, 41)) if rng.uniform() < 0.5 else int(rng.integers(41, 201))
    d = int(rng.integers(2, 65))
    u = rng.uniform()
    k = 1 if u < 0.08 else n if u < 0.14 else n + 3 if u < 0.17 else int(rng.integers(1, n + 1))
    return n, d, k


def ratio_params(rng, x, center=True):
    """A hybrid's ratio parameters; erank_avg set so that erank/erank_avg spans 0.1-2.5."""
    rule = str(rng.choice(["fixed", "adaptive", "inverse"]))
    p = dict(ratio=float(rng.choice([0.0, 0.25, 0.5, 0.5, 0.8, 1.0, rng.uniform()])),
             ratio_rule=rule, erank_avg=bf.erank(x, center) / rng.uniform(0.1, 2.5))
    if rng.uniform() < 0.3:
        p.update(ratio_slope=float(rng.uniform(0, 1.5)), ratio_min=0.1, ratio_max=0.9)
    if not center:
        p["center"] = False
    return p


def similarity(rng, x):
    """Sometimes distinct pre-projector features (a noisy linear map of x), else None."""
    if rng.uniform() < 0.5:
        return None
    w = rng.standard_normal((x.shape[1], int(rng.integers(2, 33))))
    return x @ w + 0.1 * rng.standard_normal((x.shape[0], w.shape[1]))


@contextlib.contextmanager
def using(name):
    """Run the library on backend `name` ("torch": the reference; "ext": the extension)."""
    saved = backend._choice
    backend._choice = name
    try:
        yield
    finally:
        backend._choice = saved


def backends(method):
    accelerated = getattr(backend, "ACCELERATED", frozenset())
    return ["torch"] + (["ext"] if method in accelerated and backend.ext_available() else [])


@pytest.fixture(autouse=True)
def reference_backend():
    with using("torch"):
        yield


def library(method, x, a, k, params):
    params = dict(params)
    if params.get("similarity_features") is not None:
        params["similarity_features"] = torch.from_numpy(params["similarity_features"])
    X, A = torch.from_numpy(x), torch.from_numpy(a)
    if method == "bat":
        res = prune(X, A, k, method=method, **params)
        return res.features.numpy(), res
    res = prune(X, A, k, method=method, **params)
    idx = select_tokens(X, A, k, method=method, **params)
    assert torch.equal(idx, res.indices)
    return idx.tolist(), res


def compare(method, make_params, seed, n_cases=N_CASES, check=None, sizes=draw_size):
    """Run n_cases random cases; assert equality on every unambiguous one. Returns the records."""
    rng = np.random.default_rng(seed)
    records, ambiguous, failures = [], 0, []
    for case in range(n_cases):
        n, d, k = sizes(rng)
        x, a, kind = bf.make_case(rng, n, d)
        params = make_params(rng, x, a)
        bf_params = {key: v for key, v in params.items()}
        ref, info = bf.METHODS[method](x, a, k, **bf_params)
        if info["margin"] < AMBIGUOUS:
            ambiguous += 1
            continue
        for name in backends(method):
            with using(name):
                got, res = library(method, x, a, k, params)
            if method == "bat":
                same = got.shape == ref.shape and np.allclose(got, ref, rtol=1e-9, atol=1e-12)
            else:
                # a max-min start from an exact mutual-nearest tie, which round-off in the
                # library's d(i, j) vs d(j, i) decides: either start's result (bf.greedy_max_min)
                same = got == ref or got in info.get("alternatives", [])
            if not same:
                failures.append(dict(backend=name, case=case, n=n, d=d, k=k, kind=kind, params={
                    key: v for key, v in params.items() if key != "similarity_features"},
                    margin=info["margin"]))
            elif check is not None:
                check(res, info, n, k)
        records.append(dict(n=n, k=k, info=info, got=got, x=x, a=a, params=params))
    assert not failures, f"{len(failures)} of {n_cases} cases differ, e.g. {failures[:3]}"
    assert ambiguous <= MAX_AMBIGUOUS_SHARE * n_cases, f"{ambiguous} ambiguous cases"
    return records


# ---------------------------------------------------------------- adaptive

def check_adaptive_stats(res, info, n, k):
    st = res.stats[0]
    assert st["kept"] == len(res.indices) == info["k"]
    if info["k"] < n:
        assert "tau_range" in st
    if "tau_range" in st:
        assert st["tau_range"] == pytest.approx(info["tau_range"], rel=2e-5, abs=1e-12)
    assert st["erank"] == pytest.approx(info["erank"], rel=2e-5)
    assert st["entropy"] == pytest.approx(info["entropy"], rel=1e-9, abs=1e-12)


def adaptive_params(rng, x, a):
    center = bool(rng.uniform() < 0.8)
    p = dict(erank_avg=bf.erank(x, center) / rng.uniform(0.1, 2.5))
    if not center:
        p["center"] = False
    if rng.uniform() < 0.3:
        p["tau_step"] = float(rng.choice([0.003, 0.02, 0.05]))
    if rng.uniform() < 0.3:
        p["tau_max"] = float(rng.choice([0.05, 0.1, 0.5, 1.0]))
    return p


def test_adaptive_matches_bruteforce():
    recs = compare("adaptive", adaptive_params, seed=1, n_cases=200, check=check_adaptive_stats)
    # the cases must exercise the algorithm: thresholds that remove tokens, and exhaustion
    differs = sum(r["got"] != bf.attention(r["x"], r["a"], r["k"])[0] for r in recs)
    backfilled = sum(r["info"]["backfilled"] > 0 for r in recs)
    ratios = [r["info"]["complexity"] for r in recs]
    assert differs >= 0.3 * len(recs), differs
    assert backfilled >= 0.15 * len(recs), backfilled
    assert min(ratios) < 0.2 and max(ratios) > 2.3


def test_adaptive_constant_tau_matches_bruteforce():
    def params(rng, x, a):
        return dict(tau=float(rng.choice([0.0, rng.uniform(0, 0.1), rng.uniform(0, 0.6)])))
    recs = compare("adaptive", params, seed=2)
    assert sum(r["info"]["backfilled"] > 0 for r in recs) >= 0.1 * len(recs)


def test_adaptive_entropy_complexity_matches_bruteforce():
    def params(rng, x, a):
        return dict(complexity="entropy", entropy_avg=bf.entropy(a) / rng.uniform(0.1, 2.5),
                    erank_avg=float(rng.uniform(1, 100)))
    recs = compare("adaptive", params, seed=3, check=check_adaptive_stats)
    assert sum(r["got"] != bf.attention(r["x"], r["a"], r["k"])[0] for r in recs) >= 0.2 * len(recs)


@pytest.mark.parametrize("complexity", ["erank", "entropy"])
def test_adaptive_count_matches_bruteforce(complexity):
    """adaptive_count=True: K_i = round(K * clip(c, 0.5, 1.5)) tokens, a list per image."""
    def params(rng, x, a):
        t = rng.uniform(0.1, 2.5)
        if complexity == "entropy":
            return dict(adaptive_count=True, complexity="entropy", entropy_avg=bf.entropy(a) / t)
        return dict(adaptive_count=True, erank_avg=bf.erank(x) / t)

    recs = compare("adaptive", params, seed=4 if complexity == "erank" else 5,
                   check=check_adaptive_stats)
    ks = {(r["k"], r["info"]["k"]) for r in recs}
    assert any(ki < k for k, ki in ks) and any(ki > k for k, ki in ks)


def test_adaptive_count_batch_returns_a_list():
    rng = np.random.default_rng(6)
    x = np.stack([bf.make_case(rng, 30, 8, "lowrank")[0], bf.make_case(rng, 30, 8, "gauss")[0]])
    a = rng.uniform(size=(2, 30))
    out = select_tokens(torch.from_numpy(x), torch.from_numpy(a), 10, method="adaptive",
                        adaptive_count=True, erank_avg=4.0)
    assert isinstance(out, list) and len(out) == 2
    for b in range(2):
        ref, info = bf.adaptive(x[b], a[b], 10, erank_avg=4.0, adaptive_count=True)
        assert info["margin"] > AMBIGUOUS  # a clear case (5e-3): round-off decides nothing
        assert out[b].tolist() == ref
    res = prune(torch.from_numpy(x), torch.from_numpy(a), 10, method="adaptive",
                adaptive_count=True, erank_avg=4.0)
    assert [f.shape[0] for f in res.features] == [len(i) for i in out]
    assert [s["kept"] for s in res.stats] == [len(i) for i in out]


# ---------------------------------------------------------------- baselines

def no_params(rng, x, a):
    return {}


@pytest.mark.parametrize("method,seed", [("attention", 10), ("diversity", 11), ("fps", 12)])
def test_single_signal_methods_match_bruteforce(method, seed):
    compare(method, no_params, seed=seed, n_cases=150)


def test_vispruner_matches_bruteforce():
    def params(rng, x, a):
        return dict(ratio_params(rng, x), similarity_features=similarity(rng, x))
    compare("vispruner", params, seed=13, n_cases=150, check=check_ratio_stats)


def small_diverse_budget(rng):
    """K <= 24 on up to 150 tokens: with R >= 0.6 the de-duplication ends on a short A."""
    return int(rng.integers(12, 151)), int(rng.integers(2, 33)), int(rng.integers(2, 25))


def test_vispruner_continues_where_the_official_loop_fails():
    """The official loop fails when A holds fewer tokens than the round drops (or R is odd);
    ours drops all of A and goes on (README, Our choices): still K tokens, as the brute force."""
    def params(rng, x, a):
        return dict(ratio=float(rng.choice([0.75, 0.8, 0.9, rng.uniform(0.6, 1.0)])),
                    similarity_features=similarity(rng, x))
    records = compare("vispruner", params, seed=17, n_cases=150, sizes=small_diverse_budget)
    assert all(len(r["got"]) == min(r["k"], r["n"]) for r in records)
    assert sum(r["info"]["short_rounds"] > 0 for r in records) >= 30


def test_vispruner_on_576_tokens_keeps_16_at_ratio_075():
    """The issue's failing case: K = 16, R = 0.75 on LLaVA-1.5's 576 tokens."""
    rng = np.random.default_rng(18)
    x, a, _ = bf.make_case(rng, 576, 16, "clusters")
    sim = x @ rng.standard_normal((16, 24)) + 0.1 * rng.standard_normal((576, 24))
    ref, info = bf.vispruner(x, a, 16, ratio=0.75, similarity_features=sim)
    assert info["short_rounds"] >= 1 and info["margin"] > AMBIGUOUS
    got = select_tokens(torch.from_numpy(x), torch.from_numpy(a), 16, "vispruner", ratio=0.75,
                        similarity_features=torch.from_numpy(sim))
    assert got.tolist() == ref and len(ref) == 16
    assert set(bf.attention_order(a)[:12]) <= set(ref)  # int(16 * 0.75) by attention


def test_mix_matches_bruteforce():
    compare("mix", lambda rng, x, a: ratio_params(rng, x, bool(rng.uniform() < 0.8)),
            seed=14, n_cases=150, check=check_ratio_stats)


def test_bat_matches_bruteforce():
    def params(rng, x, a):
        p = dict(ratio_params(rng, x), similarity_features=similarity(rng, x))
        if rng.uniform() < 0.4:
            p["bat_knn"] = int(rng.choice([1, 2, 3, 10, 50]))
        return p
    compare("bat", params, seed=15, n_cases=150, check=check_ratio_stats)


def check_ratio_stats(res, info, n, k):
    """The effective ratio each image used is reported, as the brute force computes it."""
    if k < n:
        assert res.stats[0]["ratio"] == pytest.approx(info["ratio"], rel=1e-4, abs=1e-9)


def test_none_keeps_every_token():
    rng = np.random.default_rng(16)
    for _ in range(10):
        n, d, k = draw_size(rng)
        x, a, _ = bf.make_case(rng, n, d)
        assert select_tokens(torch.from_numpy(x), torch.from_numpy(a), k,
                             method="none").tolist() == bf.none(x, a, k)[0]
        res = prune(torch.from_numpy(x), torch.from_numpy(a), k, method="none")
        assert torch.equal(res.features, torch.from_numpy(x))


def test_random_is_seeded_per_image():
    """random: torch.Generator().manual_seed(seed) + randperm, the same for every image."""
    rng = np.random.default_rng(17)
    x = torch.from_numpy(rng.standard_normal((3, 50, 4)))
    a = torch.from_numpy(rng.uniform(size=(3, 50)))
    for seed in (0, 1, 123):
        got = select_tokens(x, a, 7, method="random", seed=seed)
        want = torch.randperm(50, generator=torch.Generator().manual_seed(seed))[:7].sort().values
        assert torch.equal(got, want.expand(3, 7))
        assert torch.equal(got, select_tokens(x, a, 7, method="random", seed=seed))
    draws = {tuple(select_tokens(x[0], a[0], 7, method="random", seed=s).tolist())
             for s in range(20)}
    assert len(draws) > 15


def test_exact_ties_follow_the_documented_rules():
    """Quantised attention gives exact ties: both sides must order them lower-index first."""
    a = np.array([0.1, 0.3, 0.3, 0.1, 0.3, 0.2])
    x = np.eye(6)
    assert bf.attention_order(a) == [1, 2, 4, 5, 0, 3]
    assert select_tokens(torch.from_numpy(x), torch.from_numpy(a), 4,
                         method="attention").tolist() == [1, 2, 4, 5]
    assert bf.round_half_up(2.5) == 3 and bf.round_half_up(0.5) == 1
    # K=3, R=0.5: round(1.5) = 2 attention tokens (halves round up), then max-min
    idx = select_tokens(torch.from_numpy(x), torch.from_numpy(a), 3, method="mix", ratio=0.5)
    assert idx.tolist() == bf.mix(x, a, 3, ratio=0.5)[0]
    assert {1, 2} <= set(idx.tolist())
    assert math.isclose(bf.erank(np.zeros((4, 3))), 1.0)
