"""Test helper (not a test): run `llava_agile.run` or a (patched) LLaVA module as __main__ in
this process and record, for every `model.generate` call, what the LLM was fed.

    python tests/llava_probe.py RECORD.json llava_agile.run llava.eval.model_vqa_loader ...
    python tests/llava_probe.py RECORD.json llava.eval.model_vqa_loader --pruning ...

It wraps `llava_agile.patch_hooks.finish_model` (which both the runner and the patched builder
call) to instrument the loaded model: prompt length (input_ids, one <image> token each), the
LLM's prefill length (a forward pre-hook on the LLaMA model), dtype, device, agile_stats.
`max_new_tokens` is capped at 4 to keep the run short (some LLaVA modules hard-code 1024).
"""
import json
import runpy
import sys

import torch

torch.set_num_threads(1)


def instrument(model, records):
    def pre_hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and records and records[-1]["prefill"] is None:
            records[-1]["prefill"] = int(embeds.shape[1])

    model.get_model().register_forward_pre_hook(pre_hook, with_kwargs=True)
    generate = model.generate

    def probed_generate(inputs=None, *args, **kwargs):
        kwargs["max_new_tokens"] = min(kwargs.get("max_new_tokens") or 4, 4)
        records.append({"prompt": int(inputs.shape[1]), "prefill": None,
                        "dtype": str(model.dtype), "device": str(model.device),
                        "images": None if kwargs.get("images") is None
                        else str(kwargs["images"].dtype)})
        out = generate(inputs, *args, **kwargs)
        records[-1]["kept"] = [s.get("kept") for s in getattr(model, "agile_stats", None) or []]
        records[-1]["stat_keys"] = [sorted(s) for s in getattr(model, "agile_stats", None) or []]
        records[-1]["questions"] = [s.get("question") for s in
                                    getattr(model, "agile_stats", None) or []]
        return out

    model.generate = probed_generate


def main():
    record_file, target, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    records, code = [], 0
    import llava_agile.patch_hooks as hooks

    finish = hooks.finish_model

    def finish_and_probe(model, *args, **kwargs):
        model = finish(model, *args, **kwargs)
        instrument(model, records)
        return model

    hooks.finish_model = finish_and_probe
    try:
        if target == "llava_agile.run":
            from llava_agile.run import main as run_main
            code = run_main(rest)
        else:
            sys.argv = [target, *rest]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    finally:
        import llava
        with open(record_file, "w") as f:
            json.dump({"records": records, "llava_file": llava.__file__}, f)
    sys.exit(code)


# ---- for the tests: inputs in LLaVA's formats, and a subprocess call of this probe -------------

SIZES = [(300, 200), (200, 320), (336, 336)]


def make_inputs(root):
    """Three images and question files for model_vqa_loader / model_vqa (jsonl) and
    model_vqa_science (json); returns their paths."""
    import os

    import numpy as np
    from PIL import Image

    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h) in enumerate(SIZES):
        pixels = (rng.random((h, w, 3)) * 255).astype("uint8")
        pixels[h // 4: h // 2, w // 3: w // 2] = (40 * i, 200, 255 - 60 * i)
        names.append(f"img{i}.png")
        Image.fromarray(pixels).save(os.path.join(images, names[-1]))
    vqa = os.path.join(root, "questions.jsonl")
    with open(vqa, "w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"question_id": f"q{i}", "image": name, "category": "default",
                                "text": "What is in this image?\nAnswer the question using a "
                                        "single word or phrase."}) + "\n")
    sqa = os.path.join(root, "sqa.json")
    with open(sqa, "w") as f:
        json.dump([{"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the box?\nA. red\nB. blue"},
            {"from": "gpt", "value": "A"}]} for i, name in enumerate(names)], f)
    return {"images": images, "names": names, "vqa": vqa, "sqa": sqa}


def run_probe(workdir, target_args, pythonpath=None, timeout=600):
    """Run this probe in a subprocess; returns (returncode, stdout, stderr, record dict)."""
    import os
    import subprocess

    record = os.path.join(workdir, f"record-{len(os.listdir(workdir))}.json")
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, __file__, record, *target_args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=timeout)
    data = {}
    if os.path.exists(record):
        with open(record) as f:
            data = json.load(f)
    return proc.returncode, proc.stdout, proc.stderr, data


if __name__ == "__main__":
    main()
