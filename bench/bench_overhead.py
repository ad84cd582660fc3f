"""Pruning overhead per image inside the LLaVA runtime, `stats="basic"` vs `"full"` (issue 15 §5).

For every method it times, in one interleaved loop (one thread, K = 64):
- `bare`: the method's own call, `select_tokens(tokens, attn, K, method)` (for the merging
  methods, which have no indices: `prune(..., stats=False)`);
- `basic` / `full`: the `prune` call that `llava_agile.enable`'s runtime makes inside a LLaVA
  forward (the window `model.agile_stats[i]["prune_ms"]` reports), `stats="basic"` / `"full"`;
and prints the medians and `basic / bare`, `full / bare` (of the medians; of the minima after).
Two settings:
- `llava-1.5`: LLaVA-1.5-7B shapes: N = 576 projected tokens of D = 4096 (the selection space),
  1024-d CLIP features and keys (similarity_features / keys), LLaVA-like random tokens; the
  adapters' pruning step (`llava_agile.selection.select`) is called directly;
- `tiny-forward`: the tiny random LLaVA-1.5 (`llava_agile.assets`, 576 tokens of 64-d) through
  `llava_agile.llava.visual_tokens` (vision tower with the [CLS] hook, projector, pruning);
  `bare` runs on the projected tokens and [CLS] row of a tower + projector run just before (the
  same cache state as inside the forward).
Clock: this thread's CPU time by default (`--clock cpu`; on a shared machine the wall clock also
counts other jobs' time slices), or `--clock wall` (perf_counter, as `prune_ms`).
CPU target: basic <= 1.2 x bare for attention, fps and diversity.

    python bench/bench_overhead.py [--repeat 21] [--settings llava-1.5 tiny-forward] [--clock wall]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from bench_select import llava_like, machine  # noqa: E402
from llava_agile import PruneConfig, prune, select_tokens  # noqa: E402
from llava_agile.methods import MERGING, METHODS, REGISTRY  # noqa: E402

K = 64
TARGET = {"attention": 1.2, "fps": 1.2, "diversity": 1.2}  # basic / bare on CPU
MODES = ("basic", "full")
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def stopwatch(fn):
    """A call that runs `fn` and returns the seconds it took on `clock`."""
    def call():
        t0 = clock()
        fn()
        return clock() - t0
    return call


def tensor_params(method, clip, keys) -> dict:
    """The per-token tensors the runtime hands `method`: CLIP features, the select layer's keys."""
    given = {"similarity_features": clip, "keys": keys}
    return {k: v for k, v in given.items() if k in REGISTRY[method][1]}


def bare_call(method, space, attn, clip, keys=None):
    """The method's own call on one image `[N, D]`, timed."""
    extra = tensor_params(method, clip, keys)
    if method in MERGING:
        return stopwatch(lambda: prune(space, attn, K, method, stats=False, **extra))
    return stopwatch(lambda: select_tokens(space, attn, K, method, **extra))


class RuntimePrune:
    """While active, times every `prune` call the adapters make; `.last`: the latest, seconds."""

    def __enter__(self):
        from llava_agile import selection

        self.module, self.orig, self.last = selection, selection.prune, None

        def timed(*args, **kwargs):
            t0 = clock()
            out = self.orig(*args, **kwargs)
            self.last = clock() - t0
            return out
        selection.prune = timed
        return self

    def __exit__(self, *exc):
        self.module.prune = self.orig


def interleaved(calls: dict, repeat: int) -> dict:
    """Median and minimum ms of each timed call (`name`, `name_min`); one warm-up round, then
    `repeat` rounds in rotating order so machine noise and cache effects hit every call alike."""
    names = list(calls)
    for f in calls.values():
        f()
    samples = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(calls[name]())
    return {**{name: statistics.median(v) * 1e3 for name, v in samples.items()},
            **{f"{name}_min": min(v) * 1e3 for name, v in samples.items()}}


def llava_shapes(methods, repeat: int) -> dict:
    """LLaVA-1.5 shapes through the runtime's pruning step."""
    from llava_agile.selection import select as _select

    space, attn = llava_like(1, 4096, torch.float32, "cpu", seed=0)
    clip, _ = llava_like(1, 1024, torch.float32, "cpu", seed=1)
    keys, _ = llava_like(1, 1024, torch.float32, "cpu", seed=2)
    out = {}
    with RuntimePrune() as timer:
        def step(method, mode):
            cfg = PruneConfig(method, K, stats=mode)
            extra = {"keys": keys} if "keys" in REGISTRY[method][1] else {}

            def call():
                _select(cfg, space, attn, clip, K, **extra)
                return timer.last
            return call

        for m in methods:
            calls = {"bare": bare_call(m, space[0], attn[0], clip[0], keys[0]),
                     **{mode: step(m, mode) for mode in MODES}}
            out[m] = interleaved(calls, repeat)
    return out


def tiny_forward(methods, repeat: int) -> dict:
    """The tiny LLaVA through `visual_tokens` (a LLaVA forward's visual part)."""
    import llava_agile
    from llava.mm_utils import process_images
    from llava_agile.assets import build_tiny_llava, load_tiny, tiny_image
    from llava_agile.llava import visual_tokens
    from llava_agile.llava.runtime import _tower

    with tempfile.TemporaryDirectory() as tmp:
        _, model, processor, _ = load_tiny(build_tiny_llava(tmp))
    pixels = process_images([tiny_image(0)], processor, model.config)
    out = {}
    with torch.inference_mode(), RuntimePrune() as timer:
        def bare(method):   # on the tower's fresh output, as inside the forward
            def call():
                llava_agile.enable(model, method, K)
                try:
                    clip, attn = _tower(model, model._agile_state, pixels)
                    keys = getattr(model._agile_state, "keys", None)
                    proj = model.get_model().mm_projector(clip)
                finally:
                    llava_agile.disable(model)
                return bare_call(method, proj[0], attn[0], clip[0],
                                 None if keys is None else keys[0])()
            return call

        def forward(method, mode):
            def call():
                llava_agile.enable(model, method, K, stats=mode)
                try:
                    visual_tokens(model, pixels)
                    return timer.last
                finally:
                    llava_agile.disable(model)
            return call

        for m in methods:
            calls = {"bare": bare(m), **{mode: forward(m, mode) for mode in MODES}}
            out[m] = interleaved(calls, repeat)
    return out


def main(argv=None) -> int:
    global clock
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=21, help="timed runs per call (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                   help="cpu: this thread's CPU time (default), wall: perf_counter")
    p.add_argument("--settings", nargs="+", default=["llava-1.5", "tiny-forward"],
                   choices=("llava-1.5", "tiny-forward"))
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "none"],
                   choices=METHODS)
    p.add_argument("--out", default=os.path.join(HERE, "..", "out", "bench_overhead.json"),
                   help="JSON results (default out/bench_overhead.json)")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.threads < 1:
        p.error("--repeat and --threads must be >= 1")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu measures one thread: use --threads 1 or --clock wall")
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    runs = {"llava-1.5": llava_shapes, "tiny-forward": tiny_forward}
    rows, missed = [], 0
    print(f"clock: {args.clock}, {args.repeat} runs per call, K = {K}")
    print(f"{'setting':<13} {'method':<10} {'bare ms':>8} {'basic ms':>9} {'full ms':>8} "
          f"{'basic/bare':>10} {'full/bare':>9} {'(min: basic':>11} {'full)':>6}  target")
    for setting in args.settings:
        for m, t in runs[setting](args.methods, args.repeat).items():
            row = dict(setting=setting, method=m, bare_ms=t["bare"], basic_ms=t["basic"],
                       full_ms=t["full"], basic_ratio=t["basic"] / t["bare"],
                       full_ratio=t["full"] / t["bare"],
                       **{f"{k}_min_ms": t[f"{k}_min"] for k in ("bare", *MODES)},
                       basic_ratio_min=t["basic_min"] / t["bare_min"],
                       full_ratio_min=t["full_min"] / t["bare_min"])
            note = ""
            if m in TARGET:
                row["met"] = row["basic_ratio"] <= TARGET[m]
                missed += not row["met"]
                note = f"basic <= {TARGET[m]} x bare: {'MET' if row['met'] else 'MISSED'}"
            rows.append(row)
            print(f"{setting:<13} {m:<10} {t['bare']:8.3f} {t['basic']:9.3f} {t['full']:8.3f} "
                  f"{row['basic_ratio']:10.3f} {row['full_ratio']:9.3f} "
                  f"{row['basic_ratio_min']:11.3f} {row['full_ratio_min']:6.3f}  {note}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine("cpu"), "keep": K, "repeat": args.repeat,
                   "clock": args.clock, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}; targets missed: {missed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
