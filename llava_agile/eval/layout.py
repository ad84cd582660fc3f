"""The results layout, defined once: `<out>/<model-name>/<method>/k<K>/<bench>/`.

Each benchmark directory holds
  `answers.jsonl`            merged answers in question order (LLaVA's answer format),
  `chunks/<N>_<i>[.<j>].jsonl` per-chunk answer files (part `j` >= 1 after a resume),
  `results.json`             the scorer's JSON object (percentages),
  an upload file for server-scored sets (`UPLOAD_NAMES`).
Scripts, the runner, the scorers and `report` all go through these helpers.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, NamedTuple

ANSWERS_NAME = "answers.jsonl"
RESULTS_NAME = "results.json"
CHUNKS_DIR = "chunks"
FULL_METHOD = "none"   # the full-token baseline run
FULL_KEEP = 576        # LLaVA-1.5's 24 x 24 visual tokens
UPLOAD_NAMES = {
    "vqav2": "answers_upload.json",
    "vizwiz": "answers_upload.json",
    "mmbench": "answers_upload.xlsx",
    "mmbench_cn": "answers_upload.xlsx",
    "seed": "answers_upload.jsonl",
    "mmvet": "mmvet_results.json",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_KEEP_RE = re.compile(r"^k(\d+)$")
_CHUNK_RE = re.compile(r"^(\d+)_(\d+)(?:\.(\d+))?\.jsonl$")


class RunKey(NamedTuple):
    model: str
    method: str
    keep: int
    bench: str


def model_name_from_path(model_path: str) -> str:
    """The model name LLaVA uses: the last path component, or `parent_checkpoint-N`."""
    parts = str(model_path).strip("/").split("/")
    if not parts or not parts[-1]:
        raise ValueError(f"cannot derive a model name from model path {model_path!r}")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"{kind} {value!r} is not usable as a directory name "
                         f"(letters, digits, '.', '_', '+', '-'; no leading dot or slash)")
    return value


def keep_dirname(keep: int) -> str:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int, got {keep!r}")
    return f"k{keep}"


def run_dir(out: str | Path, model: str, method: str, keep: int) -> Path:
    """`<out>/<model>/<method>/k<K>`."""
    return (Path(out) / _check_name("model name", model) / _check_name("method", method)
            / keep_dirname(keep))


def bench_dir(out: str | Path, model: str, method: str, keep: int, bench: str) -> Path:
    """`<out>/<model>/<method>/k<K>/<bench>`."""
    return run_dir(out, model, method, keep) / _check_name("benchmark", bench)


def answers_path(bdir: str | Path) -> Path:
    return Path(bdir) / ANSWERS_NAME


def results_path(bdir: str | Path) -> Path:
    return Path(bdir) / RESULTS_NAME


def upload_path(bdir: str | Path, bench: str) -> Path:
    if bench not in UPLOAD_NAMES:
        raise ValueError(f"{bench} has no upload file; those with one: {', '.join(sorted(UPLOAD_NAMES))}")
    return Path(bdir) / UPLOAD_NAMES[bench]


def chunk_path(bdir: str | Path, num_chunks: int, idx: int, part: int = 0) -> Path:
    """`chunks/<N>_<i>.jsonl` (part 0) or `chunks/<N>_<i>.<part>.jsonl`."""
    if num_chunks < 1 or not 0 <= idx < num_chunks or part < 0:
        raise ValueError(f"bad chunk: num_chunks={num_chunks}, idx={idx}, part={part}")
    suffix = "" if part == 0 else f".{part}"
    return Path(bdir) / CHUNKS_DIR / f"{num_chunks}_{idx}{suffix}.jsonl"


def chunk_parts(bdir: str | Path) -> list[Path]:
    """All chunk answer files of a benchmark directory, ordered by (N, i, part)."""
    cdir = Path(bdir) / CHUNKS_DIR
    if not cdir.is_dir():
        return []
    found = []
    for p in cdir.iterdir():
        m = _CHUNK_RE.match(p.name)
        if m and p.is_file():
            found.append(((int(m[1]), int(m[2]), int(m[3] or 0)), p))
    return [p for _, p in sorted(found)]


def new_chunk_part(bdir: str | Path, num_chunks: int, idx: int) -> Path:
    """The first unused part path of chunk `idx` (LLaVA's eval modules truncate their
    answers file, so a resumed chunk writes to a fresh part and nothing is lost)."""
    part = 0
    while chunk_path(bdir, num_chunks, idx, part).exists():
        part += 1
    return chunk_path(bdir, num_chunks, idx, part)


def parse_bench_dir(path: str | Path) -> RunKey:
    """Inverse of `bench_dir`: `.../<model>/<method>/k<K>/<bench>` -> RunKey."""
    parts = Path(path).resolve().parts
    if len(parts) < 4 or not _KEEP_RE.match(parts[-2]):
        raise ValueError(f"{path} is not a <model>/<method>/k<K>/<bench> directory")
    return RunKey(parts[-4], parts[-3], int(_KEEP_RE.match(parts[-2])[1]), parts[-1])


def iter_results(root: str | Path) -> Iterator[tuple[RunKey, Path]]:
    """Every `<model>/<method>/k<K>/<bench>/results.json` under `root` (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results directory not found: {root}")
    for p in sorted(root.rglob(RESULTS_NAME)):
        try:
            yield parse_bench_dir(p.parent), p
        except ValueError:
            continue
