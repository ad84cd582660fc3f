"""CUDA kernels of the extension vs the PyTorch reference on CPU (skipped without a GPU).

Same random cases and ambiguity rule as test_ext_parity.py. The GPU's Gram products and
eigenvalues (cuBLAS / cuSOLVER) round differently from the CPU's kernels, so indices may differ
only where the reference's decision is within `ambiguity(x)` of flipping (128 units of roundoff
times sqrt(D): well above the round-off of a dot product summed in another order). erank agrees
within 1e-4 relative wherever it is determined at float32 precision (the float32 reference
agrees with float64 within 1e-5); for rank-deficient inputs round-off eigenvalues decide it, so
there the thresholds may move by the erank difference and that slack is added to the ambiguity
margin.
"""
import math

import pytest
import torch

import llava_agile
from llava_agile import backend, prune, select_tokens
from test_ext_parity import (Tally, adaptive_margin, adaptive_params, ambiguity, as_list, draw_case,
                             images, maxmin_margin, rel_close, run)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not llava_agile.ext_available("cuda"),
    reason="no CUDA device visible, or the extension was built without CUDA kernels")

CASES = 300
ERANK_REL = 1e-4


@pytest.fixture(autouse=True)
def _fresh_backend(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)
    monkeypatch.setattr(backend, "_choice", None)


def cuda(t):
    return t.to("cuda")


def erank_is_stable(x, center) -> bool:
    """Whether float32 round-off leaves this image's erank unchanged to 1e-5 (vs float64)."""
    from llava_agile.api import erank
    return rel_close(float(erank(x, center=center)), float(erank(x.double(), center=center)))


def threshold_slack(rs, es, p, n) -> float:
    """How far the GPU's thresholds may sit from the reference's, from the complexity difference."""
    if p.get("tau") is not None and not p.get("adaptive_count"):
        return 0.0
    if p.get("adaptive_count") and rs["kept"] != es["kept"]:
        return math.inf  # K itself was rounded differently
    return min(n * abs(rs["complexity"] - es["complexity"]) * p["tau_step"], p["tau_max"])


def test_auto_uses_cuda_kernels():
    assert backend.use_ext("adaptive", torch.device("cuda"))
    x, a = torch.randn(2, 50, 16, device="cuda"), torch.rand(2, 50, device="cuda")
    out = select_tokens(x, a, 8, method="adaptive")
    assert out.device.type == "cuda" and out.shape == (2, 8)


@pytest.mark.parametrize("variant", ["erank", "entropy", "tau", "count"])
def test_adaptive_cuda(variant):
    tally = Tally(f"cuda adaptive/{variant}")
    for seed in list(range(CASES)) + [10**6, 10**6 + 1]:
        rng, x, a, keep = draw_case(seed + 8 * 10**7, large=seed >= 10**6)
        p = adaptive_params(rng, variant)
        batched = x.dim() == 3
        ref = run("torch", prune, x, a, keep, method="adaptive", stats=False, **p)
        ext = run("ext", prune, cuda(x), cuda(a), keep, method="adaptive", stats=False, **p)
        xs, as_ = images(x, a)
        for b, (r, e, rs, es) in enumerate(zip(as_list(ref.indices, batched),
                                               as_list(ext.indices, batched), ref.stats, ext.stats)):
            what = f"seed {seed} image {b} N={xs.shape[1]} D={xs.shape[2]} K={keep} {x.dtype} {p}"
            assert e.device.type == "cuda" and rs.keys() == es.keys(), what
            same = torch.equal(r, e.cpu()) and all(
                rs.get(key) == es.get(key) for key in ("walk_selected", "tau_range", "kept"))
            if "entropy" in rs:
                assert rel_close(rs["entropy"], es["entropy"]), what
            stable = "erank" not in rs or erank_is_stable(xs[b], p["center"])
            if "erank" in rs and stable:
                assert abs(rs["erank"] - es["erank"]) <= ERANK_REL * rs["erank"], what
            slack = 0.0 if "erank" not in rs else threshold_slack(rs, es, p, xs.shape[1])
            tally.check(same, lambda: adaptive_margin(xs[b], as_[b], keep, p) - slack, what,
                        ambiguity(xs))
    tally.report(CASES)


@pytest.mark.parametrize("method", ["diversity", "fps"])
def test_maxmin_cuda(method):
    tally = Tally(f"cuda {method}")
    for seed in list(range(CASES)) + [10**6, 10**6 + 1]:
        _, x, a, keep = draw_case(seed + 9 * 10**7, large=seed >= 10**6)
        batched = x.dim() == 3
        ref = as_list(run("torch", select_tokens, x, a, keep, method=method), batched)
        ext = as_list(run("ext", select_tokens, cuda(x), cuda(a), keep, method=method), batched)
        xs, as_ = images(x, a)
        for b, (r, e) in enumerate(zip(ref, ext)):
            k = min(keep, xs.shape[1])
            tally.check(torch.equal(r, e.cpu()),
                        lambda: maxmin_margin(xs[b], as_[b], k, method == "fps"),
                        f"seed {seed} image {b} N={xs.shape[1]} D={xs.shape[2]} K={keep}",
                        ambiguity(xs))
    tally.report(CASES)


def test_erank_and_entropy_cuda():
    from llava_agile.api import attention_entropy, erank
    for seed in range(CASES):
        rng, x, a, _ = draw_case(seed + 10**8)
        xs, as_ = images(x, a)
        center = rng.random() < 0.8
        ref_e, got_e = erank(xs, center=center), backend.erank(cuda(xs), center=center)
        assert got_e.device.type == "cuda" and got_e.dtype == ref_e.dtype
        for b, (u, v) in enumerate(zip(ref_e.tolist(), got_e.tolist())):
            if erank_is_stable(xs[b], center):
                assert abs(u - v) <= ERANK_REL * u, f"seed {seed}: erank {u} vs {v}"
        ref_h, got_h = attention_entropy(as_), backend.attention_entropy(cuda(as_))
        for u, v in zip(ref_h.tolist(), got_h.tolist()):
            assert rel_close(u, v), f"seed {seed}: entropy {u} vs {v}"
