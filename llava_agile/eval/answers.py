"""Answer files: tolerant JSONL reading, resumable runs and merging chunks in question order.

Ids are compared as strings (`str(question_id)`), so int and str ids from different files match.
A run killed mid-write can leave a truncated last line; readers skip it (with a warning) and
`repair_jsonl` cuts it off before more answers are appended.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable

ID_KEYS = ("question_id", "id", "index")


def question_id(rec: dict):
    """The id of a question/answer record (`question_id`, SQA's `id` or MMBench's `index`)."""
    for k in ID_KEYS:
        if k in rec:
            return rec[k]
    raise ValueError(f"record has no id field ({', '.join(ID_KEYS)}): {str(rec)[:120]}")


def record_key(rec: dict) -> tuple[str, int, str | None]:
    """(question id, round, prompt). MMBench --all-rounds writes several rounds per question;
    TextVQA and MME reuse one id for several questions of an image, told apart by the prompt
    (LLaVA's loader copies the question's `text` into the answer's `prompt`)."""
    return str(question_id(rec)), int(rec.get("round_id", 0) or 0), rec.get("prompt")


def _question_text(q: dict) -> str | None:
    return q.get("text") if isinstance(q.get("text"), str) else None


class QuestionIndex:
    """Maps answers to question positions: by id where ids are unique, else by (id, text)."""

    def __init__(self, questions: list[dict]):
        self.first: dict[str, int] = {}
        self.by_text: dict[tuple[str, str | None], int] = {}
        counts: dict[str, int] = {}
        for i, q in enumerate(questions):
            qid = str(question_id(q))
            counts[qid] = counts.get(qid, 0) + 1
            self.first.setdefault(qid, i)
            self.by_text.setdefault((qid, _question_text(q)), i)
        self.shared = {q for q, c in counts.items() if c > 1}

    def position(self, rec: dict) -> int | None:
        qid = str(question_id(rec))
        if qid in self.shared:
            return self.by_text.get((qid, rec.get("prompt")), None)
        return self.first.get(qid)


def _parse_lines(path: Path, data: bytes) -> tuple[list[dict], int]:
    """Records and the byte length of the valid prefix; an unparsable *last* line (a killed
    writer) is dropped with a warning, one earlier in the file is an error."""
    records, good, pos = [], 0, 0
    segments = data.split(b"\n")
    last = max((i for i, s in enumerate(segments) if s.strip()), default=-1)
    for i, seg in enumerate(segments):
        end = pos + len(seg) + (1 if i < len(segments) - 1 else 0)
        if seg.strip():
            try:
                rec = json.loads(seg.decode("utf-8"))
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                if i == last:
                    print(f"warning: {path}: ignoring truncated last line {i + 1}", file=sys.stderr)
                    return records, good
                raise ValueError(f"{path}:{i + 1}: not a JSON object ({e})") from None
            records.append(rec)
            good = end
        pos = end
    return records, good


def read_jsonl(path: str | Path, missing_ok: bool = False) -> list[dict]:
    """Records of a JSONL file; a truncated final line (killed writer) is skipped."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"answers file not found: {path}")
    return _parse_lines(path, path.read_bytes())[0]


def repair_jsonl(path: str | Path) -> int:
    """Cut a truncated last line (and add a missing final newline) so appends stay valid.
    Returns the number of complete records."""
    path = Path(path)
    if not path.is_file():
        return 0
    raw = path.read_bytes()
    records, good = _parse_lines(path, raw)
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    if good and not raw[:good].endswith(b"\n"):
        with open(path, "ab") as f:
            f.write(b"\n")
    return len(records)


def _answer_records(paths) -> list[dict]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return [rec for p in paths for rec in read_jsonl(p, missing_ok=True)]


def finished_ids(paths: str | Path | Iterable[str | Path], all_rounds: bool = False) -> set[str]:
    """Question ids (as str) answered in one or more answer files (missing files are empty).

    With `all_rounds` (MMBench --all-rounds) a question counts only when every round
    0..len(options)-1 is present, so a question cut mid-rounds is answered again.
    Where one id covers several questions (TextVQA, MME) use `pending_questions`."""
    rounds: dict[str, set[int]] = {}
    nopts: dict[str, int] = {}
    for rec in _answer_records(paths):
        qid, rnd, _ = record_key(rec)
        rounds.setdefault(qid, set()).add(rnd)
        if isinstance(rec.get("options"), list):
            nopts[qid] = len(rec["options"])
    if not all_rounds:
        return set(rounds)
    return {q for q, r in rounds.items() if r >= set(range(nopts.get(q, 1)))}


def pending_questions(questions: list[dict], paths: str | Path | Iterable[str | Path],
                      all_rounds: bool = False) -> list[dict]:
    """The questions (in order) not yet answered in the answer files `paths`.

    A question is done when its id is answered, or, for ids shared by several questions
    (TextVQA, MME), when an answer has that id and the question's text as prompt."""
    records = _answer_records(paths)
    if all_rounds:
        done_ids = finished_ids(paths, all_rounds=True)
        records = [r for r in records if str(question_id(r)) in done_ids]
    index = QuestionIndex(questions)
    done = {index.position(r) for r in records} - {None}
    return [q for i, q in enumerate(questions) if i not in done]


def read_tsv(path: str | Path) -> list[dict]:
    """Rows of an MMBench TSV as dicts of strings (the base64 image column included)."""
    path = Path(path)
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "index" not in rows[0] or "A" not in rows[0]:
        raise ValueError(f"{path}: not an MMBench TSV (needs index, question, A, B, ... columns)")
    return rows


def load_questions(path: str | Path) -> list[dict]:
    """LLaVA question file: JSONL (most sets), a JSON list (ScienceQA) or an MMBench TSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    if path.suffix == ".tsv":
        return read_tsv(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of questions")
        return data
    return read_jsonl(path)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_output(path: str | Path, data: bytes | str, overwrite: bool = False) -> Path:
    """Write a derived file atomically. An existing file with *different* content is kept
    (FileExistsError) unless `overwrite`; identical content is a no-op."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if path.exists() and not overwrite:
        if path.read_bytes() == data:
            return path
        raise FileExistsError(f"{path} exists with different content; pass --overwrite to replace it")
    _atomic_write(path, data)
    return path


def dumps_jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def dump_questions(path: str | Path, records: list[dict]) -> str:
    """Questions serialised like LLaVA's files, by suffix: .jsonl, .json (list) or .tsv."""
    suffix = Path(path).suffix
    if suffix == ".json":
        return json.dumps(records, ensure_ascii=False, indent=1)
    if suffix == ".tsv":
        if not records:
            return ""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(records[0]), delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(records)
        return buf.getvalue()
    return dumps_jsonl(records)


def merge_answers(parts: Iterable[str | Path], out: str | Path, questions: list[dict] | None = None,
                  overwrite: bool = False) -> dict:
    """Merge answer files into `out` without loss or duplication.

    Records are de-duplicated by (question id, round, prompt), the first occurrence winning;
    an existing `out` is read first and so always kept (`overwrite` rebuilds it from `parts`
    alone). With `questions` the result is in question order (rounds ascending) and an answer
    to an unknown question is an error; without, the files are concatenated in order.
    Returns counts: records, missing (unanswered questions), duplicates (dropped)."""
    out = Path(out)
    sources = ([] if overwrite else [out]) + [Path(p) for p in parts if Path(p) != out]
    seen: dict[tuple, dict] = {}
    dup = 0
    for src in sources:
        for rec in read_jsonl(src, missing_ok=src == out):
            k = record_key(rec)
            if k in seen:
                dup += 1
                continue
            seen[k] = rec
    recs = list(seen.values())
    missing = 0
    if questions is not None:
        index = QuestionIndex(questions)
        pos = {id(r): index.position(r) for r in recs}
        unknown = [str(question_id(r)) for r in recs if pos[id(r)] is None]
        if unknown:
            raise ValueError(f"{len(unknown)} answers match no question in the question file "
                             f"(first ids: {unknown[:5]}); wrong question file?")
        recs.sort(key=lambda r: (pos[id(r)], record_key(r)[1]))
        missing = len(questions) - len(set(pos.values()))
    _atomic_write(out, dumps_jsonl(recs).encode("utf-8"))
    return {"records": len(recs), "missing": missing, "duplicates": dup}
