"""Shared by the vLLM engine tests: prompts and one engine run in its own process."""
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions. ")
PROMPT1 = SYSTEM + "USER: <image>\nWhat is in this image? ASSISTANT:"
PROMPT2 = SYSTEM + "USER: <image>\n<image>\nDescribe the picture please. ASSISTANT:"


def run_engine(tmp: Path, name: str, model: str, agile, rounds, plugins=None, timeout=900,
               embeds=None):
    spec, out = tmp / f"{name}.json", tmp / f"{name}.out.json"
    spec.write_text(json.dumps({"model": model, "agile": agile, "rounds": rounds,
                                "embeds": embeds}))
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


def check_second_round_cached(res):
    """The second round repeats the first request: prefix cache hit, no new tower run, the
    same tokens."""
    first, second = res["rounds"][0], res["rounds"][1]
    assert second["requests"][0]["num_cached_tokens"] > 0
    assert second["model"]["encoder_calls"] == first["model"]["encoder_calls"]
    assert second["requests"][0]["token_ids"] == first["requests"][0]["token_ids"]
