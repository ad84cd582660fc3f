"""Qwen3-VL (transformers 5.24) through llava_agile.enable: the Qwen2.5-VL adapter's pruning plus
the deepstack levels cut with the same kept indices, on a tiny random model built from a config.

What differs from Qwen2.5-VL is checked here: no window reordering (every vision block attends
fully; the last one scores), the deepstack features and `visual_pos_masks` (each level holds the
kept rows of the full run's level, in order), the interleaved M-RoPE (kept tokens keep their
full-run positions), a different `get_rope_index` signature, and the refusals (in-LLM methods,
videos)."""
import re

import pytest
import torch
import transformers

import llava_agile
import test_hf_qwen  # noqa: E402
from test_hf_qwen import IMAGE, PROMPT, VEND, VIDEO, VSTART, images, sharpen  # noqa: E402

V5 = int(re.match(r"(\d+)", transformers.__version__).group(1)) >= 5
pytestmark = pytest.mark.skipif(not V5, reason="Qwen3-VL pruning supports transformers 5.x only")
SIZES = [(128, 128), (128, 192)]  # 16 and 24 merged tokens (patch 16, merge 2)
LEVELS = 2


def tiny_processor():
    return test_hf_qwen.tiny_processor("Qwen3VLProcessor", patch=16)


def tiny_model(seed=0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, bos_token_id=2, eos_token_id=2, pad_token_id=0,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                              mrope_section=[2, 3, 3], mrope_interleaved=True)),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
        vision_end_token_id=VEND)
    torch.manual_seed(seed)
    return sharpen(Qwen3VLForConditionalGeneration(cfg).eval())


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_model(), tiny_processor()
    yield model, processor
    llava_agile.disable(model)


@pytest.fixture(autouse=True)
def _clean(tiny):
    yield
    llava_agile.disable(tiny[0])


def inputs(processor, sizes=SIZES):
    return processor(images=images(sizes), text=[PROMPT] * len(sizes), return_tensors="pt",
                     padding=True)


def run(model, batch, new_tokens=2):
    """Greedy stock generate; (the LLM's prefill kwargs, new ids)."""
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
    try:
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    finally:
        handle.remove()
    return seen[0], out[:, batch["input_ids"].shape[1]:]


def test_keep_all_gives_the_unpatched_prefill_and_tokens(tiny):
    model, processor = tiny
    full, tokens = run(model, inputs(processor))
    llava_agile.enable(model, processor=processor, method="none", keep=4)
    got, same = run(model, inputs(processor))
    assert same.tolist() == tokens.tolist()
    for key in ("inputs_embeds", "position_ids", "visual_pos_masks"):
        assert torch.equal(got[key], full[key]), key
    for a, b in zip(got["deepstack_visual_embeds"], full["deepstack_visual_embeds"]):
        assert torch.equal(a, b)


def test_pruned_prefill_deepstack_and_positions_follow_the_kept_tokens(tiny):
    """K per image; the main features, every deepstack level and the M-RoPE positions of the
    kept tokens are the full run's rows of those tokens; the text after an image keeps its
    full-run positions."""
    model, processor = tiny
    full_batch = inputs(processor)
    full, _ = run(model, full_batch)
    k = 6
    llava_agile.enable(model, processor=processor, method="attention", keep=k)
    batch = inputs(processor)
    assert (batch["input_ids"] == IMAGE).sum(1).tolist() == [k, k]
    got, _ = run(model, batch)
    kept = [torch.tensor(st["indices"]) for st in model.agile_stats]
    assert [len(i) for i in kept] == [k, k] and all(i.tolist() == sorted(i.tolist()) for i in kept)
    assert got["visual_pos_masks"].sum(1).tolist() == [k, k]
    levels = got["deepstack_visual_embeds"]
    assert len(levels) == LEVELS and all(tuple(t.shape) == (2 * k, 64) for t in levels)
    n_full = [16, 24]
    starts = [0, n_full[0]]
    rows = torch.cat([s + i for s, i in zip(starts, kept)])
    for pruned, whole in zip(levels, full["deepstack_visual_embeds"]):
        torch.testing.assert_close(pruned, whole[rows], rtol=1e-6, atol=1e-6)
    for b in range(2):
        fm, gm = full["visual_pos_masks"][b], got["visual_pos_masks"][b]
        torch.testing.assert_close(got["inputs_embeds"][b][gm],
                                   full["inputs_embeds"][b][fm][kept[b]], rtol=1e-6, atol=1e-6)
        fp, gp = full["position_ids"][-3:, b], got["position_ids"][-3:, b]
        assert torch.equal(gp[:, gm], fp[:, fm][:, kept[b]])  # the kept tokens' own positions
        fv, gv = full_batch["attention_mask"][b].bool(), batch["attention_mask"][b].bool()
        after = lambda pos, mask, vis: pos[:, mask & ~vis][:, -2:]  # noqa: E731 (last text)
        assert torch.equal(after(gp, gv, gm), after(fp, fv, fm))


def test_the_last_vision_block_scores_with_received_attention(tiny):
    """No [CLS]: the mean softmax attention each merged token receives in the last vision block,
    recomputed here from that block's full attention matrices, ranks the kept tokens."""
    model, processor = tiny
    block = model.model.visual.blocks[-1]
    captured = []
    handle = block.attn.register_forward_hook(
        lambda m, a, k, o: captured.append((a[0] if a else k["hidden_states"],
                                            k["cu_seqlens"], k["position_embeddings"])),
        with_kwargs=True)
    llava_agile.enable(model, processor=processor, method="attention", keep=5)
    try:
        run(model, inputs(processor), new_tokens=1)
    finally:
        handle.remove()
    hidden, cu, (cos, sin) = captured[0]
    mod = __import__(type(block.attn).__module__, fromlist=["x"])
    n = hidden.shape[0]
    with torch.inference_mode():
        q, k, _ = block.attn.qkv(hidden).reshape(n, 3, block.attn.num_heads, -1).unbind(1)
        q, k = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
    bounds = cu.tolist()
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]).double()
                          * block.attn.scaling, -1)
        received = p.mean((0, 1)).view(-1, 4).mean(1)
        order = torch.sort(received, descending=True).values
        assert (order[4] - order[5]) / order[0] > 1e-4  # decided far above round-off
        want = torch.sort(torch.topk(received, 5).indices).values.tolist()
        assert model.agile_stats[b]["indices"] == want


def test_refusals(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="deepstack adds the whole image's features"):
        llava_agile.enable(model, processor=processor, method="fastv", keep=4)
    with pytest.raises(ValueError, match=r"merges tokens.*index method on Qwen3-VL"):
        llava_agile.enable(model, processor=processor, method="visionzip", keep=4)
    llava_agile.enable(model, processor=processor, method="attention", keep=4)
    with pytest.raises(ValueError, match="Qwen3-VL pruning supports images only"):
        model.model.get_video_features(torch.zeros(4, 1536), torch.tensor([[1, 2, 2]]))
