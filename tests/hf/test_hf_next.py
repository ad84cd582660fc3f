"""HF LlavaNextForConditionalGeneration + llava_agile == the original codebase's LLaVA-NeXT
(anyres, spatial_unpad, image_newline) in the three anyres modes.

`global` runs through the stock `model.generate` (the processor emits K + newlines); `shared`
and `per_crop` keep the original's data-dependent counts (kept cells inside the unpadded
border are dropped), so they run through `llava_agile.generate`. As in test_hf_llava.py, float64
runs must agree in every choice; float32 runs in what round-off cannot decide.
"""
import re

import pytest
import torch

import llava_agile
from llava_agile.assets.tiny import tiny_image
from llava_agile.methods import MERGING

# tests/hf is on sys.path
from conftest import DTYPES, TOL, check_stats, same_greedy, text_tower  # noqa: E402
from orig_reference import IMAGES_NEXT  # noqa: E402

FAMILY = "llava_next"
INDEX_METHODS = [m for m in llava_agile.methods.METHODS if m not in MERGING]


def hf_ids(ref, count, token):
    ids = ref["input_ids"][0]
    pos = int((ids == -200).nonzero())
    return torch.cat([ids[:pos], torch.full((count,), token), ids[pos + 1:]])[None]


def inputs(ref, i, processor, token):
    """(input_ids with the unpatched processor's count, pixel_values, image_sizes (h, w))."""
    img = ref["images"][i]
    w, h = img["size"]
    sizes = torch.tensor([[h, w]])
    count = int((processor(images=tiny_image(**IMAGES_NEXT[i]), text=ref["prompt"],
                           return_tensors="pt")["input_ids"] == token).sum())
    return hf_ids(ref, count, token), img["pixel_values"], sizes, count


def capture(model):
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("inputs_embeds")), with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpatched_hf_next_reproduces_the_original(hf, reference, dtype):
    model, processor, info = hf(FAMILY, dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = reference[FAMILY]
    token = model.config.image_token_id
    for i in range(len(ref["images"])):
        want = ref["runs"][dtype][(i, "unpatched", None)]
        ids, pix, sizes, count = inputs(ref, i, processor, token)
        assert ids.shape[1] == want["embeds"].shape[0]  # the processor counts as LLaVA merges
        seen, handle = capture(model)
        try:
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     pixel_values=pix, image_sizes=sizes, do_sample=False,
                                     max_new_tokens=ref["new_tokens"])
        finally:
            handle.remove()
        torch.testing.assert_close(seen[0][0], want["embeds"], **TOL[dtype])
        assert same_greedy(out[0, ids.shape[1]:], want["tokens"], want["margins"]) > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["global", "shared", "per_crop"])
@pytest.mark.parametrize("method", INDEX_METHODS)
def test_every_mode_and_method_matches_the_original(hf, reference, method, mode, dtype):
    model, processor, _ = hf(FAMILY, dtype)
    ref = reference[FAMILY]
    token = model.config.image_token_id
    text = ref["input_ids"].shape[1] - 1
    start = int((ref["input_ids"][0] == -200).nonzero())
    full_ids = [inputs(ref, i, processor, token) for i in range(len(ref["images"]))]
    llava_agile.enable(model, processor=processor, method=method, keep=ref["keep"],
                       anyres_mode=mode, **text_tower(ref, method))
    try:
        for i, (ids, pix, sizes, full) in enumerate(full_ids):
            want = ref["runs"][dtype][(i, method, mode)]
            (st0,) = want["stats"]
            seen, handle = capture(model)
            try:
                with torch.inference_mode():
                    if mode == "global":
                        count = int((processor(images=tiny_image(**IMAGES_NEXT[i]),
                                               text=ref["prompt"], return_tensors="pt")
                                     ["input_ids"] == token).sum())
                        assert count == st0["tokens"]  # K (or every cell) + newlines
                        ids = hf_ids(ref, count, token)
                        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             pixel_values=pix, image_sizes=sizes,
                                             do_sample=False, max_new_tokens=ref["new_tokens"])
                        length = ids.shape[1]
                    else:
                        with pytest.raises(ValueError, match="llava_agile.generate"):
                            model.generate(input_ids=ids, pixel_values=pix, image_sizes=sizes,
                                           max_new_tokens=1)
                        seen.clear()
                        out, lengths = llava_agile.generate(
                            model, input_ids=ids, attention_mask=torch.ones_like(ids),
                            pixel_values=pix, image_sizes=sizes, do_sample=False,
                            max_new_tokens=ref["new_tokens"])
                        length = int(lengths.max())
            finally:
                handle.remove()
            (st,) = model.agile_stats
            assert length == seen[0].shape[1] == text + st["tokens"]  # text + kept + newlines
            agree = st["indices"] == st0["indices"]
            assert agree or dtype == "float32"  # float64: no choice decided by round-off
            check_stats(st, st0, dtype, choices_agree=agree)
            if agree:
                torch.testing.assert_close(seen[0][0], want["embeds"], **TOL[dtype])
                assert same_greedy(out[0, length:], want["tokens"], want["margins"]) > 0
            else:  # the text around the image block
                image_end = start + st["tokens"]
                torch.testing.assert_close(seen[0][0, :start], want["embeds"][:start],
                                           **TOL[dtype])
                torch.testing.assert_close(seen[0][0, image_end:],
                                           want["embeds"][start + st0["tokens"]:], **TOL[dtype])
    finally:
        llava_agile.disable(model, processor)


def test_adaptive_count_batch_on_next(hf_next, reference):
    model, processor, _ = hf_next
    ref = reference[FAMILY]
    want = [ref["runs"]["float64"][(i, "adaptive_count", "shared")] for i in range(2)]
    token = model.config.image_token_id
    # the original's ids with the unpatched counts, left-padded as the processor would
    rows = [inputs(ref, i, processor, token)[0][0] for i in range(2)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    n = [img["pixel_values"].shape[1] for img in ref["images"]]
    pix = torch.zeros(2, max(n), *ref["images"][0]["pixel_values"].shape[2:])
    for i, img in enumerate(ref["images"]):
        pix[i, :n[i]] = img["pixel_values"][0]
    sizes = torch.tensor([[img["size"][1], img["size"][0]] for img in ref["images"]])
    x = {"input_ids": ids, "attention_mask": mask, "pixel_values": pix, "image_sizes": sizes}
    llava_agile.enable(model, processor=processor, method="adaptive", keep=ref["keep"],
                       adaptive_count=True, erank_avg=ref["adaptive_count_erank_avg"]["float64"])
    try:
        seen, handle = capture(model)
        try:
            out, lengths = llava_agile.generate(model, **x, do_sample=False,
                                                max_new_tokens=ref["new_tokens"])
        finally:
            handle.remove()
        stats = model.agile_stats
    finally:
        llava_agile.disable(model, processor)
    assert [s["indices"] for s in stats] == [w["stats"][0]["indices"] for w in want]
    text = ref["input_ids"].shape[1] - 1
    assert lengths.tolist() == [text + w["stats"][0]["tokens"] for w in want]
    width = int(lengths.max())
    for i, w in enumerate(want):
        torch.testing.assert_close(seen[0][i, width - lengths[i]:], w["embeds"],
                                   **TOL["float64"])
        assert same_greedy(out[i, width:width + len(w["tokens"])], w["tokens"],
                           w["margins"]) > 0
    assert lengths.sum() < int(x["attention_mask"].sum())  # surplus placeholders dropped


def test_merging_methods_refused_and_disable_restores(hf_next, reference):
    model, processor, _ = hf_next
    for method in sorted(MERGING):
        with pytest.raises(ValueError, match=re.escape(MERGING[method]) + ", which have no grid"):
            llava_agile.enable(model, processor=processor, method=method, keep=8,
                               **text_tower(reference["llava_next"], method))
    before = dict(processor.__dict__)
    llava_agile.enable(model, processor=processor, method="attention", keep=8,
                       anyres_mode="global")
    assert "_get_number_of_features" in processor.__dict__
    llava_agile.disable(model, processor)
    assert dict(processor.__dict__) == before
    assert "pack_image_features" not in model.model.__dict__
    assert "get_image_features" not in model.model.__dict__
