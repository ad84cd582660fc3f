"""CLI: python -m llava_agile.eval {run,score,report,merge,pending,paths,layout,chair-questions} ...

Every command prints one JSON object (or the report's markdown) on stdout; errors are one line
on stderr with exit status 2."""
from __future__ import annotations

import argparse
import json
import sys

from . import benchmarks, chair, driver, layout
from .answers import (dump_questions, dumps_jsonl, finished_ids, load_questions, merge_answers,
                      pending_questions, write_output)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_agile.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    names = ", ".join(benchmarks.BENCHMARKS)
    driver.add_parser(sub)

    s = sub.add_parser("score", help="score an answers file (prints one JSON object, percentages)")
    s.add_argument("bench", help=f"one of: {names}")
    s.add_argument("--answers", required=True, help="answers JSONL (LLaVA's answer format)")
    s.add_argument("--questions", help="LLaVA question file (default: from --data-root if present)")
    s.add_argument("--annotations", help="ground truth file/folder (default: from --data-root)")
    s.add_argument("--data-root", default=benchmarks.DEFAULT_DATA_ROOT,
                   help="LLaVA eval data root for default paths (default: %(default)s)")
    s.add_argument("--upload", help="upload file for server-scored sets (default: beside --answers)")
    s.add_argument("--out", help="also write the JSON here (e.g. <bench dir>/results.json)")
    s.add_argument("--overwrite", action="store_true", help="replace existing files with different content")

    r = sub.add_parser("report", help="markdown + CSV + PNG over <model>/<method>/k<K>/<bench>/results.json")
    r.add_argument("dirs", nargs="+", help="results roots (the scripts' --out)")
    r.add_argument("--out", help="where report.md/.csv/.png go (default: the first DIR)")
    r.add_argument("--no-plot", action="store_true")
    r.add_argument("--overwrite", action="store_true")

    m = sub.add_parser("merge", help="merge chunk answer files in question order (no loss, no duplicates)")
    m.add_argument("parts", nargs="*", help="answer files (default: all chunk files of --bench-dir)")
    m.add_argument("--bench-dir", help="a <out>/<model>/<method>/k<K>/<bench> directory")
    m.add_argument("--questions", help="question file giving the order")
    m.add_argument("--out", help="merged file (default: <bench-dir>/answers.jsonl)")
    m.add_argument("--overwrite", action="store_true", help="rebuild --out from the parts alone")

    q = sub.add_parser("pending", help="write the questions not yet answered (resume)")
    q.add_argument("--questions", required=True)
    q.add_argument("--answers", nargs="+", required=True, help="existing answer files (missing ones = empty)")
    q.add_argument("--out", required=True, help="question file with the pending questions (.jsonl, .json or .tsv like --questions)")
    q.add_argument("--all-rounds", action="store_true", help="MMBench --all-rounds: need every round")
    q.add_argument("--overwrite", action="store_true")

    a = sub.add_parser("paths", help="a benchmark's data paths under the data root (JSON)")
    a.add_argument("bench", help=f"one of: {names}")
    a.add_argument("--data-root", default=benchmarks.DEFAULT_DATA_ROOT)
    a.add_argument("--get", choices=["questions", "images", "annotations", "module", "extra_args"],
                   help="print only this field (plain text)")
    a.add_argument("--check", action="store_true", help="fail (naming the download step) if a path is missing")

    y = sub.add_parser("layout", help="result paths of a run: <out>/<model>/<method>/k<K>/<bench>/... (JSON)")
    y.add_argument("--out", required=True, help="results root")
    y.add_argument("--model-path", required=True, help="model path or name (LLaVA's naming rule)")
    y.add_argument("--method", required=True)
    y.add_argument("--keep", type=int, required=True)
    y.add_argument("--bench", required=True)
    y.add_argument("--chunks", type=int, default=1, help="number of chunks (GPUs)")
    y.add_argument("--idx", type=int, default=0, help="this chunk; `chunk` is its first unused part file")
    y.add_argument("--get", choices=["model", "bench_dir", "answers", "results", "upload", "chunk"],
                   help="print only this field (plain text)")

    c = sub.add_parser("chair-questions", help="write the deterministic CHAIR image sample as a question file")
    c.add_argument("--annotations", required=True, help="instances_val2014.json or its folder")
    c.add_argument("--out", required=True)
    c.add_argument("--n", type=int, default=500)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--overwrite", action="store_true")
    return p


def _emit(obj) -> None:
    print(json.dumps(obj, indent=1, ensure_ascii=False))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return driver.main(args)
        if args.cmd == "score":
            from .scoring import score
            res = score(args.bench, args.answers, args.questions, args.annotations, args.upload,
                        args.overwrite, args.data_root)
            if args.out:
                write_output(args.out, json.dumps(res, indent=1, ensure_ascii=False) + "\n", args.overwrite)
            _emit(res)
        elif args.cmd == "report":
            from .report import report
            res = report(args.dirs, args.out, args.overwrite, plot=not args.no_plot)
            print(res.pop("markdown_text"))
            print(json.dumps(res), file=sys.stderr)
        elif args.cmd == "merge":
            if not args.parts and not args.bench_dir:
                raise ValueError("give answer files or --bench-dir")
            parts = args.parts or layout.chunk_parts(args.bench_dir)
            out = args.out or (layout.answers_path(args.bench_dir) if args.bench_dir else None)
            if out is None:
                raise ValueError("--out is required without --bench-dir")
            qs = load_questions(args.questions) if args.questions else None
            _emit(dict(merge_answers(parts, out, qs, args.overwrite), out=str(out)))
        elif args.cmd == "pending":
            qs = load_questions(args.questions)
            todo = pending_questions(qs, args.answers, args.all_rounds)
            write_output(args.out, dump_questions(args.out, todo), args.overwrite)
            _emit({"questions": len(qs), "pending": len(todo), "out": args.out,
                   "answered_ids": len(finished_ids(args.answers, args.all_rounds))})
        elif args.cmd == "paths":
            b = benchmarks.get(args.bench)
            info = dict(benchmarks.paths(args.bench, args.data_root), module=b.module,
                        extra_args=" ".join(b.extra_args), server=b.server, chunked=b.chunked)
            if args.check:
                benchmarks.require(info["questions"], args.bench, "question file")
                if info["images"]:
                    benchmarks.require(info["images"], args.bench, "image folder")
                if b.annotations != b.questions:
                    benchmarks.require(info["annotations"], args.bench, "annotations")
            if args.get:
                print(info[args.get])
            else:
                _emit(info)
        elif args.cmd == "layout":
            benchmarks.get(args.bench)
            model = layout.model_name_from_path(args.model_path)
            d = layout.bench_dir(args.out, model, args.method, args.keep, args.bench)
            info = {"model": model, "bench_dir": str(d), "answers": str(layout.answers_path(d)),
                    "results": str(layout.results_path(d)),
                    "upload": str(layout.upload_path(d, args.bench)) if args.bench in layout.UPLOAD_NAMES else "",
                    "chunk": str(layout.new_chunk_part(d, args.chunks, args.idx))}
            if args.get:
                print(info[args.get])
            else:
                _emit(info)
        elif args.cmd == "chair-questions":
            recs = chair.questions(args.annotations, args.n, args.seed)
            write_output(args.out, dumps_jsonl(recs), args.overwrite)
            _emit({"out": args.out, "images": len(recs), "seed": args.seed})
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError) as e:
        msg = str(e) if not isinstance(e, KeyError) else f"missing field {e}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
