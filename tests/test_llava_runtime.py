"""Runtime mode on a tiny random LLaVA-1.5: generate through LLaVA's unchanged code."""
import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("llava")

import llava_agile  # noqa: E402
from llava_agile import PruneConfig  # noqa: E402
from llava_agile.assets import build_tiny_llava, load_tiny, tiny_image, tiny_prompt  # noqa: E402
from llava_agile.llava import compat  # noqa: E402
from llava_agile.methods import MERGING  # noqa: E402
from llava.mm_utils import process_images  # noqa: E402

N = 576


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_llava(str(tmp_path_factory.mktemp("m")))
    tokenizer, model, processor, _ = load_tiny(path)
    compat.shim_generation(model)  # plain LLaVA on transformers 4.38+ (no-op on 4.37)
    seen = []
    model.get_model().register_forward_pre_hook(
        lambda m, a, k: seen.append((k.get("inputs_embeds"), k.get("attention_mask"))),
        with_kwargs=True)
    yield path, tokenizer, model, processor, seen
    llava_agile.disable(model)


def generate(tiny, images, n_prompts=1, **kw):
    """Run LLaVA's generate; returns the LLM's first-step inputs_embeds and attention mask."""
    _, tokenizer, model, processor, seen = tiny
    ids = tiny_prompt(tokenizer).repeat(n_prompts, 1)
    seen.clear()
    with torch.inference_mode():
        out = model.generate(ids, images=images, image_sizes=kw.pop("image_sizes", None),
                             attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=2, use_cache=True, **kw)
    assert out.shape[0] == n_prompts and out.dtype == torch.long
    assert seen[0][0] is not None
    return seen[0][0], seen[0][1], ids.shape[1]


def pixels(tiny, *imgs):
    return process_images(list(imgs), tiny[3], tiny[2].config)


# before the LLM; cdpruner / trim need a question: tests/test_llava_question.py
@pytest.mark.parametrize("method", llava_agile.methods.IMAGE_ONLY)
def test_every_method_feeds_k_tokens(tiny, method):
    model = tiny[2]
    x = pixels(tiny, tiny_image(0))
    full, _, t = generate(tiny, x)
    assert full.shape[1] == t - 1 + N
    for keep, space in ((64, "projected"), (10, "vision")):
        llava_agile.enable(model, method, keep, feature_space=space)
        try:
            pruned, _, _ = generate(tiny, x)
        finally:
            llava_agile.disable(model)
        k = N if method == "none" else keep
        assert full.shape[1] - pruned.shape[1] == N - k
        st = model.__dict__.get("agile_stats")
        assert st is None  # disable removed it
    # the stats of the last call, per image: "full" measures erank and entropy for every method
    got = {}
    for mode in ("basic", "full"):
        llava_agile.enable(model, method, 32, stats=mode)
        generate(tiny, x)
        (got[mode],) = model.agile_stats
        llava_agile.disable(model)
    st, basic = got["full"], got["basic"]
    # "basic" (the default): the same record without what the method did not compute itself
    skipped = {"erank", "entropy"} - set(basic)
    assert skipped == ({"entropy"} if method == "adaptive" else {"erank", "entropy"})
    assert {k: v for k, v in basic.items() if k != "prune_ms"} == \
        {k: v for k, v in st.items() if k not in skipped | {"prune_ms"}}
    k = N if method == "none" else 32
    assert st["kept"] == st["tokens"] == k and st["prune_ms"] > 0
    assert 1 <= st["erank"] <= N and 0 < st["entropy"] <= torch.log(torch.tensor(576.)) + 1e-5
    if method not in MERGING:
        assert st["indices"] == sorted(set(st["indices"])) and len(st["indices"]) == k
    if method == "adaptive":
        lo, hi = st["tau_range"]
        assert 0 < lo <= hi <= 0.25
    if method in ("vispruner", "bat", "mix"):
        assert 0 <= st["ratio"] <= 1


def test_kept_tokens_are_the_projected_tokens_at_the_indices(tiny):
    model = tiny[2]
    x = pixels(tiny, tiny_image(1))
    full, _, t = generate(tiny, x)
    start = int((tiny_prompt(tiny[1])[0] == -200).nonzero())
    for space in ("projected", "vision"):
        llava_agile.enable(model, PruneConfig("adaptive", 48, feature_space=space))
        pruned, _, _ = generate(tiny, x)
        idx = torch.tensor(model.agile_stats[0]["indices"])
        llava_agile.disable(model)
        torch.testing.assert_close(pruned[0, start:start + 48], full[0, start + idx],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pruned[0, :start], full[0, :start])
        torch.testing.assert_close(pruned[0, start + 48:], full[0, start + N:])


def test_bat_records_its_attention_kept_tokens(tiny):
    """bat's first round(R*K) LLM tokens are the projected tokens at `attention_indices`."""
    model = tiny[2]
    x = pixels(tiny, tiny_image(6))
    full, _, _ = generate(tiny, x)
    start = int((tiny_prompt(tiny[1])[0] == -200).nonzero())
    llava_agile.enable(model, "bat", 20, ratio=0.4)
    pruned, _, _ = generate(tiny, x)
    (st,) = model.agile_stats
    llava_agile.disable(model)
    idx = st["attention_indices"]
    assert len(idx) == 8 and idx == sorted(set(idx)) and st["prune_ms"] > 0
    torch.testing.assert_close(pruned[0, start:start + 8], full[0, start + torch.tensor(idx)],
                               rtol=1e-5, atol=1e-6)
    assert pruned.shape[1] == full.shape[1] - (N - 20)


@pytest.mark.parametrize("method,params", [("adaptive", dict(erank_avg=50.0)),
                                           ("vispruner", dict(ratio=0.5))])
def test_selection_matches_the_core_on_the_hooked_attention(tiny, method, params):
    """The integration selects exactly what llava_agile.select_tokens picks from the select
    layer's [CLS] row (the eager row, up to round-off); vispruner's similarity is taken on the
    CLIP (pre-projector) features, as its official code.

    The core gets the runtime's own tower outputs (its hook's row), not the eager ones: the two
    rows differ by float32 round-off (~1e-5 relative), and both methods read the whole attention
    order (the walk's ranks; vispruner's A/B split of the other 556 tokens), whose closest
    neighbours here are only ~1e-4 apart, so round-off could decide them. With the same row and
    features both sides compute the same numbers on any CPU; those are checked against eager."""
    from llava_agile.llava.runtime import _tower

    model = tiny[2]
    x = pixels(tiny, tiny_image(2))
    clip_model = model.get_vision_tower().vision_tower
    impl = getattr(clip_model.config, "_attn_implementation", None)
    clip_model.config._attn_implementation = "eager"  # newer transformers default to SDPA
    with torch.no_grad():
        out = clip_model(x, output_attentions=True, output_hidden_states=True)
        clip_model.config._attn_implementation = impl
    llava_agile.enable(model, method, 40, **params)
    with torch.no_grad():
        clip, attn = _tower(model, model._agile_state, x)  # as prepare_inputs_... calls it
        proj = model.get_model().mm_projector(clip)
    generate(tiny, x)
    got = model.agile_stats[0]["indices"]
    llava_agile.disable(model)
    # the select layer's patch features and [CLS] row (head mean), up to round-off
    torch.testing.assert_close(clip, out.hidden_states[-2][:, 1:], rtol=0, atol=1e-4)
    torch.testing.assert_close(attn, out.attentions[-2][:, :, 0, 1:].mean(1), rtol=1e-4, atol=0)
    extra = {"similarity_features": clip} if method == "vispruner" else {}
    want = llava_agile.select_tokens(proj, attn, 40, method, **params, **extra)
    if extra:  # the projected features would select otherwise: the check tells them apart
        assert not torch.equal(want, llava_agile.select_tokens(proj, attn, 40, method, **params))
    assert got == want[0].tolist()


def test_disable_restores_llava(tiny):
    model = tiny[2]
    x = pixels(tiny, tiny_image(3))
    before, _, _ = generate(tiny, x)
    attn_mod = model.get_vision_tower().vision_tower.vision_model.encoder.layers[-2].self_attn
    hooks = len(attn_mod._forward_hooks)
    llava_agile.enable(model, "attention", 16)
    assert len(attn_mod._forward_hooks) == hooks + 1
    llava_agile.enable(model, "diversity", 8)  # re-enable replaces, no second hook
    assert len(attn_mod._forward_hooks) == hooks + 1 and model.agile_config.keep == 8
    assert generate(tiny, x)[0].shape[1] == before.shape[1] - (N - 8)
    llava_agile.disable(model)
    llava_agile.disable(model)  # no-op
    assert len(attn_mod._forward_hooks) == hooks
    for name in ("prepare_inputs_labels_for_multimodal", "encode_images", "agile_stats",
                 "agile_config", "_agile_state"):
        assert name not in model.__dict__
    after, _, _ = generate(tiny, x)
    assert torch.equal(before, after)


def test_encode_images_called_directly_prunes(tiny):
    model = tiny[2]
    x = pixels(tiny, tiny_image(4), tiny_image(5))
    with torch.no_grad():
        full = model.encode_images(x)
        llava_agile.enable(model, "fps", 20)
        out = model.encode_images(x)
        llava_agile.disable(model)
    assert full.shape[:2] == (2, N) and out.shape == (2, 20, full.shape[2])
    assert len(model.__dict__.get("agile_stats", [])) == 0


def test_batch_of_two_images_each_pruned_on_its_own(tiny):
    """Each image of a batch is pruned as it would be alone: the batch's tower gives each image
    its own features and [CLS] row (those of the image alone, up to round-off), and its kept
    tokens are the core's selection from that image's tensors only.

    Not compared: the batch's indices with the single runs'. The tower rounds the rows of a
    batch of 2 differently from a batch of 1 (~5e-6 relative), and image a's 64th and 65th
    largest attention are only 2e-5 apart: round-off could decide that choice."""
    from llava_agile.llava.runtime import _tower

    model = tiny[2]
    a, b = tiny_image(6, kind="shapes"), tiny_image(7, kind="noise")
    singles = []
    llava_agile.enable(model, "adaptive", 64)
    for img in (a, b):
        generate(tiny, pixels(tiny, img))
        with torch.no_grad():
            clip, row = _tower(model, model._agile_state, pixels(tiny, img))
        singles.append((model.agile_stats[0]["indices"], clip[0], row[0]))
    emb, mask, t = generate(tiny, pixels(tiny, a, b), n_prompts=2)
    stats = model.agile_stats
    with torch.no_grad():
        clip, row = _tower(model, model._agile_state, pixels(tiny, a, b))
        proj = model.get_model().mm_projector(clip)
    for i, (alone, clip_alone, row_alone) in enumerate(singles):
        # up to round-off: measured 7e-6 (features of size ~8) and 6e-6 relative (rows) with
        # MKL_CBWR=COMPATIBLE's kernels; both bounds are over 14x that
        torch.testing.assert_close(clip[i], clip_alone, rtol=0, atol=1e-4)
        torch.testing.assert_close(row[i], row_alone, rtol=1e-4, atol=0)
        # the same numbers on both sides (same tensors, same per-image code): exact on any CPU
        want = llava_agile.select_tokens(proj[i], row[i], 64, "adaptive")
        assert stats[i]["indices"] == want.tolist()
    assert singles[0][0] != singles[1][0]
    assert emb.shape[:2] == (2, t - 1 + 64)
    # the list path (a list of image tensors) gives the same tokens
    x = pixels(tiny, a, b)
    emb2, _, _ = generate(tiny, [x[0], x[1]], n_prompts=2)
    torch.testing.assert_close(emb2, emb)
    llava_agile.disable(model)


def test_adaptive_count_gives_per_image_lengths(tiny):
    model = tiny[2]
    a, b = tiny_image(8, kind="flat"), tiny_image(9, kind="noise")
    llava_agile.enable(model, "attention", 8, stats="full")
    generate(tiny, pixels(tiny, a, b), n_prompts=2)
    e_a, e_b = (s["erank"] for s in model.agile_stats)
    assert abs(e_a - e_b) > 2
    llava_agile.enable(model, "adaptive", 64, adaptive_count=True, erank_avg=(e_a + e_b) / 2)
    for images in (pixels(tiny, a, b), list(pixels(tiny, a, b))):
        emb, mask, t = generate(tiny, images, n_prompts=2)
        ks = [s["kept"] for s in model.agile_stats]
        want = [min(max(int(64 * min(max(e / ((e_a + e_b) / 2), 0.5), 1.5) + 0.5), 1), N)
                for e in (e_a, e_b)]
        assert ks == want and ks[0] != ks[1]
        assert mask.sum(1).tolist() == [t - 1 + k for k in ks]
        assert emb.shape[1] == t - 1 + max(ks)
    llava_agile.disable(model)


def test_load_pretrained_model_with_pruning(tiny):
    path = tiny[0]
    tok, model, proc, ctx = llava_agile.load_pretrained_model(
        path, None, "tiny-llava-v1.5", device="cpu", device_map="cpu",
        pruning={"method": "mix", "keep": 24, "ratio": 0.25})
    model.float()
    assert isinstance(ctx, int) and model.agile_config == PruneConfig("mix", 24, {"ratio": 0.25})
    x = process_images([tiny_image(10)], proc, model.config)
    with torch.inference_mode():
        out = model.generate(tiny_prompt(tok), images=x, do_sample=False, max_new_tokens=2)
    assert isinstance(out, torch.Tensor)
    assert model.agile_stats[0]["kept"] == 24 and model.agile_stats[0]["ratio"] == 0.25
    _, plain, _, _ = llava_agile.load_pretrained_model(path, None, "tiny-llava-v1.5",
                                                       device="cpu", device_map="cpu")
    assert "_agile_state" not in plain.__dict__


def test_bad_input_is_a_clear_value_error(tiny):
    model = tiny[2]
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        llava_agile.enable(model, "nope", 64)
    for keep in (0, -3):
        with pytest.raises(ValueError, match="keep must be >= 1"):
            llava_agile.enable(model, "adaptive", keep)
    with pytest.raises(ValueError, match="does not take parameter"):
        llava_agile.enable(model, "attention", 8, tau_max=0.3)
    with pytest.raises(ValueError, match="not both"):
        llava_agile.enable(model, PruneConfig("attention", 8), keep=4)
    with pytest.raises(ValueError, match="needs a LLaVA model"):
        llava_agile.enable(torch.nn.Linear(2, 2), "attention", 8)
    with pytest.raises(ValueError, match="pruning must be"):
        llava_agile.load_pretrained_model(tiny[0], None, "tiny-llava-v1.5", pruning="adaptive")
    with pytest.raises(ValueError, match="unknown pruning method"):
        llava_agile.load_pretrained_model(tiny[0], None, "tiny-llava-v1.5",
                                          pruning={"method": "nope"})
    assert "_agile_state" not in model.__dict__


def test_transformers_version_gate(tiny, monkeypatch):
    assert compat.check_transformers("4.37.2") == (4, 37)
    assert not compat.needs_cache_position_shim("4.37.2")
    assert compat.needs_cache_position_shim("4.57.1")
    for bad in ("5.0.0", "5.2.1.dev0"):
        with pytest.raises(RuntimeError, match=r"transformers 5\.\S+ is not supported"):
            compat.check_transformers(bad)
    with pytest.raises(RuntimeError, match="older"):
        compat.check_transformers("4.30.0")
    model = tiny[2]
    before = model.__dict__.get("prepare_inputs_for_generation")
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.0.0")
    with pytest.raises(RuntimeError, match="not supported"):
        llava_agile.enable(model, "attention", 8)
    assert "_agile_state" not in model.__dict__
    # a 4.38+ version installs the cache_position shim, keeping LLaVA's signature
    monkeypatch.setattr(compat, "transformers_version", lambda: "4.45.2")
    llava_agile.enable(model, "attention", 8)
    import inspect
    assert model.__dict__["prepare_inputs_for_generation"] is not before
    assert list(inspect.signature(model.prepare_inputs_for_generation).parameters)[:3] == \
        ["input_ids", "past_key_values", "inputs_embeds"]
    out = model.prepare_inputs_for_generation(torch.ones(1, 3, dtype=torch.long),
                                              attention_mask=torch.ones(1, 3, dtype=torch.long),
                                              cache_position=torch.arange(3))
    assert "cache_position" not in out
    emb, _, t = generate(tiny, pixels(tiny, tiny_image(11)))
    assert emb.shape[1] == t - 1 + 8
    llava_agile.disable(model)
    assert model.__dict__.get("prepare_inputs_for_generation") is before


def test_merging_method_through_llava_list_path(tiny):
    model = tiny[2]
    x = pixels(tiny, tiny_image(12), tiny_image(13, kind="noise"))
    full, _, t = generate(tiny, list(x), n_prompts=2)
    llava_agile.enable(model, "bat", 20, feature_space="vision")
    emb, mask, _ = generate(tiny, list(x), n_prompts=2)
    stats = model.agile_stats
    llava_agile.disable(model)
    assert full.shape[1] == t - 1 + N and emb.shape[1] == t - 1 + 20
    assert [s["kept"] for s in stats] == [20, 20] and "indices" not in stats[0]


def test_import_without_llava():
    import subprocess
    import sys
    code = ("import sys; sys.modules['llava'] = None; import llava_agile, torch; "
            "assert 'transformers' not in sys.modules; "
            "llava_agile.enable(torch.nn.Linear(2, 2), 'attention', 4)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1 and "ValueError: enable() needs a LLaVA model" in out.stderr
