"""Record what the official SparseVLM code (v1.5 / ICML'25) does on the tiny model (golden file).

    .venv/bin/python tests/inllm/record_sparsevlm.py SPARSEVLMS [--out tests/inllm/golden]

SPARSEVLMS is a checkout of Gumpest/SparseVLMs at 734d9003879689713a132b83297dfad060a5c9af (branch
`v1.5`). Its `llava/model/language_model/modelling_sparse_llama.py` (`LlamaDynamicvitModel`, with
`score.py` and `utils.py` beside it) runs UNCHANGED in transformers 4.37.2 (this project's .venv) in
float64 on `tiny_llm`'s weights and prompt (35 prompt tokens, 576 image tokens, 20 text tokens),
with a 32-layer tiny LLaMA (as LLaVA-1.5-7B) so that its own pruning layers (2, 6, 15) and its
own schedules (`score.sparse_token_dict`: 192: 300/200/110, 128: 303/110/36, 64: 66/30/17) apply
unscaled (the FastV / PDrop / DART recordings scale their layers to a 6-layer model instead).

What is not the official setting, and why:
- its code needs CUDA. Stubbed for the run only: `flash_attn_func` (every layer's attention, from
  transformers' `LlamaFlashAttention2`) -> `torch.nn.functional.scaled_dot_product_attention`
  with flash-attn's causal layout (bottom-right aligned; here the prefill is square and a decode
  step's single query sees every key); `Tensor.cuda()` -> identity (its decode positions);
  `torch.cuda.Event` / `torch.cuda.synchronize` -> no-ops (its timing);
- `einops` (not installed here) -> a stub of the two `rearrange` patterns `cluster_and_merge`
  uses (`b l r -> b l () r`, `b l r -> b () l r`: an inserted axis);
- its builder (`llava/model/builder.py`) gives every layer a `flash_attn` module, a copy of
  `self_attn`'s weights cast `.half()`; here the copy stays float64 like the whole model;
- float64, not float16: round-off cannot decide a choice (the tests assert the margins);
- the global RNG is seeded (`SEED`) just before the prefill: `cluster_and_merge` adds
  `torch.rand(...) * 1e-6` to its densities (on CUDA's RNG in the original).
The model is called as LLaVA's `generate` + its `greedy_search` call it: the prefill with an
all-ones 2-D mask (which SDPA mask preparation turns into None, as its scoring path asserts),
`pre_prompt_length_list=[35]`, `image_shape=576`, `retained_tokens`; decoding with an all-ones
mask of layer 0's cache length + 1.

Two official functions are spied on (wrapped: called unchanged, arguments and results recorded):
`attn_postprocess_topk` (the raters, each stage's scores `relation_vis_text` and the kept visual
tokens) and `cluster_and_merge` (each stage's merged tokens). Recorded per case: per pruning layer
the sequence the next layer sees, as sources (an original position, or "m<stage>.<j>" for the
j-th merged token of stage <stage>), the scores, the raters, the merge inputs (sources, topk
order) and merged rows; the last prompt token's final hidden state and 4 greedy tokens decoded
with the KV cache (logits = h @ embedᵀ) with each step's final hidden state.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_llm as T  # noqa: E402
from record_official import _commit, _load  # noqa: E402

LAYERS = 32          # as LLaVA-1.5-7B: the official pruning layers 2, 6, 15 apply unscaled
SEED = 0
CASES = [dict(retained_tokens=192), dict(retained_tokens=128), dict(retained_tokens=64)]


def _sdpa_as_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
    """flash_attn_func's contract ([B, L, H, d] in and out; causal = bottom-right aligned)."""
    assert dropout_p == 0.0 and not kw, (dropout_p, kw)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = None
    if causal and q.shape[2] > 1:
        lq, lk = q.shape[2], k.shape[2]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2)


class _Event:
    def __init__(self, *a, **kw):
        pass

    def record(self, *a):
        pass

    def elapsed_time(self, other):
        return 0.0


@contextlib.contextmanager
def _cpu_stubs():
    from transformers.models.llama import modeling_llama as ml
    saved = [(ml, "flash_attn_func", getattr(ml, "flash_attn_func", None)),
             (torch.Tensor, "cuda", torch.Tensor.cuda),
             (torch.cuda, "Event", torch.cuda.Event),
             (torch.cuda, "synchronize", torch.cuda.synchronize)]
    ml.flash_attn_func = _sdpa_as_flash
    torch.Tensor.cuda = lambda self, *a, **kw: self
    torch.cuda.Event = _Event
    torch.cuda.synchronize = lambda *a, **kw: None
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _einops_stub():
    def rearrange(x, pattern):
        if pattern == "b l r -> b l () r":
            return x[:, :, None, :]
        if pattern == "b l r -> b () l r":
            return x[:, None, :, :]
        raise NotImplementedError(pattern)
    try:
        import einops  # noqa: F401
    except ImportError:
        sys.modules["einops"] = types.SimpleNamespace(rearrange=rearrange)


def load(root):
    d = os.path.join(root, "llava/model/language_model")
    _einops_stub()
    return _load("sparsevlm_official.modelling_sparse_llama",
                 os.path.join(d, "modelling_sparse_llama.py"), d)


def build(mod, sd):
    cfg = T.config(LAYERS)
    model = mod.LlamaDynamicvitModel(cfg).double().eval()
    model.load_state_dict(sd)
    for i, layer in enumerate(model.layers):   # builder.py L114-121, without .half()
        fa = mod.LlamaDynamicvitFlashAttention2(config=cfg, layer_idx=i).double()
        layer.add_module("flash_attn", fa)
        state = fa.state_dict()
        for key, value in layer.self_attn.state_dict().items():
            if key in state:
                state[key] = value
        fa.load_state_dict(state)
    return model


def _match(row, rows):
    hit = (rows == row).all(-1).nonzero()[:, 0]
    assert len(hit) == 1, "a row must match exactly one row"
    return int(hit[0])


def run(mod, case, sd, x, embed):
    model = build(mod, sd)
    spied = {"topk": [], "merge": []}
    topk, merge = mod.attn_postprocess_topk, mod.cluster_and_merge

    def topk_spy(w, v_start, v_num, t_start, t_idx, layer_idx, retained):
        out = topk(w, v_start, v_num, t_start, t_idx, layer_idx, retained)
        spied["topk"].append(dict(layer=layer_idx, v_start=int(v_start), v_num=int(v_num),
                                  text_start=int(t_start), raters=t_idx[1].tolist(),
                                  scores=out[2][0].tolist(),
                                  kept=out[0][0].nonzero()[:, 0].tolist()))
        return out

    def merge_spy(xs, cluster_num):
        out = merge(xs, cluster_num)
        spied["merge"].append(dict(inputs=xs[0].clone(), merged=out[0].clone()))
        return out

    mod.attn_postprocess_topk, mod.cluster_and_merge = topk_spy, merge_spy
    seen, handles = T.record_layers(model)
    kw = dict(image_shape=T.IMAGE, pre_prompt_length_list=[T.PREFIX],
              retained_tokens=case["retained_tokens"], return_dict=False, use_cache=True)
    try:
        with torch.no_grad():
            torch.manual_seed(SEED)
            out = model(inputs_embeds=x, attention_mask=torch.ones(1, T.LENGTH, dtype=torch.long),
                        **kw)
    finally:
        mod.attn_postprocess_topk, mod.cluster_and_merge = topk, merge
        for h in handles:
            h.remove()
    # the sources of every layer's tokens, from exact row matches (pruning copies rows)
    src = list(range(T.LENGTH))
    stages = []
    for s, layer in enumerate(model.pruning_loc):
        prev, now = seen[("out", layer)][0], seen[("in", layer + 1)][0]
        m = spied["merge"][s]
        merged_ids = [f"m{s}.{j}" for j in range(len(m["merged"]))]
        new = []
        for r in now:
            hit = (prev == r).all(-1).nonzero()[:, 0]
            if len(hit) == 1:
                new.append(src[int(hit[0])])
            else:
                new.append(merged_ids[_match(r, m["merged"])])
        t = spied["topk"][s]
        stages.append(dict(layer=layer, raters=t["raters"], v_start=t["v_start"],
                           v_num=t["v_num"], text_start=t["text_start"], scores=t["scores"],
                           kept=[src[t["v_start"] + i] for i in t["kept"]],
                           merge_inputs=[src[_match(r, prev)] for r in m["inputs"]],
                           merged=m["merged"].tolist(), sequence=new))
        src = new
    cache = [out[1]]
    last = out[0][0, -1]

    def step(e):
        n = cache[0][0][0].shape[2] + 1
        o = model(inputs_embeds=e, past_key_values=cache[0],
                  attention_mask=torch.ones(1, n, dtype=torch.long), **kw)
        cache[0] = o[1]
        return o[0][0, -1]
    with torch.no_grad():
        tokens, hidden = T.greedy(step, last, embed)
    return dict(stages=stages, last_hidden=last.tolist(), tokens=tokens,
                decode_hidden=[h.tolist() for h in hidden])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sparsevlms")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "golden"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sd = T.weights(layers=LAYERS)
    x, embed = T.inputs()
    mod = load(args.sparsevlms)
    with _cpu_stubs():
        cases = [dict(case=c, **run(mod, c, sd, x, embed)) for c in CASES]
    commit = _commit(args.sparsevlms) if os.path.isdir(os.path.join(args.sparsevlms, ".git")) \
        else os.environ.get("SPARSEVLM_COMMIT", "")
    out = {"inputs": f"tests/inllm/tiny_llm.py weights(0, layers={LAYERS}), inputs(0)",
           "float64": True, "seed": SEED, "commit": commit,
           "file": "llava/model/language_model/modelling_sparse_llama.py (LlamaDynamicvitModel)",
           "stubs": "flash_attn_func -> SDPA (same causal layout); Tensor.cuda -> identity; "
                    "torch.cuda.Event / synchronize -> no-ops; einops.rearrange -> unsqueeze "
                    "(not installed); flash_attn copies float64, not .half()",
           "cases": cases}
    for c in cases:
        print(c["case"], [(st["layer"], st["v_num"], len(st["kept"]), len(st["merged"]))
                          for st in c["stages"]], c["tokens"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sparsevlm.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
