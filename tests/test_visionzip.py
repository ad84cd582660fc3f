"""visionzip against the float64 brute force of bruteforce.py, and through a tiny LLaVA-1.5.

The brute force follows dvlab-research/VisionZip's `CLIPVisionTower_VisionZip.forward` (read,
not copied): dominant tokens by [CLS] attention, the rest merged onto evenly spaced targets by
head-mean key similarity. Inputs are float64, so both compute in the same precision; a case
whose closest target choice is within AMBIGUOUS may be decided either way and is skipped.
"""
import numpy as np
import pytest
import torch

import bruteforce as bf
from llava_agile import PruneConfig, prune, select_tokens
from llava_agile.methods.visionzip import contextual_count, visionzip

torch.set_num_threads(1)
AMBIGUOUS = 1e-9
N_CASES = 300


def check(x, a, k, exact=False, **params):
    """Library (float64) vs. brute force; returns False when the case is ambiguous (unless
    `exact`: every similarity is computed without round-off, so ties are ties in both)."""
    ref, info = bf.visionzip(x, a, k, **params)
    t = {name: torch.from_numpy(v) for name, v in params.items() if isinstance(v, np.ndarray)}
    res = prune(torch.from_numpy(x), torch.from_numpy(a), k, "visionzip",
                **dict(params, **t))
    if info["margin"] < AMBIGUOUS and not exact:
        return False
    assert res.indices is None and res.features.dtype == torch.float64
    np.testing.assert_allclose(res.features.numpy(), ref, rtol=1e-10, atol=1e-12)
    if k < len(a):
        st = res.stats[0]
        assert st["attention_indices"] == info["attention_indices"]
        assert st["target_indices"] == info["target_indices"]
        assert st["contextual"] == info["contextual"] and st["kept"] == k
    return True


def draw(rng):
    n = int(rng.integers(2, 41)) if rng.uniform() < 0.5 else int(rng.integers(41, 301))
    d = int(rng.integers(2, 33))
    u = rng.uniform()
    k = 1 if u < 0.08 else n - 1 if u < 0.2 else n + 2 if u < 0.23 else int(rng.integers(1, n + 1))
    return n, d, max(k, 1)


def test_matches_the_brute_force_on_random_cases():
    rng = np.random.default_rng(15)
    skipped = 0
    for _ in range(N_CASES):
        n, d, k = draw(rng)
        x, a, _ = bf.make_case(rng, n, d)
        params = {}
        u = rng.uniform()
        if u < 0.6:   # distinct keys (the select layer's), sometimes a noisy map of x
            dk = int(rng.integers(1, 17))
            keys = rng.standard_normal((n, dk))
            if rng.uniform() < 0.5:
                keys = x @ rng.standard_normal((d, dk)) + 0.05 * keys
            params["keys"] = keys
        if rng.uniform() < 0.25:
            params["contextual"] = int(rng.integers(0, min(k, n) + 1))
        if rng.uniform() < 0.5:   # the official layout: [CLS] takes a dominant slot
            params["cls_token"] = rng.standard_normal(d)
        skipped += not check(x, a, k, **params)
    assert skipped <= 0.05 * N_CASES


def test_adversarial_cases():
    rng = np.random.default_rng(16)
    n, d = 40, 6
    x, a, _ = bf.make_case(rng, n, d, "gauss")
    tied = np.round(a * 4) / 4                              # many exact attention ties
    dup = np.repeat(rng.standard_normal((4, d)), 10, axis=0)  # duplicate tokens (and keys)
    onehot = np.eye(3)[rng.integers(0, 3, n)]             # exact key ties between targets
    for k in (1, 2, 3, 4, 5, 8, 16, n - 2, n - 1, n, n + 5):
        for aa in (a, tied, np.zeros(n), np.full(n, 1.0 / n)):
            assert check(x, aa, k)
            assert check(x, aa, k, exact=True, keys=onehot)
            check(dup, aa, k)                                    # ambiguous where targets tie
            assert check(x, aa, k, exact=True, keys=np.zeros((n, 3)))  # every similarity 0
            assert check(x, aa, k, exact=True, keys=onehot, cls_token=x[0] + 1)
            for c in {0, 1, k // 2, k} if k < n else ():
                assert check(x, aa, k, exact=True, contextual=c, keys=onehot)
                assert check(x, aa, k, exact=True, contextual=c, keys=onehot, cls_token=x[1])


def test_key_ties_join_the_first_target():
    """Identical target keys: every other token joins the first target (torch.argmax's rule)."""
    n, d = 20, 3
    x = torch.arange(n * d, dtype=torch.float64).reshape(n, d)
    a = torch.zeros(n, dtype=torch.float64)
    a[:2] = 1.0                                    # dominant: tokens 0, 1
    out, st = visionzip(x, a, 4, keys=torch.ones(n, 2, dtype=torch.float64), contextual=2)
    # rest = 2..19 (M = 18), step 9: targets at positions 0 and 9 -> tokens 2 and 11
    assert st["attention_indices"] == [0, 1] and st["target_indices"] == [2, 11]
    others = [i for i in range(2, n) if i not in (2, 11)]
    torch.testing.assert_close(out[2], x[2] + x[others].mean(0))
    torch.testing.assert_close(out[3], x[11])     # nothing joined: the target as it is
    torch.testing.assert_close(out[:2], x[:2])
    cls = torch.full((d,), -1.0, dtype=torch.float64)   # the official layout: CLS, 1 patch, ...
    out, st = visionzip(x, a, 4, keys=torch.ones(n, 2, dtype=torch.float64), contextual=2,
                        cls_token=cls)
    # rest = 1..19 (M = 19), step 9: targets at positions 0 and 9 -> tokens 1 and 10
    assert st["attention_indices"] == [0] and st["target_indices"] == [1, 10]
    assert torch.equal(out[0], cls) and torch.equal(out[1], x[0])
    others = [i for i in range(1, n) if i not in (1, 10)]
    torch.testing.assert_close(out[2], x[1] + x[others].mean(0))
    torch.testing.assert_close(out[3], x[10])


def test_default_split_is_the_official_one():
    """54 + 10 at K = 64 (the official README's setting) and its ratio elsewhere:
    C = round(K * 10 / 64), halves up."""
    for k, c in ((64, 10), (128, 20), (192, 30), (160, 25), (32, 5), (16, 3), (1, 0), (3, 0)):
        assert contextual_count(k, None) == c
    x, a = torch.randn(576, 8), torch.rand(576)
    st = prune(x, a, 64, "visionzip").stats[0]
    assert len(st["attention_indices"]) == 54 and len(st["target_indices"]) == 10
    res = prune(x, a, 64, "visionzip", cls_token=torch.randn(8))   # the official: CLS + 53
    assert len(res.stats[0]["attention_indices"]) == 53 and res.features.shape == (64, 8)


def test_fp16_and_batches():
    rng = np.random.default_rng(17)
    xs, ats, ks = [], [], []
    for _ in range(3):
        x, a, _ = bf.make_case(rng, 50, 8, "clusters")
        xs.append(x), ats.append(a), ks.append(rng.standard_normal((50, 4)))
    x, a, keys = (torch.from_numpy(np.stack(v)) for v in (xs, ats, ks))
    batch = prune(x.float(), a.float(), 12, "visionzip", keys=keys.float())
    assert batch.features.shape == (3, 12, 8) and batch.indices is None
    for b in range(3):
        ref, info = bf.visionzip(xs[b], ats[b], 12, keys=ks[b])
        # float32 target choices: the similarity of 4-d unit keys rounds by < 1e-6 (and the
        # batch's keys sit at another alignment than the single image's, which may round
        # differently); these cases' closest choice is >= 1.5e-2 away, so round-off decides none
        assert info["margin"] > 1e-4
        one = prune(x[b].float(), a[b].float(), 12, "visionzip", keys=keys[b].float())
        assert torch.equal(batch.features[b], one.features) and batch.stats[b] == one.stats[0]
        np.testing.assert_allclose(one.features.numpy(), ref, rtol=1e-5, atol=1e-5)
    half = prune(x.half(), a.half(), 12, "visionzip", keys=keys.half())
    assert half.features.dtype == torch.float16


def test_errors():
    x, a = torch.randn(12, 4), torch.rand(12)
    with pytest.raises(ValueError, match=r"'visionzip' merges tokens.*llava_agile.prune"):
        select_tokens(x, a, 4, method="visionzip")
    with pytest.raises(ValueError, match=r"contextual=5 exceeds the 4 tokens kept"):
        prune(x, a, 4, "visionzip", contextual=5)
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=r"contextual must be an integer >= 0"):
            prune(x, a, 4, "visionzip", contextual=bad)
    with pytest.raises(ValueError, match=r"keys shape \(11, 3\) must match features"):
        prune(x, a, 4, "visionzip", keys=torch.randn(11, 3))
    with pytest.raises(ValueError, match=r"cls_token must be a float tensor of shape \(4,\)"):
        prune(x, a, 4, "visionzip", cls_token=torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"cls_token must be a float tensor of shape \(2, 4\)"):
        prune(x[None].repeat(2, 1, 1), a[None].repeat(2, 1), 4, "visionzip",
              cls_token=torch.randn(4))
    with pytest.raises(ValueError, match=r"cls_token contains NaN"):
        prune(x, a, 4, "visionzip", cls_token=torch.full((4,), float("nan")))
    with pytest.raises(ValueError, match=r"keys contains NaN"):
        prune(x, a, 4, "visionzip", keys=torch.full((12, 3), float("nan")))
    from llava_agile.patch_hooks import set_fastervlm_pruning
    with pytest.raises(ValueError, match=r"'visionzip' merges tokens, which FasterVLM's keep-mask"):
        set_fastervlm_pruning(object(), {"method": "visionzip", "keep": 64})
    assert PruneConfig("visionzip").feature_space == "vision"      # the official merge space
    assert PruneConfig("visionzip", feature_space="projected").feature_space == "projected"
    assert PruneConfig("attention").feature_space == "projected"


# ---------------------------------------------------------------- through a tiny LLaVA-1.5

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("llava")
    from llava_agile.assets import build_tiny_llava, load_tiny
    from llava_agile.llava import compat

    tokenizer, model, processor, _ = load_tiny(build_tiny_llava(str(tmp_path_factory.mktemp("z"))))
    compat.shim_generation(model)
    seen = []
    model.get_model().register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("inputs_embeds")), with_kwargs=True)
    yield tokenizer, model, processor, seen


def _generate(tiny, images):
    from llava_agile.assets import tiny_prompt

    tokenizer, model, _, seen = tiny
    ids = tiny_prompt(tokenizer).repeat(len(images), 1)
    seen.clear()
    with torch.inference_mode():
        model.generate(ids, images=images, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=1, use_cache=True)
    return seen[0], int((ids[0] == -200).nonzero())


def _eager(model, images):
    """Layer -2 of the tower run eagerly: patch features, head-mean [CLS] row, head-mean keys,
    the [CLS] hidden state."""
    clip_model = model.get_vision_tower().vision_tower
    attn_mod = clip_model.vision_model.encoder.layers[-2].self_attn
    got = []
    handle = attn_mod.k_proj.register_forward_hook(lambda m, i, o: got.append(o))
    impl = getattr(clip_model.config, "_attn_implementation", None)
    clip_model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = clip_model(images, output_attentions=True, output_hidden_states=True)
    finally:
        clip_model.config._attn_implementation = impl
        handle.remove()
    (k_out,) = got                                  # one call of layer -2's k_proj
    b, t, _ = k_out.shape
    keys = k_out.view(b, t, attn_mod.num_heads, -1).mean(2)[:, 1:]
    h = out.hidden_states[-2]
    return h[:, 1:], out.attentions[-2][:, :, 0, 1:].mean(1), keys, h[:, 0]


def test_llava_runtime_uses_layer_minus_2_keys_and_feeds_k_tokens(tiny):
    import llava_agile
    from llava.mm_utils import process_images
    from llava_agile.assets import tiny_image

    _, model, processor, _ = tiny
    # two clear cases (checked below): their closest target choice (4e-4) and dominant-token
    # boundary (8e-2 relative) stay far from a tie with every CPU kernel set tried, whose own
    # float32 forward moves such gaps by up to 2e-5 (targets) and 5e-4 (relative, attention)
    images = process_images([tiny_image(10), tiny_image(7, kind="noise")], processor,
                            model.config)
    full, start = _generate(tiny, images)
    clip, attn, keys, cls = _eager(model, images)
    n = clip.shape[1]
    assert full.shape[1] > n
    block = model.get_vision_tower().vision_tower.vision_model.encoder.layers[-2]
    hooks = len(block._forward_hooks)
    llava_agile.enable(model, "visionzip", 64)
    assert len(block._forward_hooks) == hooks + 1        # the [CLS] output of the select block
    try:
        assert model.agile_config.feature_space == "vision"
        assert model._agile_state.hook.with_keys
        pruned, _ = _generate(tiny, images)
        recorded = model._agile_state.keys
        recorded_cls = model._agile_state.cls
        stats = model.agile_stats
        as_list, _ = _generate(tiny, list(images))   # LLaVA's list path: keys split per image
    finally:
        llava_agile.disable(model)
    assert len(block._forward_hooks) == hooks            # disable removed it
    # the hook's keys are layer -2's k_proj output, head-averaged, patches only
    torch.testing.assert_close(recorded, keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recorded_cls, cls)          # hidden_states[-2][:, 0]
    assert pruned.shape[1] == full.shape[1] - (n - 64)     # K = 64 tokens per image
    torch.testing.assert_close(as_list, pruned)
    projector = model.get_model().mm_projector
    for b in range(2):
        st = stats[b]
        assert st["kept"] == st["tokens"] == 64 and st["contextual"] == 10
        ref, info = bf.visionzip(clip[b].double().numpy(), attn[b].double().numpy(), 64,
                                 keys=keys[b].double().numpy(), cls_token=cls[b].double().numpy())
        # a clear case: float32 (the hook, the method) decides it as float64 does. Targets: the
        # float32 cosine of 16-d unit keys rounds by < 20 u = 1.2e-6 in any summation order,
        # far below a 1e-4 gap. Dominant tokens: the hook's row differs from this eager row by
        # round-off (< 1e-5 relative, measured 9.5e-6), far below a 5e-3 relative gap
        top = attn[b].double().sort(descending=True).values
        assert info["margin"] > 1e-4 and top[52] - top[53] > 5e-3 * top[52], \
            (info["margin"], top[52:54])
        assert len(st["attention_indices"]) == 53             # + [CLS] = 54 dominant
        assert st["attention_indices"] == info["attention_indices"]
        assert st["target_indices"] == info["target_indices"]
        with torch.no_grad():
            want = projector(torch.from_numpy(ref).float())
        torch.testing.assert_close(pruned[b, start:start + 64], want, rtol=1e-4, atol=1e-5)
    # feature_space="projected" (ours, not the official): merges projected tokens; [CLS] projected
    llava_agile.enable(model, "visionzip", 64, feature_space="projected")
    try:
        proj_run, _ = _generate(tiny, images)
    finally:
        llava_agile.disable(model)
    assert proj_run.shape == pruned.shape
    with torch.no_grad():
        torch.testing.assert_close(proj_run[:, start], projector(cls), rtol=1e-5, atol=1e-6)
    # the LLaVA-NeXT refusal covers visionzip too (a merged token has no grid position)
    model.config.image_aspect_ratio, saved = "anyres", model.config.image_aspect_ratio
    try:
        with pytest.raises(ValueError, match="'visionzip' merges tokens"):
            llava_agile.enable(model, "visionzip", 64)
    finally:
        model.config.image_aspect_ratio = saved
    with pytest.raises(ValueError, match="keys is set by the LLaVA integration"):
        llava_agile.enable(model, "visionzip", 64, keys=torch.zeros(1))
