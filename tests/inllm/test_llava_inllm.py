"""FastV, PDrop, DART and SparseVLM on LLaVA's own model (transformers 4.37.2), through LLaVA's
unchanged generate: where the image sits, generation with the KV cache, batches, errors.

The tiny LLaVA runs in float64; every comparison of choices asserts its margins (greedy steps:
top-2 logit gaps; selections: the engine's cut-off gaps).
"""
import contextlib

import pytest
import torch

pytest.importorskip("llava")

import llava_agile  # noqa: E402
from llava_agile.assets import build_tiny_llava, load_tiny, tiny_image, tiny_prompt  # noqa: E402
from llava.mm_utils import process_images  # noqa: E402

N, LAYERS = 576, 4
CASES = [("fastv", 64, {}), ("fastv", 100, dict(layer=1)), ("dart", 68, {}),
         ("dart", 62, dict(layer=3, pivot_image=2, pivot_text=2)),
         ("pdrop", 64, dict(layers=(1, 2, 3))),
         ("pdrop", 1, dict(layers=(2, 3), ratios=(0.3, 0.05))),
         ("sparsevlm", 300, dict(layers=(0, 1, 2))),      # its "192" schedule, 300/200/110
         ("sparsevlm", 100, dict(layers=(1, 2), schedule=(100, 20)))]   # 15, 3 merged
BATCH = CASES[:6:2] + [CASES[5]] + CASES[6:]
LOGIT_GAP = 1e-6    # float64 model; its RMSNorm rounds to float32 (differences ~1e-7)
CUT_GAP = 1e-9      # selections: float32-softmax scores (ulp ~1e-10 at these sizes)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_llava(str(tmp_path_factory.mktemp("m")), llm_layers=LAYERS)
    tokenizer, model, processor, _ = load_tiny(path)
    return tokenizer, model.double(), processor


def pixels(tiny, *seeds):
    return process_images([tiny_image(s) for s in seeds], tiny[2], tiny[1].config).double()


def generate(model, ids, images, n=5, mask=None):
    with torch.inference_mode():
        out = model.generate(ids, images=images, attention_mask=mask if mask is not None else
                             torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             use_cache=True, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, -n:], torch.stack(out.scores, 1)


@contextlib.contextmanager
def float64_masks():
    """transformers 4.37 builds 4-D masks (padding, eager) with torch.full(finfo(dtype).min) in
    the default dtype, which overflows float32 for this float64 model."""
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(torch.float32)


def gaps(scores):
    top = scores.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def engine(model):
    return model._agile_state.engine


def clusters_decided(run):
    """SparseVLM: the DPC-kNN density noise (torch.rand * 1e-6, whose draws differ between a
    batch and its samples alone) cannot change a clustering (methods.dpc_knn's margins)."""
    return all(m.get("centre", 1) > 0 and m.get("assign", 1) > CUT_GAP
               for m in run.merge_margins)


@pytest.mark.parametrize("method,keep,params", CASES)
def test_layers_see_the_kept_tokens(tiny, method, keep, params):
    tokenizer, model, _ = tiny
    ids = tiny_prompt(tokenizer)
    lengths = []
    hooks = [layer.register_forward_hook(lambda m, a, out: lengths.append(out[0].shape[1]))
             for layer in model.get_model().layers]   # a layer's output: the tokens it saw
    llava_agile.enable(model, method, keep, **params)
    try:
        generate(model, ids, pixels(tiny, 0), n=1)
        st = model.agile_stats
        eng = engine(model)
        image_at = int((ids[0] == -200).nonzero()[0])
        assert eng.last.images == [[range(image_at, image_at + N)]]
        assert min(eng.last.margins) > CUT_GAP and clusters_decided(eng.last)
    finally:
        llava_agile.disable(model)
        for h in hooks:
            h.remove()
    text = ids.shape[1] - 1
    assert len(st) == 1 and st[0]["tokens"] == N
    counts = st[0]["layer_tokens"]
    assert [x - text for x in lengths[:LAYERS]] == counts   # what each layer really saw
    expect = llava_agile.inllm.layer_tokens(method, keep, eng.params, N, LAYERS)
    assert counts == expect and st[0]["avg_tokens"] == sum(expect) / LAYERS
    assert st[0]["kept"] == (keep if method != "pdrop" or params.get("ratios") is None
                             else int(N * params["ratios"][0]))
    assert st[0]["indices"] == sorted(st[0]["indices"]) and len(st[0]["indices"]) == st[0]["kept"]


@pytest.mark.parametrize("method,keep,params", CASES)
def test_cached_generation_equals_recomputing_with_the_prefill_choices(tiny, method, keep, params):
    """Greedy decoding with the KV cache = full forwards without cache that keep what each layer
    kept at prefill (decode positions: original ones for FastV / DART, renumbered for PDrop)."""
    tokenizer, model, _ = tiny
    ids, x = tiny_prompt(tokenizer), pixels(tiny, 1)
    llava_agile.enable(model, method, keep, **params)
    try:
        tokens, scores = generate(model, ids, x, n=5)
        seq = ids
        for step in range(5):
            engine(model).replay()
            with torch.inference_mode():
                logits = model(input_ids=seq, images=x, use_cache=False).logits[0, -1]
            torch.testing.assert_close(logits, scores[0, step], rtol=0, atol=1e-5)
            assert gaps(logits) > LOGIT_GAP
            assert int(logits.argmax()) == int(tokens[0, step])
            seq = torch.cat([seq, tokens[:, step:step + 1]], 1)
    finally:
        llava_agile.disable(model)


@pytest.mark.parametrize("method,keep,params", BATCH)
def test_batch_equals_single_samples(tiny, method, keep, params):
    """Left-padded batch: two prompts of different lengths with images, one text-only sample
    (not pruned; LLaVA still consumes an image slot for it): each row = that sample alone."""
    tokenizer, model, _ = tiny
    prompts = [tiny_prompt(tokenizer)[0], tiny_prompt(tokenizer, "How many dogs are on the left "
                                                             "of the red car?")[0],
               tokenizer("A chat. USER: Say one word. ASSISTANT:", return_tensors="pt").input_ids[0]]
    images = pixels(tiny, 2, 3, 4)
    L = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(L - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(L) >= L - len(p) for p in prompts]).long()
    model.config.tokenizer_padding_side = "left"
    llava_agile.enable(model, method, keep, **params)
    try:
        with float64_masks():
            tokens, scores = generate(model, ids, images, n=4, mask=mask)
            batch_stats = model.agile_stats
            assert clusters_decided(engine(model).last)
            single = []
            for b, p in enumerate(prompts):
                img = images[b:b + 1] if b < 2 else None
                single.append(generate(model, p[None], img, n=4))
                if b < 2:
                    assert model.agile_stats[0]["indices"] == batch_stats[b]["indices"]
    finally:
        llava_agile.disable(model)
        model.config.tokenizer_padding_side = "right"
    assert len(batch_stats) == 2
    for b, (t, s) in enumerate(single):
        torch.testing.assert_close(scores[b], s[0], rtol=0, atol=1e-5)
        decided = (gaps(s[0]) > LOGIT_GAP).all()
        assert decided and torch.equal(tokens[b], t[0])


def test_attention_row_equals_eager_attention_weights(tiny):
    """The engine computes the one attention row it needs from the layer's q and k; the LLM
    keeps SDPA. That row equals eager attention's weights (output_attentions)."""
    tokenizer, model, _ = tiny
    ids, x = tiny_prompt(tokenizer), pixels(tiny, 5)
    llm = model.get_model()
    with torch.inference_mode():
        _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            ids, None, None, None, None, x)
        with float64_masks():   # output_attentions: 4.37's SDPA layers fall back to eager
            eager = llm(inputs_embeds=embeds, output_attentions=True).attentions
        llava_agile.enable(model, "fastv", 64, layer=2)
        try:
            generate(model, ids, x, n=1)
            row = engine(model).last.saved[1][0]
        finally:
            llava_agile.disable(model)
    assert all(type(layer.self_attn).__name__ == "LlamaSdpaAttention" for layer in llm.layers)
    torch.testing.assert_close(row, eager[1][0, :, -1].mean(0), rtol=1e-6, atol=0)


def test_errors(tiny):
    tokenizer, model, _ = tiny
    with pytest.raises(ValueError, match="outside the model's 4 decoder layers"):
        llava_agile.enable(model, "fastv", 64, layer=4)
    with pytest.raises(ValueError, match="use 124 or 132"):
        llava_agile.enable(model, "dart", 128)
    with pytest.raises(ValueError, match="one kept fraction per layer"):
        llava_agile.enable(model, "pdrop", 64, ratios=(0.5, 0.25))
    with pytest.raises(ValueError, match="strictly increasing"):
        llava_agile.enable(model, "pdrop", 64, layers=(2, 1))
    with pytest.raises(ValueError, match="does not take parameter"):
        llava_agile.enable(model, "fastv", 64, pivots=3)
    with pytest.raises(ValueError, match="prunes inside the LLM"):
        llava_agile.select_tokens(torch.randn(10, 4), torch.rand(10), 3, method="fastv")
    assert not llava_agile.llava.runtime.is_enabled(model)
    ids, x = tiny_prompt(tokenizer), pixels(tiny, 0)
    llava_agile.enable(model, "fastv", 64)
    try:
        with pytest.raises(ValueError, match="computing a loss is not supported"):
            model(input_ids=ids, images=x, labels=ids)
        generate(model, ids, x, n=1)            # a budget larger than the image keeps it all:
        llava_agile.enable(model, "fastv", 1000)
        generate(model, ids, x, n=1)
        assert model.agile_stats[0]["kept"] == N
        with torch.inference_mode():            # text only: nothing to prune, nothing reported
            model.generate(tokenizer("USER: hi ASSISTANT:", return_tensors="pt").input_ids,
                           max_new_tokens=2, do_sample=False)
        assert model.agile_stats == []
    finally:
        llava_agile.disable(model)
    assert "forward" not in model.get_model().layers[0].__dict__   # disable undid the patch


def test_budget_conversion():
    from llava_agile.inllm import average_tokens, keep_for_average, layer_tokens
    fastv = dict(layer=2)
    assert keep_for_average("fastv", 64, fastv, 576, 32) == 29    # FasterVLM's "FastV, 29"
    assert average_tokens("fastv", 29, fastv, 576, 32) == (2 * 576 + 30 * 29) / 32
    dart = dict(layer=2, pivot_image=4, pivot_text=4)
    assert average_tokens("dart", 132, dart, 576, 32) == (2 * 576 + 30 * 132) / 32
    assert keep_for_average("dart", 160, dart, 576, 32) == 132
    pdrop = dict(layers=(8, 16, 24), ratios=None)
    assert layer_tokens("pdrop", 288, pdrop, 576, 32) == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert average_tokens("pdrop", 288, pdrop, 576, 32) == 270   # PDrop's default setting
    official = dict(layers=(8, 16, 24), ratios=(0.5, 0.25, 0.125))
    assert layer_tokens("pdrop", 1, official, 576, 32) == layer_tokens("pdrop", 288, pdrop, 576, 32)
