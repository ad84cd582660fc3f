"""The pruning flags shared by `python -m llava_agile.run` and the patched LLaVA eval modules.

    --pruning METHOD  --keep K  --pruning-args key=value,...  --erank-avg-file FILE

Without `--pruning` the model runs unpruned (LLaVA's own behaviour).
"""
from __future__ import annotations

import argparse
import sys

from .config import METHODS, PruneConfig

KEEP_DEFAULT = 64


def add_pruning_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the four pruning flags (in their own group) to `parser`; returns it."""
    group = parser.add_argument_group("visual-token pruning (llava_agile)")
    group.add_argument("--pruning", default=None, metavar="METHOD",
                       help=f"pruning method: {', '.join(METHODS)} (default: no pruning)")
    group.add_argument("--keep", type=int, default=None, metavar="K",
                       help=f"visual tokens kept per image (default {KEEP_DEFAULT})")
    group.add_argument("--pruning-args", default=None, metavar="KEY=VALUE,...",
                       help="method parameters, e.g. erank_avg=95,tau_max=0.3; also "
                            "feature_space=projected|vision, anyres_mode=shared|per_crop|global, "
                            "stats=basic|full (full: also each image's erank and entropy), "
                            "text_tower=CLIP_FOLDER (cdpruner, trim)")
    group.add_argument("--erank-avg-file", default=None, metavar="FILE",
                       help="calibration JSON giving erank_avg (adaptive and the hybrids)")
    return parser


def config_from_args(args: argparse.Namespace) -> PruneConfig | None:
    """The PruneConfig the flags ask for, or None without `--pruning`; ValueError on bad input."""
    method = getattr(args, "pruning", None)
    keep = getattr(args, "keep", None)
    extra = getattr(args, "pruning_args", None)
    calib = getattr(args, "erank_avg_file", None)
    if method is None:
        given = [flag for flag, value in (("--keep", keep), ("--pruning-args", extra),
                                          ("--erank-avg-file", calib)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given without --pruning METHOD "
                             f"(one of {', '.join(METHODS)})")
        return None
    return PruneConfig.from_args(method, KEEP_DEFAULT if keep is None else keep,
                                 extra, erank_avg_file=calib)


def config_or_exit(args: argparse.Namespace, prog: str | None = None) -> PruneConfig | None:
    """`config_from_args`, but bad input prints one `error:` line to stderr and exits with 2."""
    try:
        return config_from_args(args)
    except (ValueError, OSError) as exc:
        message = str(exc).replace("\n", " ")
        print(f"{prog + ': ' if prog else ''}error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_args_with_pruning(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """What the patched eval modules call instead of `parser.parse_args()`.

    Adds the pruning flags, parses, validates them (one error line, exit 2, on bad input) and
    stores the result as `args.pruning_config` (a PruneConfig or None).
    """
    args = add_pruning_args(parser).parse_args(argv)
    args.pruning_config = config_or_exit(args, parser.prog)
    return args
