"""Evaluation for LLaVA-1.5 benchmarks: scorers, upload converters, the results layout,
resumable answer files and the comparison report. CLI: `python -m llava_agile.eval --help`."""
from .answers import (finished_ids, load_questions, merge_answers, pending_questions, read_jsonl,
                      repair_jsonl, write_output)
from .benchmarks import BENCHMARKS, DEFAULT_DATA_ROOT, get as get_benchmark
from .layout import (ANSWERS_NAME, RESULTS_NAME, answers_path, bench_dir, chunk_parts, chunk_path,
                     iter_results, model_name_from_path, new_chunk_part, parse_bench_dir, results_path,
                     run_dir, upload_path)
from .scoring import score

__all__ = ["score", "BENCHMARKS", "DEFAULT_DATA_ROOT", "get_benchmark", "finished_ids",
           "pending_questions", "merge_answers", "read_jsonl", "repair_jsonl", "load_questions",
           "write_output", "ANSWERS_NAME", "RESULTS_NAME", "run_dir", "bench_dir", "answers_path",
           "results_path", "upload_path", "chunk_path", "chunk_parts", "new_chunk_part",
           "parse_bench_dir", "iter_results", "model_name_from_path"]
