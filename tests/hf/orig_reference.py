"""Reference run on the ORIGINAL LLaVA codebase (run with the project's .venv, transformers
4.37.2 + llava-torch), for the HF equivalence tests in this folder (not a test itself).

    .venv/bin/python tests/hf/orig_reference.py OUT_DIR

Builds the tiny random LLaVA-1.5 and LLaVA-NeXT (`llava_agile.assets.build_tiny_llava`) under
OUT_DIR, runs every method through `llava_agile.enable` (every anyres mode on NeXT) with greedy
decoding, and saves OUT_DIR/reference.pt: the pixel values LLaVA's preprocessing made, the prompt
ids (-200 = the image), and per run the kept indices, the LLM's prefill embeddings, the greedy
tokens and `agile_stats`.
"""
import os
import sys

import torch

torch.set_num_threads(1)

KEEP = 24
NEW_TOKENS = 4
IMAGES_15 = [dict(seed=0, size=(336, 336), kind="shapes"), dict(seed=1, size=(336, 336), kind="noise")]
IMAGES_NEXT = [dict(seed=3, size=(500, 300), kind="shapes"), dict(seed=4, size=(640, 640), kind="noise")]


def run_model(model, tokenizer, pixels, size, runs, key):
    from llava_agile.assets import tiny_prompt

    ids = tiny_prompt(tokenizer)
    seen = []
    handle = model.get_model().register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("inputs_embeds")), with_kwargs=True)
    try:
        with torch.inference_mode():
            out = model.generate(ids, images=pixels, image_sizes=None if size is None else [size],
                                 attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, use_cache=True)
    finally:
        handle.remove()
    stats = [dict(s) for s in getattr(model, "agile_stats", None) or []]
    # generate from inputs_embeds starts its output with the BOS it decoded from: drop it
    assert int(out[0, 0]) == tokenizer.bos_token_id
    runs[key] = {"embeds": seen[0][0].clone(), "tokens": out[0, 1:].clone(), "stats": stats}
    return ids


def prompt_text(question="What is in this image?", conv_mode="vicuna_v1"):
    """The text `llava_agile.assets.tiny_prompt` tokenizes (LLaVA's template, one <image>)."""
    from llava.conversation import conv_templates

    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def main(out_dir):
    import llava_agile
    from llava.mm_utils import process_images
    from llava_agile.assets import build_tiny_llava, load_tiny, tiny_image
    from llava_agile.llava import compat
    from llava_agile.methods import MERGING

    ref = {}
    for family, images in (("llava", IMAGES_15), ("llava_next", IMAGES_NEXT)):
        path = build_tiny_llava(os.path.join(out_dir, family), next=family == "llava_next")
        tokenizer, model, processor, _ = load_tiny(path)
        compat.shim_generation(model)
        runs, pix = {}, []
        modes = ("shared", "per_crop", "global") if family == "llava_next" else (None,)
        for i, spec in enumerate(images):
            img = tiny_image(**spec)
            x = process_images([img], processor, model.config)
            size = img.size if family == "llava_next" else None
            pix.append({"pixel_values": x.clone(), "size": img.size})
            ids = run_model(model, tokenizer, x, size, runs, (i, "unpatched", None))
            for method in llava_agile.METHODS:
                if family == "llava_next" and method in MERGING:  # refused on NeXT
                    continue
                for mode in modes:
                    kw = {} if mode is None else {"anyres_mode": mode}
                    llava_agile.enable(model, method, KEEP, **kw)
                    try:
                        run_model(model, tokenizer, x, size, runs, (i, method, mode))
                    finally:
                        llava_agile.disable(model)
        # adaptive_count=True: erank_avg between the two images' eranks, so their K differ
        e = [runs[(i, "adaptive", modes[0])]["stats"][0]["erank"] for i in range(len(images))]
        avg = sum(e) / len(e)
        for i, p in enumerate(pix):
            llava_agile.enable(model, "adaptive", KEEP, adaptive_count=True, erank_avg=avg,
                               **({} if modes[0] is None else {"anyres_mode": modes[0]}))
            try:
                run_model(model, tokenizer, p["pixel_values"],
                          p["size"] if family == "llava_next" else None, runs,
                          (i, "adaptive_count", modes[0]))
            finally:
                llava_agile.disable(model)
        ref[family] = {"path": path, "images": pix, "input_ids": ids, "runs": runs,
                       "keep": KEEP, "new_tokens": NEW_TOKENS, "adaptive_count_erank_avg": avg,
                       "prompt": prompt_text()}
    torch.save(ref, os.path.join(out_dir, "reference.pt"))


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
