"""The vLLM plugin on tiny random Qwen2.5-VL and Qwen3-VL checkpoints
(`llava_agile.vllm.tiny.build_tiny_qwen`: Qwen2.5-VL with windowed and full-attention vision
blocks, Qwen3-VL with two deepstack levels; head_dim 32 in the LLM): per family, images of 8x8,
8x12 (wide) and 12x8 (tall: its extent is its height) patches, 16, 24 and 24 merged tokens.

Per family, three offline engines, each once in its own process (tests/vllm/engine_run.py): the
plugin disabled, K above every image's count (nothing pruned) and K = 6.
"""
import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llava_agile.vllm.tiny import build_tiny_qwen

# tests/vllm is on sys.path
from vllm_helpers import (check_greedy, check_second_round_cached, hf_reference, ok,  # noqa: E402
                          run_engine)
import decided  # noqa: E402  (tests/, put on sys.path by vllm_helpers)

K, ALL = 6, 100_000
AGILE = {"method": "adaptive"}
SIZES = [(8, 8), (8, 12), (12, 8)]  # (height, width) in patches
PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}
CLASSES = {"qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "AgileQwen2_5_VL"),
           "qwen3_vl": ("Qwen3VLForConditionalGeneration", "AgileQwen3VL")}
IMAGE = "<|vision_start|> <|image_pad|> <|vision_end|>"
P1 = "a cat and a dog " * 6 + f"{IMAGE} the image"  # a full 32-token block before the end
P2 = f"describe {IMAGE} and {IMAGE} please"
TEXT1, TEXT2 = 34, 7  # the prompts' tokens besides the image pads


@pytest.fixture(scope="module", params=sorted(PATCH))
def tiny(request, tmp_path_factory):
    from PIL import Image

    family = request.param
    root = tmp_path_factory.mktemp(f"vllm-{family}")
    model = build_tiny_qwen(str(root / "tiny"), family=family)
    images = []
    for i, (h, w) in enumerate(SIZES):
        path = root / f"img{i}.png"
        pixels = np.random.RandomState(i).rand(h * PATCH[family], w * PATCH[family], 3)
        Image.fromarray((pixels * 255).astype("uint8")).save(path)
        images.append(str(path))
    return root, model, images, family


def _rounds(images):
    one = {"prompt": P1, "images": images[:1]}
    return [[one], [one], [{"prompt": P1, "images": images[2:]},
                           {"prompt": P2, "images": images[1:]}],
            [dict(one, mm={"agile": {"keep": 3}}), dict(one, mm={"agile": {"keep": 10}}),
             {"prompt": P1, "images": images[1:2]}]]


@pytest.fixture(scope="module")
def disabled(tiny):
    root, model, images, _ = tiny
    return ok(*run_engine(root, "disabled", model, None, _rounds(images)[:3], plugins=""))


@pytest.fixture(scope="module")
def everything(tiny):
    root, model, images, _ = tiny
    return ok(*run_engine(root, "all", model, dict(AGILE, keep=ALL), _rounds(images)[:3]))


@pytest.fixture(scope="module")
def pruned(tiny):
    root, model, images, _ = tiny
    return ok(*run_engine(root, "pruned", model, dict(AGILE, keep=K), _rounds(images),
                           record=True, positions=True, video=f"describe <|vision_start|> "
                           f"<|video_pad|> <|vision_end|> the video"))


@pytest.fixture(scope="module")
def reference(tiny):
    """transformers' Qwen2.5-VL / Qwen3-VL with `llava_agile.enable` (K) in float64 on the same
    checkpoint, for one image with P1 (vllm_helpers.hf_reference; each image's run once)."""
    import transformers

    _, model_dir, images, family = tiny
    model_cls = getattr(transformers, CLASSES[family][0])
    return functools.lru_cache(lambda i: hf_reference(model_cls, model_dir, images[i], P1,
                                                      **dict(AGILE, keep=K)))


def _lengths(res):
    return [len(r["prompt_token_ids"]) for rd in res["rounds"] for r in rd["requests"]]


def test_prefill_is_text_plus_k_per_image(disabled, pruned):
    assert _lengths(disabled) == [TEXT1 + 16, TEXT1 + 16, TEXT1 + 24, TEXT2 + 48]  # unpruned
    assert _lengths(pruned) == [TEXT1 + K, TEXT1 + K, TEXT1 + K, TEXT2 + 2 * K,
                                TEXT1 + 3, TEXT1 + 10, TEXT1 + K]
    assert pruned["prompt_tokens"] == sum(_lengths(pruned))
    assert [st["kept"] for st in pruned["rounds"][2]["model"]["stats"]] == [K, K]


def test_a_budget_per_request(pruned):
    """mm_processor_kwargs {"agile": {"keep": k}}: the same image under two budgets and another
    under the engine's default in one batch, each with its own count (prefill lengths above).
    The two budgets are two cache entries, encoded in one call; the third image was encoded
    under the default in the third round and comes from the encoder cache."""
    third, fourth = pruned["rounds"][2]["model"], pruned["rounds"][3]["model"]
    assert sorted(st["kept"] for st in fourth["stats"]) == [3, 10]
    assert fourth["encoder_calls"] == third["encoder_calls"] + 1


def test_nothing_pruned_gives_the_stock_tokens(tiny, disabled, everything):
    """K above every count: the same prompts, the merger's tokens in their order, positions
    recomputed from the full grid: vLLM's own greedy tokens."""
    family = tiny[3]
    assert disabled["rounds"][0]["model"]["cls"] == CLASSES[family][0]
    assert everything["rounds"][0]["model"]["cls"] == CLASSES[family][1]
    for a, b in zip(disabled["rounds"], everything["rounds"]):
        for ra, rb in zip(a["requests"], b["requests"]):
            assert ra["prompt_token_ids"] == rb["prompt_token_ids"]
            assert ra["token_ids"] == rb["token_ids"]


@pytest.mark.parametrize("request_index", [0, 1])
def test_kept_tokens_positions_and_greedy_tokens_equal_transformers(pruned, reference,
                                                                    request_index):
    """The transformers adapter in float64 on the same weights: the same kept tokens (where its
    selection margins are far above float32 round-off; vLLM's selection inputs within round-off
    of its), the same M-RoPE positions of the prefill (kept tokens at their full-grid positions,
    text after an image from the full grid's extent), and vLLM's greedy tokens where its logit
    gaps decide them. Request 0: the first prompt (a square image); request 1: the third
    round's tall image, batched with a two-image prompt."""
    rnd = pruned["rounds"][2 * request_index]
    got = rnd["requests"][0]
    ref = reference(2 * request_index)
    assert ref.inputs["input_ids"][0].tolist() == got["prompt_token_ids"]
    if request_index == 0:  # the recorded selection is the first round's
        (sel,) = pruned["selection"]
        kept = decided.adaptive(ref.selection, [torch.tensor(sel[n], dtype=torch.float64)[0]
                                                for n in ("space", "attn")], K)
        assert sel["indices"][0] == kept
        assert rnd["model"]["stats"][0]["indices"] == ref.stats[0]["indices"] == sorted(kept)
    # the round's prefill starts with this request's tokens
    assert [p[:len(got["prompt_token_ids"])] for p in rnd["positions"]] == \
        ref.positions[-3:, 0].tolist()
    check_greedy(ref.scores, ref.tokens, got)


def test_positions_of_a_tall_image_continue_from_its_height():
    """`get_mrope_input_positions` with pruned runs: text after an image continues from the
    full grid's extent (here its height), as transformers does for the pruned prompt."""
    from llava_agile.vllm.qwen import AgileQwenModel

    feature = SimpleNamespace(mm_position=SimpleNamespace(offset=2, length=4), modality="image",
                              data={"image_grid_thw": SimpleNamespace(
                                  data=torch.tensor([1, 12, 8]))})
    model = SimpleNamespace(agile_config=object(), config=SimpleNamespace(
        vision_config=SimpleNamespace(spatial_merge_size=2)))
    pos, delta = AgileQwenModel.get_mrope_input_positions(model, list(range(9)), [feature])
    assert pos.shape == (3, 9)
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[:, 2:6].tolist() == [[2, 2, 2, 2], [2, 2, 2, 2], [2, 3, 4, 5]]  # placeholders
    assert pos[:, 6:].tolist() == [[8, 9, 10]] * 3  # 2 + max(1, 6, 4)
    assert delta == 11 - 9


def test_repeated_request_hits_prefix_and_encoder_caches(pruned, reference):
    """The first request again: its first block (32 tokens, ending inside the image's kept run)
    comes from the prefix cache, the rest of the image from the encoder cache (no tower run),
    and the recompute of positions starts in the middle of the image: the same greedy tokens
    as the float64 reference (check_second_round_cached)."""
    check_second_round_cached(pruned, reference(0))


def test_video_refused(pruned):
    assert pruned["video_error"] is not None and "video" in pruned["video_error"]


@pytest.mark.parametrize("agile, words", [
    ({"method": "visionzip", "keep": 8}, "M-RoPE position"),
    ({"method": "fastv", "keep": 8}, "prunes inside the LLM"),
    ({"method": "cdpruner", "keep": 8}, "question"),
    ({"method": "adaptive", "keep": 8, "adaptive_count": True}, "adaptive_count=True"),
])
def test_refusals_name_the_reason(tiny, agile, words):
    from transformers import AutoConfig

    from llava_agile.vllm.qwen import qwen_config

    cfg = AutoConfig.from_pretrained(tiny[1])  # both families
    cfg.agile = agile
    with pytest.raises(ValueError, match="llava_agile") as e:
        qwen_config(cfg)
    assert words in str(e.value)


@pytest.mark.parametrize("cls", ["AgileQwen2_5_VL", "AgileQwen3VL"])
def test_recomputed_positions_continue_from_the_full_extent(cls):
    """The runner's `recompute_mrope_positions` on our embeddings (kept tokens = the first row
    of a tall 6x4 grid, so their largest position is below the grid's extent): the kept tokens
    at their grid positions, the text after the image from the full extent (6), as transformers
    places it. vLLM's own Qwen3-VL recompute would continue from the kept tokens' maximum."""
    import llava_agile.vllm.qwen as q

    vstart, image, vend = 118, 120, 119
    ids = [3, 4, vstart] + [image] * 4 + [vend, 5, 6]
    cfg = SimpleNamespace(vision_start_token_id=vstart, image_token_id=image,
                          video_token_id=121, vision_config=SimpleNamespace(spatial_merge_size=2))
    model = SimpleNamespace(agile_config=object(), config=cfg)
    feature = SimpleNamespace(mm_position=SimpleNamespace(offset=3, length=4), modality="image",
                              data={"image_grid_thw": SimpleNamespace(
                                  data=torch.tensor([1, 12, 8]))})
    first, _ = q.AgileQwenModel.get_mrope_input_positions(model, ids, [feature])
    klass = getattr(q, cls)
    kept = torch.tensor([[0, 0, w, 6] for w in range(4)], dtype=torch.float32)  # t, h, w, extent
    pad = torch.zeros(4, klass.position_channels - 4)
    emb = torch.cat([torch.randn(4, 8), kept, pad], dim=1)
    out, pos, delta = klass.recompute_mrope_positions(model, ids, [emb], first.clone(), 0)
    assert out[0].shape == (4, 8)
    assert pos[:, 3:7].tolist() == [[3, 3, 3, 3], [3, 3, 3, 3], [3, 4, 5, 6]]
    assert pos[:, 7:].tolist() == [[9, 10, 11]] * 3  # vision_end at 3 + 6
    assert delta == 12 - len(ids)
