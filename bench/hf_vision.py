"""The vision step on transformers' CLIP tower: peers' way vs llava_agile's (issue 10).

peers: eager attention, `output_attentions=True` (every layer's attention maps are materialised
and returned), the select layer's [CLS] row from them, then FasterVLM's top-K;
ours:  SDPA (the tower's default) + `ClsAttentionHook` on the select layer (the [CLS] row
recomputed from that layer's own q/k), then the same top-K.
Both run `output_hidden_states=True` as transformers' LLaVA does; the selections must agree.
Towers: a random CLIP-L/336 (24 layers, 1024-d, 577 tokens) and the offline DINOv2 ViT-S/14
asset packed as a CLIP vision model (224 px; `python -m llava_agile.assets dinov2` under .venv).
Median of interleaved repeats, one thread unless --threads. Target: ours >= 1.2x on CPU for
CLIP-L/336 at batch 8 (docs/benchmarks.md).

    .venv-hf/bin/python bench/hf_vision.py                    # both towers, batch 8
    .venv-hf/bin/python bench/hf_vision.py --tower clip-l --repeats 5
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from llava_agile import select_tokens  # noqa: E402
from llava_agile.hf.model import encoder_layers  # noqa: E402
from llava_agile.llava.attention import ClsAttentionHook, select_layer_index  # noqa: E402

DINOV2 = os.path.join("out", "assets", "dinov2-vits14-clip-224")


def pair(config, state=None):
    """(eager model, SDPA model) with the same weights."""
    from transformers import CLIPVisionModel

    models = []
    for impl in ("eager", "sdpa"):  # one config each: the attention choice lives in the config
        m = CLIPVisionModel._from_config(copy.deepcopy(config), attn_implementation=impl).eval()
        assert m.config._attn_implementation == impl, (impl, m.config._attn_implementation)
        models.append(m)
    eager, sdpa = models
    if state is not None:
        eager.load_state_dict(state, strict=False)
    sdpa.load_state_dict(eager.state_dict())
    return eager, sdpa


def clip_l():
    from transformers import CLIPVisionConfig

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=336, patch_size=14,
                           hidden_act="quick_gelu", projection_dim=768)
    return pair(cfg)


def dinov2(path):
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig

    cfg = CLIPVisionConfig.from_pretrained(path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    eager, sdpa = pair(cfg)
    for model in (eager, sdpa):
        owner = getattr(model, "vision_model", model)   # 4.x nests vision_model, 5.x does not
        prefix = "vision_model." if owner is not model else ""
        state = {k[len("vision_model."):] if not prefix and k.startswith("vision_model.") else k: v
                 for k, v in weights.items() if "pre_layrnorm" not in k}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all("pre_layrnorm" in k for k in missing), (missing, unexpected)
        owner.pre_layrnorm = torch.nn.Identity()  # DINOv2 has no pre-encoder LayerNorm
    return eager, sdpa


def peers(model, x, layer, keep):
    out = model(pixel_values=x, output_attentions=True, output_hidden_states=True)
    attn = out.attentions[layer][:, :, 0, 1:].mean(1)
    feats = out.hidden_states[layer][:, 1:]
    return select_tokens(feats, attn, keep, "attention")


def ours(model, hook, x, layer, keep):
    hook.start()
    try:
        out = model(pixel_values=x, output_hidden_states=True)
    finally:
        attn = hook.stop()
    return select_tokens(out.hidden_states[layer][:, 1:], attn, keep, "attention")


def bench(name, eager, sdpa, batch, repeats, keep, layer=-2):
    size = sdpa.config.image_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    layers = encoder_layers(sdpa)
    hook = ClsAttentionHook(layers[select_layer_index(layer, len(layers))].self_attn)
    times = {"peers": [], "ours": []}
    with torch.inference_mode():
        a, b = peers(eager, x, layer, keep), ours(sdpa, hook, x, layer, keep)  # warm-up + check
        same = bool(torch.equal(a, b))
        for _ in range(repeats):
            for key, fn in (("peers", lambda: peers(eager, x, layer, keep)),
                            ("ours", lambda: ours(sdpa, hook, x, layer, keep))):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    hook.remove()
    p, o = statistics.median(times["peers"]), statistics.median(times["ours"])
    res = {"tower": name, "batch": batch, "tokens": (size // sdpa.config.patch_size) ** 2,
           "keep": keep, "repeats": repeats,
           "peers_s": p, "ours_s": o, "speedup": p / o, "same_selection": same}
    print(f"{name:>12} batch {batch}: peers (eager + output_attentions) {p:.3f} s, "
          f"ours (SDPA + hook) {o:.3f} s, speedup {p / o:.2f}x, same selection: {same}",
          flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tower", choices=("clip-l", "dinov2", "both"), default="both")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dinov2", default=DINOV2, help=f"converted DINOv2 folder (default {DINOV2})")
    ap.add_argument("--out", default=os.path.join("out", "hf_vision.json"))
    args = ap.parse_args(argv)
    import transformers

    torch.set_num_threads(args.threads)
    results = []
    if args.tower in ("dinov2", "both"):
        if os.path.isfile(os.path.join(args.dinov2, "config.json")):
            results.append(bench("dinov2-224", *dinov2(args.dinov2), args.batch, args.repeats,
                                 args.keep))
        else:
            print(f"no DINOv2 folder at {args.dinov2}: build it with `.venv/bin/python -m "
                  f"llava_agile.assets dinov2 --no-llava` (skipped)", file=sys.stderr)
    if args.tower in ("clip-l", "both"):
        results.append(bench("clip-l-336", *clip_l(), args.batch, args.repeats, args.keep))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "threads": args.threads, "results": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
