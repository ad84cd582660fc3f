"""FastV, PDrop, DART and SparseVLM on transformers' LLaVA-1.5 / LLaVA-NeXT == the original
codebase.

The same in-LLM runs of orig_reference.py (INLLM: the tiny LLaMA has 2 layers, so pruning
happens before layer 1) through `llava_agile.enable(model, processor=..., method=...)` on the
converted checkpoint, with the stock processor (every image token reaches the LLM) and
`generate`. float64: the kept tokens of each image, what every layer saw and the greedy tokens
agree (each selection's cut-off margin asserted); float32: the counts.
"""
import pytest
import torch

import llava_agile

# tests/hf is on sys.path
from conftest import same_greedy  # noqa: E402
from orig_reference import INLLM  # noqa: E402
from test_hf_next import inputs as next_inputs  # noqa: E402

CUT_GAP = 1e-9   # float32-softmax attention scores (ulp ~1e-10), float64 cosine similarities


def run(model, ids, pixel_values, new_tokens, **extra):
    with torch.inference_mode():
        out = model.generate(input_ids=ids, pixel_values=pixel_values, do_sample=False,
                             attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             **extra)
    return out[0, ids.shape[1]:]


def case(hf, reference, family, i, dtype, processor_arg=True):
    model, processor, _ = hf(family, dtype)
    ref = reference[family]
    token = model.config.image_token_id
    if family == "llava":
        ids0 = ref["input_ids"][0]
        pos = int((ids0 == -200).nonzero())
        ids = torch.cat([ids0[:pos], torch.full((576,), token), ids0[pos + 1:]])[None]
        return model, processor, ids, ref["images"][i]["pixel_values"], {}
    ids, pix, sizes, _ = next_inputs(ref, i, processor, token)
    return model, processor, ids, pix, {"image_sizes": sizes}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method,keep,params", INLLM)
def test_matches_the_original(hf, reference, family, method, keep, params, dtype):
    ref = reference[family]
    for i in range(len(ref["images"])):
        model, processor, ids, pix, extra = case(hf, reference, family, i, dtype)
        llava_agile.enable(model, processor=processor, method=method, keep=keep, **params)
        try:
            tokens = run(model, ids, pix, ref["new_tokens"], **extra)
            (st,) = model.agile_stats
            margins = model._agile_state.engine.last.margins
        finally:
            llava_agile.disable(model, processor)
        want = ref["runs"][dtype][(i, method, None)]
        (st0,) = want["stats"]
        assert st["tokens"] == st0["tokens"] and st["kept"] == st0["kept"]
        assert st["layer_tokens"] == st0["layer_tokens"] and st["stages"] == st0["stages"]
        if dtype == "float64":
            assert min(margins) > CUT_GAP
            assert st["indices"] == st0["indices"]
            assert same_greedy(tokens, want["tokens"], want["margins"]) > 0


def test_enable_without_processor_and_undo(hf, reference):
    """The processor is not needed (nor patched) for in-LLM methods; disable restores the
    layers and forward; unpruned output is unchanged afterwards."""
    model, processor, ids, pix, _ = case(hf, reference, "llava", 0, "float64")
    before = run(model, ids, pix, 2)
    llava_agile.enable(model, method="fastv", keep=24, layer=1)
    assert llava_agile.hf.is_enabled(model)
    llava_agile.disable(model)
    assert "forward" not in model.__dict__
    assert all("forward" not in layer.__dict__ for layer in model.model.language_model.layers)
    assert torch.equal(run(model, ids, pix, 2), before)
    with pytest.raises(ValueError, match="outside the model's 2 decoder layers"):
        llava_agile.enable(model, method="fastv", keep=24)
    with pytest.raises(ValueError, match="computing a loss is not supported"):
        llava_agile.enable(model, method="fastv", keep=24, layer=1)
        try:
            model(input_ids=ids, pixel_values=pix, labels=ids)
        finally:
            llava_agile.disable(model)


@pytest.mark.parametrize("method,keep,params", INLLM)
def test_left_padded_batch_equals_single_samples(hf, reference, method, keep, params):
    """Two image prompts of different lengths and a text-only one, left-padded: each row's
    kept tokens and greedy tokens = that sample alone (where its logits margins decide)."""
    model, processor, ids, _, _ = case(hf, reference, "llava", 0, "float64")
    ref = reference["llava"]
    pix = torch.cat([ref["images"][0]["pixel_values"], ref["images"][1]["pixel_values"]])
    token = model.config.image_token_id
    longer = torch.cat([ids[:, :1], ids[:, 1:9], ids[:, 1:]], 1)   # 8 more text tokens
    text_only = ids[:, (ids[0] != token)]
    rows = [ids[0], longer[0], text_only[0]]
    L = max(len(r) for r in rows)
    pad = getattr(model.config, "pad_token_id", None) or 0
    batch = torch.stack([torch.cat([torch.full((L - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.arange(L) >= L - len(r) for r in rows]).long()
    llava_agile.enable(model, processor=processor, method=method, keep=keep, **params)
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=batch, pixel_values=pix, attention_mask=mask,
                                 do_sample=False, max_new_tokens=4)[:, L:]
            stats = model.agile_stats
            # sparsevlm: its DPC-kNN density noise (global RNG, drawn in sample order) cannot
            # change a clustering here, so the batch and the samples alone merge alike
            assert all(m.get("centre", 1) > 0 and m.get("assign", 1) > CUT_GAP
                       for m in model._agile_state.engine.last.merge_margins)
            for b, r in enumerate(rows):
                image = {"pixel_values": pix[b:b + 1]} if b < 2 else {}
                single = model.generate(input_ids=r[None], attention_mask=torch.ones_like(r[None]),
                                        do_sample=False, max_new_tokens=4, output_scores=True,
                                        return_dict_in_generate=True, **image)
                top2 = torch.stack([s[0].topk(2).values for s in single.scores])
                margins = (top2[:, 0] - top2[:, 1]).tolist()
                assert same_greedy(out[b], single.sequences[0, len(r):], margins) > 0
                if b < 2:
                    assert model.agile_stats[0]["indices"] == stats[b]["indices"]
    finally:
        llava_agile.disable(model, processor)
    assert len(stats) == 2
