"""Reference run on the ORIGINAL LLaVA codebase (run with the project's .venv, transformers
4.37.2 + llava-torch), for the HF equivalence tests in this folder (not a test itself).

    .venv/bin/python tests/hf/orig_reference.py OUT_DIR

Builds the tiny random LLaVA-1.5 and LLaVA-NeXT (`llava_agile.assets.build_tiny_llava`) under
OUT_DIR, runs every method through `llava_agile.enable` (every anyres mode on NeXT; the in-LLM
methods of INLLM once per image) with greedy
decoding, in float64 and in float32 (LLaVA's builder loads float16 weights; both runs use those
values), and saves OUT_DIR/reference.pt: the pixel values LLaVA's preprocessing made, the prompt
ids (-200 = the image), and per dtype and run the kept indices, the LLM's prefill embeddings, the
greedy tokens with each step's logits margin (top 1 - top 2) and `agile_stats`.

float64 is where the HF tests compare token choices: there round-off cannot decide them (the
float32 runs' near-ties, e.g. VisPruner's similarity rounds on flat image regions, flip with the
CPU's kernels); the float32 runs check what float32 guarantees.
"""
import os
import sys

import torch

torch.set_num_threads(1)

DTYPES = {"float64": torch.float64, "float32": torch.float32}
KEEP = 24
NEW_TOKENS = 4
INLLM = [("fastv", KEEP, dict(layer=1)), ("dart", 28, dict(layer=1)),
         ("pdrop", KEEP, dict(layers=(1,))),
         ("sparsevlm", KEEP, dict(layers=(0,), schedule=(KEEP,)))]
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
            # LLaVA's tower casts its output to the images' dtype: give them the model's
            out = model.generate(ids, images=pixels.to(model.dtype), image_sizes=None if size is None else [size],
                                 attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, use_cache=True,
                                 output_scores=True, return_dict_in_generate=True)
    finally:
        handle.remove()
    stats = [dict(s) for s in getattr(model, "agile_stats", None) or []]
    # generate from inputs_embeds starts its output with the BOS it decoded from: drop it
    assert int(out.sequences[0, 0]) == tokenizer.bos_token_id
    top2 = torch.stack([s[0].double().topk(2).values for s in out.scores])
    runs[key] = {"embeds": seen[0][0].clone(), "tokens": out.sequences[0, 1:].clone(),
                 "margins": (top2[:, 0] - top2[:, 1]).tolist(), "stats": stats}
    return ids


def prompt_text(question="What is in this image?", conv_mode="vicuna_v1"):
    """The text `llava_agile.assets.tiny_prompt` tokenizes (LLaVA's template, one <image>)."""
    from llava.conversation import conv_templates

    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def main(out_dir):
    from llava_agile.assets import build_tiny_llava, load_tiny
    from llava_agile.assets.tiny import build_tiny_text_tower
    from llava_agile.llava import compat

    ref = {}
    for family, images in (("llava", IMAGES_15), ("llava_next", IMAGES_NEXT)):
        path = build_tiny_llava(os.path.join(out_dir, family), next=family == "llava_next")
        text = build_tiny_text_tower(os.path.join(path, "clip-vision"),
                                     os.path.join(out_dir, family, "clip-text"))
        tokenizer, model, processor, _ = load_tiny(path)
        compat.shim_generation(model)
        ref[family] = {"path": path, "keep": KEEP, "new_tokens": NEW_TOKENS,
                       "prompt": prompt_text(), "runs": {}, "text_tower": text}
        for name, dtype in DTYPES.items():
            model.to(dtype)
            run_family(model, tokenizer, processor, family, images, ref[family], name)
    torch.save(ref, os.path.join(out_dir, "reference.pt"))


def run_family(model, tokenizer, processor, family, images, ref, dtype_name):
    """Every run of one family in the model's current dtype -> ref["runs"][dtype_name]."""
    import llava_agile
    from llava.mm_utils import process_images
    from llava_agile.assets import tiny_image
    from llava_agile.methods import MERGING, TEXT

    runs, pix = {}, []
    modes = ("shared", "per_crop", "global") if family == "llava_next" else (None,)
    for i, spec in enumerate(images):
        img = tiny_image(**spec)
        x = process_images([img], processor, model.config)
        size = img.size if family == "llava_next" else None
        pix.append({"pixel_values": x.clone(), "size": img.size})
        ids = run_model(model, tokenizer, x, size, runs, (i, "unpatched", None))
        for method in llava_agile.methods.METHODS:   # before the LLM (in-LLM: below)
            if family == "llava_next" and method in MERGING:  # refused on NeXT
                continue
            for mode in modes:
                kw = {} if mode is None else {"anyres_mode": mode}
                if method in TEXT:  # cdpruner / trim: the question after the image
                    kw["text_tower"] = ref["text_tower"]
                llava_agile.enable(model, method, KEEP, **kw)
                try:
                    run_model(model, tokenizer, x, size, runs, (i, method, mode))
                finally:
                    llava_agile.disable(model)
        for method, keep, params in INLLM:   # inside the LLM (the tiny LLaMA has 2 layers)
            llava_agile.enable(model, method, keep, **params)
            try:
                run_model(model, tokenizer, x, size, runs, (i, method, None))
            finally:
                llava_agile.disable(model)
    # adaptive_count=True: erank_avg between the two images' eranks, so their K differ
    e = [runs[(i, "adaptive", modes[0])]["stats"][0]["erank"] for i in range(len(images))]
    avg = sum(e) / len(e)
    for i, p in enumerate(pix):
        llava_agile.enable(model, "adaptive", KEEP, adaptive_count=True, erank_avg=avg,
                           **({} if modes[0] is None else {"anyres_mode": modes[0]}))
        try:
            run_model(model, tokenizer, p["pixel_values"], p["size"] if family == "llava_next"
                      else None, runs, (i, "adaptive_count", modes[0]))
        finally:
            llava_agile.disable(model)
    ref.update(images=pix, input_ids=ids)  # pixels and prompt: the same for every dtype
    ref["runs"][dtype_name] = runs
    ref.setdefault("adaptive_count_erank_avg", {})[dtype_name] = avg

if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
