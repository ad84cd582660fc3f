"""HoloV and PruMerge+ in LLaVA's own model: the signals the official codes use, recomputed here
from the tiny tower's hidden states, give the same rows as the runtime's hooks."""
import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("llava")

import llava_agile  # noqa: E402
from llava_agile.assets import build_tiny_llava, load_tiny, tiny_image  # noqa: E402
from llava.mm_utils import process_images  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer, model, processor, _ = load_tiny(build_tiny_llava(str(tmp_path_factory.mktemp("m"))))
    return model, process_images([tiny_image(0)], processor, model.config)


def hidden_states(model, x):
    clip = model.get_vision_tower().vision_tower
    with torch.inference_mode():
        return clip(x, output_hidden_states=True).hidden_states


def test_prumerge_plus_scores_with_the_block_after_the_select_layer(tiny):
    model, x = tiny
    hs = hidden_states(model, x)[-2]  # the select layer's output, [CLS] first
    nxt = model.get_vision_tower().vision_tower.vision_model.encoder.layers[-1]
    with torch.inference_mode():
        h = nxt.layer_norm1(hs)
        q, k = nxt.self_attn.q_proj(h), nxt.self_attn.k_proj(h)  # the official hooks' outputs
        a = torch.softmax(q[:, :1] @ k.transpose(1, 2) * k.shape[-1] ** -0.5, -1)[:, 0, 1:]
        want = llava_agile.prune(hs[:, 1:], a, 24, "prumerge_plus", keys=k[:, 1:], count="iqr")
        llava_agile.enable(model, "prumerge_plus", 24, count="iqr")
        try:
            feats = model.encode_images(x)
        finally:
            llava_agile.disable(model)
        projected = model.get_model().mm_projector(want.features[0])  # merged CLIP features
    assert feats[0].shape == projected.shape
    torch.testing.assert_close(feats[0], projected, rtol=1e-5, atol=1e-5)


def test_holov_uses_the_projected_tokens_and_the_select_row(tiny):
    model, x = tiny
    from llava_agile.llava.attention import ClsAttentionHook, attention_module

    hook = ClsAttentionHook(attention_module(model.get_vision_tower()))
    hook.start()
    with torch.inference_mode():
        clip = model.get_vision_tower()(x)
    a = hook.stop()
    hook.remove()
    with torch.inference_mode():
        proj = model.get_model().mm_projector(clip)
        want = llava_agile.prune(proj, a, 20, "holov")
        llava_agile.enable(model, "holov", 20)
        try:
            feats = model.encode_images(x)
            st = model.agile_stats[0]
        finally:
            llava_agile.disable(model)
    assert st["attention_indices"] == want.stats[0]["attention_indices"]
    torch.testing.assert_close(feats[0], want.features[0])
