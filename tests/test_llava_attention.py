"""The [CLS]-attention hook equals CLIP's eager `output_attentions` row (head mean, patches)."""
import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("llava")

from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

import llava_agile  # noqa: E402
from llava_agile.assets import build_tiny_llava, load_tiny, tiny_image, tiny_prompt  # noqa: E402
from llava_agile.llava.attention import (ClsAttentionHook, cls_attention_row,  # noqa: E402
                                         select_layer_index)
from llava.mm_utils import process_images  # noqa: E402


def eager_row(clip, x, layer):
    """The reference: eager attention with output_attentions (newer transformers default to SDPA,
    which returns no attentions)."""
    impl = getattr(clip.config, "_attn_implementation", None)
    clip.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = clip(x, output_attentions=True)
    finally:
        clip.config._attn_implementation = impl
    return out.attentions[layer][:, :, 0, 1:].mean(dim=1)


@pytest.mark.parametrize("layer", [-2, -1, 0, 2])
def test_hook_row_equals_eager_attention(layer):
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                           num_attention_heads=4, image_size=112, patch_size=14,
                           initializer_factor=4.0)
    clip = CLIPVisionModel(cfg).eval()
    x = torch.randn(3, 3, 112, 112)
    hook = ClsAttentionHook(clip.vision_model.encoder.layers[layer].self_attn)
    hook.start()
    with torch.no_grad():
        clip(x)
    got = hook.stop()
    hook.remove()
    want = eager_row(clip, x, layer)
    assert got.shape == (3, 64) and got.dtype == torch.float32
    assert (want.max(1).values > 2.0 / 65).all()  # not a uniform row: the test means something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the same from the module and its input directly
    h = torch.randn(2, 65, 64)
    attn = clip.vision_model.encoder.layers[layer].self_attn
    clip.config._attn_implementation = "eager"
    with torch.no_grad():
        _, w = attn(h, output_attentions=True)[:2]
    torch.testing.assert_close(cls_attention_row(attn, h), w[:, :, 0, 1:].mean(1),
                               rtol=0, atol=1e-6)


def test_select_layer_index():
    assert select_layer_index(-2, 24) == 22 and select_layer_index(-1, 24) == 23
    assert select_layer_index(5, 24) == 4 and select_layer_index(24, 24) == 23
    for bad in (0, 25, -25):
        with pytest.raises(ValueError, match="mm_vision_select_layer"):
            select_layer_index(bad, 24)


def test_llava_tower_keeps_its_fast_path_and_the_row_matches_eager(tmp_path, monkeypatch):
    tokenizer, model, processor, _ = load_tiny(build_tiny_llava(str(tmp_path)))
    x = process_images([tiny_image(0), tiny_image(1, kind="noise")], processor, model.config)
    clip = model.get_vision_tower().vision_tower
    calls = []
    forward = type(clip).forward

    def spy(self, *a, **k):
        calls.append(k.get("output_attentions"))
        return forward(self, *a, **k)

    monkeypatch.setattr(type(clip), "forward", spy)
    llava_agile.enable(model, "attention", 16)
    from llava_agile.llava.runtime import _tower
    with torch.no_grad():
        feats, row = _tower(model, model._agile_state, x)
        model.generate(tiny_prompt(tokenizer).repeat(2, 1), images=x, max_new_tokens=1,
                       do_sample=False)
    kept = [s["indices"] for s in model.agile_stats]
    llava_agile.disable(model)
    assert calls and all(not c for c in calls)  # never output_attentions=True
    monkeypatch.undo()
    want = eager_row(clip, x, -2)
    torch.testing.assert_close(row, want, rtol=0, atol=1e-5)
    assert feats.shape == (2, 576, 64)
    # method "attention" keeps the top-16 of the eager row, per image. The hook's row (which
    # the runtime ranks) is within 1e-5 of it (just checked): with the 16th and 17th largest
    # more than twice that apart, both rows have the same top 16 whatever the round-off
    top = want.sort(dim=1, descending=True).values
    assert (top[:, 15] - top[:, 16] > 2e-5).all(), top[:, 15:17]
    assert kept == torch.topk(want, 16, dim=1).indices.sort(dim=1).values.tolist()
