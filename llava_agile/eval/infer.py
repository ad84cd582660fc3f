"""One inference chunk, as the eval driver launches it:

    python -m llava_agile.eval.infer --stats-file F [--max-new-tokens N] [--llava-dir D] \\
        MODULE [the module's and the pruning arguments]

MODULE (e.g. llava.eval.model_vqa_loader) runs through the runner `llava_agile.run`, or, with
`--llava-dir`, as `python -m MODULE` of that patched LLaVA checkout (it parses --pruning itself).
Both load the model through `llava_agile.patch_hooks.finish_model`, which honours
`LLAVA_AGILE_STATS_FILE` and `LLAVA_AGILE_MAX_NEW_TOKENS` (set here): every `model.generate`
call appends one flushed JSON line to the stats file, `{"images": n, "kept": [visual tokens kept
per image], "prune_ms": [...], "s": seconds}`, which the driver reads for its progress bar, the
mean kept tokens and the seconds per sample.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys


def patch_problem(llava_dir: str, module: str) -> str | None:
    """Why MODULE of the checkout LLAVA_DIR cannot run with our flags (None: it can)."""
    path = os.path.join(llava_dir, *module.split(".")) + ".py"
    if not os.path.isfile(path):
        return (f"LLAVA_DIR={llava_dir}: {path} not found (LLAVA_DIR must be the LLaVA checkout, "
                f"the folder holding llava/)")
    with open(path, encoding="utf-8") as f:
        if "parse_args_with_pruning" not in f.read():
            return f"LLAVA_DIR={llava_dir} is not patched ({path}); run `patches/apply.sh {llava_dir}` first"
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m llava_agile.eval.infer", allow_abbrev=False)
    p.add_argument("--stats-file", required=True)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--llava-dir", default=None)
    p.add_argument("module")
    # our options come first; everything after MODULE belongs to it (and to the runner)
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        i += 1 if "=" in argv[i] else 2
    ours, rest = p.parse_args(argv[:i + 1]), argv[i + 1:]
    if ours.llava_dir:
        problem = patch_problem(ours.llava_dir, ours.module)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        sys.path.insert(0, os.path.abspath(ours.llava_dir))
    from llava_agile.patch_hooks import MAX_NEW_TOKENS_ENV, STATS_ENV

    os.environ[STATS_ENV] = os.path.abspath(ours.stats_file)
    if ours.max_new_tokens is not None:
        os.environ[MAX_NEW_TOKENS_ENV] = str(ours.max_new_tokens)
    if not ours.llava_dir:
        from llava_agile.run import main as run_main
        return run_main([ours.module, *rest])
    sys.argv = [ours.module, *rest]
    try:
        runpy.run_module(ours.module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
