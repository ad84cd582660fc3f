"""End-to-end speed of LLaVA-1.5-7B with visual-token pruning, random weights (issue 7).

Builds a LLaVA-1.5-7B-shaped model directly on the GPU in fp16 with random weights, no download
and no weight file: CLIP ViT-L/14-336 (24 layers, 1024-d, 16 heads, features of layer -2), an
mlp2x_gelu projector and a Vicuna-7B-shaped LLaMA (32 layers, 4096-d, FFN 11008, vocab 32000).
For each batch size (default 1 and 8) it times, as the median of repeated runs after warm-up
(CUDA events; perf_counter on the CPU), per call and per image:

- the vision tower: LLaVA's own (eager attention), eager with `output_attentions=True` on all
  layers (how [CLS] attention is usually read), eager + our [CLS]-row hook (the runtime on
  transformers 4.37.2, whose CLIP has no SDPA), and SDPA attention with and without the hook;
- the pruning step of every method at K under the extension and the PyTorch reference (and,
  under the backend enable() uses, with the per-image stats it records), adaptive at every K;
- LLM prefill with 576 visual tokens vs K in {192, 128, 64, 32} (eager, and CUDA-graph replay),
  next to the roofline bound max(FLOPs / peak, bytes / bandwidth) of each length, with the
  datasheet's peak and bandwidth (flags) and with this card's measured matmul and copy rates;
- time to first token through LLaVA's forward (images in, first token out), unpruned vs
  `enable(model, "adaptive", K)`, with peak memory; decode tokens/s after each prefill;
- the in-LLM methods (FastV layer 2, PDrop layers 2/8/16, DART layer 2) against adaptive and no
  pruning at equal average image tokens per decoder layer (the `--keeps` values): TTFT, speedup,
  and their pruning step (attention row / keys and selection) as a share of the TTFT and of one
  decoder layer.

    python bench/e2e.py --json out/e2e.json          # GPU, fp16, full size
    python bench/e2e.py --tiny --json /tmp/e2e.json  # same code, CPU, fp32, tiny shapes (CI)
    python bench/e2e.py --reduced --batches 1        # CPU, the 7B's depth at width 256
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import llava_agile  # noqa: E402
from llava_agile import backend, prune  # noqa: E402
from llava_agile.methods import METHODS, REGISTRY  # noqa: E402

SHAPES = {
    "7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5),
        llm=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "tiny": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, image_size=336, patch_size=14, projection_dim=64,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5),
        llm=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                 rms_norm_eps=1e-5)),
}
# the 7B's depth (in-LLM pruning layers mean the same) at a width a CPU runs in seconds
SHAPES["reduced"] = dict(
    vision=SHAPES["tiny"]["vision"],
    llm=dict(SHAPES["tiny"]["llm"], hidden_size=256, intermediate_size=688, num_hidden_layers=32))
TOWER_NAME = "openai/clip-vit-large-patch14-336"  # recorded in the config only; never loaded
IMAGE_POS = 35  # where <image> sits in LLaVA-1.5's vicuna_v1 prompt (after "... USER: ")
VISION_VARIANTS = ("eager", "eager_attn", "eager_hook", "sdpa", "sdpa_hook")
GIB = 2 ** 30


# ---------------------------------------------------------------- model

def random_tower(vision_cfg: dict, select_layer: int = -2):
    """LLaVA's CLIPVisionTower around a randomly initialised CLIPVisionModel (no checkpoint)."""
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    vcfg = CLIPVisionConfig(**vision_cfg)

    class RandomCLIPTower(CLIPVisionTower):
        def load_model(self, device_map=None):
            side = vcfg.image_size
            self.image_processor = CLIPImageProcessor(
                size={"shortest_edge": side}, crop_size={"height": side, "width": side})
            self.vision_tower = CLIPVisionModel(vcfg)
            self.vision_tower.requires_grad_(False)
            self.is_loaded = True

    args = types.SimpleNamespace(mm_vision_select_layer=select_layer,
                                 mm_vision_select_feature="patch")
    return RandomCLIPTower(TOWER_NAME, args, delay_load=False)


def build_model(shape: str, device, dtype, seed: int = 0):
    """LlavaLlamaForCausalLM with random weights, created directly on `device` in `dtype`."""
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from llava.model.multimodal_projector.builder import build_vision_projector

    spec = SHAPES[shape]
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        **spec["llm"], bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        use_cache=True, mm_hidden_size=spec["vision"]["hidden_size"],
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_use_im_start_end=False, mm_use_im_patch_token=False,
        image_aspect_ratio="pad", mm_patch_merge_type="flat", tune_mm_mlp_adapter=False,
        use_mm_proj=True)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            # no mm_vision_tower in the config yet: LLaVA would load the tower from a path
            model = LlavaLlamaForCausalLM(cfg)
            inner = model.get_model()
            inner.vision_tower = random_tower(spec["vision"], cfg.mm_vision_select_layer)
            inner.mm_projector = build_vision_projector(cfg)
    finally:
        torch.set_default_dtype(old)
    cfg.mm_vision_tower = TOWER_NAME
    model.requires_grad_(False)
    return model.eval()  # already on `device` in `dtype` (float buffers stay float, as loaded)


# ---------------------------------------------------------------- SDPA attention for CLIP

def _sdpa_forward(self, hidden_states, attention_mask=None, causal_attention_mask=None,
                  output_attentions=False):
    """CLIPAttention.forward with F.scaled_dot_product_attention (same math, no T x T tensor)."""
    if output_attentions or attention_mask is not None or causal_attention_mask is not None:
        return self._agile_eager_forward(hidden_states, attention_mask, causal_attention_mask,
                                         output_attentions)
    b, t, c = hidden_states.shape

    def heads(x):
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    q, k, v = heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)), \
        heads(self.v_proj(hidden_states))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                         scale=self.scale)
    return self.out_proj(out.transpose(1, 2).reshape(b, t, c)), None


def clip_attention_modules(model):
    return [layer.self_attn for layer in
            model.get_vision_tower().vision_tower.vision_model.encoder.layers]


def set_tower_attention(model, impl: str) -> None:
    """'sdpa' or 'eager' for every CLIP attention module of the model (instance-level)."""
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"tower attention must be 'sdpa' or 'eager', got {impl!r}")
    for m in clip_attention_modules(model):
        if impl == "sdpa" and "_agile_eager_forward" not in m.__dict__:
            m._agile_eager_forward = m.forward
            m.forward = types.MethodType(_sdpa_forward, m)
        elif impl == "eager" and "_agile_eager_forward" in m.__dict__:
            m.__dict__.pop("forward")
            m.__dict__.pop("_agile_eager_forward")


@contextlib.contextmanager
def tower_attention(model, impl: str):
    was = "sdpa" if "_agile_eager_forward" in clip_attention_modules(model)[0].__dict__ else "eager"
    set_tower_attention(model, impl)
    try:
        yield
    finally:
        set_tower_attention(model, was)


# ---------------------------------------------------------------- timing

class Timer:
    """Median of repeated runs after warm-up: CUDA events on a GPU, perf_counter on the CPU.

    Each run starts on an idle device (synchronised first), so host-side launch overhead counts.
    """

    def __init__(self, device, warmup: int, repeat: int):
        self.cuda = torch.device(device).type == "cuda"
        self.warmup, self.repeat = warmup, repeat

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn, setup=None) -> dict:
        """Times `fn(*setup())` (setup untimed); returns ms statistics and the peak memory."""
        for _ in range(self.warmup):
            fn(*(setup() if setup else ()))
        times = []
        peak = None
        for i in range(self.repeat):
            args = setup() if setup else ()
            self.sync()
            if self.cuda:
                if i == 0:
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*args)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
                if i == 0:
                    peak = (torch.cuda.max_memory_allocated(), base)
            else:
                t0 = time.perf_counter()
                fn(*args)
                times.append((time.perf_counter() - t0) * 1e3)
        out = {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
               "runs": len(times)}
        if peak is not None:
            out["peak_gib"] = peak[0] / GIB
            out["extra_gib"] = (peak[0] - peak[1]) / GIB  # over what was allocated before
        return out

    def graph(self, fn) -> dict:
        """Median time of replaying `fn` captured in a CUDA graph (launch overhead removed)."""
        if not self.cuda:
            return {"skipped": "CUDA graphs need a GPU"}
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            res = self.run(g.replay)
            res.pop("peak_gib", None), res.pop("extra_gib", None)
            del g
            return res
        except Exception as exc:  # recorded, not fatal: eager numbers still stand
            torch.cuda.synchronize()
            return {"error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- roofline

def llm_cost(cfg, batch: int, tokens: int, dtype_bytes: int = 2) -> dict:
    """FLOPs and fewest bytes of one LLaMA prefill of `tokens` per sequence (LLaVA's forward:
    logits for every position, cast to fp32; weights read once, KV cache written once)."""
    d, L, ffn, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    layer_params = 2 * d * d + 2 * d * kv + 3 * d * ffn
    matmul_params = L * layer_params + d * vocab  # lm_head; the embedding is a lookup
    n = batch * tokens
    flops = 2 * n * matmul_params + 2 * batch * L * d * tokens * tokens  # causal QK^T and PV
    weight_bytes = dtype_bytes * (matmul_params + L * 2 * d + d)  # + RMSNorm weights
    io_bytes = n * d * dtype_bytes + 2 * L * n * kv * dtype_bytes + n * vocab * (dtype_bytes + 4)
    return {"flops": flops, "bytes": weight_bytes + io_bytes, "weight_bytes": weight_bytes}


def roofline(cfg, batch, tokens, peak_flops, bandwidth) -> dict:
    c = llm_cost(cfg, batch, tokens)
    t_flops, t_bytes = c["flops"] / peak_flops, c["bytes"] / bandwidth
    return dict(c, t_flops_ms=t_flops * 1e3, t_bytes_ms=t_bytes * 1e3,
                bound_ms=max(t_flops, t_bytes) * 1e3,
                bound_by="compute" if t_flops >= t_bytes else "memory")


def measure_ceilings(device, dtype, timer, n: int = 8192, copy_bytes: int = 2 ** 30) -> dict:
    """This card's matrix rate (an n^3 product, random data) and copy bandwidth (bytes read +
    written), the ceilings METHOD.md asks for next to the datasheet's."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    mm = timer.run(lambda: a @ b)["ms"]
    src = torch.randn(copy_bytes // torch.finfo(dtype).bits * 8, device=device, dtype=dtype,
                      generator=g)
    dst = torch.empty_like(src)
    cp = timer.run(lambda: dst.copy_(src))["ms"]
    return {"matmul_tflops": 2 * n ** 3 / (mm / 1e3) / 1e12, "matmul_n": n,
            "copy_tbs": 2 * src.numel() * src.element_size() / (cp / 1e3) / 1e12,
            "copy_bytes": src.numel() * src.element_size()}


# ---------------------------------------------------------------- stages

def make_inputs(model, batch, text_tokens, device, dtype, seed):
    """Random pixels `[B, 3, S, S]` and vicuna-style prompt ids `[B, T]` with one <image>."""
    from llava.constants import IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(seed)
    side = model.get_vision_tower().config.image_size
    images = torch.randn(batch, 3, side, side, generator=g).to(device=device, dtype=dtype)
    ids = torch.randint(3, model.config.vocab_size, (batch, text_tokens + 1), generator=g)
    ids[:, 0] = 1
    ids[:, min(IMAGE_POS, text_tokens)] = IMAGE_TOKEN_INDEX
    return images, ids.to(device)


def cls_row_from_attentions(attentions, select_layer):
    """[B, N] [CLS] row (head mean, patches only) from HF's `output_attentions` tuple."""
    return attentions[select_layer][:, :, 0, 1:].float().mean(dim=1)


def vision_stage(model, images, timer, graphs):
    """Time the tower variants; returns (timings, clip features, [CLS] rows, checks)."""
    from llava_agile.llava.attention import ClsAttentionHook, attention_module

    tower = model.get_vision_tower()
    clip = tower.vision_tower
    sel = tower.select_layer
    hook = ClsAttentionHook(attention_module(tower))

    def eager():
        return tower(images)

    def eager_attn():
        out = clip(images.to(dtype=tower.dtype), output_hidden_states=True, output_attentions=True)
        return out.hidden_states[sel][:, 1:], cls_row_from_attentions(out.attentions, sel)

    def with_hook():
        hook.start()
        try:
            feats = tower(images)
        finally:
            row = hook.stop()
        return feats, row

    calls = {"eager": (eager, "eager"), "eager_attn": (eager_attn, "eager"),
             "eager_hook": (with_hook, "eager"), "sdpa": (eager, "sdpa"),
             "sdpa_hook": (with_hook, "sdpa")}
    res = {}
    try:
        for name, (fn, impl) in calls.items():
            with tower_attention(model, impl):
                res[name] = timer.run(fn)
                if graphs:
                    res[name]["graph"] = timer.graph(fn)
        with tower_attention(model, "eager"):
            feats_ref, row_ref = eager_attn()
            feats_hook, row_hook = with_hook()
        with tower_attention(model, "sdpa"):
            feats_sdpa, row_sdpa = with_hook()
    finally:
        hook.remove()
    checks = {"hook_row_max_abs_err": float((row_hook - row_ref).abs().max()),
              "sdpa_row_max_abs_err": float((row_sdpa - row_ref).abs().max()),
              "sdpa_feature_rel_err": float((feats_sdpa.float() - feats_ref.float()).norm()
                                            / feats_ref.float().norm()),
              "hook_feature_rel_err": float((feats_hook.float() - feats_ref.float()).norm()
                                            / feats_ref.float().norm()),
              "row_sums": float(row_ref.sum(-1).mean()),
              "features_finite": bool(torch.isfinite(feats_ref).all())}
    return res, feats_ref, row_sdpa, checks


def prune_params(method, clip):
    return {"similarity_features": clip} if "similarity_features" in REGISTRY[method][1] else {}


def prune_stage(proj, clip, attn, keep, keeps, methods, timer):
    """Each method at `keep` under each backend that can run it (plus, under the one enable()
    uses, with the per-image stats it records), and adaptive at every K in `keeps`."""
    accel = backend.ACCELERATED
    ext_ok = backend.ext_available(proj.device)
    out = {}
    try:
        for m in methods:
            params = prune_params(m, clip)
            names = ["ext", "torch"] if (m in accel and ext_ok) else ["torch"]
            out[m] = {}
            for name in names:
                llava_agile.set_backend(name)
                row = timer.run(lambda: prune(proj, attn, keep, m, stats=False, **params))
                if name == names[0]:  # what enable() runs: "auto" picks the first
                    row["with_stats"] = timer.run(
                        lambda: prune(proj, attn, keep, m, stats=True, **params))
                out[m][name] = row
        by_k = {}
        llava_agile.set_backend("auto")
        for k in keeps:
            by_k[str(k)] = timer.run(lambda: prune(proj, attn, k, "adaptive", stats=True))
    finally:
        llava_agile.set_backend("auto")
    return out, by_k


def prefill_stage(model, batch, lengths, text_tokens, timer, graphs, peak, bw, device, dtype,
                  measured=None):
    """LLM prefill (inputs_embeds -> logits + KV cache) per visual-token count; the roofline
    from the given peak / bandwidth, and from the `measured` ceilings when given."""
    d = model.config.hidden_size
    res = {}
    for n_vis in lengths:
        tokens = text_tokens + n_vis
        x = torch.randn(batch, tokens, d, device=device, dtype=dtype) * 0.02

        def fn():
            return model(inputs_embeds=x, use_cache=True, return_dict=True).logits

        row = timer.run(fn)
        if graphs:
            row["graph"] = timer.graph(fn)
        row["tokens"] = tokens
        row["roofline"] = roofline(model.config, batch, tokens, peak, bw)
        row["roofline_fraction"] = row["roofline"]["bound_ms"] / row["ms"]
        if measured:
            row["roofline_measured"] = roofline(model.config, batch, tokens,
                                                measured["matmul_tflops"] * 1e12,
                                                measured["copy_tbs"] * 1e12)
        res[str(n_vis)] = row
    return res


def _graph_ms(row):
    g = row.get("graph") or {}
    return g.get("ms")


def speedups(prefill, full: int, keeps):
    base = prefill[str(full)]
    out = {}
    for k in keeps:
        row = prefill[str(k)]
        bound = base["roofline"]["bound_ms"] / row["roofline"]["bound_ms"]
        meas = base["ms"] / row["ms"]
        s = {"measured": meas, "bound": bound, "of_bound": meas / bound}
        if "roofline_measured" in row:
            mb = base["roofline_measured"]["bound_ms"] / row["roofline_measured"]["bound_ms"]
            s.update(bound_measured=mb, of_bound_measured=meas / mb)
        gb, gk = _graph_ms(base), _graph_ms(row)
        if gb and gk:
            s["graph"] = gb / gk
            s["graph_of_bound"] = (gb / gk) / bound
        out[str(k)] = s
    return out


def ttft_stage(model, images, ids, full, keeps, method, timer):
    """Images + prompt in, first token out, through LLaVA's forward; unpruned and per K."""
    from llava_agile import disable, enable

    def first_token():
        out = model(input_ids=ids, images=images, use_cache=True, return_dict=True)
        first_token.length = out.logits.shape[1]
        return out.logits[:, -1].argmax(-1)

    res = {}
    disable(model)
    row = timer.run(first_token)
    res[str(full)] = dict(row, sequence=first_token.length)
    try:
        for k in keeps:
            enable(model, method, k)
            row = timer.run(first_token)
            kept = [st.get("kept") for st in model.agile_stats]
            res[str(k)] = dict(row, sequence=first_token.length, kept=kept)
    finally:
        disable(model)
    return res


def inllm_calls(budgets, full, layers):
    """{(method, budget): (method, keep, params)}: the in-LLM methods at each average budget
    (README budgets table: FastV layer 2, PDrop layers 2/8/16, DART layer 2) and adaptive;
    SparseVLM at its own setting of that name (192 / 128 / 64: keep 300 / 303 / 66 after layers
    2, 6, 15, whose averages exceed the name: the table reports them)."""
    from llava_agile.inllm import DEFAULTS, keep_for_average
    from llava_agile.inllm.methods import SPARSEVLM_SCHEDULES
    plans = {"fastv": dict(layer=2), "pdrop": dict(layers=(2, 8, 16), ratios=None),
             "dart": dict(DEFAULTS["dart"])}
    out = {}
    for b in budgets:
        out[("adaptive", b)] = ("adaptive", b, {})
        if b in SPARSEVLM_SCHEDULES and layers > max(DEFAULTS["sparsevlm"]["layers"]) + 1:
            out[("sparsevlm", b)] = ("sparsevlm", SPARSEVLM_SCHEDULES[b][0], {})
        for m, p in plans.items():
            if max(p.get("layers", (p.get("layer", 0),))) >= layers:
                continue
            try:
                keep = keep_for_average(m, b, p, full, layers)
            except ValueError:   # the layers before the pruning one alone exceed the budget
                continue
            out[(m, b)] = (m, keep, {k: v for k, v in p.items() if v is not None})
    return out


def inllm_stage(model, images, ids, full, budgets, timer):
    """TTFT at equal average image tokens per decoder layer: no pruning, adaptive (before the
    LLM) and FastV / PDrop / DART / SparseVLM (inside it); their pruning step (median over the calls) as a
    share of the TTFT and of one decoder layer."""
    from llava_agile import disable, enable

    steps = []   # each call's pruning step (ms, summed over the batch's images)

    def first_token():
        out = model(input_ids=ids, images=images, use_cache=True).logits[:, -1].argmax(-1)
        steps.append(sum(x.get("prune_ms", 0.0) for x in getattr(model, "agile_stats", [])))
        return out

    layers = model.config.num_hidden_layers
    disable(model)
    base = timer.run(first_token)
    res = {"none": dict(base, avg_tokens=full)}
    for (m, b), (method, keep, params) in inllm_calls(budgets, full, layers).items():
        enable(model, method, keep, **params)
        steps.clear()
        try:
            row = timer.run(first_token)
            st = model.agile_stats[0]
        finally:
            disable(model)
        step = statistics.median(steps)
        res[f"{m}@{b}"] = dict(row, keep=keep, avg_tokens=st.get("avg_tokens", keep),
                               speedup=base["ms"] / row["ms"], prune_ms=step,
                               prune_share_of_ttft=step / row["ms"],
                               prune_share_of_layer=step / (base["ms"] / layers))
    return res


def decode_stage(model, batch, lengths, text_tokens, steps, timer, device, dtype):
    """Greedy decode of `steps` tokens after a prefill of text + n visual tokens (untimed)."""
    d = model.config.hidden_size
    res = {}
    for n_vis in lengths:
        x = torch.randn(batch, text_tokens + n_vis, d, device=device, dtype=dtype) * 0.02

        def setup():
            out = model(inputs_embeds=x, use_cache=True, return_dict=True)
            return out.past_key_values, out.logits[:, -1:].argmax(-1)

        def decode(past, tok):
            for _ in range(steps):
                out = model(input_ids=tok, past_key_values=past, use_cache=True, return_dict=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return tok

        row = timer.run(decode, setup)
        row["steps"] = steps
        row["ms_per_step"] = row["ms"] / steps
        row["tokens_per_s"] = batch * steps / (row["ms"] / 1e3)
        res[str(n_vis)] = row
    return res


# ---------------------------------------------------------------- report

def per_image(section, batch):
    for row in section.values():
        if isinstance(row, dict) and "ms" in row:
            row["ms_per_image"] = row["ms"] / batch
    return section


def targets(result, keep=64):
    """Issue 7's targets (H100, fp16, K=64 vs 576); meaningful on the GPU run only."""
    out = {}
    for b, want in (("8", 4.5), ("1", 2.5)):
        s = result["batches"].get(b, {}).get("prefill_speedup", {}).get(str(keep))
        if s is None:
            continue
        out[f"prefill_speedup_b{b}"] = {"value": s["measured"], "target": f">= {want}",
                                        "met": s["measured"] >= want}
        out[f"prefill_of_bound_b{b}"] = {"value": s["of_bound"], "target": ">= 0.85",
                                         "met": s["of_bound"] >= 0.85}
    sec = result["batches"].get("1", {})
    if str(keep) in sec.get("ttft", {}) and "adaptive" in sec.get("prune", {}):
        step = sec["prune"]["adaptive"]
        used = step["ext"] if "ext" in step else step["torch"]  # what enable() runs ("auto")
        share = used["with_stats"]["ms"] / sec["ttft"][str(keep)]["ms"]
        out["adaptive_step_share_of_ttft_b1"] = {"value": share, "target": "<= 0.05",
                                                 "met": share <= 0.05}
    for b, sec in result["batches"].items():
        if "vision" in sec:
            sp = sec["vision"]["eager_attn"]["ms"] / sec["vision"]["sdpa_hook"]["ms"]
            out[f"vision_sdpa_hook_vs_eager_attn_b{b}"] = {"value": sp, "target": ">= 1.15",
                                                            "met": sp >= 1.15}
    return out


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_batch(b, sec, full):
    print(f"\n== batch {b} ==")
    for name, err in sec.get("errors", {}).items():
        print(f"ERROR in {name}: {err}")
    if "vision" in sec:
        print(f"{'vision tower':<14} {'ms':>8} {'ms/img':>8} {'graph ms':>9} {'peak GiB':>9} "
              f"{'vs eager_attn':>13}")
        for name, r in sec["vision"].items():
            sp = sec["vision_speedup"].get(f"{name}_vs_eager_attn", 1.0)
            print(f"{name:<14} {r['ms']:8.3f} {r['ms_per_image']:8.3f} "
                  f"{fmt(_graph_ms(r), '9.3f')} {fmt(r.get('peak_gib'), '9.2f')} {sp:13.2f}")
        print(f"{'projector':<14} {sec['projector']['ms']:8.3f}")
    if "prune" in sec:
        head = f"prune (K={sec['prune_keep']})"
        print(f"\n{head:<14} {'backend':>7} {'ms':>8} {'+stats':>8}")
        for m, rows in sec["prune"].items():
            for be, r in rows.items():
                print(f"{m:<14} {be:>7} {r['ms']:8.3f} "
                      f"{fmt((r.get('with_stats') or {}).get('ms'), '8.3f')}")
    if "prefill" in sec:
        print(f"\n{'prefill':<8} {'tokens':>6} {'ms':>9} {'graph':>9} {'bound':>8} {'by':>7} "
              f"{'%bound':>6} {'speedup':>7} {'graph':>6} {'bound':>6} {'of bnd':>6} "
              f"{'mbound':>6} {'of mb':>6}")
        for n, r in sec["prefill"].items():
            s = sec["prefill_speedup"].get(n, {})
            rf = r["roofline"]
            print(f"{n:<8} {r['tokens']:6d} {r['ms']:9.3f} {fmt(_graph_ms(r), '9.3f')} "
                  f"{rf['bound_ms']:8.3f} {rf['bound_by']:>7} "
                  f"{100 * r['roofline_fraction']:6.1f} {fmt(s.get('measured'), '7.2f')} "
                  f"{fmt(s.get('graph'), '6.2f')} {fmt(s.get('bound'), '6.2f')} "
                  f"{fmt(s.get('of_bound'), '6.2f')} {fmt(s.get('bound_measured'), '6.2f')} "
                  f"{fmt(s.get('of_bound_measured'), '6.2f')}")
    if "inllm" in sec:
        print(f"\n{'TTFT at avg budget':<18} {'keep':>5} {'avg/layer':>9} {'ms':>9} "
              f"{'speedup':>7} {'prune ms':>8} {'% TTFT':>6} {'% layer':>7}")
        for n, r in sec["inllm"].items():
            print(f"{n:<18} {fmt(r.get('keep'), '5d')} {r['avg_tokens']:9.1f} {r['ms']:9.3f} "
                  f"{fmt(r.get('speedup'), '7.2f')} {fmt(r.get('prune_ms'), '8.3f')} "
                  f"{fmt(100 * r['prune_share_of_ttft'] if 'prune_ms' in r else None, '6.2f')} "
                  f"{fmt(100 * r['prune_share_of_layer'] if 'prune_ms' in r else None, '7.2f')}")
    if "ttft" in sec:
        print(f"\n{'TTFT':<8} {'seq':>5} {'ms':>9} {'peak GiB':>9} {'speedup':>7}   "
              f"{'decode':<6} {'ms/step':>8} {'tok/s':>8}")
        base = sec["ttft"][str(full)]["ms"]
        for n, r in sec["ttft"].items():
            dec = sec.get("decode", {}).get(n)
            dtxt = f"{'':6} {dec['ms_per_step']:8.3f} {dec['tokens_per_s']:8.1f}" if dec else ""
            print(f"{n:<8} {r['sequence']:5d} {r['ms']:9.3f} {fmt(r.get('peak_gib'), '9.2f')} "
                  f"{base / r['ms']:7.2f}   {dtxt}")


def environment(device, args):
    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device),
            "ext_cpu": backend.ext_available("cpu"),
            "ext_device": backend.ext_available(device),
            "ext_reason": backend.unavailable_reason(device), "threads": torch.get_num_threads()}
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    gpu_mem_gib=p.total_memory / GIB, cuda=torch.version.cuda)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


# ---------------------------------------------------------------- one batch size

def guarded(sec, name, fn):
    """Run one stage; on an error print its traceback, record it in `sec` and go on."""
    try:
        return fn()
    except Exception as exc:
        traceback.print_exc()
        sec.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
        return None


def run_batch(model, b, ctx):
    """Every stage for `b` images; a failed stage is recorded in sec["errors"]."""
    a, timer = ctx.args, ctx.timer
    sec = {"checks": {}}
    images, ids = make_inputs(model, b, a.text_tokens, ctx.device, ctx.dtype, a.seed + b)

    print(f"[batch {b}] vision tower", flush=True)
    vis = guarded(sec, "vision", lambda: vision_stage(model, images, timer, ctx.graphs))
    if vis is not None:
        sec["vision"], clip, attn, checks = vis
        sec["checks"].update(checks)
        v = per_image(sec["vision"], b)
        sec["vision_speedup"] = {f"{n}_vs_eager_attn": v["eager_attn"]["ms"] / v[n]["ms"]
                                 for n in VISION_VARIANTS if n != "eager_attn"}
        if _graph_ms(v["eager_attn"]) and _graph_ms(v["sdpa_hook"]):
            sec["vision_speedup"]["graph_sdpa_hook_vs_eager_attn"] = \
                _graph_ms(v["eager_attn"]) / _graph_ms(v["sdpa_hook"])
        projector = model.get_model().mm_projector
        sec["projector"] = timer.run(lambda: projector(clip))
        sec["projector"]["ms_per_image"] = sec["projector"]["ms"] / b
        proj = projector(clip)
        print(f"[batch {b}] pruning", flush=True)
        sec["prune_keep"] = a.keep
        pr = guarded(sec, "prune", lambda: prune_stage(proj, clip, attn, a.keep, ctx.keeps,
                                                       a.methods, timer))
        if pr is not None:
            sec["prune"], sec["prune_adaptive_by_k"] = pr
            for rows in sec["prune"].values():
                per_image(rows, b)
        del clip, attn, proj

    print(f"[batch {b}] prefill", flush=True)
    pf = guarded(sec, "prefill", lambda: prefill_stage(
        model, b, ctx.lengths, a.text_tokens, timer, ctx.graphs, ctx.peak, ctx.bw, ctx.device,
        ctx.dtype, ctx.ceilings))
    if pf is not None:
        sec["prefill"] = per_image(pf, b)
        sec["prefill_speedup"] = speedups(pf, ctx.full, ctx.keeps)

    print(f"[batch {b}] time to first token", flush=True)

    def ttft():
        with tower_attention(model, a.tower_attn):
            return ttft_stage(model, images, ids, ctx.full, ctx.keeps, a.ttft_method, timer)

    tt = guarded(sec, "ttft", ttft)
    if tt is not None:
        sec["ttft"] = per_image(tt, b)
        want = {str(ctx.full): a.text_tokens + ctx.full,
                **{str(k): a.text_tokens + k for k in ctx.keeps}}
        sec["checks"]["ttft_sequence_ok"] = all(tt[n]["sequence"] == t for n, t in want.items())

    if model.config.num_hidden_layers > 2:
        print(f"[batch {b}] in-LLM methods at equal average budgets", flush=True)
        il = guarded(sec, "inllm", lambda: inllm_stage(model, images, ids, ctx.full, ctx.keeps,
                                                        timer))
        if il is not None:
            sec["inllm"] = il

    print(f"[batch {b}] decode", flush=True)
    dec_lengths = [ctx.full] + ([a.keep] if a.keep in ctx.keeps else ctx.keeps[-1:])
    dec = guarded(sec, "decode", lambda: decode_stage(
        model, b, dec_lengths, a.text_tokens, a.decode_tokens, ctx.dec_timer, ctx.device,
        ctx.dtype))
    if dec is not None:
        sec["decode"] = dec
    return sec


def write_json(path, result):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


# ---------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true",
                   help="CPU, fp32: the 7B's 32 LLM layers at width 256 (in-LLM methods)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes, float32, on the CPU (what CI runs)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="default: fp16 (fp32 with --tiny)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--keeps", type=int, nargs="+", default=[192, 128, 64, 32])
    p.add_argument("--keep", type=int, default=64, help="K for the per-method pruning times")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ttft-method", default="adaptive", choices=METHODS)
    p.add_argument("--text-tokens", type=int, default=60,
                   help="prompt tokens besides the image (LLaVA-1.5 system prompt + question)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-repeat", type=int, default=3, help="timed decode runs (median)")
    p.add_argument("--tower-attn", choices=("eager", "sdpa"), default="eager",
                   help="CLIP attention for the time-to-first-token runs (eager: LLaVA's own on "
                        "transformers 4.37.2)")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (1 with --tiny)")
    p.add_argument("--repeat", type=int, default=None, help="default 10 (3 with --tiny)")
    p.add_argument("--no-graphs", action="store_true", help="skip CUDA-graph replay timings")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense fp16 peak for the roofline (H100 SXM: 989)")
    p.add_argument("--bandwidth-tbs", type=float, default=3.35,
                   help="memory bandwidth for the roofline, TB/s (H100 SXM: 3.35)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write all figures here")
    args = p.parse_args(argv)
    small = args.tiny or args.reduced
    args.device = args.device or ("cpu" if small else "cuda")
    args.dtype = args.dtype or ("fp32" if small else "fp16")
    args.warmup = (1 if small else 3) if args.warmup is None else args.warmup
    args.repeat = (3 if small else 10) if args.repeat is None else args.repeat
    bad = [f"--batches {b}" for b in args.batches if b < 1] + \
          [f"--keeps {k}" for k in args.keeps if k < 1] + \
          [f"--{n.replace('_', '-')} {getattr(args, n)}" for n in
           ("keep", "repeat", "decode_tokens", "decode_repeat", "text_tokens")
           if getattr(args, n) < 1] + \
          ([f"--warmup {args.warmup}"] if args.warmup < 0 else []) + \
          [f"--{n.replace('_', '-')} {getattr(args, n)}" for n in ("peak_tflops", "bandwidth_tbs")
           if not getattr(args, n) > 0]
    if bad:
        p.error(f"must be positive (warmup >= 0): {', '.join(bad)}")
    try:
        dev = torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device {args.device!r}: {exc}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --tiny for the CPU run)")
    if dev.type == "cpu" and args.dtype == "fp16":
        p.error("--dtype fp16 on the CPU is not supported; use fp32 (or --tiny)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shape = "tiny" if args.tiny else "reduced" if args.reduced else "7b"
    timer = Timer(device, args.warmup, args.repeat)
    dec_timer = Timer(device, min(args.warmup, 1), args.decode_repeat)
    graphs = device.type == "cuda" and not args.no_graphs
    peak, bw = args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12

    t0 = time.perf_counter()
    model = build_model(shape, device, dtype, args.seed)
    build_s = time.perf_counter() - t0
    full = model.get_vision_tower().num_patches
    keeps = sorted({k for k in args.keeps if k < full}, reverse=True)
    if not keeps:
        print(f"error: every --keeps value is >= the {full} visual tokens", file=sys.stderr)
        return 2
    lengths = [full] + keeps
    params = sum(p.numel() for p in model.parameters())
    print(f"built {shape} LLaVA ({params / 1e6:.1f} M parameters, {args.dtype}) on {device} in "
          f"{build_s:.1f} s; {full} visual tokens, {args.text_tokens} text tokens", flush=True)
    result = {"meta": {"env": environment(device, args), "shape": shape, "dtype": args.dtype,
                       "parameters": params, "visual_tokens": full,
                       "text_tokens": args.text_tokens, "warmup": args.warmup,
                       "repeat": args.repeat, "peak_tflops": args.peak_tflops,
                       "bandwidth_tbs": args.bandwidth_tbs, "build_s": build_s,
                       "llm_attention": getattr(model.config, "_attn_implementation", None),
                       "timer": "cuda events" if timer.cuda else "perf_counter",
                       "shapes": SHAPES[shape], "ttft_method": args.ttft_method,
                       "ttft_tower_attention": args.tower_attn,
                       "decode_tokens": args.decode_tokens, "decode_repeat": args.decode_repeat},
              "batches": {}}
    if timer.cuda:
        result["meta"]["weights_gib"] = torch.cuda.memory_allocated() / GIB
        with torch.inference_mode():
            ceil = guarded(result["meta"], "ceilings",
                           lambda: measure_ceilings(device, dtype, timer))
        torch.cuda.empty_cache()
        result["meta"]["ceilings"] = ceil
        if ceil:
            print(f"measured ceilings: {ceil['matmul_tflops']:.0f} TFLOP/s ({args.dtype} matmul), "
                  f"{ceil['copy_tbs']:.2f} TB/s (copy)", flush=True)

    ctx = types.SimpleNamespace(args=args, device=device, dtype=dtype, timer=timer,
                                dec_timer=dec_timer, graphs=graphs, peak=peak, bw=bw, full=full,
                                keeps=keeps, lengths=lengths,
                                ceilings=result["meta"].get("ceilings"))
    with torch.inference_mode():
        for b in args.batches:
            result["batches"][str(b)] = run_batch(model, b, ctx)
            write_json(args.json, result)  # a later failure keeps what was measured
            if timer.cuda:
                torch.cuda.empty_cache()

    result["targets"] = targets(result, args.keep)
    for b, sec in result["batches"].items():
        print_batch(b, sec, full)
    print("\nchecks:", json.dumps({b: s.get("checks") for b, s in result["batches"].items()}))
    where = result["meta"]["env"].get("gpu", result["meta"]["env"].get("cpu"))
    small = ", small shapes: not meaningful" if args.tiny or args.reduced else ""
    print(f"\ntargets ({where}, {args.dtype}{small}):")
    for name, t in result["targets"].items():
        print(f"  {name:<40} {t['value']:8.3f}  {t['target']:<8} {'MET' if t['met'] else 'MISSED'}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    errors = {b: list(sec["errors"]) for b, sec in result["batches"].items() if sec.get("errors")}
    if errors:
        print(f"error: stages failed (tracebacks above): {errors}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
