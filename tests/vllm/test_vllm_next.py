"""The vLLM plugin on a tiny random LLaVA-NeXT checkpoint (N = 64 patches per 112-px crop, grids
of 1x2, 2x1 and 2x2 high-res crops, unpadding and newlines), anyres_mode "global".

Three offline engines, each once for the module in its own process (tests/vllm/engine_run.py):
the plugin disabled, K above every image's count (nothing pruned) and K = 24.
"""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llava_agile.vllm.tiny import build_tiny_hf_llava

# tests/vllm is on sys.path
from vllm_helpers import (PROMPT1, PROMPT2, check_greedy, check_second_round_cached,  # noqa: E402
                          check_selection, hf_reference, ok, run_engine)

K, ALL = 24, 100_000
GLOBAL = {"method": "adaptive", "anyres_mode": "global"}
SIZES = [(100, 240), (230, 90), (150, 150)]  # (height, width): 1x2, 2x1 and 2x2 grids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("vllm-next")
    model = build_tiny_hf_llava(str(root / "tiny-llava-next"), image_size=112, next=True)
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate(SIZES):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return root, model, images


def _rounds(images):
    one = {"prompt": PROMPT1, "images": images[:1]}
    return [[one], [one], [{"prompt": PROMPT1, "images": images[2:]},
                           {"prompt": PROMPT2, "images": images[1:]}]]


@pytest.fixture(scope="module")
def disabled(tiny):
    root, model, images = tiny
    return ok(*run_engine(root, "disabled", model, None, _rounds(images), plugins=""))


@pytest.fixture(scope="module")
def everything(tiny):
    root, model, images = tiny
    return ok(*run_engine(root, "all", model, dict(GLOBAL, keep=ALL), _rounds(images)))


@pytest.fixture(scope="module")
def pruned(tiny):
    root, model, images = tiny
    return ok(*run_engine(root, "pruned", model, dict(GLOBAL, keep=K), _rounds(images),
                           embeds=PROMPT1, record=True))


def _info(model_dir, agile):
    """The plugin's processing info on the checkpoint's config (no engine)."""
    from transformers import AutoConfig

    from llava_agile.vllm.llava_next import AgileLlavaNextProcessingInfo

    cfg = AutoConfig.from_pretrained(model_dir)
    if agile is not None:
        cfg.agile = agile
    return AgileLlavaNextProcessingInfo(SimpleNamespace(get_hf_config=lambda *a, **k: cfg)), cfg


def _cells(cfg, h, w):
    """Base-crop patches + the high-res cells that survive unpadding: what `global` selects
    among (the newline rows come on top)."""
    from llava_agile.vllm.llava_next import next_layout

    layout, _ = next_layout(cfg, (h, w))
    return 64 + layout.crop.numel()


def test_placeholder_count_matches_the_model_for_every_size(tiny):
    """`get_num_image_tokens` = the number of tokens the model returns, for many image sizes
    and K; with K above the count, the tokens are vLLM's own merge (same order, newlines)."""
    from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration

    from llava_agile.vllm.llava_next import image_tokens, next_config

    _, model_dir, _ = tiny
    rnd = random.Random(0)
    sizes = [(rnd.randint(1, 900), rnd.randint(1, 900)) for _ in range(30)]
    sizes += [(1, 900), (900, 1), (112, 112), (112, 224), (224, 112), (224, 224), (7, 9)]
    gen = torch.Generator().manual_seed(0)
    for keep in (1, 5, K, 64, 300, ALL):
        info, cfg = _info(model_dir, dict(GLOBAL, keep=keep))
        pc = next_config(cfg)
        for h, w in sizes:
            proj = torch.randn(5, 64, 64, generator=gen)
            clip = torch.randn(5, 64, 64, generator=gen)
            rows = torch.rand(5, 64, generator=gen).softmax(-1)
            newline = torch.randn(64, generator=gen)
            tokens, st = image_tokens(pc, cfg, torch.tensor([h, w]), proj, clip, rows, newline)
            assert tokens.shape[0] == info.get_num_image_tokens(image_width=w, image_height=h)
            assert st["kept"] == min(keep, _cells(cfg, h, w))
            if keep == ALL:
                stock = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
                    SimpleNamespace(config=cfg, image_newline=newline), torch.tensor([h, w]),
                    proj, strategy="spatial_unpad")
                assert torch.equal(tokens, stock)


def test_refusals_name_the_fix(tiny):
    from llava_agile.vllm.llava_next import next_config

    _, model_dir, _ = tiny
    for agile, words in (({"method": "adaptive", "keep": 8}, "use anyres_mode='global'"),
                         ({"method": "adaptive", "keep": 8, "anyres_mode": "per_crop"},
                          "anyres_mode='per_crop' is not possible under vLLM"),
                         (dict(GLOBAL, method="visionzip", keep=8), "merges tokens"),
                         (dict(GLOBAL, keep=8, adaptive_count=True), "adaptive_count=True")):
        _, cfg = _info(model_dir, agile)
        with pytest.raises(ValueError, match="llava_agile") as e:
            next_config(cfg)
        assert words in str(e.value)
    _, cfg = _info(model_dir, dict(GLOBAL, keep=8))
    cfg.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="'default'"):
        next_config(cfg)


def test_nothing_pruned_gives_the_stock_tokens(disabled, everything):
    """Exact by construction: with K above the count the plugin's tokens are vLLM's own merge
    tensor for tensor (test_placeholder_count_matches_the_model_for_every_size), so the LLM gets
    bit-identical embeddings on any kernel."""
    assert disabled["rounds"][0]["model"]["cls"] == "LlavaNextForConditionalGeneration"
    assert everything["rounds"][0]["model"]["cls"] == "AgileLlavaNext"
    for a, b in zip(disabled["rounds"], everything["rounds"]):
        for ra, rb in zip(a["requests"], b["requests"]):
            assert ra["prompt_token_ids"] == rb["prompt_token_ids"]
            assert ra["token_ids"] == rb["token_ids"]


def test_prompt_holds_k_plus_newlines_per_image(tiny, disabled, pruned):
    _, model_dir, _ = tiny
    _, cfg = _info(model_dir, None)
    cut = [sum(_cells(cfg, *SIZES[i]) - K for i in ids)
           for ids in ([0], [0], [2], [1, 2])]
    full = [len(r["prompt_token_ids"]) for rd in disabled["rounds"] for r in rd["requests"]]
    lens = [len(r["prompt_token_ids"]) for rd in pruned["rounds"] for r in rd["requests"]]
    assert [f - p for f, p in zip(full, lens)] == cut
    assert pruned["prompt_tokens"] == sum(lens)
    assert disabled["prompt_tokens"] == sum(full)
    for st in pruned["rounds"][2]["model"]["stats"]:
        assert st["kept"] == K


@pytest.fixture(scope="module")
def reference(tiny):
    """The HF adapter in float64 on the same weights, first request (vllm_helpers.hf_reference)."""
    from transformers import LlavaNextForConditionalGeneration

    _, model_dir, images = tiny
    return hf_reference(LlavaNextForConditionalGeneration, model_dir, images[0], PROMPT1,
                        **dict(GLOBAL, keep=K))


def test_kept_indices_and_tokens_equal_the_hf_adapter(pruned, reference):
    """transformers' LLaVA-NeXT with llava_agile.enable (anyres_mode global) on the same weights
    keeps the same (crop, patch) positions and continues with vLLM's greedy tokens. vLLM runs in
    float32 only, so round-off is kept out of the comparison: transformers runs in float64, and
    check_selection / check_greedy demand equality only where that reference's decision margins
    are far above float32 round-off, checking that vLLM's own selection inputs (base crop and
    surviving cells, in the same order) lie within that round-off of the reference's."""
    first = pruned["rounds"][0]
    assert reference.inputs["input_ids"][0].tolist() == first["requests"][0]["prompt_token_ids"]
    (got,) = pruned["selection"]  # one image in the first round
    check_selection(reference.selection, got, K)
    assert reference.stats[0]["indices"] == first["model"]["stats"][0]["indices"]
    check_greedy(reference.scores, reference.tokens, first["requests"][0])


def test_repeated_request_hits_prefix_and_encoder_caches(pruned, reference):
    check_second_round_cached(pruned, reference)


def test_image_embeds_refused(pruned):
    assert "llava_agile: precomputed image_embeds cannot be pruned" in pruned["embeds_error"]


def test_a_budget_per_request(tiny, disabled):
    """mm_processor_kwargs {"agile": {"keep": k}} on LLaVA-NeXT: each request's image gets k
    cells (plus its newlines), as the model keeps."""
    root, model_dir, images = tiny
    _, cfg = _info(model_dir, None)
    one = {"prompt": PROMPT1, "images": images[:1]}
    res = ok(*run_engine(root, "budgets", model_dir, dict(GLOBAL, keep=K),
                         [[dict(one, mm={"agile": {"keep": 5}}), one]]))
    full = len(disabled["rounds"][0]["requests"][0]["prompt_token_ids"])
    lens = [len(r["prompt_token_ids"]) for r in res["rounds"][0]["requests"]]
    cells = _cells(cfg, *SIZES[0])
    assert [full - n for n in lens] == [cells - 5, cells - K]
    assert sorted(st["kept"] for st in res["rounds"][0]["model"]["stats"]) == sorted([5, K])
