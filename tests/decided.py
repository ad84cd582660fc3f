"""Whether round-off can decide a choice, for tests that compare a run with another path's run
that has other round-off (vLLM in float32 vs a float64 reference, a batch vs one image): equality
of the choices is demanded only where the reference's decision margins exceed TOL_* and the other
run's inputs to the decision lie within DEV_* of the reference's, a small fraction of TOL_*.
Measured with the native, avx2 and default ATen kernels: vLLM float32 vs float64 <= 9e-7 on the
attention row, <= 6e-7 on cosine distances, <= 2e-6 on logits; Qwen2.5-VL batch vs single
<= 1.2e-7 on logits.
"""
import torch

import bruteforce

TOL_ATT, DEV_ATT = 1e-4, 1e-5      # relative gap between neighbours in the attention order
TOL_DIST, DEV_DIST = 1e-3, 1e-4    # cosine distance vs the adaptive threshold; erank (relative)
TOL_LOGIT, DEV_LOGIT = 1e-3, 1e-4  # top-2 logit gap of a greedy step


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return 1 - x @ x.T


def adaptive(ref, other, keep: int, **params) -> list[int]:
    """`ref`, `other`: (features [N, D], attention [N]) of one selection in two runs. Asserts that
    round-off cannot decide `adaptive` there: `other` within DEV_* of `ref`, and the float64
    brute force on `ref` with a distance margin (|d - tau| over the walk's comparisons) and an
    attention margin (the smallest relative gap between neighbours of the attention order, over
    the part the walk and the backfill read and the first token they did not read) above TOL_*.
    Returns the brute force's kept indices."""
    (x, a), (y, b) = ((t.double().cpu() for t in pair) for pair in (ref, other))
    assert y.shape == x.shape and b.shape == a.shape
    assert float(((b - a).abs() / a).max()) < DEV_ATT
    assert float((cosine_distances(y) - cosine_distances(x)).abs().max()) < DEV_DIST
    assert abs(bruteforce.erank(y.numpy()) / bruteforce.erank(x.numpy()) - 1) < DEV_DIST
    a = a.numpy()
    kept, info = bruteforce.adaptive(x.numpy(), a, keep, **params)
    order = bruteforce.attention_order(a)
    pos = {t: p for p, t in enumerate(order)}
    last = max(pos[i] for i in kept) if info["backfilled"] == 0 else len(a) - 1
    att = min(((a[order[p]] - a[order[p + 1]]) / max(a[order[p]], 1e-300)
               for p in range(min(last + 1, len(a) - 1))), default=float("inf"))
    assert info["margin"] > TOL_DIST and att > TOL_ATT, (
        f"the reference's choice is a near tie (distance margin {info['margin']:.3g}, attention "
        f"margin {att:.3g}): pick other test inputs")
    return kept


def greedy(ref_scores: torch.Tensor, other_scores: torch.Tensor | None = None) -> None:
    """`[steps, V]` logits of a greedy continuation: every step's top-2 gap of `ref_scores` is
    above TOL_LOGIT (and `other_scores`, when given, within DEV_LOGIT of them), so round-off
    cannot pick another token: the runs' tokens must then be equal (the caller checks them)."""
    top = ref_scores.double().topk(2, dim=-1).values
    gaps = (top[:, 0] - top[:, 1]).tolist()
    assert min(gaps) > TOL_LOGIT, f"a greedy step is a near tie (top-2 logit gaps {gaps}): " \
        f"pick other test inputs"
    if other_scores is not None:
        torch.testing.assert_close(other_scores.double(), ref_scores.double(), rtol=0,
                                   atol=DEV_LOGIT)
