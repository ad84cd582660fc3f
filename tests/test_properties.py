"""Properties of the selection methods and the metrics (hypothesis for the adaptive pruner).

Run on the reference backend, and again on the C++ extension where it is built.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import bruteforce as bf
from llava_agile import attention_entropy, backend, erank, prune, select_tokens
from llava_agile.methods import METHODS  # the tensor-level (pre-LLM) methods
from llava_agile.methods import MERGING
from question import question_params
from test_ext_parity import adaptive_margin, ambiguity

INDEX_METHODS = [m for m in METHODS if m not in MERGING]


@pytest.fixture(scope="module", autouse=True, params=["torch", "ext"])
def each_backend(request):
    """The library's backend for this module's tests ("torch": the reference)."""
    if request.param == "ext" and not backend.ext_available():
        pytest.skip("the C++ extension is not built")
    saved = backend._choice
    backend._choice = request.param
    yield request.param
    backend._choice = saved


@st.composite
def images(draw, max_n=40, max_d=12, dtypes=(torch.float32, torch.float64)):
    """(features [N, D], cls_attn [N]) with clusters, exact and scaled duplicates, ties, zeros."""
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    x, a, _ = bf.make_case(rng, n, d, draw(st.sampled_from(
        ["clusters", "direction", "lowrank", "gauss"])))
    for _ in range(draw(st.integers(0, 3)) if n > 1 else 0):  # duplicated tokens
        i, j = rng.integers(0, n, size=2)
        x[j] = x[i] * draw(st.sampled_from([1.0, 1.0, 2.0, 0.5]))
    dtype = draw(st.sampled_from(dtypes))
    return torch.from_numpy(x).to(dtype), torch.from_numpy(a).to(dtype)


adaptive_params = st.fixed_dictionaries({}, optional={
    "erank_avg": st.floats(0.05, 200.0),
    "tau_step": st.floats(0.0, 0.1),
    "tau_max": st.floats(0.0, 1.0),
    "center": st.booleans(),
    "complexity": st.sampled_from(["erank", "entropy"]),
})


def top_k(a, k):
    return sorted(bf.attention_order(a.double().tolist())[:k])


# ---------------------------------------------------------------- adaptive (hypothesis)

@given(images(), st.integers(1, 50), adaptive_params)
def test_adaptive_returns_k_ascending_unique_indices(img, keep, params):
    x, a = img
    idx = select_tokens(x, a, keep, method="adaptive", **params)
    k = min(keep, x.shape[0])
    assert idx.dtype == torch.long and idx.shape == (k,)
    assert bool((idx[1:] > idx[:-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < x.shape[0]
    assert torch.equal(idx, select_tokens(x, a, keep, method="adaptive", **params))  # determinism


@given(images(), st.integers(1, 50), st.floats(0.05, 200.0))
@example(img=(torch.tensor([[1.5726], [-0.1714], [0.3621], [-0.0787], [0.1049], [-0.6538],
                            [-0.6821], [-0.6084], [-0.1191]]),
              torch.tensor([0.0192, 0.0636, 0.0686, 0.1953, 0.1199, 0.1480, 0.0327, 0.0717,
                            0.2810])), keep=2, erank_avg=1.0)  # found by hypothesis (D = 1)
def test_adaptive_with_zero_threshold_is_attention_top_k(img, keep, erank_avg):
    """tau_max = 0 (or a constant tau = 0): d(i, j) < 0 never holds, so nothing is removed."""
    x, a = img
    want = select_tokens(x, a, keep, method="attention")
    assert want.tolist() == top_k(a, min(keep, x.shape[0]))
    assert torch.equal(select_tokens(x, a, keep, method="adaptive", tau_max=0.0,
                                     erank_avg=erank_avg), want)
    assert torch.equal(select_tokens(x, a, keep, method="adaptive", tau=0.0), want)


def test_zero_threshold_with_duplicate_tokens_is_attention_top_k():
    """Regression: a token and its (scaled) copy have cosine distance 0, which is not < 0.

    The rows are chosen so that 1 - cos rounds to a negative number in the given dtype.
    """
    a = torch.tensor([1.0, 0.9, 0.8, 0.5, 0.4])
    for dtype, v in [(torch.float32, 1.1), (torch.float64, 0.1)]:
        x = torch.tensor([[v, 1.0], [v, 1.0], [2 * v, 2.0], [1.0, -1.0], [-1.0, 0.3]],
                         dtype=dtype)
        want = [0, 1, 2]
        assert select_tokens(x, a, 3, method="attention").tolist() == want
        assert select_tokens(x, a, 3, method="adaptive", tau_max=0.0).tolist() == want, dtype
        assert select_tokens(x, a, 3, method="adaptive", tau=0.0).tolist() == want, dtype


def test_threshold_comparison_is_strict():
    """d(i, j) == tau does not remove j; d < tau does (float64: orthogonal rows give d = 1)."""
    x = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], dtype=torch.float64)
    a = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert select_tokens(x, a, 3, method="adaptive", tau=1.0).tolist() == [0, 2, 3]
    assert select_tokens(x, a, 3, method="adaptive", tau=1.0 + 1e-12).tolist() == [0, 1, 2]


@given(images(), st.integers(2, 40), adaptive_params)
def test_adaptive_selection_is_nested_in_k(img, keep, params):
    """The walk does not depend on K (global ranks), so the K-1 set lies inside the K set.

    Only where round-off decides no comparison of the walk: the extension computes the dot
    products in row blocks sized after K, and a block's rounding may depend on its size, so a
    distance within round-off of its threshold (a duplicate's 0 against a tiny threshold) may be
    decided differently for K and K - 1. `adaptive_margin` (the reference's smallest
    |d - tau|) must exceed `ambiguity(x)`, a bound 16x above that round-off."""
    x, a = img
    if keep < x.shape[0]:
        p = {**dict(erank_avg=90.0, tau_step=0.01, tau_max=0.25, center=True), **params}
        assume(adaptive_margin(x, a, keep, p) > ambiguity(x))
    big = set(select_tokens(x, a, keep, method="adaptive", **params).tolist())
    small = set(select_tokens(x, a, keep - 1, method="adaptive", **params).tolist())
    assert small <= big


@given(st.lists(st.integers(1, 6), min_size=1, max_size=6), st.integers(0, 2 ** 32 - 1),
       st.integers(1, 40), st.booleans())
def test_adaptive_backfill_order(sizes, seed, keep, quantised):
    """Clusters of near-duplicates on orthogonal axes, constant tau = 0.05: the walk keeps the
    most attended token of each cluster; the rest of K is backfilled in attention order."""
    rng = np.random.default_rng(seed)
    n_c, n = len(sizes), sum(sizes)
    labels = np.repeat(np.arange(n_c), sizes)
    x = np.eye(8)[labels] * rng.uniform(0.5, 2, size=(n, 1)) + 1e-3 * rng.standard_normal((n, 8))
    a = rng.uniform(size=n)
    if quantised:
        a = np.round(a * 4) / 4  # exact ties: lower index first
    order = bf.attention_order(a)
    walk = [i for i in order if all(labels[j] != labels[i] for j in order[:order.index(i)])]
    k = min(keep, n)
    want = walk[:k] + [i for i in order if i not in walk][:max(0, k - len(walk))]
    got = select_tokens(torch.from_numpy(x), torch.from_numpy(a), keep, method="adaptive",
                        tau=0.05)
    assert got.tolist() == sorted(want)
    res = prune(torch.from_numpy(x), torch.from_numpy(a), keep, method="adaptive", tau=0.05)
    if k < n:
        assert res.stats[0]["walk_selected"] == min(k, n_c)


@given(st.lists(images(max_n=25, dtypes=(torch.float64,)), min_size=2, max_size=4),
       st.integers(1, 30), adaptive_params)
def test_adaptive_batch_equals_per_image(imgs, keep, params):
    n, d = min(x.shape[0] for x, _ in imgs), min(x.shape[1] for x, _ in imgs)
    xs = torch.stack([x[:n, :d] for x, _ in imgs])  # equal N and D across the batch
    ats = torch.stack([a[:n] for _, a in imgs])
    batch = select_tokens(xs, ats, keep, method="adaptive", **params)
    for b in range(len(imgs)):
        assert torch.equal(batch[b], select_tokens(xs[b], ats[b], keep, method="adaptive",
                                                   **params))


# ---------------------------------------------------------------- every method

def _case(seed, n=30, d=8, b=None):
    rng = np.random.default_rng(seed)
    if b is None:
        x, a, _ = bf.make_case(rng, n, d)
        return torch.from_numpy(x), torch.from_numpy(a)
    cases = [bf.make_case(rng, n, d, kind) for kind in
             ["clusters", "direction", "lowrank", "gauss"][:b]]
    return (torch.from_numpy(np.stack([c[0] for c in cases])),
            torch.from_numpy(np.stack([c[1] for c in cases])))


@pytest.mark.parametrize("method", INDEX_METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_method_returns_k_ascending_unique(method, dtype):
    for seed, keep in [(0, 1), (1, 7), (2, 29), (3, 30), (4, 100)]:
        x, a = _case(seed)
        q = question_params(method, x.to(dtype))
        idx = select_tokens(x.to(dtype), a.to(dtype), keep, method=method, **q)
        k = 30 if method == "none" else min(keep, 30)
        assert idx.dtype == torch.long and idx.shape == (k,)
        assert bool((idx[1:] > idx[:-1]).all())
        assert torch.equal(idx, select_tokens(x.to(dtype), a.to(dtype), keep, method=method, **q))


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_per_image_calls(method):
    x, a = _case(5, n=40, d=6, b=4)
    params = {"erank_avg": 3.0} if method in ("adaptive", "vispruner", "bat", "mix") else {}
    if method in ("vispruner", "bat", "mix"):
        params["ratio_rule"] = "adaptive"
    params.update(question_params(method, x, scope="image"))  # "batch" couples the images
    res = prune(x, a, 11, method=method, **params)
    for b in range(4):
        one = prune(x[b], a[b], 11, method=method,
                    **dict(params, **question_params(method, x[b], scope="image")))
        assert torch.equal(res.features[b], one.features)
        assert res.stats[b] == one.stats[0]
        if method not in MERGING:
            assert torch.equal(res.indices[b], one.indices)
            assert torch.equal(select_tokens(x, a, 11, method=method, **params)[b], one.indices)
    assert torch.equal(prune(x, a, 11, method=method, **params).features, res.features)


def _well_separated(method, params, min_margin=2e-2):
    """Small float64 cases whose every decision has a gap of at least `min_margin`."""
    rng = np.random.default_rng(7)
    found = []
    for _ in range(400):
        n, d = int(rng.integers(6, 16)), int(rng.integers(3, 10))
        x, _, _ = bf.make_case(rng, n, d, str(rng.choice(["clusters", "gauss", "lowrank"])))
        a = rng.permutation(np.linspace(0.05, 1.0, n))  # distinct even in fp16
        a = a.astype(np.float16).astype(np.float64)
        k = int(rng.integers(1, n))
        ref, info = bf.METHODS[method](x, a, k, **params)
        # a max-min start from an exact mutual-nearest tie is decided by round-off in the
        # library (bf.greedy_max_min): a zero gap, so not well separated
        if info["margin"] >= min_margin and not info.get("alternatives"):
            found.append((x, a, k, ref))
            if len(found) == 4:
                return found
    raise AssertionError(f"no well-separated cases found for {method}")


@pytest.mark.parametrize("method,params", [
    ("adaptive", dict(erank_avg=2.0)), ("adaptive", dict(tau=0.3)), ("attention", {}),
    ("diversity", {}), ("fps", {}), ("vispruner", {}), ("mix", dict(ratio=0.3)),
    ("bat", dict(ratio=0.3))])
def test_fp16_input_gives_the_fp32_result_on_well_separated_data(method, params):
    for x, a, k, ref in _well_separated(method, params):
        x32, a32 = torch.from_numpy(x).float(), torch.from_numpy(a).float()
        r32 = prune(x32, a32, k, method=method, **params)
        r16 = prune(x32.half(), a32.half(), k, method=method, **params)
        if method == "bat":
            assert r16.features.dtype == torch.float16
            torch.testing.assert_close(r16.features.float(), r32.features, rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(r32.features.numpy(), ref, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(r16.indices, r32.indices)
            assert r32.indices.tolist() == ref
            assert r16.features.dtype == torch.float16


def test_diversity_first_pick_is_the_most_isolated_token():
    """K = 1: the token whose nearest neighbour is farthest (ties: the lower index)."""
    rng = np.random.default_rng(8)
    for _ in range(30):
        x, a, _ = bf.make_case(rng, int(rng.integers(3, 40)), int(rng.integers(2, 10)))
        d = bf.cosine_distance_matrix(x)
        np.fill_diagonal(d, np.inf)
        nn = d.min(axis=1)
        best = int(np.argmax(nn))
        if np.sort(nn)[-2] > nn[best] - 1e-9:  # (near) ties: tested below
            continue
        got = select_tokens(torch.from_numpy(x), torch.from_numpy(a), 1, method="diversity")
        assert got.tolist() == [best]
    # a symmetric tie (two mutual nearest neighbours, farthest from the rest): lower index
    x = torch.tensor([[0.0, -1.0], [0.01, -1.0], [1.0, 0.0], [-0.01, -1.0], [0.8, 0.6]])
    assert select_tokens(x, torch.ones(5), 1, method="diversity").tolist() == [2]
    # fps starts at the top-attention token instead
    a = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.4])
    assert 3 in select_tokens(x, a, 2, method="fps").tolist()


def test_random_determinism_and_seed():
    x, a = _case(9, n=50)
    same = [select_tokens(x, a, 10, method="random", seed=4) for _ in range(3)]
    assert all(torch.equal(s, same[0]) for s in same)
    assert not torch.equal(same[0], select_tokens(x, a, 10, method="random", seed=5))


# ---------------------------------------------------------------- metrics

@given(images(max_n=30, max_d=16, dtypes=(torch.float64,)), st.booleans())
def test_erank_equals_the_svd_definition(img, center):
    x, _ = img
    xc = x - x.mean(dim=0) if center else x
    # rows equal up to round-off: the centred matrix is noise, its erank is not defined
    assume(float(xc.abs().max()) > 1e-12 * float(x.abs().max()) or float(xc.abs().max()) == 0)
    want = bf.erank(x.numpy(), center)
    got = float(erank(x, center=center))
    assert got == pytest.approx(want, rel=1e-5)
    assert 1 - 1e-5 <= got <= min(x.shape) * (1 + 1e-5)


@pytest.mark.parametrize("n,d,rank,noise", [
    (576, 64, 1, 0.0), (576, 1024, 2, 0.0), (576, 32, 32, 0.0), (576, 256, 16, 1e-2),
    (200, 4096, 200, 0.0), (64, 8, 3, 1e-6)])
def test_erank_equals_the_svd_definition_at_llava_sizes(n, d, rank, noise):
    """float64, rel 1e-5, at LLaVA's N = 576 tokens; low-rank inputs included."""
    rng = np.random.default_rng(n + d + rank)
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) \
        + noise * rng.standard_normal((n, d))
    for center in (True, False):
        got = float(erank(torch.from_numpy(x), center=center))
        assert got == pytest.approx(bf.erank(x, center), rel=1e-5), (center, got)


@pytest.mark.parametrize("r,d,scale", [(1, 1, 1.0), (1, 5, 3.0), (3, 3, 0.2), (5, 17, 1.0),
                                       (16, 64, 7.0), (64, 64, 1.0)])
def test_erank_of_r_orthonormal_equal_norm_rows_is_r(r, d, scale):
    rng = np.random.default_rng(r * d)
    q, _ = np.linalg.qr(rng.standard_normal((d, r)))
    x = torch.from_numpy(scale * q.T.copy())
    assert float(erank(x, center=False)) == pytest.approx(r, rel=1e-5)
    assert float(erank(x.float(), center=False)) == pytest.approx(r, rel=1e-4)
    padded = torch.cat([x, torch.zeros(3, d, dtype=x.dtype)])  # zero rows add no rank
    assert float(erank(padded, center=False)) == pytest.approx(r, rel=1e-5)


def test_erank_edge_cases_and_batches():
    assert float(erank(torch.zeros(5, 3))) == 1.0
    assert float(erank(torch.zeros(5, 3), center=False)) == 1.0
    assert float(erank(torch.randn(1, 8))) == 1.0  # one token, centred: a zero matrix
    x = torch.randn(3, 20, 6, dtype=torch.float64)
    batch = erank(x)
    assert batch.shape == (3,)
    for b in range(3):
        assert float(batch[b]) == pytest.approx(bf.erank(x[b].numpy()), rel=1e-5)
    assert erank(x[0]).shape == ()
    assert float(erank(x[0] * 1e3 + 5.0)) == pytest.approx(float(erank(x[0])), rel=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 576])
def test_entropy_of_uniform_attention_is_log_n(n):
    for value in (1.0, 1.0 / n, 1e-3):
        a = torch.full((n,), value, dtype=torch.float64)
        assert float(attention_entropy(a)) == pytest.approx(math.log(n), abs=1e-12)
    assert float(attention_entropy(torch.full((n,), 1.0 / n))) == pytest.approx(math.log(n),
                                                                               abs=1e-5)


def test_entropy_matches_bruteforce():
    rng = np.random.default_rng(10)
    rows = [rng.dirichlet(np.ones(50) * c) for c in (0.05, 1.0, 20.0)]
    rows.append(np.eye(50)[3])                      # one-hot: 0 nats
    rows.append(np.r_[np.zeros(25), np.ones(25)])   # 0 log 0 = 0
    a = torch.from_numpy(np.stack(rows))
    got = attention_entropy(a)
    assert got.shape == (5,)
    for b, row in enumerate(rows):
        assert float(got[b]) == pytest.approx(bf.entropy(row), abs=1e-12)
        assert float(attention_entropy(a[b] * 7.0)) == pytest.approx(bf.entropy(row), abs=1e-12)
    assert float(got[3]) == 0.0 and float(got[4]) == pytest.approx(math.log(25))


# ---------------------------------------------------------------- hybrid ratio rules

@pytest.mark.parametrize("method", ["vispruner", "bat", "mix"])
def test_hybrid_ratio_rules_move_r_in_the_documented_direction(method):
    """adaptive: a higher erank lowers R (more diversity); inverse raises it; fixed keeps R0."""
    rng = np.random.default_rng(11)
    x = torch.from_numpy(np.stack([
        rng.standard_normal((64, r)) @ rng.standard_normal((r, 32))
        + 1e-3 * rng.standard_normal((64, 32)) for r in (1, 2, 4, 8, 32)]))
    a = torch.from_numpy(rng.uniform(size=(5, 64)))
    e = [bf.erank(x[b].numpy()) for b in range(5)]
    assert e == sorted(e)
    avg = e[2]
    ratios = {}
    for rule in ("fixed", "adaptive", "inverse"):
        res = prune(x, a, 16, method=method, ratio=0.5, ratio_rule=rule, erank_avg=avg)
        ratios[rule] = [s["ratio"] for s in res.stats]
        sign = {"fixed": 0.0, "adaptive": -1.0, "inverse": 1.0}[rule]
        for b in range(5):
            want = min(max(0.5 + sign * 0.5 * (e[b] / avg - 1.0), 0.0), 1.0)
            assert ratios[rule][b] == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert ratios["fixed"] == [0.5] * 5
    assert all(p > q for p, q in zip(ratios["adaptive"], ratios["adaptive"][1:3]))
    assert all(p < q for p, q in zip(ratios["inverse"], ratios["inverse"][1:3]))
    assert ratios["adaptive"] == sorted(ratios["adaptive"], reverse=True)
    assert ratios["inverse"] == sorted(ratios["inverse"])
    assert ratios["adaptive"][2] == pytest.approx(0.5) == ratios["inverse"][2]
    # clipping to [ratio_min, ratio_max]
    res = prune(x, a, 16, method=method, ratio=0.5, ratio_rule="inverse", erank_avg=avg,
                ratio_slope=5.0, ratio_min=0.2, ratio_max=0.7)
    got = [s["ratio"] for s in res.stats]
    assert got[0] == 0.2 and got[-1] == 0.7


@pytest.mark.parametrize("method", ["vispruner", "mix"])
def test_hybrids_keep_their_top_attention_tokens(method):
    """mix: round(R*K) (SPEC, halves up); vispruner: int(K*R), a floor, as its official code."""
    x, a = _case(12, n=60, d=8)
    for ratio, keep in [(0.0, 10), (0.5, 9), (0.25, 10), (1.0, 7), (0.3, 1)]:
        idx = set(select_tokens(x, a, keep, method=method, ratio=ratio).tolist())
        k_att = int(keep * ratio) if method == "vispruner" else bf.round_half_up(ratio * keep)
        assert set(bf.attention_order(a.tolist())[:k_att]) <= idx
        if ratio == 1.0:
            assert sorted(idx) == top_k(a, keep)
