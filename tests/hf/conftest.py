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


def load_hf(reference, family, tmp_path_factory):
    from transformers import AutoProcessor

    from llava_agile.hf.convert import convert_original

    cls_name = {"llava": "LlavaForConditionalGeneration",
                "llava_next": "LlavaNextForConditionalGeneration"}[family]
    import transformers
    cls = getattr(transformers, cls_name)
    dst = convert_original(reference[family]["path"], str(tmp_path_factory.mktemp(family) / "hf"))
    model, info = cls.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():  # LLaVA's builder loads in float16, load_tiny casts back to float32:
        for p in model.parameters():  # the original ran with float16-rounded weights
            p.copy_(p.half().float())
    set_tower_attention(model, "eager")
    processor = AutoProcessor.from_pretrained(dst)
    return model.eval(), processor, info, dst


def set_tower_attention(model, impl):
    """The original codebase's tower (transformers 4.37) runs eager attention; the equivalence
    tests give the HF tower the same kernel, because on images with flat regions VisPruner's
    similarity ties are decided by round-off (SDPA vs eager differ there in HF itself).
    test_sdpa_tower_gives_the_same_selection checks the SDPA tower (the adapter's point)."""
    tower = model.model.vision_tower
    if hasattr(tower, "set_attn_implementation"):
        tower.set_attn_implementation(impl)
    else:
        tower.config._attn_implementation = impl
    assert tower.config._attn_implementation == impl


@pytest.fixture(scope="session")
def hf_llava(reference, tmp_path_factory):
    return load_hf(reference, "llava", tmp_path_factory)


@pytest.fixture(scope="session")
def hf_next(reference, tmp_path_factory):
    return load_hf(reference, "llava_next", tmp_path_factory)

