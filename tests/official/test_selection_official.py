"""The pre-LLM baselines equal their authors' code (golden files of `record_selection.py`).

Inputs are float64 and drawn by numpy (`selection_cases.py`), so ours and the official functions
saw the same tensors; every choice round-off could decide (a budget's floor, a top-k cut-off) is
checked to lie farther than MARGIN from its boundary before the kept tokens are compared.
"""
import json
from pathlib import Path

import pytest
import torch

import selection_cases as C
from llava_agile import prune, select_tokens
from llava_agile.methods.holov import EPS, chunk_bounds, chunk_scores

GOLDEN = Path(__file__).parent / "golden"
MARGIN = 1e-9


def golden(name):
    return json.loads((GOLDEN / f"{name}.json").read_text())


def _gap(values: torch.Tensor, k: int) -> float:
    """Distance between the k-th and (k+1)-th largest of `values` (inf when nothing is cut)."""
    if k <= 0 or k >= values.numel():
        return float("inf")
    top = torch.sort(values, descending=True).values
    return float(top[k - 1] - top[k])


def holov_margin(x, a, k, chunks) -> float:
    bounds = chunk_bounds(x.shape[0], chunks)
    s = chunk_scores(x, a, bounds)
    w = s / (s.sum() + EPS)
    frac = (w * k) - (w * k).floor()
    budget = (w * k).floor().long()
    margin = min(float(frac.min()), float((1 - frac).min()), _gap(w, k - int(budget.sum())))
    budget[torch.sort(w, descending=True).indices[:k - int(budget.sum())]] += 1
    for (s0, e0), b in zip(bounds, budget.tolist()):
        margin = min(margin, _gap(a[s0:e0], b))
    return margin


@pytest.mark.parametrize("case", golden("holov")["cases"],
                         ids=lambda c: f"{c['n']}-{c['keep']}-{c['attention']}")
def test_holov_equals_the_official_code(case):
    x, a = C.holov_inputs(case["seed"], case["n"], case["d"], case["attention"])
    assert holov_margin(x, a, case["keep"], case["chunks"]) > MARGIN
    res = prune(x, a, case["keep"], "holov", chunks=case["chunks"])
    st = res.stats[0]
    assert st["attention_indices"] + [-1] * st["zero_rows"] == case["rows"]
    rows = torch.tensor(case["rows"])
    want = torch.where((rows >= 0)[:, None], x[rows.clamp_min(0)], torch.zeros(()))
    assert torch.equal(res.features, want)


def test_holov_backfill_keeps_real_tokens_in_place_of_the_zero_rows():
    case = next(c for c in golden("holov")["cases"] if c["rows"].count(-1) > 50)
    x, a = C.holov_inputs(case["seed"], case["n"], case["d"], case["attention"])
    res = prune(x, a, case["keep"], "holov", overflow="backfill")
    st = res.stats[0]
    official = [i for i in case["rows"] if i >= 0]
    assert st["zero_rows"] == 0 and len(set(st["attention_indices"])) == case["keep"]
    assert st["attention_indices"][:len(official)] == official  # the official rows first
    rest = torch.tensor(st["attention_indices"][len(official):])  # then the best-attended others
    others = torch.tensor(sorted(set(range(case["n"])) - set(official)))
    best = others[torch.sort(a[others], descending=True, stable=True).indices]
    assert torch.equal(rest, best[:rest.numel()])
    assert torch.equal(res.features, x[st["attention_indices"]])


def cdpruner_margin(x, image, text, k, scope="batch") -> float:
    """Smallest gap, over every image and greedy step, between the best and the second-best
    residual gain, relative to the largest gain (the official kernel is float32)."""
    from llava_agile.methods.cdpruner import _unit, relevance

    r = relevance(image, [text] * x.shape[0], scope)
    margin = float("inf")
    for b in range(x.shape[0]):
        xn = _unit(x[b])
        kernel = r[b][:, None] * (xn @ xn.T) * r[b][None, :]
        di2s = torch.diagonal(kernel).clone()
        scale = float(di2s.max())
        cis = torch.zeros(k, x.shape[1], dtype=x.dtype)
        for i in range(k):
            top = torch.topk(di2s, 2).values
            margin = min(margin, float(top[0] - top[1]) / scale)
            j = int(torch.argmax(di2s))
            eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
            cis[i] = eis
            di2s -= eis * eis
            di2s[j] = float("-inf")
    return margin


CDPRUNER_MARGIN = 1e-5  # the official similarity is float32 (~1e-7 relative)


@pytest.mark.parametrize("case", golden("cdpruner")["cases"],
                         ids=lambda c: f"B{c['b']}-{c['n']}-{c['keep']}")
def test_cdpruner_equals_the_official_code(case):
    x, image, text = C.cdpruner_inputs(case["seed"], case["b"], case["n"], case["d"], case["e"],
                                       case["m"])
    assert cdpruner_margin(x, image, text, case["keep"]) > CDPRUNER_MARGIN
    idx = select_tokens(x, torch.ones(x.shape[:2], dtype=x.dtype), case["keep"], "cdpruner",
                        image_embeds=image, text_embeds=text)
    assert idx.tolist() == case["indices"]


def test_cdpruner_batch_normalisation_couples_images_and_per_image_does_not():
    case = next(c for c in golden("cdpruner")["cases"] if c["b"] == 2 and c["keep"] == 96)
    x, image, text = C.cdpruner_inputs(case["seed"], 2, case["n"], case["d"], case["e"], case["m"])
    a = torch.ones(x.shape[:2], dtype=x.dtype)
    alone = [select_tokens(x[b], a[b], case["keep"], "cdpruner", image_embeds=image[b],
                           text_embeds=text) for b in range(2)]
    assert cdpruner_margin(x[:1], image[:1], text, case["keep"]) > CDPRUNER_MARGIN
    assert alone[0].tolist() != case["indices"][0]  # the official batch: image 0 differs alone
    per_image = select_tokens(x, a, case["keep"], "cdpruner", image_embeds=image,
                              text_embeds=[text, text], scope="image")
    assert cdpruner_margin(x, image, text, case["keep"], "image") > CDPRUNER_MARGIN
    assert [p.tolist() for p in per_image] == [t.tolist() for t in alone]


def trim_margin(x, text, n, iqr) -> float:
    """Relative distance of the nearest score to the cut: the n-th / (n+1)-th largest, or (IQR)
    the fence, which the official computes in float32 (~1e-7 relative)."""
    from llava_agile.methods.trim import scores

    s = torch.stack([scores(x[b], text[0]) for b in range(x.shape[0])])
    if iqr:
        v = s.flatten()
        q1, q3 = torch.quantile(v, 0.25), torch.quantile(v, 0.75)
        fence = q3 + 1.5 * (q3 - q1)
        return float((v - fence).abs().min() / fence)
    return min(_gap(s[b], n) / float(s[b].max()) for b in range(x.shape[0]))


@pytest.mark.parametrize("case", golden("trim")["cases"], ids=lambda c: f"B{c['b']}-{c['func']}")
def test_trim_equals_the_official_code(case):
    x, text = C.trim_inputs(case["seed"], case["b"], case["n"], case["d"])
    iqr = case["func"] == "TRIM:-1"
    assert trim_margin(x, text, case["kept"], iqr) > 1e-5
    params = dict(count="iqr") if iqr else {}
    keep = 64 if iqr else case["kept"] + 1  # fixed: K - 1 tokens and the mean token
    res = prune(x, torch.ones(x.shape[:2], dtype=x.dtype), keep, "trim", image_embeds=x,
                text_embeds=text, **params)
    for b in range(case["b"]):
        st = res.stats[b]
        assert st["attention_indices"] == case["indices"][b]
        assert res.features[b].shape[0] == case["kept"] + 1
        torch.testing.assert_close(res.features[b][:-1], x[b, case["indices"][b]], rtol=0, atol=0)
        torch.testing.assert_close(res.features[b][-1], torch.tensor(case["mean"][b],
                                   dtype=x.dtype), rtol=1e-12, atol=1e-12)


def test_trim_iqr_per_image_differs_from_the_coupled_batch():
    case = next(c for c in golden("trim")["cases"] if c["b"] == 3)
    x, text = C.trim_inputs(case["seed"], 3, case["n"], case["d"])
    from llava_agile.methods.common import iqr_outliers
    from llava_agile.methods.trim import scores

    a = torch.ones(x.shape[:2], dtype=x.dtype)
    res = prune(x, a, 64, "trim", image_embeds=x, text_embeds=text, count="iqr", scope="image")
    alone = [iqr_outliers(scores(x[b], text[0])) for b in range(3)]
    assert [st["outliers"] for st in res.stats] == alone
    assert alone != [case["kept"]] * 3  # the official batch keeps the same count everywhere
    assert [f.shape[0] for f in res.features] == [n + 1 for n in alone]


def prumerge_margin(a, keys, idx) -> float:
    """Relative distances to the cuts: the IQR fence (float32 in the official), the outliers'
    last place, and every kept token's 32nd / 33rd nearest key."""
    from llava_agile.methods.common import iqr_outliers

    q1, q3 = torch.quantile(a, 0.25), torch.quantile(a, 0.75)
    fence = q3 + 1.5 * (q3 - q1)
    margin = float((a - fence).abs().min() / fence)
    margin = min(margin, _gap(a, iqr_outliers(a)) / float(a.max()))
    kn = keys / keys.norm(dim=1, keepdim=True)
    for i in idx:
        sim = kn[i] @ kn.T
        sim[i] = float("-inf")
        margin = min(margin, _gap(sim, 32))
    return margin


@pytest.mark.parametrize("case", golden("prumerge")["cases"], ids=lambda c: f"rows{c['rows']}")
def test_prumerge_plus_equals_the_official_code(case):
    hidden, q, k = C.prumerge_inputs(case["seed"], case["d"], case["lean"], case["strength"],
                                     case["scale"])
    x, a, keys = hidden[0, 1:], C.cls_row(q, k), k[0, 1:]
    res = prune(x, a, 64, "prumerge_plus", keys=keys, count="iqr")
    assert prumerge_margin(a, keys, res.stats[0]["attention_indices"]) > 1e-6
    assert res.features.shape == (case["rows"], case["d"])
    torch.testing.assert_close(C.fingerprint(res.features),
                               torch.tensor(case["fingerprint"], dtype=x.dtype),
                               rtol=1e-10, atol=1e-10)
