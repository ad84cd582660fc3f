"""`python -m llava_agile.eval run BENCH --pruning METHOD --keep K ...`: one benchmark end to end,
as LLaVA's `scripts/v1_5/eval/<bench>.sh` runs it (same data layout, prompts, module flags,
`--temperature 0 --conv-mode vicuna_v1`), with visual-token pruning; `eval_scripts/*.sh` call it.

1. Check the inputs (question file, images, ground truth) before any model is loaded.
2. Questions already answered in `<out>/<model>/<method>/k<K>/<bench>/` are skipped (resume).
3. The rest is split over the GPUs in CUDA_VISIBLE_DEVICES, one chunk per GPU in parallel, as
   LLaVA's chunked scripts do (LLaVA's `--num-chunks/--chunk-idx`); one chunk on the CPU when
   no GPU is visible. Each chunk is `python -m llava_agile.eval.infer` (the runner, or the
   patched checkout in LLAVA_DIR) writing a fresh chunk part, a stats file and a log.
4. The parts are merged in question order into answers.jsonl, scored into results.json (plus
   the upload file of server-scored sets), and one summary line is printed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import benchmarks, layout
from .answers import dump_questions, load_questions, merge_answers, pending_questions, write_output

DEFAULT_MODEL = "liuhaotian/llava-v1.5-7b"
DEFAULT_OUT = "./playground/results"
CONV_MODE = "vicuna_v1"
RECORD_NAME = "run.json"
STATS_DIR, LOGS_DIR = "stats", "logs"
# what must match for answers in a result directory to be continued (resume)
RECORD_KEYS = ("benchmark", "model", "model_base", "pruning", "conv_mode", "max_new_tokens")


class RunError(Exception):
    """A failed inference chunk or an incomplete run (one line on stderr, exit status 1)."""


def add_parser(sub) -> None:
    names = ", ".join(benchmarks.BENCHMARKS)
    r = sub.add_parser("run", help="run one benchmark: inference (resumable, one chunk per GPU), "
                                   "merge, score, summary")
    r.add_argument("bench", help=f"one of: {names}")
    r.add_argument("--pruning", required=True, metavar="METHOD",
                   help="pruning method (`none`: the full-token run)")
    r.add_argument("--keep", type=int, default=None, metavar="K",
                   help="visual tokens kept per image (required; `none` defaults to 576)")
    r.add_argument("--pruning-args", default=None, metavar="KEY=VALUE,...")
    r.add_argument("--erank-avg-file", default=None, metavar="FILE")
    r.add_argument("--model-path", default=DEFAULT_MODEL, help="(default: %(default)s)")
    r.add_argument("--model-base", default=None, help="LLaVA's --model-base (LoRA checkpoints)")
    r.add_argument("--data-root", default=benchmarks.DEFAULT_DATA_ROOT, help="(default: %(default)s)")
    r.add_argument("--out", default=DEFAULT_OUT, help="results root (default: %(default)s)")
    r.add_argument("--conv-mode", default=CONV_MODE, help="(default: %(default)s)")
    r.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="cap every generation at N new tokens (smoke tests; default: LLaVA's)")
    r.add_argument("--llava-dir", default=os.environ.get("LLAVA_DIR") or None,
                   help="a LLaVA checkout patched with patches/apply.sh (default: $LLAVA_DIR; "
                        "unset: the installed llava through llava_agile.run)")
    r.add_argument("--overwrite", action="store_true",
                   help="discard this run's earlier answers and results and start over")


# ---------------------------------------------------------------- inputs

def check_inputs(bench: str, data_root: str) -> tuple[dict, list[dict]]:
    """Paths (from benchmarks.paths) and the questions; every missing file named with its
    download step, before any model is loaded."""
    b = benchmarks.get(bench)
    paths = benchmarks.paths(bench, data_root)
    benchmarks.require(paths["questions"], bench, "question file")
    if b.images:
        benchmarks.require(paths["images"], bench, "image folder")
    if not b.server and bench != "sqa":   # ScienceQA's truth is inside llava_test_CQM-A.json
        benchmarks.require(paths["annotations"], bench, "ground truth")
    if bench == "vqav2":
        benchmarks.require(paths["annotations"], bench, "test split (llava_vqav2_mscoco_test2015.jsonl)")
    questions = load_questions(paths["questions"])
    if not questions:
        raise ValueError(f"{bench}: the question file {paths['questions']} has no questions")
    return paths, questions


def check_images(bench: str, image_folder: str, questions: list[dict]) -> None:
    if not image_folder:
        return
    missing = [Path(image_folder) / q["image"] for q in questions
               if "image" in q and not (Path(image_folder) / q["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{bench}: {len(missing)} image(s) not found, e.g. {missing[0]}; "
                                f"{benchmarks.get(bench).download}")


def gpu_list() -> list[str]:
    """The GPUs of CUDA_VISIBLE_DEVICES (LLaVA's scripts default to "0"); [] = no GPU named."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return ["0"]
    return [g.strip() for g in env.split(",") if g.strip()]


def n_chunks(n_questions: int, n_gpus: int) -> int:
    """LLaVA's split_list makes ceil(n / ceil(n / g)) chunks; asking for more fails there."""
    if n_questions == 0:
        return 0
    return math.ceil(n_questions / math.ceil(n_questions / max(n_gpus, 1)))


# ---------------------------------------------------------------- the result directory

def run_record(opts, config) -> dict:
    return {"benchmark": opts.bench, "model": layout.model_name_from_path(opts.model_path),
            "model_path": opts.model_path, "model_base": opts.model_base,
            "pruning": config.to_dict(), "conv_mode": opts.conv_mode, "temperature": 0,
            "max_new_tokens": opts.max_new_tokens, "llava_dir": opts.llava_dir}


def check_record(bdir: Path, record: dict) -> None:
    """Answers in `bdir` from a different configuration are never mixed with new ones."""
    path = bdir / RECORD_NAME
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(old.get("pruning"), dict):  # written before PruneConfig.stats existed
        old["pruning"].setdefault("stats", record["pruning"].get("stats"))
    diff = [k for k in RECORD_KEYS if old.get(k) != record.get(k)]
    if diff:
        raise FileExistsError(
            f"{bdir} holds a run with a different {', '.join(diff)} "
            f"({'; '.join(f'{k}: {old.get(k)!r} there, {record.get(k)!r} now' for k in diff)}); "
            f"pass --overwrite to discard it, or choose another --out")


def clear(bdir: Path, bench: str) -> None:
    """--overwrite: remove what earlier runs of this benchmark wrote (only our own files)."""
    for sub in (layout.CHUNKS_DIR, STATS_DIR, LOGS_DIR):
        shutil.rmtree(bdir / sub, ignore_errors=True)
    files = [layout.answers_path(bdir), layout.results_path(bdir), bdir / RECORD_NAME]
    if bench in layout.UPLOAD_NAMES:
        files.append(layout.upload_path(bdir, bench))
    for f in files:
        f.unlink(missing_ok=True)


def lock(bdir: Path):
    """One run per result directory at a time (the lock goes with the process)."""
    import fcntl

    bdir.mkdir(parents=True, exist_ok=True)
    handle = open(bdir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise FileExistsError(f"another run is using {bdir}") from None
    return handle


# ---------------------------------------------------------------- inference

def chunk_command(opts, module: str, extra: tuple, question_file: str, image_folder: str,
                  part: Path, stats: Path, chunks: int, idx: int) -> list[str]:
    cmd = [sys.executable, "-m", "llava_agile.eval.infer", "--stats-file", str(stats)]
    if opts.max_new_tokens is not None:
        cmd += ["--max-new-tokens", str(opts.max_new_tokens)]
    if opts.llava_dir:
        cmd += ["--llava-dir", opts.llava_dir]
    cmd += [module, "--pruning", opts.pruning, "--keep", str(opts.keep)]
    if opts.pruning_args:
        cmd += ["--pruning-args", opts.pruning_args]
    if opts.erank_avg_file:
        cmd += ["--erank-avg-file", opts.erank_avg_file]
    cmd += ["--model-path", opts.model_path]
    if opts.model_base:
        cmd += ["--model-base", opts.model_base]
    cmd += ["--question-file", question_file]
    if image_folder:
        cmd += ["--image-folder", image_folder]
    cmd += ["--answers-file", str(part), "--num-chunks", str(chunks), "--chunk-idx", str(idx),
            "--temperature", "0", "--conv-mode", opts.conv_mode, *extra]
    return cmd


class _Follower:
    """Counts the stats lines the chunks append (one per generate call)."""

    def __init__(self, paths):
        self.paths, self.offsets, self.records = list(paths), {}, []

    def poll(self) -> int:
        for p in self.paths:
            if not p.is_file():
                continue
            with open(p, "rb") as f:
                f.seek(self.offsets.get(p, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1
            self.offsets[p] = self.offsets.get(p, 0) + end
            self.records += [json.loads(l) for l in data[:end].splitlines() if l.strip()]
        return len(self.records)


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + l for l in lines[-n:])


def infer(opts, bdir: Path, paths: dict, pending: list[dict], all_questions: int) -> list[dict]:
    """Answer `pending` in one chunk per GPU; returns this run's stats records."""
    from tqdm import tqdm

    b = benchmarks.get(opts.bench)
    gpus = gpu_list()
    chunks = n_chunks(len(pending), len(gpus))
    qfile = paths["questions"]
    if len(pending) < all_questions:      # resume: only the unanswered questions
        qfile = str(bdir / layout.CHUNKS_DIR / ("pending" + Path(qfile).suffix))
        write_output(qfile, dump_questions(qfile, pending), overwrite=True)
    import torch

    on_cpu = not torch.cuda.is_available()
    jobs = []
    for i in range(chunks):
        part = layout.new_chunk_part(bdir, chunks, i)
        stats = bdir / STATS_DIR / part.name
        log = bdir / LOGS_DIR / (part.stem + ".log")
        for d in (part.parent, stats.parent, log.parent):
            d.mkdir(parents=True, exist_ok=True)
        stats.unlink(missing_ok=True)
        cmd = chunk_command(opts, b.module, b.extra_args, qfile, paths["images"], part, stats,
                            chunks, i)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus and chunks > 1:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        if on_cpu and chunks > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // chunks))
        if opts.llava_dir:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(opts.llava_dir),
                                                              env.get("PYTHONPATH")]))
        jobs.append((cmd, env, part, stats, log))
    where = ("the CPU: no GPU visible" if on_cpu else
             f"one per GPU: {','.join(gpus[:chunks])}" if gpus and chunks > 1 else
             f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
    print(f"[{opts.bench}] {len(pending)} of {all_questions} questions to answer in {chunks} "
          f"chunk(s) ({where}); logs in {bdir / LOGS_DIR}", file=sys.stderr, flush=True)
    procs = []
    follower = _Follower(j[3] for j in jobs)
    try:
        for cmd, env, part, stats, log in jobs:
            with open(log, "w") as lf:
                lf.write(" ".join(cmd) + "\n")
                lf.flush()
                procs.append(subprocess.Popen(cmd, env=env, stdout=lf, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))
        with tqdm(total=len(pending), desc=opts.bench, unit="q", dynamic_ncols=True,
                  mininterval=1.0) as bar:
            while any(p.poll() is None for p in procs):
                time.sleep(0.5)
                done = min(follower.poll(), len(pending))
                if done > bar.n:
                    bar.update(done - bar.n)
    finally:
        _stop(procs)
    failed = [(j, p.returncode) for j, p in zip(jobs, procs) if p.returncode != 0]
    if failed:
        (cmd, _, part, _, log), rc = failed[0]
        raise RunError(f"{opts.bench}: {len(failed)} of {chunks} chunk(s) failed; chunk "
                       f"{part.name} exited with {rc}; the end of {log}:\n{_tail(log)}\n"
                       f"(answers so far are kept: rerun the same command to resume)")
    if len(pending) < all_questions:
        Path(qfile).unlink(missing_ok=True)
    return follower.records


# ---------------------------------------------------------------- summary

def read_stats(bdir: Path) -> list[dict]:
    recs = []
    for p in sorted((bdir / STATS_DIR).glob("*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue   # a line cut by a kill
    return recs


def mean_kept(stats: list[dict]) -> float | None:
    kept = [k for s in stats for k in s.get("kept") or [] if isinstance(k, (int, float))]
    return sum(kept) / len(kept) if kept else None


def summary(bench: str, n_questions: int, answered_now: int, all_stats: list[dict],
            run_stats: list[dict], seconds: float, results: dict, results_file: Path) -> str:
    kept = mean_kept(all_stats)
    timed = run_stats or all_stats
    sps = sum(s["s"] for s in timed) / len(timed) if timed else None
    metrics = [(m, results[m]) for m in benchmarks.get(bench).metrics
               if isinstance(results.get(m), (int, float))]
    parts = [f"[{bench}] {n_questions} questions ({answered_now} answered now)",
             f"{kept:.1f} kept tokens/image" if kept is not None else "kept tokens/image: n/a",
             f"{sps:.3f} s/sample" if sps is not None else "s/sample: n/a",
             f"{seconds:.0f} s wall"]
    parts += [f"{m} {v:.2f}" for m, v in metrics]
    if results.get("upload_file"):
        parts.append(f"upload {results['upload_file']}")
    parts.append(str(results_file))
    return " | ".join(parts)


# ---------------------------------------------------------------- main

def run(opts) -> str:
    """Run (or resume) one benchmark; returns the summary line. Raises ValueError,
    FileNotFoundError, FileExistsError on bad input, RunError when inference fails."""
    from ..config import PruneConfig
    from .scoring import score

    start = time.time()
    bench = opts.bench
    benchmarks.get(bench)
    if opts.keep is None:
        if opts.pruning != layout.FULL_METHOD:
            raise ValueError(f"--keep K is required with --pruning {opts.pruning}")
        opts.keep = layout.FULL_KEEP
    if opts.max_new_tokens is not None and opts.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {opts.max_new_tokens}")
    config = PruneConfig.from_args(opts.pruning, opts.keep, opts.pruning_args, opts.erank_avg_file)
    if opts.llava_dir:
        from .infer import patch_problem

        problem = patch_problem(opts.llava_dir, benchmarks.get(bench).module)
        if problem:
            raise ValueError(problem)
    paths, questions = check_inputs(bench, opts.data_root)
    record = run_record(opts, config)
    bdir = layout.bench_dir(opts.out, record["model"], opts.pruning, opts.keep, bench)
    answers = layout.answers_path(bdir)

    def todo():
        return pending_questions(questions, [answers, *layout.chunk_parts(bdir)])

    # refusals and missing images first: nothing is written before they pass
    if not opts.overwrite:
        check_record(bdir, record)
    check_images(bench, paths["images"], questions if opts.overwrite else todo())
    _lock = lock(bdir)
    if opts.overwrite:
        clear(bdir, bench)
    pending = todo()
    run_stats = []
    if pending:
        write_output(bdir / RECORD_NAME, json.dumps(record, indent=1) + "\n", overwrite=True)
        run_stats = infer(opts, bdir, paths, pending, len(questions))
    merged = merge_answers(layout.chunk_parts(bdir), answers, questions)
    if merged["missing"]:
        raise RunError(f"{bench}: {merged['missing']} of {len(questions)} questions have no answer "
                       f"after the run (see {bdir / LOGS_DIR}); rerun the same command to resume")
    results_file = layout.results_path(bdir)
    try:
        results = score(bench, answers, paths["questions"], None, None, opts.overwrite,
                        opts.data_root)
        write_output(results_file, json.dumps(results, indent=1, ensure_ascii=False) + "\n",
                     opts.overwrite)
    except FileExistsError as e:
        raise FileExistsError(f"{e} (--overwrite here also discards the answers; to rescore only: "
                              f"python -m llava_agile.eval score {bench} --answers {answers} "
                              f"--data-root {opts.data_root} --out {results_file} --overwrite)") from None
    _lock.close()
    return summary(bench, len(questions), len(pending), read_stats(bdir), run_stats,
                   time.time() - start, results, results_file)


def main(opts) -> int:
    """The `run` subcommand; the summary goes to stdout (last line)."""
    def on_term(signum, frame):
        raise KeyboardInterrupt   # stop the chunks, keep the answers so far

    signal.signal(signal.SIGTERM, on_term)
    try:
        line = run(opts)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the answers so far are kept: rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(line, flush=True)
    return 0
