"""`score(bench, answers, ...)`: one entry point over all scorers and upload converters."""
from __future__ import annotations

from pathlib import Path

from . import benchmarks, chair, gqa, mmbench, mme, pope, seed, sqa, textvqa, upload, xlsx
from .answers import load_questions, read_jsonl, write_output
from .layout import UPLOAD_NAMES


def resolve(bench: str, questions: str | None, annotations: str | None,
            data_root: str | None) -> tuple[str | None, str | None]:
    """Fill unset paths from the data root's default layout (only those that exist)."""
    if data_root is None:
        return questions, annotations
    defaults = benchmarks.paths(bench, data_root)
    if questions is None and Path(defaults["questions"]).exists():
        questions = defaults["questions"]
    if annotations is None and Path(defaults["annotations"]).exists():
        annotations = defaults["annotations"]
    return questions, annotations


def _need(path, bench, what):
    if path is None:
        b = benchmarks.get(bench)
        raise FileNotFoundError(f"{bench}: {what} not found (give --annotations, or --data-root "
                                f"holding {b.annotations}); {b.download}")
    return path


def score(bench: str, answers: str | Path, questions: str | None = None, annotations: str | None = None,
          upload_file: str | Path | None = None, overwrite: bool = False,
          data_root: str | None = None) -> dict:
    """Score one answers file; server-scored sets (and MMBench, SEED) also write their upload
    file (default: beside the answers file, named as in `layout.UPLOAD_NAMES`)."""
    benchmarks.get(bench)
    questions, annotations = resolve(bench, questions, annotations, data_root)
    recs = read_jsonl(answers)
    qs = load_questions(benchmarks.require(questions, bench, "question file")) if questions else None
    if bench in UPLOAD_NAMES and upload_file is None:
        upload_file = Path(answers).parent / UPLOAD_NAMES[bench]
    if bench == "gqa":
        return gqa.score(recs, _need(annotations, bench, "testdev_balanced_questions.json"), qs)
    if bench == "textvqa":
        return textvqa.score(recs, _need(annotations, bench, "TextVQA_0.5.1_val.json"), qs)
    if bench == "pope":
        return pope.score(recs, _need(annotations, bench, "the coco/ folder of coco_pope_*.json"), qs)
    if bench == "mme":
        return mme.score(recs, _need(annotations, bench, "MME_Benchmark_release_version"), qs)
    if bench == "sqa":
        return sqa.score(recs, annotations, qs)
    if bench == "chair":
        return chair.score(recs, _need(annotations, bench, "instances_val2014.json or its folder"))
    if bench in ("mmbench", "mmbench_cn"):
        tsv = _need(annotations or questions, bench, "the MMBench TSV")
        header, rows = mmbench.upload_rows(recs, tsv, bench)
        write_output(upload_file, xlsx.to_bytes(header, rows), overwrite)
        try:
            out = mmbench.score(recs, tsv, bench)
        except ValueError as e:
            if "has no answers" not in str(e):
                raise
            out = {"benchmark": bench, "n_records": len(recs)}
        return dict(out, upload_file=str(upload_file))
    if bench == "seed":
        ann = _need(annotations, bench, "SEED-Bench.json")
        out = seed.score(recs, ann, qs)
        write_output(upload_file, seed.upload(recs, ann), overwrite)
        return dict(out, upload_file=str(upload_file))
    if bench == "vqav2":
        text, info = upload.vqav2(recs, _need(annotations, bench, "llava_vqav2_mscoco_test2015.jsonl"))
        if qs is not None:
            info["missing"] = len({str(q["question_id"]) for q in qs} - {str(r["question_id"]) for r in recs})
    elif bench == "vizwiz":
        text, info = upload.vizwiz(recs, _need(annotations or questions, bench, "llava_test.jsonl"))
    else:  # mmvet
        text, info = upload.mmvet(recs)
    write_output(upload_file, text, overwrite)
    return dict({"benchmark": bench, "server_scored": True}, **info, upload_file=str(upload_file))
