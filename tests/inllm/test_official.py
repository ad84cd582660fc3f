"""FastV, PDrop and DART equal their authors' code on a tiny random LLaMA (transformers 4.37).

The golden file was written by `record_official.py` from the official checkouts (commits inside
it); here `llava_agile.inllm.Engine` runs on a stock `LlamaModel` with the same weights and inputs
in float64. Kept positions must be equal wherever the choice is decided by more than round-off
(every cut-off margin is asserted); hidden states agree up to LLaMA's float32 RMSNorm rounding.
"""
import json
from pathlib import Path

import pytest
import torch

import tiny_llm as T
from llava_agile.inllm.engine import Engine

GOLDEN = json.loads((Path(__file__).parent / "golden" / "official.json").read_text())
# FastV's and PDrop's scores are float32 softmax probabilities (~1e-3; float32 ulp ~1e-10),
# DART's float64 similarities of float32-rounded (RMSNorm) states: 1e-7 is far above what a CPU's
# round-off can move either.
MARGIN = {"fastv": 1e-9, "pdrop": 1e-9, "dart": 1e-7}
HIDDEN_TOL = 1e-6   # float32 RMSNorm inside the float64 model (FastV's official run also calls
                    # layer K-1 twice, duplicating its cache)


def _case(name, c):
    if name == "fastv":
        return c["keep"], dict(layer=c["layer"])
    if name == "dart":
        pi, pt = c.get("pivot_image", 4), c.get("pivot_text", 4)
        return pi + (pi + pt) * (c["max_num_trunction"] // (pi + pt)), \
            dict(layer=c["layer"], pivot_image=pi, pivot_text=pt)
    return 64, dict(layers=tuple(c["layers"]), ratios=tuple(c["ratios"]))


def run_ours(method, keep, params, attn="sdpa"):
    model = LlamaModel_(attn)
    eng = Engine(model.layers, method, keep, params, norm=model.norm)
    x, embed = T.inputs()
    eng.begin([[range(T.PREFIX, T.PREFIX + T.IMAGE)]], torch.ones(1, T.LENGTH, dtype=torch.bool))
    with torch.no_grad():
        last, tokens, hidden = T.prefill_and_greedy(model, x, embed)
    return eng, last, tokens, hidden


def LlamaModel_(attn="sdpa"):
    from transformers import LlamaModel
    cfg = T.config()
    cfg._attn_implementation = attn
    model = LlamaModel(cfg).double().eval()
    model.load_state_dict(T.weights())
    return model


CASES = [(name, i) for name in ("fastv", "dart", "pdrop") for i in range(len(GOLDEN[name]["cases"]))]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name,i", CASES)
def test_equals_official_code(name, i, attn):
    """The official runs used SDPA (their scripts' setting); the engine gives the same with the
    LLM on eager attention (4-D masks in prefill and decoding)."""
    gold = GOLDEN[name]["cases"][i]
    keep, params = _case(name, gold["case"])
    # transformers 4.37's eager masks: torch.full(finfo(float64).min) in the default dtype
    torch.set_default_dtype(torch.float64)
    try:
        eng, last, tokens, hidden = run_ours(name, keep, params, attn)
    finally:
        torch.set_default_dtype(torch.float32)
    assert min(eng.last.margins) > MARGIN[name], "a choice too close to call on this input"
    want = {int(k): [p - T.PREFIX for p in v if T.PREFIX <= p < T.PREFIX + T.IMAGE]
            for k, v in gold["kept"].items()}
    got = dict(zip(eng.prune_layers, eng.last.kept[0][0]))
    assert got == want
    # the text around the image is never dropped: the official layers saw exactly these rows
    for layer, kept in gold["kept"].items():
        assert len(kept) == T.PREFIX + len(want[int(layer)]) + T.TEXT
    torch.testing.assert_close(last, torch.tensor(gold["last_hidden"], dtype=torch.float64),
                               rtol=0, atol=HIDDEN_TOL)
    for h, g in zip(hidden, gold["decode_hidden"]):
        torch.testing.assert_close(h, torch.tensor(g, dtype=torch.float64), rtol=0, atol=HIDDEN_TOL)
    _, embed = T.inputs()
    for h in [last] + hidden[:-1]:
        top2 = (h @ embed.T).topk(2).values
        assert top2[0] - top2[1] > 1e-3
    assert tokens == gold["tokens"]


def test_golden_names_the_commits():
    assert GOLDEN["fastv"]["commit"] == "d1659729b5bf1be225e99ee15783deeea80f63b1"
    assert GOLDEN["pdrop"]["commit"] == "6444f304aee4b7edcb022839fb9e8cd07859704a"
    assert GOLDEN["dart"]["commit"] == "983e443ebb41fac8db19829499fe388c87885b58"
    # FastV's lmms-eval file as published (K=3, ratio 0.5) is one of the cases
    assert GOLDEN["fastv"]["cases"][0]["case"] == dict(layer=3, keep=288, source_as_is=True)


def test_masks_two_and_four_dimensional():
    """FlashAttention-2 layers take 2-D padding masks, SDPA / eager 4-D ones: a stage's masks
    in both forms select the same kept columns; fillers are attended by nobody."""
    from llava_agile.inllm.engine import _decode_mask, _prefill_mask, _Stage

    valid = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    alive = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    st = _Stage(alive, valid)
    assert st.gather.tolist() == [[0, 0, 1, 3, 5], [0, 2, 3, 4, 5]]
    assert st.filler.tolist() == [[True, False, False, False, False], [False] * 5]
    flat = _prefill_mask(valid.long(), st, torch.float64, flat=True)
    assert flat.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    m4 = torch.full((6, 6), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)
    m4 = m4[None, None].repeat(2, 1, 1, 1)
    m4[0, :, :, 0] = torch.finfo(torch.float64).min          # sample 0's padding
    four = _prefill_mask(m4, st, torch.float64)
    open_ = four == 0
    assert not open_[0, 0, 1:, 0].any() and open_[0, 0, 0, 0]  # a filler: itself only
    assert open_[1, 0].tolist() == torch.ones(5, 5).tril().bool().tolist()
    dec = _decode_mask(torch.ones(2, 8, dtype=torch.long), st, 8, torch.float64, flat=True)
    assert dec.tolist() == [[0, 1, 1, 1, 1, 1, 1], [1] * 7]
    assert _decode_mask(None, st, 8, torch.float64)[0, 0, 0].tolist()[:2] == \
        [torch.finfo(torch.float64).min, 0]
