"""Record what the official pre-LLM selection code returns on fixed inputs (golden files).

    .venv/bin/python tests/official/record_selection.py --holov HOLOV --cdpruner CDPRUNER \
        --trim TRIM --prumerge LLAVA_PRUMERGE [--out tests/official/golden]

Each path is a checkout of the official repository; its commit is recorded in the golden file:
- obananas/HoloV: `HoloV` of `llava/model/utils.py`, called as `llava_arch.py` calls it (features
  `[1, N, D]`, head-mean [CLS] attention `[1, N]`, `num_patches`, `new_image_token_num`), unchanged.
- Theia-4869/CDPruner: `LlavaMetaForCausalLM.encode_images` of `llava/model/llava_arch.py`,
  unchanged, on a stand-in model whose vision tower returns the case's (features, CLIP patch
  embeddings, text embeddings) and whose projector is the identity; float64 default dtype (its
  `cis` buffer), its similarity in float32 as written (`.float()`).
- FreedomIntelligence/TRIM: `CLIPVisionTower.token_reduction` of
  `llava/model/multimodal_encoder/clip_encoder.py`, unchanged, on a stand-in tower whose
  `post_layernorm` and `visual_projection` are the identity (so the case's features are their own
  joint-space embeddings), float64 (neither of its fp16 / fp32 casts applies), gradients off.
- 42Shawn/LLaVA-PruMerge: `CLIPVisionTower.token_prune_merge_advanced_plus` of
  `llava/model/multimodal_encoder/clip_encoder.py`, unchanged (adaptive, as its `forward` calls
  it), on a stand-in tower whose forward returns the case's hidden states and whose layer 23
  `q_proj` / `k_proj` return the case's q / k (so its hooks record them), float64.
Each method runs in a process of its own (the official repositories are `llava` packages).
The inputs come from `selection_cases.py` (float64, numpy-drawn). An output row is recorded as
the input token it equals (-1: a zero row); PruMerge+'s merged rows by their fingerprint (their
projections on two fixed directions).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import selection_cases as C  # noqa: E402


def commit(path):
    return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows_to_indices(out: torch.Tensor, x: torch.Tensor) -> list[int]:
    """Which token of `x` each output row is (-1 for an all-zero row); every row must match."""
    idx = []
    for row in out:
        if not row.any():
            idx.append(-1)
            continue
        hit = (x == row).all(dim=1).nonzero().flatten()
        assert hit.numel() == 1, "an output row is no input token"
        idx.append(int(hit))
    return idx


def record_holov(path):
    mod = load("holov_utils", os.path.join(path, "llava/model/utils.py"))
    cases = []
    for seed, n, d, k, chunks, attention in C.HOLOV:
        x, a = C.holov_inputs(seed, n, d, attention)
        out = mod.HoloV(x[None], a[None], num_patches=chunks, new_image_token_num=k)[0]
        cases.append(dict(seed=seed, n=n, d=d, keep=k, chunks=chunks, attention=attention,
                          rows=rows_to_indices(out, x)))
    return {"commit": commit(path), "function": "llava/model/utils.py::HoloV", "cases": cases}


def record_cdpruner(path):
    sys.path.insert(0, path)  # the official `llava` package, not the installed one
    from llava.model.llava_arch import LlavaMetaForCausalLM

    torch.set_default_dtype(torch.float64)
    cases = []
    for seed, b, n, d, e, m, k in C.CDPRUNER:
        x, image, text = C.cdpruner_inputs(seed, b, n, d, e, m)

        class Inner(torch.nn.Module):
            mm_projector = torch.nn.Identity()

            def get_vision_tower(self):
                return lambda images, texts=None: (x, image, text)

        class Stub(LlavaMetaForCausalLM):
            visual_token_num = k

            def get_model(self):
                return Inner()

        _, masks = Stub().encode_images(None, texts="unused: the tower stand-in ignores it")
        cases.append(dict(seed=seed, b=b, n=n, d=d, e=e, m=m, keep=k,
                          indices=[mk.nonzero().flatten().tolist() for mk in masks]))
    return {"commit": commit(path), "function": "llava/model/llava_arch.py::encode_images",
            "cases": cases}


def record_trim(path):
    from types import SimpleNamespace

    mod = load("trim_clip_encoder",
               os.path.join(path, "llava/model/multimodal_encoder/clip_encoder.py"))
    torch.set_grad_enabled(False)  # it calls .numpy()
    same = lambda t: t  # noqa: E731
    cases = []
    for seed, b, n, d, func in C.TRIM:
        x, text = C.trim_inputs(seed, b, n, d)
        stub = SimpleNamespace(token_reduce_func=func, vision_tower=SimpleNamespace(
            vision_model=SimpleNamespace(post_layernorm=same), visual_projection=same))
        out, dims = mod.CLIPVisionTower.token_reduction(stub, x, None, text)
        kept = dims[0] - 1
        cases.append(dict(seed=seed, b=b, n=n, d=d, func=func, kept=kept,
                          indices=[rows_to_indices(out[i, :kept], x[i]) for i in range(b)],
                          mean=[out[i, kept].tolist() for i in range(b)],
                          zero_after=bool((out[:, kept + 1:] == 0).all())))
    return {"commit": commit(path), "function": "llava/model/multimodal_encoder/clip_encoder.py"
            "::CLIPVisionTower.token_reduction", "cases": cases}


def record_prumerge(path):
    from types import SimpleNamespace

    mod = load("prumerge_clip_encoder",
               os.path.join(path, "llava/model/multimodal_encoder/clip_encoder.py"))
    torch.set_grad_enabled(False)

    class Const(torch.nn.Module):
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, _):
            return self.t

    cases = []
    for seed, d, lean, strength, scale in C.PRUMERGE:
        hidden, q, k = C.prumerge_inputs(seed, d, lean, strength, scale)
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        layer.self_attn.q_proj, layer.self_attn.k_proj = Const(q), Const(k)

        class Tower(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.vision_model = SimpleNamespace(encoder=SimpleNamespace(
                    layers=[None] * 23 + [layer]))

            def forward(self, images, output_hidden_states=True):
                layer.self_attn.q_proj(None), layer.self_attn.k_proj(None)  # the hooks fire
                return SimpleNamespace(hidden_states=[None] * 23 + [hidden, None])

        stub = SimpleNamespace(vision_tower=Tower(), device=torch.device("cpu"),
                               dtype=torch.float64, select_layer=-2, select_feature="patch")
        stub.feature_select = lambda outs: mod.CLIPVisionTower.feature_select(stub, outs)
        out = mod.CLIPVisionTower.token_prune_merge_advanced_plus(
            stub, torch.zeros(1, 3, 2, 2, dtype=torch.float64))[0]
        cases.append(dict(seed=seed, d=d, lean=lean, strength=strength, scale=scale,
                          rows=out.shape[0], fingerprint=C.fingerprint(out).tolist()))
    return {"commit": commit(path), "function": "llava/model/multimodal_encoder/clip_encoder.py"
            "::CLIPVisionTower.token_prune_merge_advanced_plus", "cases": cases}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--holov", help="checkout of github:obananas/HoloV")
    ap.add_argument("--cdpruner", help="checkout of github:Theia-4869/CDPruner")
    ap.add_argument("--trim", help="checkout of github:FreedomIntelligence/TRIM")
    ap.add_argument("--prumerge", help="checkout of github:42Shawn/LLaVA-PruMerge")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "golden"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    recorders = {"holov": record_holov, "cdpruner": record_cdpruner, "trim": record_trim,
                 "prumerge": record_prumerge}
    todo = {name: getattr(args, name) for name in recorders if getattr(args, name)}
    if not todo:
        ap.error("give at least one checkout (--holov ...)")
    os.makedirs(args.out, exist_ok=True)
    if len(todo) > 1:  # one process per official repository
        for name, path in todo.items():
            subprocess.run([sys.executable, __file__, f"--{name}", path, "--out", args.out],
                           check=True)
        return
    for name, path in todo.items():
        data = recorders[name](path)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)
        print(f"{name}: {len(data['cases'])} cases from {data['commit'][:8]}")


if __name__ == "__main__":
    main()
