"""LLaVA-NeXT (anyres + spatial_unpad) on a tiny random model: shared / per_crop / global."""
import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("llava")

import llava_agile  # noqa: E402
from llava_agile.assets import build_tiny_llava, load_tiny, tiny_image, tiny_prompt  # noqa: E402
from llava_agile.llava import compat  # noqa: E402
from llava.mm_utils import process_images  # noqa: E402

N = 576
MODES = ("shared", "per_crop", "global")


@pytest.fixture(scope="module")
def nxt(tmp_path_factory):
    tokenizer, model, processor, _ = load_tiny(
        build_tiny_llava(str(tmp_path_factory.mktemp("n")), next=True))
    compat.shim_generation(model)  # plain LLaVA on transformers 4.38+ (no-op on 4.37)
    seen = []
    model.get_model().register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("inputs_embeds")), with_kwargs=True)
    yield tokenizer, model, processor, seen
    llava_agile.disable(model)


def run(nxt, imgs):
    tokenizer, model, processor, seen = nxt
    x = process_images(imgs, processor, model.config)
    ids = tiny_prompt(tokenizer).repeat(len(imgs), 1)
    seen.clear()
    with torch.inference_mode():
        model.generate(ids, images=x, image_sizes=[i.size for i in imgs], do_sample=False,
                       attention_mask=torch.ones_like(ids), max_new_tokens=1, use_cache=True)
    start = int((ids[0] == -200).nonzero())
    return seen[0], start, ids.shape[1] - 1


def llava_order(nxt, img):
    """LLaVA's own merge applied to position codes: 1 + crop * N + patch per token, 0 = newline."""
    tokenizer, model, processor, _ = nxt
    x = process_images([img], processor, model.config)
    n = x.shape[1]
    codes = torch.zeros(n, N, model.config.hidden_size)
    codes[..., 0] = torch.arange(1, n * N + 1, dtype=torch.float32).view(n, N)
    newline = model.get_model().image_newline
    saved = newline.data.clone()
    newline.data.zero_()
    model.encode_images = lambda images: codes
    try:
        ids = tiny_prompt(tokenizer)
        emb = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, x,
                                                         image_sizes=[img.size])[4]
    finally:
        del model.encode_images
        newline.data.copy_(saved)
    start = int((ids[0] == -200).nonzero())
    return emb[0, start:start + emb.shape[1] - (ids.shape[1] - 1), 0].round().long(), n


def is_newline(model, tokens):
    return (tokens == model.get_model().image_newline.detach()).all(dim=-1)


def test_method_none_reproduces_llava_exactly(nxt):
    model = nxt[1]
    for img in (tiny_image(0, (500, 300)), tiny_image(1, (300, 700), kind="noise")):
        full, _, _ = run(nxt, [img])
        llava_agile.enable(model, "none", 64, anyres_mode="per_crop")
        same, _, _ = run(nxt, [img])
        llava_agile.disable(model)
        assert torch.equal(full, same)


@pytest.mark.parametrize("mode,space", [("shared", "projected"), ("per_crop", "projected"),
                                        ("global", "projected"), ("shared", "vision"),
                                        ("global", "vision")])
def test_square_image_counts(nxt, mode, space):
    """640x640: 2x2 high-res crops, nothing unpadded: exact counts, all 48 newlines kept."""
    model = nxt[1]
    img = tiny_image(2, (640, 640))
    full, start, text = run(nxt, [img])
    llava_agile.enable(model, "adaptive", 32, anyres_mode=mode, feature_space=space)
    emb, _, _ = run(nxt, [img])
    (st,) = model.agile_stats
    llava_agile.disable(model)
    assert st["crops"] == 5 and st["mode"] == mode and st["newlines"] == 48
    kept = 32 if mode == "global" else 5 * 32
    assert st["kept"] == kept and full.shape[1] - emb.shape[1] == 5 * N - kept
    assert int(is_newline(model, emb[0]).sum()) == 48 == int(is_newline(model, full[0]).sum())
    counts = [len(i) for i in st["indices"]]
    if mode == "shared":
        assert counts == [32] * 5 and all(i == st["indices"][0] for i in st["indices"])
    elif mode == "per_crop":
        assert counts == [32] * 5 and len(st["crop_stats"]) == 5
    else:
        assert sum(counts) == 32


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(500, 300), (300, 700)])
def test_padded_image_keeps_llava_order_unpad_and_newlines(nxt, mode, size):
    """The pruned sequence is LLaVA's full sequence restricted to the kept positions."""
    model = nxt[1]
    img = tiny_image(3, size)
    order, n = llava_order(nxt, img)
    full, start, text = run(nxt, [img])
    assert full.shape[1] == text + order.numel() and n >= 3
    llava_agile.enable(model, "adaptive", 40, anyres_mode=mode)
    emb, _, _ = run(nxt, [img])
    (st,) = model.agile_stats
    llava_agile.disable(model)
    fed = torch.zeros(n, N, dtype=torch.bool)
    for c, idx in enumerate(st["indices"]):
        fed[c, idx] = True
    keep = (order == 0) | fed.flatten()[(order - 1).clamp_min(0)]
    assert int(keep.sum()) - int((order == 0).sum()) == st["kept"] == int(fed.sum())
    assert emb.shape[1] == text + int(keep.sum()) == text + st["tokens"]
    want = full[0, start:start + order.numel()][keep]
    torch.testing.assert_close(emb[0, start:start + want.shape[0]], want, rtol=1e-5, atol=1e-6)
    assert st["newlines"] == int((order == 0).sum()) > 0
    base = st["indices"][0]
    if mode == "global":
        assert st["kept"] == 40
    else:
        assert len(base) == 40 and all(len(i) <= 40 for i in st["indices"])
    if mode == "shared":
        assert all(set(i) <= set(base) for i in st["indices"][1:])


def test_batch_of_two_next_images_with_different_crop_counts(nxt):
    from llava_agile.llava.runtime import _tower

    model = nxt[1]
    a, b = tiny_image(4, (640, 640)), tiny_image(5, (500, 300), kind="noise")
    llava_agile.enable(model, "attention", 16, anyres_mode="shared")
    singles = []
    for img in (a, b):
        run(nxt, [img])
        singles.append(model.agile_stats[0])
        # the batch's tower call (8 crops, not 5 or 3) rounds the [CLS] rows differently (~1e-5
        # relative): the base crop's 16th and 17th largest attention must be far more apart
        # than that (>= 5e-4 relative) for the top-16 to be the same whatever the round-off
        x = process_images([img], nxt[2], model.config)
        with torch.no_grad():
            _, row = _tower(model, model._agile_state, x[0] if x.dim() == 5 else x)
        top = row[0].sort(descending=True).values
        assert top[15] - top[16] > 5e-4 * top[15], top[15:17]
    emb, start, text = run(nxt, [a, b])
    stats = model.agile_stats
    llava_agile.disable(model)
    assert [s["crops"] for s in stats] == [5, 3]
    assert [s["indices"] for s in stats] == [s["indices"] for s in singles]
    assert emb.shape[1] == text + max(s["tokens"] for s in stats)


def test_merging_method_is_refused_on_next(nxt):
    with pytest.raises(ValueError, match="merges tokens"):
        llava_agile.enable(nxt[1], "bat", 16)
    assert "_agile_state" not in nxt[1].__dict__
