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
from llava_agile import prune
from llava_agile.methods.holov import EPS, chunk_scores

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
    n = x.shape[0]
    size, extra = divmod(n, chunks)
    bounds, start = [], 0
    for p in range(chunks):
        end = start + size + (p < extra)
        if end > start:
            bounds.append((start, end))
        start = end
    s = chunk_scores(x, a, bounds)
    w = s / (s.sum() + EPS)
    frac = (w * k) - (w * k).floor()
    budget = (w * k).floor().long()
    margin = min(float(frac.min()), float((1 - frac).min()), _gap(w, k - int(budget.sum())))
    budget[torch.sort(w, descending=True).indices[:k - int(budget.sum())]] += 1
    for (s0, e0), b in zip(bounds, budget.tolist()):
        margin = min(margin, _gap(a[s0:e0], b))
    return margin


@pytest.mark.parametrize("case", golden("holov")["cases"], ids=lambda c: f"{c['n']}-{c['keep']}-{c['attention']}")
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
    assert torch.equal(rest, others[torch.sort(a[others], descending=True, stable=True).indices][:rest.numel()])
    assert torch.equal(res.features, x[st["attention_indices"]])
