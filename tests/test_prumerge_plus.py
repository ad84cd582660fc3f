"""prumerge_plus where its official code crashes or has no budget, and its neighbour ties.

(Equality with the official code: tests/official/test_selection_official.py.)"""
import pytest
import torch

from llava_agile import prune
from llava_agile.methods.prumerge import centres, nearest

torch.set_num_threads(1)


def case(n=576, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    a = torch.softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    return x, a


@pytest.mark.parametrize("keep", [1, 2, 5, 64, 128, 192, 575])
def test_fixed_count_gives_exactly_keep_tokens(keep):
    x, a = case()
    res = prune(x, a, keep, "prumerge_plus")
    idx = res.stats[0]["attention_indices"]
    assert res.features.shape == (keep, 8) and len(set(idx)) == len(idx) == keep - 1
    top = max(1, int((keep - 1) / 4 + 0.5)) if keep > 1 else 0
    assert idx[:top] == torch.sort(a, descending=True, stable=True).indices[:top].tolist()


def test_no_outlier_keeps_the_top_token_and_many_outliers_sample_every_token():
    flat = torch.full((576,), 1 / 576, dtype=torch.float64)  # official: ZeroDivisionError
    assert centres(flat, 64, 0).tolist()[0] == 0
    peaked = torch.rand(576, dtype=torch.float64)
    idx = centres(peaked, 64, 250)  # official: a step of 0
    assert len(set(idx.tolist())) == idx.numel() and set(range(575)) <= set(idx.tolist())


def test_few_tokens_merge_with_all_others():
    x, a = case(n=20)
    res = prune(x, a, 5, "prumerge_plus")
    st = res.stats[0]
    idx = st["attention_indices"]
    want = x[idx] + (a[:, None] * x).sum(0) - a[idx, None] * x[idx]  # every other token
    torch.testing.assert_close(res.features[:-1], want)


def test_neighbour_ties_go_to_the_lower_index():
    sim = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1]], dtype=torch.float64)
    assert nearest(sim, 3).tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]


def test_iqr_scope_couples_the_batch_or_not():
    x, a = case()
    x2, a2 = case(seed=1)
    a2 = torch.softmax(4 * torch.log(a2), 0)  # a peakier second image: other outlier count
    xs, as_ = torch.stack([x, x2]), torch.stack([a, a2])
    batch = prune(xs, as_, 64, "prumerge_plus", count="iqr")
    image = prune(xs, as_, 64, "prumerge_plus", count="iqr", scope="image")
    assert batch.stats[0]["outliers"] == batch.stats[1]["outliers"]
    alone = [prune(xs[b], as_[b], 64, "prumerge_plus", count="iqr").stats[0]["outliers"]
             for b in range(2)]
    assert [st["outliers"] for st in image.stats] == alone and alone[0] != alone[1]
