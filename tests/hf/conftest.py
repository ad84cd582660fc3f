"""HF adapter tests: run in .venv-hf (transformers 4.57.6) and .venv-hf5 (5.24.0) by `make test`.

Under .venv (transformers 4.37.2, no LlavaModel) this folder is not collected. The original
codebase's reference run (tests/hf/orig_reference.py) needs .venv's python: it is run once per
session into a temporary folder (LLAVA_AGILE_ORIGINAL_PYTHON overrides the interpreter).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _hf_ok() -> bool:
    try:
        import transformers
    except ImportError:
        return False
    m = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (4, 52)


if not _hf_ok():
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The original codebase's runs (see orig_reference.py), loaded from its reference.pt
    (LLAVA_AGILE_HF_REFERENCE=DIR reuses a finished run's folder)."""
    done = os.environ.get("LLAVA_AGILE_HF_REFERENCE")
    if done:
        return torch.load(Path(done) / "reference.pt", weights_only=False)
    python = os.environ.get("LLAVA_AGILE_ORIGINAL_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    if not os.path.exists(python):
        pytest.skip(f"no original-codebase python at {python} (run `make setup`)")
    out = tmp_path_factory.mktemp("orig")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, str(Path(__file__).with_name("orig_reference.py")), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "reference.pt", weights_only=False)


# DTYPES: float64, where the equivalence tests compare token choices (round-off cannot decide
# them); float32, the adapters' real dtype, checked for what it guarantees (orig_reference.py)
from orig_reference import DTYPES  # noqa: E402  (tests/hf is on sys.path)
# round-off through the tower scales with the features' size (|x| up to ~6 here), not with each
# element's: float32 embeddings of two codebases differ by up to ~1e-5 where a value is near 0
TOL = {"float64": dict(rtol=1e-9, atol=1e-10), "float32": dict(rtol=1e-4, atol=1e-4)}
# stats that the selection does not decide (measured before it, or fixed by the layout)
CHOICE_FREE = ("erank", "entropy", "complexity", "tau_range", "ratio", "contextual", "mode",
               "crops", "newlines")


def close(got, want, dtype):
    """Numbers within TOL[dtype] (ints and strings equal), through lists, tuples and dicts."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (got, want)
        for k in want:
            close(got[k], want[k], dtype)
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), (got, want)
        for g, w in zip(got, want):
            close(g, w, dtype)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=TOL[dtype]["rtol"], abs=TOL[dtype]["atol"])
    else:
        assert got == want


def check_stats(st, st0, dtype, choices_agree):
    """`agile_stats` of one image against the reference: the same keys; every value where the
    choices agree (prune_ms aside), else the CHOICE_FREE ones."""
    assert st.keys() == st0.keys(), (sorted(st), sorted(st0))
    for k in st0:
        if k != "prune_ms" and (choices_agree or k in CHOICE_FREE):
            close(st[k], st0[k], dtype)


def load_hf(path, family, dtype):
    """The converted checkpoint in `dtype` with the original's float16-rounded weights (LLaVA's
    builder loads float16), its vision tower on SDPA (the adapters' setting; transformers 5.x's
    eager CLIP attention computes its softmax in float32 even for float64 input)."""
    import transformers
    from transformers import AutoProcessor

    cls_name = {"llava": "LlavaForConditionalGeneration",
                "llava_next": "LlavaNextForConditionalGeneration"}[family]
    model, info = getattr(transformers, cls_name).from_pretrained(
        path, dtype=DTYPES[dtype], output_loading_info=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().to(p.dtype))
    tower = model.model.vision_tower
    if hasattr(tower, "set_attn_implementation"):
        tower.set_attn_implementation("sdpa")
    else:
        tower.config._attn_implementation = "sdpa"
    assert tower.config._attn_implementation == "sdpa"
    return model.eval(), AutoProcessor.from_pretrained(path), info


@pytest.fixture(scope="session")
def converted(reference, tmp_path_factory):
    """family -> the original tiny checkpoint converted to the llava-hf layout (once)."""
    from llava_agile.hf.convert import convert_original

    return {f: convert_original(reference[f]["path"], str(tmp_path_factory.mktemp(f) / "hf"))
            for f in ("llava", "llava_next")}


@pytest.fixture(scope="session")
def hf(converted):
    """`hf(family, dtype="float64")` -> (model, processor, loading info), each loaded once."""
    cache = {}

    def get(family, dtype="float64"):
        if (family, dtype) not in cache:
            cache[family, dtype] = load_hf(converted[family], family, dtype)
        return cache[family, dtype]
    return get


@pytest.fixture(scope="session")
def hf_llava(hf):
    return hf("llava")


@pytest.fixture(scope="session")
def hf_next(hf):
    return hf("llava_next")


def text_tower(ref: dict, method: str) -> dict:
    """cdpruner / trim: the reference's tiny CLIP text tower (the question comes from the
    prompt); {} for the other methods."""
    from llava_agile.methods import TEXT

    return {"text_tower": ref["text_tower"]} if method in TEXT else {}


def same_greedy(got, want, margins, tol=1e-3):
    """Greedy tokens equal the reference's up to the first step whose reference logits margin
    (top 1 - top 2) is within what the two paths' round-off could flip (their LLMs differ in
    kernels, and transformers 4.37's LLaMA computes its softmax in float32 even in float64;
    logits differ by ~1e-6); later steps follow from that choice. Returns the steps compared."""
    got, want = list(got), list(want)
    for step, margin in enumerate(margins):
        if margin < tol:
            return step
        assert got[step] == want[step], (step, got, want, margins)
    return len(margins)
