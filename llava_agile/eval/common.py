"""Shared scorer helpers: loading ground truth with clear errors, answer checks, percentages."""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from .answers import question_id, record_key
from .benchmarks import require


def load_json(path: str | Path, bench: str, what: str = "annotation file"):
    path = require(path, bench, what)
    if path.is_dir():
        raise ValueError(f"{bench}: {what} must be a file, got the directory {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{bench}: {path} is not valid JSON ({e})") from None


def check_answers(answers: list[dict], bench: str) -> list[dict]:
    """Non-empty, every record has an id and a `text`, no record twice."""
    if not answers:
        raise ValueError(f"{bench}: the answers file has no answers")
    seen = set()
    for rec in answers:
        question_id(rec)
        if not isinstance(rec.get("text"), str):
            raise ValueError(f"{bench}: answer without a `text` string: {str(rec)[:120]}")
        k = record_key(rec)
        if k in seen:
            raise ValueError(f"{bench}: question {k[0]!r} is answered twice; merge chunk files "
                             f"with `python -m llava_agile.eval merge` (it drops duplicates)")
        seen.add(k)
    return answers


def pct(num: float, den: float) -> float:
    return round(100.0 * num / den, 6) if den else 0.0


@functools.lru_cache(maxsize=1)
def llava_m4c():
    """The installed LLaVA's `llava/eval/m4c_evaluator.py`, loaded from its file so that the
    heavy `llava` package (torch, transformers) is not imported just to score."""
    spec = importlib.util.find_spec("llava")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the `llava` package (llava-torch==1.2.2.post1) is not installed; run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / "eval" / "m4c_evaluator.py"
    mspec = importlib.util.spec_from_file_location("_llava_m4c_evaluator", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module
