"""Command lines of `python -m llava_agile {analyze,calibrate,visualize,demo}`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..methods import IMAGE_ONLY as METHODS  # no question or text tower here
from ..methods import TEXT

PROG = "python -m llava_agile"
DEFAULT_ASSETS = "out/assets"


def _methods(values) -> list[str]:
    """`--methods a b` or `--methods a,b`; 'all' means every method."""
    from ..config import check_method

    out = [m.strip() for v in values for m in v.split(",") if m.strip()]
    out = list(METHODS) if out == ["all"] else out
    for m in out:
        check_method(m)
        if m in TEXT:
            raise ValueError(f"{m} is conditioned on the question and a CLIP text tower, which "
                             f"the analysis commands do not load; evaluate it with the eval "
                             f"scripts or llava_agile.enable(model, {m!r}, K, text_tower=...)")
    return out


def _model(ap):
    ap.add_argument("--model-path", default=None,
                    help="LLaVA checkpoint (folder or hub id, e.g. liuhaotian/llava-v1.5-7b); "
                         "default: the offline tiny DINOv2 LLaVA under --assets (built if "
                         "missing; real vision features, random LLM)")
    ap.add_argument("--model-base", default=None, help="LLaVA's --model-base (LoRA checkpoints)")
    ap.add_argument("--assets", default=DEFAULT_ASSETS,
                    help=f"where the default model is built/cached (default {DEFAULT_ASSETS})")


def _images(ap):
    ap.add_argument("--question-file", default=None,
                    help="LLaVA question file (JSONL with image, category; or SQA's JSON list)")
    ap.add_argument("--image-folder", default=None, help="folder the question file's images are in")
    ap.add_argument("--images", default=None,
                    help="instead: a folder of images (sub-folders become categories)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images")


def _space(ap):
    ap.add_argument("--feature-space", choices=("projected", "vision"), default=None,
                    help="features for erank and selection: 'projected' (the paper's, default "
                         "for real checkpoints) or 'vision' (default for the tiny models, whose "
                         "projector is random)")


def _pruning(ap, keep_nargs="+"):
    ap.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                    help=f"methods (space or comma separated; default: all): {', '.join(METHODS)}")
    ap.add_argument("--keep", type=int, nargs=keep_nargs, default=None, metavar="K",
                    help="visual tokens kept per image (default 64)")
    ap.add_argument("--pruning-args", default=None, metavar="KEY=VALUE,...",
                    help="method parameters, each given to the methods that take it")
    ap.add_argument("--erank-avg-file", default=None, metavar="FILE",
                    help="calibration JSON (from `calibrate`) giving erank_avg")


def _question(ap):
    ap.add_argument("--question", default=None,
                    help="generate an answer to this question for every image (needed by the "
                         "methods that prune inside the LLM: fastv, pdrop, dart, sparsevlm rank by "
                         "the prompt's attention)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="llava_agile: analysis, calibration, "
                                 "visualisation and the demo (see docs/analysis.md)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("analyze", help="per-image erank/entropy and each method's kept tokens; "
                                       "Table 1 and Table 4 summaries")
    _model(a)
    _images(a)
    _pruning(a)
    _space(a)
    a.add_argument("--out", default=None, help="output folder (default out/analysis/<model>)")
    a.add_argument("--plots", action="store_true",
                   help="also erank-vs-entropy scatter and retained-erank bars (PNG)")
    a.add_argument("--overwrite", action="store_true",
                   help="start again instead of resuming the records in --out")
    _question(a)

    c = sub.add_parser("calibrate", help="mean full-image erank and entropy -> JSON for "
                                         "--erank-avg-file")
    _model(c)
    _images(c)
    _space(c)
    c.add_argument("--out", default=None,
                   help="JSON file to write (default out/calibration/<model>.json)")

    v = sub.add_parser("visualize", help="one PNG: the kept patches of each method")
    v.add_argument("image", help="an image file")
    _model(v)
    _pruning(v, keep_nargs=None)
    _space(v)
    v.add_argument("--out", default=None, help="PNG to write (default out/visualize/<image>.png)")
    _question(v)

    d = sub.add_parser("demo", help="every method on real photos + text images; a report folder")
    d.add_argument("--out", default="out/demo", help="report folder (default out/demo)")
    d.add_argument("--model-path", default=None,
                   help="a real checkpoint instead of the tiny DINOv2 LLaVA, e.g. "
                        "liuhaotian/llava-v1.5-7b")
    d.add_argument("--assets", default=DEFAULT_ASSETS, help="where the tiny model is cached")
    d.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="default: all methods")
    d.add_argument("--keep", type=int, default=64, help="K (default 64)")
    d.add_argument("--limit", type=int, default=None, help="only the first N images")
    d.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per answer")
    _space(d)
    for p, default in ((a, None), (c, None), (v, None), (d, 1)):
        p.add_argument("--threads", type=int, default=default,
                       help="CPU threads for torch" + (" (default 1: steadier pruning times)"
                                                       if default else " (default: torch's)"))
    return ap


def _model_path(args) -> str:
    if args.model_path:
        return args.model_path
    from .demo import ensure_assets

    return ensure_assets(args.assets, log=lambda s: print(s, file=sys.stderr))


def _configs(args, model_path, keeps):
    from .measure import default_feature_space, make_configs

    methods = _methods(args.methods) if args.methods else list(METHODS)
    return make_configs(methods, keeps, args.pruning_args, args.erank_avg_file,
                        args.feature_space or default_feature_space(model_path))


def _items(args):
    from .inputs import select

    return select(args.question_file, args.image_folder, args.images, args.limit)


def _name(model_path: str) -> str:
    return Path(str(model_path).rstrip("/")).name


def cmd_analyze(args) -> int:
    from .commands import analyze

    items = _items(args)
    if args.methods:
        _methods(args.methods)
    model_path = _model_path(args)
    configs = _configs(args, model_path, args.keep or [64])
    out = Path(args.out or Path("out/analysis") / _name(model_path))
    res = analyze(model_path, items, configs, out, plots=args.plots, model_base=args.model_base,
                  overwrite=args.overwrite, question=args.question)
    print(f"{len(res['records'])} images ({res['computed']} measured now, "
          f"{len(res['records']) - res['computed']} from earlier runs)")
    for key, path in res["paths"].items():
        print(f"{key}: {path}")
    return 0


def cmd_calibrate(args) -> int:
    from .commands import calibrate
    from .measure import default_feature_space

    items = _items(args)
    model_path = _model_path(args)
    space = args.feature_space or default_feature_space(model_path)
    out = Path(args.out or Path("out/calibration") / f"{_name(model_path)}.json")
    res = calibrate(model_path, items, out, space, args.model_base)
    e, h = res["erank"], res["entropy"]
    print(f"{res['n_images']} images, {space} features: erank {e['mean']:.2f} ± {e['std']:.2f} "
          f"(min {e['min']:.1f}, max {e['max']:.1f}); entropy {h['mean']:.3f} ± {h['std']:.3f} nats")
    print(f"wrote {out}; use it with --erank-avg-file {out} (or --pruning-args "
          f"erank_avg={e['mean']:.1f})")
    return 0


def cmd_visualize(args) -> int:
    from .commands import visualize
    from .inputs import open_image

    open_image(args.image)   # fail early on a bad image, before loading a model
    args.methods = _methods(args.methods) if args.methods else [m for m in METHODS if m != "none"]
    model_path = _model_path(args)
    configs = _configs(args, model_path, [args.keep or 64])
    out = Path(args.out or Path("out/visualize") / f"{Path(args.image).stem}.png")
    path = visualize(args.image, model_path, configs, out, args.model_base,
                     question=args.question)
    print(path)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    methods = _methods(args.methods) if args.methods else list(METHODS)
    res = run_demo(args.out, args.assets, args.model_path, methods, args.keep, args.limit,
                   args.max_new_tokens, args.feature_space,
                   log=lambda s: print(s, file=sys.stderr))
    if res["missing"]:
        print(f"note: sample photos not found: {', '.join(res['missing'])}", file=sys.stderr)
    print(f"report: {res['report']}")
    return 0


COMMANDS = {"analyze": cmd_analyze, "calibrate": cmd_calibrate, "visualize": cmd_visualize,
            "demo": cmd_demo}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"{PROG} {args.command}: error: --threads must be >= 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        msg = str(e).replace("\n", " ")
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2
