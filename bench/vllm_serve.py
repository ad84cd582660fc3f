"""vLLM serving with and without the llava_agile plugin on one request set (issue 12, docs/benchmarks.md).

The same requests (random images of mixed sizes and prompts, fixed seed) go through an offline
vLLM engine twice, each in its own process: stock (no `agile` override) and pruned
(`hf_overrides={"agile": {"method": ..., "keep": K}}`, plus `"anyres_mode": "global"` for
LLaVA-NeXT, the one mode vLLM allows; Qwen2.5-VL / Qwen3-VL take the override as it is). Reported per run and as pruned/stock
ratios: requests/s (all requests submitted at once, wall time of `LLM.generate`), time to first
token percentiles (p50/p90/p99 from vLLM's per-request metrics), prompt tokens
(`vllm:prompt_tokens`, which also counts the one warm-up request) and KV-cache tokens held per request (prompt + generated: what the
paged KV cache stores). Prefix caching is off (every image differs anyway).

    .venv-vllm/bin/python bench/vllm_serve.py                      # tiny random LLaVA, CPU
    .venv-vllm/bin/python bench/vllm_serve.py --next               # tiny random LLaVA-NeXT
    .venv-vllm/bin/python bench/vllm_serve.py --qwen qwen2_5_vl    # tiny random Qwen2.5-VL
    .venv-vllm/bin/python bench/vllm_serve.py --qwen qwen3_vl      # tiny random Qwen3-VL
    python bench/vllm_serve.py --model Qwen/Qwen2.5-VL-7B-Instruct --requests 200 --dtype bfloat16
    python bench/vllm_serve.py --model llava-hf/llava-1.5-7b-hf --requests 200 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(spec_path: str, out_path: str) -> None:
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    spec = json.load(open(spec_path))
    kw = {} if spec["agile"] is None else {"hf_overrides": {"agile": spec["agile"]}}
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enforce_eager=spec["enforce_eager"],
              max_model_len=spec["max_model_len"], limit_mm_per_prompt={"image": 1},
              enable_prefix_caching=False, disable_log_stats=False, seed=0, **kw)
    rng = np.random.default_rng(spec["seed"])
    reqs = []
    for i in range(spec["requests"]):
        h, w = (int(v) for v in rng.integers(160, 480, 2))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        reqs.append({"prompt": spec["prompts"][i % len(spec["prompts"])],
                     "multi_modal_data": {"image": img}})
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    llm.generate(reqs[:1], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    res = llm.generate(reqs, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    ttft = [r.metrics.first_token_latency for r in res if getattr(r, "metrics", None)]
    json.dump({"wall_s": wall, "requests": len(res), "ttft_s": ttft,
               "prompt_tokens": [len(r.prompt_token_ids) for r in res],
               "kv_tokens": [len(r.prompt_token_ids) + len(r.outputs[0].token_ids) for r in res],
               "prompt_tokens_metric": sum(m.value for m in llm.get_metrics()
                                           if m.name == "vllm:prompt_tokens")},
              open(out_path, "w"))


def _pct(xs, q):
    import numpy as np
    return float(np.percentile(xs, q)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="llava-hf or Qwen2.5-VL / Qwen3-VL checkpoint (default: a "
                    "tiny random one)")
    ap.add_argument("--next", action="store_true",
                    help="LLaVA-NeXT: the tiny checkpoint is one, anyres_mode 'global'")
    ap.add_argument("--qwen", choices=("qwen2_5_vl", "qwen3_vl"),
                    help="the tiny checkpoint is this Qwen family (up to 1024 merged tokens "
                    "per image)")
    ap.add_argument("--method", default="adaptive")
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--compiled", action="store_true", help="no enforce_eager (GPU: CUDA graphs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "vllm_serve.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    tmp = tempfile.mkdtemp(prefix="vllm_serve_")
    model = a.model
    sys.path.insert(0, ROOT)
    if model is None and a.qwen:
        from llava_agile.vllm.tiny import build_tiny_qwen
        model = build_tiny_qwen(os.path.join(tmp, "tiny-qwen"), family=a.qwen, max_tokens=1024)
    elif model is None:
        from llava_agile.vllm.tiny import build_tiny_hf_llava
        model = build_tiny_hf_llava(os.path.join(tmp, "tiny-llava-hf"), image_size=336,
                                    next=a.next)
    from transformers import AutoConfig
    qwen = AutoConfig.from_pretrained(model).model_type in ("qwen2_5_vl", "qwen3_vl")
    questions = ("What is in this image?", "Describe the picture.", "How many people are there?",
                 "What color is the sky? Answer with a single word.")
    if qwen:  # Qwen's chat format
        prompts = ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                   f"{q}<|im_end|>\n<|im_start|>assistant\n" for q in questions]
    else:
        system = ("A chat between a curious user and an artificial intelligence assistant. The "
                  "assistant gives helpful, detailed, and polite answers to the user's questions. ")
        prompts = [system + f"USER: <image>\n{q} ASSISTANT:" for q in questions]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               TOKENIZERS_PARALLELISM="false")
    runs = {}
    pruned = {"method": a.method, "keep": a.keep}
    if a.next:
        pruned["anyres_mode"] = "global"
    for name, agile in (("stock", None), ("pruned", pruned)):
        spec = os.path.join(tmp, f"{name}.json")
        out = os.path.join(tmp, f"{name}.out.json")
        json.dump({"model": model, "agile": agile, "dtype": a.dtype, "seed": a.seed,
                   "enforce_eager": not a.compiled, "max_model_len": a.max_model_len,
                   "requests": a.requests, "max_tokens": a.max_tokens, "prompts": prompts},
                  open(spec, "w"))
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec, out],
                       check=True, cwd=tmp, env=env)
        r = json.load(open(out))
        runs[name] = {"requests_per_s": r["requests"] / r["wall_s"],
                      "ttft_p50_s": _pct(r["ttft_s"], 50), "ttft_p90_s": _pct(r["ttft_s"], 90),
                      "ttft_p99_s": _pct(r["ttft_s"], 99),
                      "prompt_tokens": r["prompt_tokens_metric"],
                      "kv_tokens_per_request": sum(r["kv_tokens"]) / len(r["kv_tokens"])}
    ratio = {k: runs["pruned"][k] / runs["stock"][k] for k in runs["stock"]
             if runs["stock"][k]}
    tiny = (f"tiny random {a.qwen} (up to 1024 merged tokens per image)" if a.qwen else
            f"tiny random {'llava-next' if a.next else 'llava'}-hf (336 px, N=576 per crop)")
    result = {"model": a.model or tiny, "agile": pruned, "requests": a.requests,
              "max_tokens": a.max_tokens, "dtype": a.dtype, "compiled": a.compiled,
              "runs": runs, "pruned_over_stock": ratio}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    json.dump(result, open(a.out, "w"), indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
