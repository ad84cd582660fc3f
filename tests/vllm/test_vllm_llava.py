"""The vLLM plugin on a tiny random llava-hf checkpoint (LLaVA-1.5 layout, N = 256 tokens/image).

Three offline engines, each once for the module in its own process (tests/vllm/engine_run.py):
the plugin disabled (VLLM_PLUGINS without ours), K = N, and K = 16 < N.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from llava_agile.vllm.tiny import build_tiny_hf_llava
# tests/vllm is on sys.path
from vllm_helpers import (PROMPT1, PROMPT2, check_greedy, check_second_round_cached,  # noqa: E402
                          check_selection, hf_reference, ok, run_engine)

N, K = 256, 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model = build_tiny_hf_llava(str(root / "tiny-llava-hf"), image_size=224)
    # seed 1: the first image's choice has wide margins (test_kept_indices_equal_select_tokens
    # asserts them; seed 0's attention order has a 2e-5 near tie among the kept tokens)
    rng = np.random.default_rng(1)
    images = []
    for i in range(2):
        from PIL import Image
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (200 + 40 * i, 240, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return root, model, images


def _rounds(images):
    one = {"prompt": PROMPT1, "images": images[:1]}
    return [[one], [one], [{"prompt": PROMPT1, "images": images[1:]},
                           {"prompt": PROMPT2, "images": images}]]


@pytest.fixture(scope="module")
def disabled(tiny):
    root, model, images = tiny
    return ok(*run_engine(root, "disabled", model, None, _rounds(images), plugins=""))


@pytest.fixture(scope="module")
def full_k(tiny):
    root, model, images = tiny
    return ok(*run_engine(root, "full", model, {"method": "adaptive", "keep": N},
                           _rounds(images)))


@pytest.fixture(scope="module")
def pruned(tiny):
    root, model, images = tiny
    return ok(*run_engine(root, "pruned", model, {"method": "adaptive", "keep": K},
                           _rounds(images), embeds=PROMPT1, record=True))


def test_entry_point_registers_the_model(tmp_path):
    """vLLM's own plugin loader finds the entry point and swaps the LLaVA class (run from a
    neutral folder: a stale llava_agile.egg-info in the checkout would shadow the installed
    metadata on sys.path)."""
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm import ModelRegistry; "
            "print(ModelRegistry._try_load_model_cls('LlavaNextForConditionalGeneration').__name__,"
            " ModelRegistry._try_load_model_cls('LlavaForConditionalGeneration').__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout.split()[-2:] == ["AgileLlavaNext", "AgileLlava"], proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, VLLM_PLUGINS=""))
    assert proc.stdout.split()[-2:] == ["LlavaNextForConditionalGeneration",
                                        "LlavaForConditionalGeneration"], proc.stderr[-3000:]


def test_config_is_validated_by_pruneconfig():
    from transformers import LlavaConfig

    from llava_agile.vllm.llava import agile_config, kept_count

    cfg = LlavaConfig()
    assert agile_config(cfg) is None
    cfg.agile = {"method": "adaptive", "keep": 64}
    assert agile_config(cfg).keep == 64
    assert kept_count(agile_config(cfg), 576, "default") == 64
    assert kept_count(agile_config(cfg), 577, "full") == 65
    assert kept_count(agile_config(cfg), 40, "default") == 40
    cfg.agile = {"method": "none"}  # keeps every token whatever `keep` says
    assert kept_count(agile_config(cfg), 576, "default") == 576
    for bad, words in (({"method": "nope"}, "unknown pruning method"), ({"keep": 0}, "keep"),
                       ({"adaptive_count": True},
                        "adaptive_count=True, count='iqr') is not possible"),
                       ({"method": "prumerge_plus", "count": "iqr"}, "is not possible under vLLM"),
                       ("adaptive", "must be a dict"),
                       ({"method": "fastv", "keep": 64}, "paged KV cache"),
                       ({"method": "dart", "keep": 132}, "prunes inside the LLM"),
                       ({"method": "cdpruner", "keep": 64}, "conditioned on each request's "
                                                            "question"),
                       ({"method": "trim", "keep": 64, "text_tower": "/x"}, "caches an image")):
        cfg.agile = bad
        with pytest.raises(ValueError, match="llava_agile") as e:
            agile_config(cfg)
        assert words in str(e.value), str(e.value)


def test_k_equals_n_gives_the_stock_tokens(disabled, full_k):
    """Exact by construction: with K = N the plugin runs vLLM's own tower and projector on the
    same batch and hands every row on, so the LLM gets bit-identical embeddings on any kernel."""
    assert disabled["rounds"][0]["model"]["cls"] == "LlavaForConditionalGeneration"
    assert full_k["rounds"][0]["model"]["cls"] == "AgileLlava"
    for a, b in zip(disabled["rounds"], full_k["rounds"]):
        for ra, rb in zip(a["requests"], b["requests"]):
            assert ra["prompt_token_ids"] == rb["prompt_token_ids"]
            assert ra["token_ids"] == rb["token_ids"]
    assert full_k["rounds"][0]["model"]["stats"][0]["indices"] == list(range(N))


def test_k_below_n_shortens_the_prompt(disabled, pruned):
    lens = [len(r["prompt_token_ids"]) for rd in pruned["rounds"] for r in rd["requests"]]
    full = [len(r["prompt_token_ids"]) for rd in disabled["rounds"] for r in rd["requests"]]
    assert [f - p for f, p in zip(full, lens)] == [N - K, N - K, N - K, 2 * (N - K)]
    assert pruned["prompt_tokens"] == sum(lens)
    assert disabled["prompt_tokens"] == sum(full)


@pytest.fixture(scope="module")
def reference(tiny):
    """The HF adapter in float64 on the same weights, first request (vllm_helpers.hf_reference)."""
    from transformers import LlavaForConditionalGeneration

    _, model_dir, images = tiny
    return hf_reference(LlavaForConditionalGeneration, model_dir, images[0], PROMPT1,
                        method="adaptive", keep=K)


def test_kept_indices_equal_select_tokens(tiny, pruned, reference):
    """The indices vLLM kept = llava_agile.select_tokens on transformers' features and [CLS] row
    of the same weights (an independent path: HF tower, separate q/k projections), and the HF
    adapter on those weights keeps the same tokens and, fed them, continues with vLLM's greedy
    tokens. vLLM runs in float32 only, so round-off is kept out of the comparison: transformers
    runs in float64, and check_selection / check_greedy demand equality only where that
    reference's decision margins are far above float32 round-off, checking that vLLM's own
    features and [CLS] row lie within that round-off of the reference's."""
    from transformers import LlavaForConditionalGeneration

    import llava_agile
    from llava_agile.hf.model import attention_module
    from llava_agile.llava.attention import ClsAttentionHook

    _, model_dir, _ = tiny
    model = LlavaForConditionalGeneration.from_pretrained(  # not enabled: plain transformers
        model_dir, dtype=torch.float64, attn_implementation="sdpa").eval()
    x = reference.inputs["pixel_values"]
    hook = ClsAttentionHook(attention_module(model.model))
    hook.start()
    with torch.no_grad():
        out = model.model.vision_tower(x.double(), output_hidden_states=True)
        row = hook.stop()
        clip = out.hidden_states[-2][:, 1:]
        proj = model.model.multi_modal_projector(clip)
    hook.remove()
    assert row.dtype == proj.dtype == torch.float64
    want = llava_agile.select_tokens(proj[0], row[0], K, "adaptive").tolist()
    (selection,) = pruned["selection"]  # one image in the first round
    assert check_selection((proj[0], row[0]), selection, K) == want
    got = pruned["rounds"][0]["model"]["stats"][0]["indices"]
    assert got == want
    assert got == sorted(got) and len(got) == K
    first = pruned["rounds"][0]["requests"][0]
    assert reference.inputs["input_ids"][0].tolist() == first["prompt_token_ids"]
    assert reference.stats[0]["indices"] == got
    check_greedy(reference.scores, reference.tokens, first)


def test_repeated_request_hits_prefix_and_encoder_caches(pruned, reference):
    check_second_round_cached(pruned, reference)


def test_image_embeds_refused(pruned):
    assert pruned["embeds_error"] is not None
    assert "llava_agile: precomputed image_embeds cannot be pruned" in pruned["embeds_error"]


def test_batch_with_one_and_two_images(pruned):
    one, two = pruned["rounds"][2]["requests"]
    assert len(one["token_ids"]) == len(two["token_ids"]) == 8
    assert all(len(s["indices"]) == K for s in pruned["rounds"][2]["model"]["stats"])


def test_bad_config_refused_at_startup(tiny):
    """The engine stops at start-up with our line (every other refusal of `agile_config`, e.g.
    adaptive_count, raises at the same point: test_config_is_validated_by_pruneconfig)."""
    root, model, images = tiny
    res, proc = run_engine(root, "refused", model, {"method": "nope", "keep": K}, [])
    assert res is None and proc.returncode != 0
    assert "llava_agile: bad hf_overrides {'agile': {'method': 'nope'" in proc.stderr


def test_holov_runs_through_the_plugin(tiny, disabled):
    """HoloV returns K rows (zero rows included) through the shared selection code: the prompt
    holds K placeholders per image and each image's chunk budgets add up to K."""
    root, model, images = tiny
    res = ok(*run_engine(root, "holov", model, {"method": "holov", "keep": K}, _rounds(images)))
    lens = [len(r["prompt_token_ids"]) for rd in res["rounds"] for r in rd["requests"]]
    full = [len(r["prompt_token_ids"]) for rd in disabled["rounds"] for r in rd["requests"]]
    assert [f - p for f, p in zip(full, lens)] == [N - K, N - K, N - K, 2 * (N - K)]
    stats = res["rounds"][0]["model"]["stats"]
    assert [sum(st["chunk_budgets"]) for st in stats] == [K]
    assert len(stats[0]["attention_indices"]) + stats[0]["zero_rows"] == K


def test_prumerge_plus_scores_with_the_next_block_loaded_beside_vllm(tiny, disabled):
    """vLLM's tower stops at the select layer; the plugin loads the next block's layer_norm1 /
    q_proj / k_proj itself: the tokens it keeps equal the transformers adapter's (float64, the
    attention cut far above float32 round-off), K per image."""
    from transformers import LlavaForConditionalGeneration

    from llava_agile.methods.common import round_half_up

    root, model, images = tiny
    res = ok(*run_engine(root, "prumerge", model, {"method": "prumerge_plus", "keep": K},
                         _rounds(images)))
    lens = [len(r["prompt_token_ids"]) for rd in res["rounds"] for r in rd["requests"]]
    full = [len(r["prompt_token_ids"]) for rd in disabled["rounds"] for r in rd["requests"]]
    assert [f - p for f, p in zip(full, lens)] == [N - K, N - K, N - K, 2 * (N - K)]
    ref = hf_reference(LlavaForConditionalGeneration, model, images[0], PROMPT1,
                       method="prumerge_plus", keep=K)
    _, attn = ref.selection
    top = round_half_up((K - 1) / 4)
    values = torch.sort(attn, descending=True).values
    assert (values[top - 1] - values[top]) / values[0] > 1e-4
    (st,) = res["rounds"][0]["model"]["stats"]
    assert st["attention_indices"] == ref.stats[0]["attention_indices"]
    assert len(st["attention_indices"]) == K - 1


def test_a_budget_per_request(tiny, disabled):
    """mm_processor_kwargs {"agile": {"keep": k}} sets one request's K: the same image under three
    budgets in one batch gets 8, 32 and the engine's K placeholders, and the model keeps that
    many tokens per image (no cache entry shared across budgets); bad values fail that request
    alone, and the engine goes on."""
    root, model, images = tiny
    one = {"prompt": PROMPT1, "images": images[:1]}
    batch = [dict(one, mm={"agile": {"keep": 8}}), dict(one, mm={"agile": {"keep": 32}}), one]
    refused = [dict(one, mm={"agile": {"keep": 0}}),
               dict(one, mm={"agile": {"method": "fps"}}),
               dict(one, mm={"agile": {"tau_max": -1}}), dict(one, mm={"agile": 5})]
    res = ok(*run_engine(root, "budgets", model, {"method": "adaptive", "keep": K},
                         [batch, [one]], refused=refused))
    full = len(disabled["rounds"][0]["requests"][0]["prompt_token_ids"])
    lens = [len(r["prompt_token_ids"]) for r in res["rounds"][0]["requests"]]
    assert [full - n for n in lens] == [N - 8, N - 32, N - K]
    stats = res["rounds"][0]["model"]["stats"]
    assert sorted(st["kept"] for st in stats) == sorted([8, 32, K])
    assert len(res["rounds"][1]["requests"][0]["prompt_token_ids"]) == full - (N - K)
    errors = res["refused"]
    assert all(e is not None and "llava_agile" in e for e in errors), errors
    assert "keep must be >= 1" in errors[0] and "not another method" in errors[1]
    assert "tau_max must be >= 0" in errors[2] and "must be a dict" in errors[3]
