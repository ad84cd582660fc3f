"""Qwen2.5-VL (transformers 5.x): pruning after the patch merger, original M-RoPE positions.

A tiny random `Qwen2_5_VLForConditionalGeneration` from a config (2 full-attention and 2
windowed vision blocks, windows of 2x2 merged tokens so the window reordering is not the
identity) and a tiny word-level tokenizer: no download. Images of 112x112 (16 merged tokens)
and 112x168 (24).
"""
import contextlib
import os
import re
import sys
import warnings
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import transformers

import llava_agile
import llava_agile.selection
from llava_agile.hf import qwen
from llava_agile.methods import MERGING, METHODS, TEXT

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import decided  # noqa: E402  (tests/: the decision-margin checks)

V5 = int(re.match(r"(\d+)", transformers.__version__).group(1)) >= 5
needs5 = pytest.mark.skipif(not V5, reason="Qwen2.5-VL pruning supports transformers 5.x only")

WORDS = ["describe", "the", "image", "what", "is", "in", "this", "picture", "a", "cat"]
IMAGE, VIDEO, VSTART, VEND = 120, 121, 118, 119
PROMPT = "describe <|vision_start|><|image_pad|><|vision_end|> the image"
SIZES = [(112, 112), (112, 168)]


def tiny_tokenizer(words=WORDS):
    """A word-level tokenizer with Qwen's vision tokens (shared with test_hf_qwen3 and
    test_hf_lmms_qwen, which passes more words: ids 3 .. 3 + len(words) - 1, below 118)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert len(words) + 3 <= VSTART
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(words)},
             "<|vision_start|>": VSTART, "<|vision_end|>": VEND, "<|image_pad|>": IMAGE,
             "<|video_pad|>": VIDEO}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", padding_side="left",
                                   additional_special_tokens=["<|vision_start|>", "<|vision_end|>",
                                                              "<|image_pad|>", "<|video_pad|>"])


def tiny_processor(processor="Qwen2_5_VLProcessor", patch=14):
    """`processor` (transformers' class name; shared with test_hf_qwen3) with the tiny tokenizer
    and a PIL image processor for `patch`-px patches, merge 2, 1 to 64 merge groups per image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
        Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    unit = (2 * patch) ** 2
    images = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=unit,
                                      max_pixels=unit * 64)
    orig = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):  # no video processor (videos are refused; it needs torchvision)
        return None if arg is None else orig(self, name, arg)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check):
        return getattr(transformers, processor)(image_processor=images, tokenizer=tiny_tokenizer(),
                                                video_processor=None)


def tiny_model(seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, fullatt_block_indexes=[1, 3], window_size=56,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=2, eos_token_id=2, pad_token_id=0,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                              mrope_section=[2, 3, 3])),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
        vision_end_token_id=VEND)
    torch.manual_seed(seed)
    return sharpen(Qwen2_5_VLForConditionalGeneration(cfg).eval())


def sharpen(model):
    """The vision blocks' q and k 16x larger: at init (std 0.02) every patch receives nearly the
    same attention (neighbours in the score order differ by as little as 1e-6 relative: near
    ties that round-off decides); peaked, by > 4e-3 (decided.adaptive checks the margins)."""
    with torch.no_grad():
        for block in model.model.visual.blocks:
            qk = 2 * block.attn.qkv.in_features  # the q and k rows of the fused projection
            block.attn.qkv.weight[:qk] *= 16
            block.attn.qkv.bias[:qk] *= 16
    return model


def images(sizes=SIZES):
    from PIL import Image
    return [Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype("uint8"))
            for i, (h, w) in enumerate(sizes)]


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_model(), tiny_processor()
    yield model, processor
    llava_agile.disable(model)


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "tiny" in request.fixturenames:
        llava_agile.disable(request.getfixturevalue("tiny")[0])


def inputs(processor, sizes=SIZES):
    return processor(images=images(sizes), text=[PROMPT] * len(sizes), return_tensors="pt",
                     padding=True)


def run(model, batch, new_tokens=3):
    """Greedy stock generate; (what the LLM received per forward: embeds, position ids; new ids)."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["inputs_embeds"], k["position_ids"])), with_kwargs=True)
    try:
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    finally:
        handle.remove()
    return seen, out[:, batch["input_ids"].shape[1]:]


def greedy(model, batch, new_tokens):
    """Stock greedy generate: (new ids [B, new_tokens], logits of each step [new_tokens, B, V])."""
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.scores)


def mrope(pos):
    """[3 or 4, B, L] position ids -> the 3 M-RoPE rows (5.x prepends a text row)."""
    return pos[-3:]


# Two runs that batch differently, or a plain forward vs generate, use other kernels (GEMM
# shapes, padding masks) and so other float32 round-off. transformers' Qwen2.5-VL has no true
# float64 (its RMSNorm and vision rotary compute in float32), so their choices are compared only
# where round-off cannot decide them (tests/decided.py; measured with the native, avx2 and
# default ATen kernels: <= 1.2e-7 on the logits, 0 on the selection inputs).


@contextlib.contextmanager
def recording():
    """Records each selection's (features [N, D], scores [N], keep, parameters), per image."""
    seen, prune = [], llava_agile.selection.prune

    def spy(space, attn, keep, method, **params):
        assert space.shape[0] == 1  # qwen selects per image
        seen.append((space[0].double(), attn[0].double(), keep,
                     {k: v for k, v in params.items() if k != "stats"}))
        return prune(space, attn, keep, method, **params)

    with mock.patch.object(llava_agile.selection, "prune", spy):
        yield seen


def decided_adaptive(ref, other):
    """Two runs' `adaptive` selection of one image (`recording` entries): decided.adaptive."""
    (x, a, keep, params), (y, b, keep2, params2) = ref, other
    assert keep == keep2 and params == params2
    return decided.adaptive((x, a), (y, b), keep, **params)


def test_refuses_transformers_4():
    with pytest.raises(RuntimeError, match=r"transformers 5\.x.*pip install transformers==5\.24"):
        qwen.check_transformers("4.57.6")
    if not V5:  # enable itself refuses before touching the model
        with pytest.raises(RuntimeError, match="needs transformers 5.x"):
            fake = SimpleNamespace(config=SimpleNamespace(model_type="qwen2_5_vl"),
                                   generate=None)
            llava_agile.enable(fake, processor=object(), method="attention", keep=4)


@needs5
def test_keep_all_gives_the_unpatched_tokens(tiny):
    """Exact by construction: K = N runs the same kernels on the same batch as the unpatched
    model and hands every merged token on, so embeddings, positions and tokens are bit-equal."""
    model, processor = tiny
    sizes = [(112, 112), (112, 112)]  # 16 tokens each: K = N for both
    full_seen, full = run(model, inputs(processor, sizes))
    llava_agile.enable(model, processor=processor, method="attention", keep=16)
    batch = inputs(processor, sizes)
    assert int((batch["input_ids"] == IMAGE).sum()) == 32
    seen, tokens = run(model, batch)
    assert tokens.tolist() == full.tolist()
    for (e0, p0), (e1, p1) in zip(full_seen, seen):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(e1, e0, rtol=0, atol=0)
    llava_agile.disable(model)
    full_seen, full = run(model, inputs(processor))  # two sizes, method "none": every token
    llava_agile.enable(model, processor=processor, method="none", keep=4)
    seen, tokens = run(model, inputs(processor))
    assert tokens.tolist() == full.tolist()
    assert torch.equal(seen[0][1], full_seen[0][1]) and torch.equal(seen[0][0], full_seen[0][0])


@needs5
@pytest.mark.parametrize("keep", [5, 9])
def test_prefill_is_text_plus_k_with_original_positions(tiny, keep):
    model, processor = tiny
    full_batch = inputs(processor)
    full_seen, _ = run(model, full_batch, new_tokens=2)
    n = [16, 24]
    with torch.no_grad():
        feats = model.model.get_image_features(full_batch["pixel_values"],
                                               full_batch["image_grid_thw"]).pooler_output
    llava_agile.enable(model, processor=processor, method="attention", keep=keep)
    batch = inputs(processor)
    mask, full_mask = batch["attention_mask"].bool(), full_batch["attention_mask"].bool()
    text = (full_batch["input_ids"] != IMAGE) & full_mask
    for b in range(2):  # the prompt is the text plus K placeholders per image
        assert int(mask[b].sum()) == int(text[b].sum()) + keep
        assert int((batch["input_ids"][b] == IMAGE).sum()) == keep
        assert torch.equal(batch["mm_token_type_ids"][b][mask[b]],
                           (batch["input_ids"][b][mask[b]] == IMAGE).int())
    seen, _ = run(model, batch, new_tokens=2)
    emb, pos = seen[0]
    full_emb, full_pos = full_seen[0]
    assert emb.shape[1] == batch["input_ids"].shape[1]
    for b in range(2):
        kept = torch.tensor(model.agile_stats[b]["indices"])
        assert kept.numel() == keep and torch.equal(kept, kept.sort().values)
        img, full_img = batch["input_ids"][b] == IMAGE, full_batch["input_ids"][b] == IMAGE
        # the LLM sees the kept merged tokens, in raster order
        torch.testing.assert_close(emb[b][img], feats[b][kept], rtol=1e-6, atol=1e-6)
        # each keeps its original (t, h, w) position
        assert torch.equal(mrope(pos)[:, b][:, img], mrope(full_pos)[:, b][:, full_img][:, kept])
        # the text (before and after the image) has exactly the full run's positions
        txt, full_txt = mask[b] & ~img, full_mask[b] & ~full_img
        assert torch.equal(mrope(pos)[:, b][:, txt], mrope(full_pos)[:, b][:, full_txt])
        assert torch.equal(emb[b][txt], full_emb[b][full_txt])
    # the first generated token's position continues as after the full image (rope_deltas)
    torch.testing.assert_close(mrope(seen[1][1]), mrope(full_seen[1][1]), rtol=0, atol=0)
    assert n == [len(f) for f in feats]


def runs(ids):
    """Start and end of each run of image placeholders in one row."""
    where = (ids == IMAGE).nonzero().flatten().tolist()
    out = []
    for i in where:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


@needs5
def test_two_images_in_one_prompt_and_plain_forward(tiny):
    model, processor = tiny
    prompt = PROMPT + " and <|vision_start|><|image_pad|><|vision_end|> what is in this picture"
    full_batch = processor(images=images(), text=[prompt], return_tensors="pt")
    full_seen, full_new = run(model, full_batch, new_tokens=2)
    llava_agile.enable(model, processor=processor, method="diversity", keep=7)
    batch = processor(images=images(), text=[prompt], return_tensors="pt")
    seen, _ = run(model, batch, new_tokens=2)
    pos, full_pos = mrope(seen[0][1])[:, 0], mrope(full_seen[0][1])[:, 0]
    got, want = runs(batch["input_ids"][0]), runs(full_batch["input_ids"][0])
    assert [e - s for s, e in got] == [7, 7] and [e - s for s, e in want] == [16, 24]
    for (s, e), (fs, fe), st in zip(got, want, model.agile_stats):
        assert torch.equal(pos[:, s:e], full_pos[:, fs:fe][:, torch.tensor(st["indices"])])
    txt, full_txt = batch["input_ids"][0] != IMAGE, full_batch["input_ids"][0] != IMAGE
    assert torch.equal(pos[:, txt], full_pos[:, full_txt])
    torch.testing.assert_close(mrope(seen[1][1]), mrope(full_seen[1][1]), rtol=0, atol=0)
    # a plain forward (no generate) computes the same positions and prefill logits
    plain = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: plain.append(k["position_ids"]), with_kwargs=True)
    try:
        with torch.inference_mode():
            logits = model(**batch).logits
    finally:
        handle.remove()
    assert torch.equal(mrope(plain[0]), mrope(seen[0][1]))
    with torch.inference_mode():
        first = model.generate(**batch, max_new_tokens=1, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)
    # generate computes the logits of the last position only, the plain forward of every
    # position: other GEMM shapes, other round-off; the argmax agrees because its top-2 gap is
    # far above the two logits' difference
    assert int(logits[0, -1].argmax()) == int(first.sequences[0, -1])
    decided.greedy(logits[0, -1:], first.scores[0])


@needs5
def test_hf_enable_dispatches_qwen(tiny):
    model, processor = tiny
    from llava_agile import hf
    hf.enable(model, processor, "attention", 4)
    assert qwen.is_enabled(model)
    hf.disable(model)
    assert not qwen.is_enabled(model) and "_agile_state" not in model.__dict__


@needs5
def test_batch_of_two_sizes_matches_single_images(tiny):
    """A batch of two image sizes (padding, one vision sequence for both) keeps each image's
    tokens and continues each prompt as the image alone does. The two runs differ in round-off
    (other GEMM shapes, a padding mask), so the tokens are compared where the margins of the
    choices are far above that (tests/decided.py)."""
    model, processor = tiny
    llava_agile.enable(model, processor=processor, method="adaptive", keep=8)
    calls = []
    handle = model.model.visual.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with recording() as chosen:
            both, scores = greedy(model, inputs(processor), new_tokens=4)
    finally:
        handle.remove()
    assert len(calls) == 1  # encoded once (for the positions), handed to the first forward
    stats = model.agile_stats
    assert [s["tokens"] for s in stats] == [8, 8] and len(chosen) == 2
    for b, size in enumerate(SIZES):
        batch = processor(images=images(SIZES)[b:b + 1], text=[PROMPT], return_tensors="pt")
        with recording() as alone:
            one, one_scores = greedy(model, batch, new_tokens=4)
        kept = decided_adaptive(chosen[b], alone[0])
        assert model.agile_stats[0]["indices"] == stats[b]["indices"] == kept
        assert one[0].tolist() == both[b].tolist()
        decided.greedy(scores[:, b], one_scores[:, 0])


@needs5
@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGING and m not in TEXT])
def test_every_index_method_runs(tiny, method):
    model, processor = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llava_agile.enable(model, processor=processor, method=method, keep=6)
        batch = inputs(processor)
        _, tokens = run(model, batch, new_tokens=2)
    assert tokens.shape == (2, 2)
    want = [16, 24] if method == "none" else [6, 6]
    assert [len(s["indices"]) for s in model.agile_stats] == want
    assert int((batch["input_ids"] == IMAGE).sum()) == sum(want)


@needs5
@pytest.mark.parametrize("method", sorted(TEXT))
def test_question_methods_are_refused(tiny, method):
    model, processor = tiny
    with pytest.raises(ValueError, match="CLIP text tower.*runs on LLaVA-1.5 / NeXT"):
        llava_agile.enable(model, processor=processor, method=method, keep=6, text_tower="/x")
    assert not qwen.is_enabled(model)


@needs5
@pytest.mark.parametrize("method", sorted(set(MERGING) - set(TEXT)))
def test_merging_methods_are_refused(tiny, method):
    model, processor = tiny
    with pytest.raises(ValueError, match=re.escape(MERGING[method]) + ".*pick an index method"):
        llava_agile.enable(model, processor=processor, method=method, keep=6)
    assert not qwen.is_enabled(model)


@needs5
def test_feature_space_vision_runs(tiny):
    model, processor = tiny
    llava_agile.enable(model, processor=processor, method="vispruner", keep=6,
                       feature_space="vision")
    _, tokens = run(model, inputs(processor), new_tokens=2)
    assert [len(s["indices"]) for s in model.agile_stats] == [6, 6]


@needs5
def test_adaptive_count_goes_through_llava_agile_generate(tiny):
    model, processor = tiny
    llava_agile.enable(model, processor=processor, method="adaptive", keep=12,
                       adaptive_count=True)
    batch = inputs(processor)
    assert int((batch["input_ids"] == IMAGE).sum()) == 40  # the processor emits N
    with pytest.raises(ValueError, match="llava_agile.generate"):
        model.generate(**batch, max_new_tokens=2)
    out, lengths = llava_agile.generate(model, **batch, max_new_tokens=3, do_sample=False)
    kept = [s["tokens"] for s in model.agile_stats]
    text = ((batch["input_ids"] != IMAGE) & batch["attention_mask"].bool()).sum(1)
    assert lengths.tolist() == (text + torch.tensor(kept)).tolist()
    assert out.shape == (2, int(lengths.max()) + 3)


@needs5
def test_received_mean_equals_eager_attention(tiny):
    """The hook (SDPA tower, q/k recomputed) == eager softmax weights of the same layer, and the
    merged scores are the 2x2 means in raster order (the window permutation recovered from the
    block inputs, independently of llava_agile)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

    model, processor = tiny
    llava_agile.enable(model, processor=processor, method="attention", keep=4)
    state = model._agile_state
    assert state.layer == 3  # fullatt_block_indexes[-1]
    visual = model.model.visual
    batch = inputs(processor)
    weights, taps = [], {}
    orig = mq.eager_attention_forward

    def eager(module, q, k, v, attention_mask, **kw):
        out, w = orig(module, q, k, v, attention_mask, **kw)
        if module is visual.blocks[state.layer].attn:
            weights.append(w.double())
        return out, w

    hooks = [visual.patch_embed.register_forward_hook(lambda m, a, o: taps.update(raster=o)),
             visual.blocks[0].register_forward_pre_hook(
                 lambda m, a: taps.update(window=a[0]))]
    impl = visual.config._attn_implementation
    visual.config._attn_implementation = "eager"
    try:
        with mock.patch.object(mq, "eager_attention_forward", eager), torch.no_grad():
            model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    finally:
        visual.config._attn_implementation = impl
        for h in hooks:
            h.remove()
    assert len(weights) == 2  # one full-attention segment per image
    want = torch.cat([w[0].mean(0).mean(0) for w in weights])  # heads, then queries
    got = state.hook.rows[0].double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # window row r holds raster patch perm[r]
    dist = torch.cdist(taps["window"].double(), taps["raster"].double())
    perm = dist.argmin(1)
    assert torch.equal(perm.sort().values, torch.arange(len(perm)))
    raster = torch.empty_like(want)
    raster[perm] = want
    merged = raster.view(-1, 4).mean(1)
    for s, part in zip(state.scores, merged.split([16, 24])):
        torch.testing.assert_close(s.double() / s.double().sum(), part / part.sum(),
                                   rtol=1e-5, atol=1e-7)


@needs5
def test_attention_layer_is_configurable(tiny):
    model, processor = tiny
    llava_agile.enable(model, processor=processor, method="attention", keep=4, attention_layer=1)
    assert model._agile_state.layer == 1
    run(model, inputs(processor), new_tokens=1)
    with pytest.raises(ValueError, match="attention_layer=9"):
        llava_agile.enable(model, processor=processor, method="attention", keep=4,
                           attention_layer=9)
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        llava_agile.enable(model, processor=processor, keep=4, attention_source="cls")


@needs5
def test_bad_input_gets_clear_messages(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="needs its processor"):
        llava_agile.enable(model, method="attention", keep=4)
    with pytest.raises(ValueError, match="keep must|keep="):
        llava_agile.enable(model, processor=processor, method="attention", keep=0)
    unpruned = inputs(processor)
    llava_agile.enable(model, processor=processor, method="attention", keep=20)
    with pytest.warns(UserWarning, match="keep=20 is larger than the image's 16 visual tokens"):
        _, tokens = run(model, inputs(processor), new_tokens=1)
    assert [s["tokens"] for s in model.agile_stats] == [16, 20]
    with pytest.raises(ValueError, match="hold 40 image placeholders, but the images need 36"):
        model.generate(**unpruned, max_new_tokens=1)  # made before enable: the full count
    batch = inputs(processor)
    with pytest.raises(ValueError, match="videos are not supported"):
        model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                   video_grid_thw=batch["image_grid_thw"])
    llava_agile.disable(model)
    broken = tiny_model()
    del broken.model.visual
    with pytest.raises(ValueError, match="no model.visual"):
        llava_agile.enable(broken, processor=processor, method="attention", keep=4)


@needs5
def test_disable_restores_model_and_processor(tiny):
    model, processor = tiny
    before = inputs(processor)["input_ids"]
    llava_agile.enable(model, processor=processor, method="attention", keep=4)
    assert inputs(processor)["input_ids"].shape[1] < before.shape[1]
    sizes = [list(s) for s in SIZES]
    assert processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == [4, 4]
    llava_agile.disable(model)
    assert torch.equal(inputs(processor)["input_ids"], before)
    assert processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == [16, 24]
    for name in qwen._PATCHED:
        assert name not in model.model.__dict__
    assert not model.model.visual.blocks[3].attn._forward_hooks


@needs5
def test_calibrate_measures_qwen_tokens(tiny, tmp_path):
    model, processor = tiny
    llava_agile.enable(model, processor=processor, method="adaptive", keep=4)
    res = qwen.calibrate(model, processor, images(), PROMPT, out_file=tmp_path / "cal.json")
    assert res["n_images"] == 2 and 1 <= res["erank_avg"] <= 24
    assert 0 < res["entropy_avg"] <= np.log(24)
    from llava_agile.config import load_erank_avg
    assert load_erank_avg(str(tmp_path / "cal.json")) == pytest.approx(res["erank_avg"])


@needs5
@pytest.mark.parametrize("method,keep,params", [("fastv", 5, dict(layer=1)),
                                                ("dart", 10, dict(layer=1, pivot_image=2,
                                                                  pivot_text=2))])
def test_in_llm_methods(tiny, method, keep, params):
    """FastV / DART inside Qwen2.5-VL's LLM (kept tokens keep their M-RoPE positions): each
    image's tokens leave after layer 0; cached greedy decoding = full forwards without cache
    that keep the prefill's choices; a budget >= every image = stock generate; PDrop (which
    renumbers positions) is refused."""
    model, processor = tiny
    batch = inputs(processor)
    _, stock = run(model, batch)
    llava_agile.enable(model, processor=processor, method=method, keep=keep, **params)
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, max_new_tokens=3, output_scores=True,
                             return_dict_in_generate=True)
    stats, eng = model.agile_stats, model._agile_state.engine
    assert [(s["tokens"], s["kept"], s["layer_tokens"]) for s in stats] == \
        [(16, keep, [16, keep]), (24, keep, [24, keep])]
    assert min(eng.last.margins) > 1e-6
    L = batch["input_ids"].shape[1]
    for step in range(3):
        eng.replay()
        longer = dict(batch, input_ids=out.sequences[:, :L + step])   # + the generated text
        for key, fill in (("attention_mask", 1), ("mm_token_type_ids", 0)):
            longer[key] = torch.cat([batch[key], torch.full((2, step), fill)], 1)
        with torch.inference_mode():
            logits = model(**longer, use_cache=False).logits[:, -1]
        torch.testing.assert_close(logits, out.scores[step], rtol=0, atol=1e-4)
        top2 = logits.topk(2).values
        assert ((top2[:, 0] - top2[:, 1]) > 1e-3).all()
        assert torch.equal(logits.argmax(-1), out.sequences[:, L + step])
    llava_agile.enable(model, processor=processor, method=method, keep=102, **params)
    _, same = run(model, batch)
    assert torch.equal(same, stock) and model.agile_stats[0]["kept"] == 16
    with pytest.raises(ValueError, match="no M-RoPE"):
        llava_agile.enable(model, processor=processor, method="pdrop", keep=8, layers=(1,))
    with pytest.raises(ValueError, match="no M-RoPE"):   # renumbers too
        llava_agile.enable(model, processor=processor, method="sparsevlm", keep=8, layers=(0,),
                           schedule=(8,))
