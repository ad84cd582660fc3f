"""One offline vLLM engine run for tests/vllm (its own process: VLLM_PLUGINS is read per process).

    python engine_run.py SPEC.json OUT.json

SPEC: {"model": dir, "agile": {...} | null, "rounds": [[{"prompt": str, "images": [png]}, ...]],
"max_tokens": int, "embeds": prompt | absent, "video": prompt | absent, "record": bool | absent,
"positions": bool | absent}. Each round is one
`LLM.generate` call (a batch); OUT holds per request the prompt/output token ids and cached-token
count, the model's `agile_stats` and encoder-call count after each round, and the
`vllm:prompt_tokens` counter. With "record", OUT["selection"] holds what every
`llava_agile.selection.prune` call of the first round got and kept (features, attention row,
indices): the tests compare them with a float64 reference and its decision margins. With
"positions", each round's OUT entry holds the positions of its first LLM forward (its prefill).
"""
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model(lambda)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def _probe(model):
    return {"stats": [{k: v for k, v in s.items() if k in ("indices", "kept", "tokens",
                                                          "chunk_budgets", "zero_rows",
                                                          "attention_indices")}
                      for s in getattr(model, "agile_stats", [])],
            "encoder_calls": getattr(model, "agile_encoder_calls", None),
            "cls": type(model).__name__}


def _record(model):
    """Wraps `llava_agile.selection.prune` in the worker (the plugin's only selection call)."""
    import llava_agile.selection as selection

    seen = model.agile_test_selection = []
    orig = selection.prune

    def spy(space, attn, keep, *args, **kwargs):
        res = orig(space, attn, keep, *args, **kwargs)
        seen.append({"space": space.tolist(), "attn": attn.tolist(),
                     "indices": res.indices.tolist()})
        return res

    spy.orig = orig
    selection.prune = spy


def _record_positions(model):
    """Records the `positions` of every LLM forward, as its first decoder layer's attention gets
    them (vLLM calls its compilable modules through `forward`, bypassing their own hooks; the
    attention module is not one)."""
    seen = model.agile_test_positions = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["positions"]).tolist())

    attn = model.language_model.model.layers[0].self_attn
    model.agile_test_hook = attn.register_forward_pre_hook(hook, with_kwargs=True)


def _first_positions(model):
    """The first recorded forward's positions since the last call (a round's prefill)."""
    first = model.agile_test_positions[0]
    model.agile_test_positions.clear()
    return first


def _recorded(model):
    import llava_agile.selection as selection

    selection.prune = selection.prune.orig
    return model.agile_test_selection


def main(spec_path, out_path):
    from PIL import Image
    from vllm import LLM, SamplingParams

    spec = json.load(open(spec_path))
    kw = {} if spec.get("agile") is None else {"hf_overrides": {"agile": spec["agile"]}}
    llm = LLM(model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=2048,
              max_num_batched_tokens=2048, max_num_seqs=4, limit_mm_per_prompt={"image": 2},
              enable_prefix_caching=True, block_size=32, enable_mm_embeds=True, disable_log_stats=False, seed=0, **kw)
    record = bool(spec.get("record"))
    # no logprobs (the tests take the logit margins from their float64 reference): vLLM gathers
    # them with a torch.compile'd function that inductor fails to build under
    # ATEN_CPU_CAPABILITY=default
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), ignore_eos=True)
    out = {"rounds": []}
    for n, batch in enumerate(spec["rounds"]):
        if record and n == 0:
            llm.apply_model(_record)
        if spec.get("positions") and n == 0:
            llm.apply_model(_record_positions)
        reqs = [{"prompt": r["prompt"],
                 "multi_modal_data": {"image": [Image.open(p).convert("RGB")
                                                for p in r["images"]]},
                 **({"mm_processor_kwargs": r["mm"]} if "mm" in r else {})} for r in batch]
        res = llm.generate(reqs, params, use_tqdm=False)
        if record and n == 0:
            out["selection"] = llm.apply_model(_recorded)[0]
        out["rounds"].append({
            "requests": [{"prompt_token_ids": list(r.prompt_token_ids),
                          "token_ids": list(r.outputs[0].token_ids),
                          "num_cached_tokens": r.num_cached_tokens} for r in res],
            "model": llm.apply_model(_probe)[0],
            **({"positions": llm.apply_model(_first_positions)[0]} if spec.get("positions")
               else {})})
    out["refused"] = []  # requests expected to fail alone: their error, then a good one runs
    for r in spec.get("refused", []):
        try:
            llm.generate([{"prompt": r["prompt"], "mm_processor_kwargs": r["mm"],
                           "multi_modal_data": {"image": [Image.open(p).convert("RGB")
                                                          for p in r["images"]]}}], params,
                         use_tqdm=False)
            out["refused"].append(None)
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            out["refused"].append(f"{type(e).__name__}: {e}")
    if spec.get("video"):  # a video request: must be refused under the plugin
        import numpy as np
        try:
            llm.generate([{"prompt": spec["video"],
                           "multi_modal_data": {"video": np.zeros((4, 56, 56, 3), np.uint8)}}],
                         params, use_tqdm=False)
            out["video_error"] = None
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            out["video_error"] = f"{type(e).__name__}: {e}"
    if spec.get("embeds"):  # a precomputed image_embeds input: must be refused under the plugin
        import torch
        try:
            llm.generate([{"prompt": spec["embeds"],
                           "multi_modal_data": {"image": torch.zeros(1, 16, 64)}}], params,
                         use_tqdm=False)
            out["embeds_error"] = None
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            out["embeds_error"] = f"{type(e).__name__}: {e}"
    out["prompt_tokens"] = sum(m.value for m in llm.get_metrics()
                               if m.name == "vllm:prompt_tokens")
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
