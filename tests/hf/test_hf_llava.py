"""HF LlavaForConditionalGeneration + llava_agile.enable == the original codebase + enable.

The tiny random LLaVA-1.5 of llava_agile.assets is converted (llava_agile.hf.convert) to the
llava-hf layout with the same weights; the original codebase's runs come from
orig_reference.py under .venv. Same pixels, same prompt. In float64 the kept indices, the LLM's
prefill embeddings and the greedy tokens (where the reference's logits margin is above the two
LLMs' round-off) agree for every method: no choice is decided by round-off there. In float32
(the real dtype) a near-tie may go either way with the CPU's kernels, so a float32 run is checked
for what it guarantees: counts, shapes, the stats that no choice decides, and every embedding row
whose choice agrees.
"""
import warnings

import pytest
import torch

import llava_agile
from llava_agile.methods import MERGING
from llava_agile.assets.tiny import tiny_image

# tests/hf is on sys.path
from conftest import DTYPES, TOL, check_stats, same_greedy, text_tower  # noqa: E402
from orig_reference import IMAGES_15  # noqa: E402

FAMILY = "llava"


def image_token(model):
    return model.config.image_token_id


def hf_ids(ref, count, token):
    """The original prompt ids with its image (-200) replaced by `count` placeholders."""
    ids = ref["input_ids"][0]
    pos = int((ids == -200).nonzero())
    return torch.cat([ids[:pos], torch.full((count,), token), ids[pos + 1:]])[None]


def run(model, ids, pixel_values, new_tokens, mask=None, **extra):
    """Stock generate (greedy); returns (prefill inputs_embeds, generated ids)."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("inputs_embeds")), with_kwargs=True)
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, pixel_values=pixel_values, do_sample=False,
                                 attention_mask=torch.ones_like(ids) if mask is None else mask,
                                 max_new_tokens=new_tokens, **extra)
    finally:
        handle.remove()
    return seen[0], out[:, ids.shape[1]:]


def processor_count(processor, image, prompt, token):
    ids = processor(images=image, text=prompt, return_tensors="pt")["input_ids"]
    return int((ids == token).sum()), ids


@pytest.mark.parametrize("dtype", DTYPES)
def test_converted_checkpoint_loads_every_weight(hf, reference, dtype):
    model, processor, info = hf(FAMILY, dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.dtype == DTYPES[dtype]
    ref = reference[FAMILY]
    token = image_token(model)
    n, ids = processor_count(processor, tiny_image(**IMAGES_15[0]), ref["prompt"], token)
    assert n == 576
    # one contiguous run; the text around it may tokenise differently from LLaVA's
    # tokenizer_image_token (a space token before <image>), so the equivalence tests below give
    # both models the original's ids with -200 replaced by the placeholders
    where = (ids[0] == token).nonzero().flatten()
    assert where[-1] - where[0] == 575
    pix = processor(images=tiny_image(**IMAGES_15[0]), text=ref["prompt"],
                    return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pix, ref["images"][0]["pixel_values"], atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpatched_hf_reproduces_the_original(hf, reference, dtype):
    model, _, _ = hf(FAMILY, dtype)
    ref = reference[FAMILY]
    for i, img in enumerate(ref["images"]):
        want = ref["runs"][dtype][(i, "unpatched", None)]
        emb, tokens = run(model, hf_ids(ref, 576, image_token(model)), img["pixel_values"],
                          ref["new_tokens"])
        torch.testing.assert_close(emb[0], want["embeds"], **TOL[dtype])
        assert same_greedy(tokens[0], want["tokens"], want["margins"]) > 0


def image_rows(st, st0, method):
    """(rows of ours, rows of the reference) in the image block whose choice agrees: a kept
    token both chose (index methods); the dominant / attention-kept tokens when those agree
    (merging methods: their merged rows depend on every assignment, compared in float64)."""
    if method in MERGING:
        if st["attention_indices"] != st0["attention_indices"]:
            return [], []
        n = len(st0["attention_indices"]) + (method == "visionzip")  # + its [CLS] row
        return list(range(n)), list(range(n))
    ours, theirs = st["indices"], st0["indices"]
    common = sorted(set(ours) & set(theirs))
    return [ours.index(j) for j in common], [theirs.index(j) for j in common]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", llava_agile.methods.METHODS)  # before the LLM
def test_every_method_matches_the_original(hf, reference, method, dtype):
    model, processor, _ = hf(FAMILY, dtype)
    ref = reference[FAMILY]
    token = image_token(model)
    full = 576
    k = full if method == "none" else ref["keep"]
    text = ref["input_ids"].shape[1] - 1
    start = int((ref["input_ids"][0] == -200).nonzero())
    llava_agile.enable(model, processor=processor, method=method, keep=ref["keep"],
                       **text_tower(ref, method))
    try:
        count, ids = processor_count(processor, tiny_image(**IMAGES_15[0]), ref["prompt"], token)
        assert count == k  # the processor emits K placeholders per image
        for i, img in enumerate(ref["images"]):
            want = ref["runs"][dtype][(i, method, None)]
            ids = hf_ids(ref, k, token)
            emb, tokens = run(model, ids, img["pixel_values"], ref["new_tokens"])
            (st,) = model.agile_stats
            (st0,) = want["stats"]
            assert emb.shape[1] == text + k  # prefill = text + K
            assert st["kept"] == st0["kept"] == k
            key = "attention_indices" if method in MERGING else "indices"
            assert len(st[key]) == len(st0[key])
            if dtype == "float64":  # no choice decided by round-off: all of it agrees
                assert st[key] == st0[key] and st.get("target_indices") == st0.get("target_indices")
                check_stats(st, st0, dtype, choices_agree=True)
                torch.testing.assert_close(emb[0], want["embeds"], **TOL[dtype])
                assert same_greedy(tokens[0], want["tokens"], want["margins"]) > 0
                continue
            agree = st[key] == st0[key] and st.get("target_indices") == st0.get("target_indices")
            check_stats(st, st0, dtype, choices_agree=agree)
            rows = torch.cat([torch.arange(start), torch.arange(start + k, text + k)])
            torch.testing.assert_close(emb[0, rows], want["embeds"][rows], **TOL[dtype])  # text
            ours, theirs = image_rows(st, st0, method)
            torch.testing.assert_close(emb[0, start + torch.tensor(ours, dtype=torch.long)],
                                       want["embeds"][start + torch.tensor(theirs,
                                                                           dtype=torch.long)],
                                       **TOL[dtype])
            if agree and method not in MERGING:
                same_greedy(tokens[0], want["tokens"], want["margins"])
    finally:
        llava_agile.disable(model, processor)


def test_keep_all_is_the_unpatched_model_and_disable_restores(hf_llava, reference):
    model, processor, _ = hf_llava
    ref = reference[FAMILY]
    img = tiny_image(**IMAGES_15[1])
    before_inputs = processor(images=img, text=ref["prompt"], return_tensors="pt")
    before = run(model, before_inputs["input_ids"], before_inputs["pixel_values"], 4)
    proc_dict = dict(processor.__dict__)
    inner_dict = set(model.model.__dict__)
    attn = model.model.vision_tower
    hooks = sum(len(m._forward_hooks) for m in attn.modules())
    for method, keep in (("attention", 576), ("adaptive", 1000), ("none", 8)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            llava_agile.enable(model, processor=processor, method=method, keep=keep)
            inputs = processor(images=img, text=ref["prompt"], return_tensors="pt")
            got = run(model, inputs["input_ids"], inputs["pixel_values"], 4)
        assert (keep > 576) == any("larger than the image's 576" in str(w.message)
                                   for w in caught)
        assert torch.equal(inputs["input_ids"], before_inputs["input_ids"])
        torch.testing.assert_close(got[0], before[0], rtol=0, atol=0)
        assert torch.equal(got[1], before[1])
    llava_agile.enable(model, processor=processor, method="fps", keep=7)  # re-enable replaces
    assert processor.num_additional_image_tokens == 1 + 7 - 576
    llava_agile.disable(model, processor)
    llava_agile.disable(model, processor)  # no-op
    assert dict(processor.__dict__) == proc_dict and set(model.model.__dict__) == inner_dict
    assert sum(len(m._forward_hooks) for m in attn.modules()) == hooks
    for name in ("_agile_state", "agile_stats", "agile_config"):
        assert name not in model.__dict__
    after_inputs = processor(images=img, text=ref["prompt"], return_tensors="pt")
    after = run(model, after_inputs["input_ids"], after_inputs["pixel_values"], 4)
    assert torch.equal(after_inputs["input_ids"], before_inputs["input_ids"])
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_full_select_strategy_feeds_the_cls_token_in_front(hf_llava, reference):
    """vision_feature_select_strategy="full": [CLS] + the K kept patches (K + 1 placeholders)."""
    model, processor, _ = hf_llava
    ref = reference[FAMILY]
    img = tiny_image(**IMAGES_15[1])
    model.config.vision_feature_select_strategy = "full"
    processor.vision_feature_select_strategy = "full"
    try:
        x = processor(images=img, text=ref["prompt"], return_tensors="pt")
        assert int((x["input_ids"] == image_token(model)).sum()) == 577
        full, _ = run(model, x["input_ids"], x["pixel_values"], 1)
        start = int((x["input_ids"][0] == image_token(model)).nonzero()[0])
        llava_agile.enable(model, processor=processor, method="adaptive", keep=20)
        x = processor(images=img, text=ref["prompt"], return_tensors="pt")
        assert int((x["input_ids"] == image_token(model)).sum()) == 21
        emb, _ = run(model, x["input_ids"], x["pixel_values"], 1)
        idx = torch.tensor(model.agile_stats[0]["indices"])
        torch.testing.assert_close(emb[0, start:start + 21],
                                   full[0, torch.cat([torch.tensor([start]), start + 1 + idx])])
    finally:
        llava_agile.disable(model, processor)
        model.config.vision_feature_select_strategy = "default"
        processor.vision_feature_select_strategy = "default"


def test_batch_with_padding_prunes_each_image_on_its_own(hf_llava, reference):
    model, processor, _ = hf_llava
    ref = reference[FAMILY]
    imgs = [tiny_image(**spec) for spec in IMAGES_15]
    prompts = [ref["prompt"], ref["prompt"].replace("What is in this image?",
                                                    "Describe the picture please, what color?")]
    processor.tokenizer.padding_side = "left"
    llava_agile.enable(model, processor=processor, method="adaptive", keep=16)
    try:
        singles = []
        for img, prompt in zip(imgs, prompts):
            x = processor(images=img, text=prompt, return_tensors="pt")
            singles.append((run(model, x["input_ids"], x["pixel_values"], 3)[1][0].tolist(),
                            model.agile_stats[0]["indices"]))
        x = processor(images=imgs, text=prompts, return_tensors="pt", padding=True)
        assert (x["attention_mask"] == 0).any()  # the rows really are padded
        _, out = run(model, x["input_ids"], x["pixel_values"], 3, mask=x["attention_mask"])
        assert [s["indices"] for s in model.agile_stats] == [s[1] for s in singles]
        assert [o.tolist() for o in out] == [s[0] for s in singles]
    finally:
        llava_agile.disable(model, processor)


def test_adaptive_count_generate_matches_the_original(hf_llava, reference):
    """Variable K: llava_agile.generate on a batch of two images whose K differ."""
    model, processor, _ = hf_llava
    ref = reference[FAMILY]
    want = [ref["runs"]["float64"][(i, "adaptive_count", None)] for i in range(2)]
    ks = [w["stats"][0]["kept"] for w in want]
    assert ks[0] != ks[1]
    llava_agile.enable(model, processor=processor, method="adaptive", keep=ref["keep"],
                       adaptive_count=True, erank_avg=ref["adaptive_count_erank_avg"]["float64"])
    try:
        imgs = [tiny_image(**spec) for spec in IMAGES_15]
        x = processor(images=imgs, text=[ref["prompt"]] * 2, return_tensors="pt", padding=True)
        assert int((x["input_ids"] == image_token(model)).sum()) == 2 * 576  # not patched
        with pytest.raises(ValueError, match="llava_agile.generate"):
            model.generate(**x, max_new_tokens=1)
        # the original's ids (LLaVA's tokenisation) with the unpatched count, as the processor
        # would make them; llava_agile.generate drops each image's surplus and re-pads
        ids = hf_ids(ref, 576, image_token(model)).repeat(2, 1)
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.cat([img["pixel_values"] for img in ref["images"]])}
        seen = []
        handle = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.append(k.get("inputs_embeds")), with_kwargs=True)
        try:
            out, lengths = llava_agile.generate(model, **x, do_sample=False,
                                                max_new_tokens=ref["new_tokens"])
        finally:
            handle.remove()
        text = ref["input_ids"].shape[1] - 1
        assert lengths.tolist() == [text + k for k in ks]
        assert [s["kept"] for s in model.agile_stats] == ks
        assert [s["indices"] for s in model.agile_stats] == [w["stats"][0]["indices"]
                                                              for w in want]
        width = int(lengths.max())
        for i, w in enumerate(want):
            assert same_greedy(out[i, width:width + len(w["tokens"])], w["tokens"],
                               w["margins"]) > 0
            torch.testing.assert_close(seen[0][i, width - lengths[i]:], w["embeds"],
                                       **TOL["float64"])
    finally:
        llava_agile.disable(model, processor)


def test_bad_input_is_a_clear_error(hf_llava, hf_next):
    model, processor, _ = hf_llava
    with pytest.raises(ValueError, match="needs its processor"):
        llava_agile.enable(model, method="attention", keep=8)
    with pytest.raises(ValueError, match="not the LlavaProcessor"):
        llava_agile.enable(model, processor=hf_next[1], method="attention", keep=8)
    with pytest.raises(ValueError, match="needs a LLaVA model; Linear is none of the supported"):
        llava_agile.enable(torch.nn.Linear(2, 2), "attention", 8)
    saved = processor.patch_size
    processor.patch_size = 16
    try:
        with pytest.raises(ValueError, match="does not belong to this model.*patch_size 16"):
            llava_agile.enable(model, processor=processor, method="attention", keep=8)
    finally:
        processor.patch_size = saved
    layer = model.config.vision_feature_layer
    model.config.vision_feature_layer = [-2, -1]
    try:
        with pytest.raises(ValueError, match=r"vision_feature_layer=\[-2, -1\].*one integer"):
            llava_agile.enable(model, processor=processor, method="attention", keep=8)
    finally:
        model.config.vision_feature_layer = layer
    with pytest.raises(ValueError, match="unknown pruning method"):
        llava_agile.enable(model, processor=processor, method="nope", keep=8)
    with pytest.raises(ValueError, match="llava_agile.generate is for transformers"):
        llava_agile.generate(torch.nn.Linear(2, 2))
    assert "_agile_state" not in model.__dict__ and "num_additional_image_tokens" in \
        processor.__dict__ and processor.num_additional_image_tokens == 1
    from llava_agile import hf
    with pytest.warns(UserWarning, match="outside the versions .* tested"):
        hf.check_transformers("5.30.0")
    with pytest.raises(RuntimeError, match="too old"):
        hf.check_transformers("4.45.0")
    assert hf.check_transformers(__import__("transformers").__version__) in ((4, 57), (5, 24))


def test_import_does_not_load_the_hf_adapter():
    import subprocess
    import sys
    code = ("import sys, llava_agile; "
            "bad = [m for m in sys.modules if m.startswith(('transformers', 'llava_agile.hf'))]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_trim_iqr_count_goes_through_llava_agile_generate(hf_llava, reference):
    """TRIM's official IQR count is known only after the tower: model.generate refuses it,
    llava_agile.generate feeds each image its outliers + the mean token, with the question read
    from the prompt."""
    model, processor, _ = hf_llava
    ref = reference[FAMILY]
    llava_agile.enable(model, processor=processor, method="trim", keep=ref["keep"], count="iqr",
                       text_tower=ref["text_tower"])
    try:
        ids = hf_ids(ref, 576, image_token(model))
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": ref["images"][0]["pixel_values"]}
        with pytest.raises(ValueError, match="count='iqr'.*llava_agile.generate"):
            model.generate(**x, max_new_tokens=1)
        _, lengths = llava_agile.generate(model, **x, do_sample=False, max_new_tokens=1)
        (st,) = model.agile_stats
        assert lengths.tolist() == [ids.shape[1] - 576 + st["outliers"] + 1]
        assert st["question"] == "What is in this image?"
    finally:
        llava_agile.disable(model, processor)
