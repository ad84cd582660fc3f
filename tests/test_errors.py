"""Bad input raises a ValueError whose message names the argument (issue 2, section 3)."""
import math

import numpy as np
import pytest
import torch

from llava_agile import METHODS, PruneConfig, attention_entropy, erank, prune, select_tokens

X = torch.randn(12, 5)
A = torch.rand(12)
XB = torch.randn(3, 12, 5)
AB = torch.rand(3, 12)


def both(features, cls_attn, keep, match, method="adaptive", **params):
    """select_tokens and prune reject the input alike."""
    for fn in (select_tokens, prune):
        if fn is select_tokens and method in ("bat", "holov"):
            continue
        with pytest.raises(ValueError, match=match):
            fn(features, cls_attn, keep, method=method, **params)


@pytest.mark.parametrize("keep", [0, -1, -64])
def test_keep_below_one(keep):
    both(X, A, keep, r"keep must be >= 1")


@pytest.mark.parametrize("keep", [2.5, 3.0, "8", None, True, torch.tensor(3.0), [4]])
def test_keep_not_an_integer(keep):
    both(X, A, keep, r"keep must be an integer")


def test_keep_accepts_integer_types():
    for keep in (3, np.int64(3), np.int32(3)):
        assert select_tokens(X, A, keep, method="attention").shape == (3,)


@pytest.mark.parametrize("shape", [(12,), (), (2, 3, 12, 5)])
def test_features_not_2d_or_3d(shape):
    both(torch.randn(shape), A, 4, r"features must be 2-D \[N, D\] or 3-D \[B, N, D\]")


@pytest.mark.parametrize("features", [torch.ones(12, 5, dtype=torch.long), np.ones((12, 5)),
                                      [[1.0] * 5] * 12])
def test_features_not_a_float_tensor(features):
    both(features, A, 4, r"features must be a float tensor")


@pytest.mark.parametrize("features,cls_attn", [
    (X, torch.rand(11)), (X, torch.rand(13)), (X, torch.rand(1, 12)), (XB, torch.rand(12)),
    (XB, torch.rand(2, 12)), (XB, torch.rand(3, 11)), (XB, torch.rand(1, 12))])
def test_cls_attn_shape_does_not_match_features(features, cls_attn):
    both(features, cls_attn, 4, r"cls_attn shape .* does not match features")


@pytest.mark.parametrize("shape", [(), (3, 12, 1)])
def test_cls_attn_not_1d_or_2d(shape):
    both(X, torch.rand(shape), 4, r"cls_attn must be 1-D \[N\] or 2-D \[B, N\]")


def test_cls_attn_not_a_float_tensor():
    both(X, torch.ones(12, dtype=torch.long), 4, r"cls_attn must be a float tensor")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_features(bad):
    x = X.clone()
    x[3, 2] = bad
    both(x, A, 4, r"features contains NaN or Inf")
    xb = XB.clone()
    xb[2, 0, 0] = bad
    both(xb, AB, 4, r"features contains NaN or Inf")
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        both(x.to(dtype), A, 4, r"features contains NaN or Inf")
    with pytest.raises(ValueError, match=r"features contains NaN or Inf"):
        erank(x)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_in_cls_attn(bad):
    a = A.clone()
    a[5] = bad
    both(X, a, 4, r"cls_attn contains NaN or Inf")
    with pytest.raises(ValueError, match=r"cls_attn contains NaN or Inf"):
        attention_entropy(a)


def test_nan_in_similarity_features():
    sim = torch.randn(12, 7)
    sim[0, 0] = math.nan
    both(X, A, 4, r"similarity_features contains NaN or Inf", method="vispruner",
         similarity_features=sim)


def test_negative_attention():
    a = A.clone()
    a[7] = -1e-6
    both(X, a, 4, r"cls_attn must be non-negative")
    ab = AB.clone()
    ab[1, 0] = -0.5
    both(XB, ab, 4, r"cls_attn must be non-negative")
    with pytest.raises(ValueError, match=r"cls_attn must be non-negative"):
        attention_entropy(a)


def test_no_tokens():
    both(torch.randn(0, 5), torch.rand(0), 4, r"N == 0")
    both(torch.randn(2, 0, 5), torch.rand(2, 0), 4, r"N == 0")
    with pytest.raises(ValueError, match=r"N == 0"):
        erank(torch.randn(0, 5))
    with pytest.raises(ValueError, match=r"N == 0"):
        attention_entropy(torch.rand(0))


def test_zero_feature_dimensions():
    both(torch.randn(12, 0), A, 4, r"features has zero feature dimensions")


@pytest.mark.parametrize("method", ["adaptve", "topk", "", None, "ADAPTIVE"])
def test_unknown_method_lists_the_valid_ones(method):
    for fn in (select_tokens, prune):
        with pytest.raises(ValueError, match=r"unknown pruning method") as err:
            fn(X, A, 4, method=method)
        assert all(m in str(err.value) for m in METHODS)
    with pytest.raises(ValueError, match=r"unknown pruning method"):
        PruneConfig(method=method)


@pytest.mark.parametrize("method,param", [
    ("attention", "tau"), ("adaptive", "ratio"), ("adaptive", "erank_avgg"), ("none", "seed"),
    ("diversity", "erank_avg"), ("mix", "similarity_features"), ("vispruner", "bat_knn"),
    ("random", "center"), ("fps", "keep_ratio")])
def test_parameter_the_method_does_not_take(method, param):
    both(X, A, 4, rf"method '{method}' does not take parameter\(s\) {param}; it accepts",
         method=method, **{param: 1})


@pytest.mark.parametrize("method", ["vispruner", "bat", "mix"])
@pytest.mark.parametrize("name", ["ratio", "ratio_min", "ratio_max"])
@pytest.mark.parametrize("value", [-0.1, 1.5, -1e-9, 1 + 1e-9])
def test_ratio_outside_unit_interval(method, name, value):
    both(X, A, 4, rf"{name} must lie in \[0, 1\]", method=method, **{name: value})


@pytest.mark.parametrize("method,params,match", [
    ("vispruner", dict(ratio=math.nan), r"ratio must be a finite number"),
    ("mix", dict(ratio="half"), r"ratio must be a finite number"),
    ("mix", dict(ratio_min=0.8, ratio_max=0.2), r"ratio_min \(0.8\) must not exceed ratio_max"),
    ("mix", dict(ratio_rule="linear"), r"ratio_rule must be one of fixed, adaptive, inverse"),
    ("mix", dict(ratio_slope=-1.0), r"ratio_slope must be >= 0"),
    ("adaptive", dict(erank_avg=0.0), r"erank_avg must be > 0"),
    ("adaptive", dict(erank_avg=-90.0), r"erank_avg must be > 0"),
    ("adaptive", dict(entropy_avg=0.0), r"entropy_avg must be > 0"),
    ("adaptive", dict(tau_max=-0.1), r"tau_max must be >= 0"),
    ("adaptive", dict(tau_step=-0.01), r"tau_step must be >= 0"),
    ("adaptive", dict(tau=-0.01), r"tau must be >= 0"),
    ("adaptive", dict(tau=math.inf), r"tau must be a finite number"),
    ("adaptive", dict(complexity="variance"), r"complexity must be one of erank, entropy"),
    ("adaptive", dict(center="yes"), r"center must be True or False"),
    ("adaptive", dict(adaptive_count=1), r"adaptive_count must be True or False"),
    ("random", dict(seed=1.5), r"seed must be an integer"),
    ("bat", dict(bat_knn=0), r"bat_knn must be an integer >= 1"),
    ("holov", dict(chunks=0), r"chunks must be an integer >= 1"),
    ("holov", dict(chunks=2.0), r"chunks must be an integer >= 1"),
    ("holov", dict(overflow="drop"), r"overflow must be one of zeros, backfill"),
])
def test_invalid_parameter_values(method, params, match):
    both(X, A, 4, match, method=method, **params)


@pytest.mark.parametrize("sim", [torch.randn(11, 7), torch.randn(3, 12, 7), torch.randn(12)])
def test_similarity_features_shape(sim):
    both(X, A, 4, r"similarity_features", method="vispruner", similarity_features=sim)


def test_bat_has_no_indices():
    with pytest.raises(ValueError, match=r"'bat' merges tokens.*llava_agile.prune"):
        select_tokens(X, A, 4, method="bat")
    assert prune(X, A, 4, method="bat").indices is None


def test_metric_shapes():
    with pytest.raises(ValueError, match=r"features must be 2-D"):
        erank(torch.randn(12))
    with pytest.raises(ValueError, match=r"cls_attn must be 1-D"):
        attention_entropy(torch.rand(2, 3, 4))
