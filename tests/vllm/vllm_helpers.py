"""Shared by the vLLM engine tests: prompts, one engine run in its own process, and the margin
checks that let a float32 vLLM run be compared token for token with a float64 reference."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # tests/: the decision-margin checks
    sys.path.insert(0, str(HERE.parent))
import decided  # noqa: E402

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions. ")
PROMPT1 = SYSTEM + "USER: <image>\nWhat is in this image? ASSISTANT:"
PROMPT2 = SYSTEM + "USER: <image>\n<image>\nDescribe the picture please. ASSISTANT:"


def run_engine(tmp: Path, name: str, model: str, agile, rounds, plugins=None, timeout=900,
               embeds=None, record=False, refused=(), **spec_extra):
    """One engine in a subprocess (engine_run.py). A request of `rounds` may carry "mm" (its
    mm_processor_kwargs); `refused`: requests that must fail alone (their errors come back);
    `spec_extra`: engine_run's other keys ("video", "positions")."""
    spec, out = tmp / f"{name}.json", tmp / f"{name}.out.json"
    spec.write_text(json.dumps({"model": model, "agile": agile, "rounds": rounds,
                                "embeds": embeds, "record": record, "refused": list(refused),
                                **spec_extra}))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    proc = subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(spec), str(out)],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        return None, proc
    return json.loads(out.read_text()), proc


def ok(res, proc):
    assert res is not None, proc.stderr[-6000:]
    return res


def check_second_round_cached(res, ref):
    """The second round repeats the first request: prefix cache hit, no new tower run, the
    same tokens. The cached prefill runs the rest of the prompt alone (other GEMM and attention
    shapes than the full prefill, so other round-off): both rounds' tokens are compared with the
    float64 reference `ref` (hf_reference) through check_greedy's margins."""
    first, second = res["rounds"][0], res["rounds"][1]
    assert second["requests"][0]["num_cached_tokens"] > 0
    assert second["model"]["encoder_calls"] == first["model"]["encoder_calls"]
    for request in (first["requests"][0], second["requests"][0]):
        check_greedy(ref.scores, ref.tokens, request)


def hf_reference(model_cls, model_dir, image, prompt, **agile):
    """The float64 reference for a vLLM run of one request: transformers' `model_cls` on the
    checkpoint in float64 (SDPA tower: the eager CLIP attention of transformers 5.x takes its
    softmax in float32) with `llava_agile.enable(**agile)` and greedy `generate` (8 tokens).
    Returns the model, processor and inputs, `selection` (the
    features and attention its one selection got), `stats`, `positions` (the `position_ids` its
    LLM got in the prefill), the new `tokens` and their `scores` (`[8, V]` logits); its LLM's
    RMSNorm still rounds to float32 in transformers, so the logits are accurate to ~1e-6, far
    inside check_greedy's margin."""
    import warnings
    from types import SimpleNamespace
    from unittest import mock

    from PIL import Image
    from transformers import AutoProcessor

    import llava_agile
    import llava_agile.selection as selection

    model = model_cls.from_pretrained(model_dir, dtype=torch.float64,
                                      attn_implementation="sdpa").eval()
    assert model.config.vision_config._attn_implementation == "sdpa"
    processor = AutoProcessor.from_pretrained(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5.19 is outside the adapter's tested pair
        llava_agile.enable(model, processor=processor, **agile)
    inputs = processor(images=[Image.open(image).convert("RGB")], text=prompt,
                       return_tensors="pt")
    seen, positions, prune = [], [], selection.prune

    def spy(space, attn, keep, *args, **kwargs):
        seen.append((space[0], attn[0]))
        return prune(space, attn, keep, *args, **kwargs)

    def first(module, args, kwargs):
        if not positions:
            positions.append(kwargs.get("position_ids"))

    hook = model.model.language_model.register_forward_pre_hook(first, with_kwargs=True)
    try:
        with torch.no_grad(), mock.patch.object(selection, "prune", spy):
            gen = model.generate(**inputs, max_new_tokens=8, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
    finally:
        hook.remove()
    assert len(seen) == 1 and seen[0][0].dtype == seen[0][1].dtype == torch.float64
    return SimpleNamespace(model=model, processor=processor, inputs=inputs, selection=seen[0],
                           stats=model.agile_stats, positions=positions[0],
                           tokens=gen.sequences[0, inputs["input_ids"].shape[1]:].tolist(),
                           scores=torch.stack([s[0] for s in gen.scores]))


def check_selection(ref, got, k):
    """`ref` = (features, attention) of the float64 reference's selection, `got` = the dict vLLM
    recorded (engine_run "selection"). Asserts that round-off cannot decide the choice
    (decided.adaptive) and that vLLM kept the reference's tokens; returns them."""
    kept = decided.adaptive(ref, [torch.tensor(got[n], dtype=torch.float64)[0]
                                  for n in ("space", "attn")], k)
    assert got["indices"][0] == kept
    return kept


def check_greedy(ref_scores, ref_tokens, got):
    """Greedy tokens of a float64 reference (`ref_scores`: `[steps, V]` logits of its steps,
    `ref_tokens` its new tokens) vs a vLLM request `got`: every step's top-2 logit gap of the
    reference is above decided.TOL_LOGIT, hundreds of times vLLM's float32 deviation, so
    round-off cannot pick another token and vLLM's tokens must be the reference's."""
    decided.greedy(ref_scores)
    assert got["token_ids"] == ref_tokens
