"""Record what the official FastV, PyramidDrop and DART code keeps on the tiny model (golden files).

    .venv/bin/python tests/inllm/record_official.py --fastv FASTV --pdrop PYRAMIDDROP \
        --dart VTC_BENCH [--out tests/inllm/golden]

Each path is a checkout of the official repository (commits in docs/in_llm.md):
pkunlp-icler/FastV (`src/FastV/lmms-eval/fastv_kvcache.py`), Cooperx521/PyramidDrop
(`llava/model/modeling_llama_pdrop.py`) and Chenfei-Liao/VTC-Bench, whose `external/DART/` holds
DART's LLaVA code (`llava/model/language_model/modeling_llama_self.py`). They run unchanged in
transformers 4.37.2 (this project's .venv) in float64, except:
- FastV's K and ratio are constants in its source (its README says to edit lines 119-120): the
  source is read and those two lines substituted before it runs;
- FastV's README step 5 edits transformers so that rotary tables reach the largest kept position
  (`seq_len=position_ids.max().item() + 1`); here `LlamaRotaryEmbedding.forward` returns the
  whole (identical) table instead;
- DART imports `einops` without using it on this path: a stub is provided when it is missing;
- PyramidDrop builds its scoring mask with `torch.full(..., finfo(dtype).min)` in the default
  dtype, which overflows float32 for a float64 model: its run uses float64 as default dtype.
Recorded per case: the kept original positions at each pruning layer, the last prompt token's
final hidden state (checks positions and masks after pruning) and 4 greedy tokens decoded with the
KV cache (logits = h @ embedᵀ) with each step's final hidden state (decode positions and caches).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_llm as T  # noqa: E402

FASTV_CASES = [dict(layer=3, keep=288, source_as_is=True), dict(layer=2, keep=72)]
DART_CASES = [dict(layer=2, max_num_trunction=128), dict(layer=2, max_num_trunction=64),
              dict(layer=3, max_num_trunction=128, pivot_image=2, pivot_text=6)]
PDROP_CASES = [dict(layers=[2, 3, 4], ratios=[0.5, 0.25, 0.125]),
               dict(layers=[1, 4], ratios=[0.3, 0.1])]


def _commit(path):
    return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


def _load(name, path, package_dir=None):
    if package_dir:
        pkg = types.ModuleType(name.rsplit(".", 1)[0])
        pkg.__path__ = [package_dir]
        sys.modules[pkg.__name__] = pkg
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _whole_rope_table():
    from transformers.models.llama import modeling_llama as ml
    orig = ml.LlamaRotaryEmbedding.forward

    def forward(self, x, seq_len=None):
        return orig(self, x, seq_len=max(seq_len, self.max_seq_len_cached))
    ml.LlamaRotaryEmbedding.forward = forward


def _run(model, call, embed, x, layers):
    seen, handles = T.record_layers(model)
    with torch.no_grad():
        out = call(inputs_embeds=x, use_cache=True)
    kept = T.kept_positions(seen, layers)
    for h in handles:
        h.remove()
    cache = [out[1]]
    last = out[0][0, -1]

    def step(e):
        o = call(inputs_embeds=e, past_key_values=cache[0], use_cache=True)
        cache[0] = o[1]
        return o[0][0, -1]
    with torch.no_grad():
        tokens, hidden = T.greedy(step, last, embed)
    return dict(kept={str(k): v for k, v in kept.items()}, last_hidden=last.tolist(),
                tokens=tokens, decode_hidden=[h.tolist() for h in hidden])


def fastv(root, case, sd, x, embed):
    path = os.path.join(root, "src/FastV/lmms-eval/fastv_kvcache.py")
    src = open(path).read()
    if not case.get("source_as_is"):
        for old, new in (("K = 3", f"K = {case['layer']}"),
                         ("ratio = 0.5", f"ratio = {case['keep']} / 576")):
            assert src.count(old) == 1, old
            src = src.replace(old, new)
        assert int(576 * (case["keep"] / 576)) == case["keep"]
    mod = types.ModuleType("fastv_official")
    exec(compile(src, path, "exec"), mod.__dict__)
    model = mod.FastVLlamaModel(T.config()).double().eval()
    model.load_state_dict(sd)
    return _run(model, lambda **kw: model(**kw, return_dict=False), embed, x, 6)


def dart(root, case, sd, x, embed):
    d = os.path.join(root, "external/DART/llava/model/language_model")
    sys.modules.setdefault("einops", types.SimpleNamespace(rearrange=None))
    mod = _load("dart_official.modeling_llama_self", os.path.join(d, "modeling_llama_self.py"), d)
    cfg = mod.LlamaConfig(**T.config().to_dict())
    cfg._attn_implementation = "sdpa"
    cfg.DART_config = dict(K=case["layer"], image_token_start_index=T.PREFIX,
                           image_token_length=T.IMAGE, max_num_trunction=case["max_num_trunction"],
                           reduction_ratio=0.778, retain_token_num_for_llava_next=320,
                           pivot_image_token=case.get("pivot_image", 4),
                           pivot_text_token=case.get("pivot_text", 4))
    cfg.text_length = None
    model = mod.DART(cfg).double().eval()
    model.load_state_dict(sd)
    return _run(model, lambda **kw: model(**kw, return_dict=False), embed, x, 6)


def pdrop(root, case, sd, x, embed):
    mod = _load("pdrop_official", os.path.join(root, "llava/model/modeling_llama_pdrop.py"))
    model = mod.LlamaModel(T.config()).double().eval()
    model.load_state_dict(sd)
    model.layer_list = list(case["layers"])
    model.image_token_ratio_list = [1.0] + list(case["ratios"])
    model.image_token_posi = [T.PREFIX]
    model.prompt_len = [T.PREFIX + T.TEXT]   # len(input_ids) - 1: the <image> placeholder
    model.image_tokens = [T.IMAGE]
    torch.set_default_dtype(torch.float64)  # its causal mask: torch.full(finfo(dtype).min)
    try:
        return _run(model, lambda **kw: model.pdrop_forward(**kw, return_dict=False)[0], embed,
                    x, 6)
    finally:
        torch.set_default_dtype(torch.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fastv", required=True)
    ap.add_argument("--pdrop", required=True)
    ap.add_argument("--dart", required=True)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "golden"))
    args = ap.parse_args(argv)
    _whole_rope_table()
    sd = T.weights()
    x, embed = T.inputs()
    out = {"inputs": "tests/inllm/tiny_llm.py weights(0), inputs(0)", "float64": True}
    for name, fn, cases, root in (("fastv", fastv, FASTV_CASES, args.fastv),
                                  ("dart", dart, DART_CASES, args.dart),
                                  ("pdrop", pdrop, PDROP_CASES, args.pdrop)):
        out[name] = {"commit": _commit(root),
                     "cases": [dict(case=c, **fn(root, c, sd, x, embed)) for c in cases]}
        print(name, [(len(r["kept"]), r["tokens"]) for r in out[name]["cases"]])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "official.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
