"""Time the reference backend vs the C++/CUDA extension per image (issue 3, docs/benchmarks.md).

For N=576 tokens, D in {1024, 4096}, K in {32, 64, 128, 192}, B in {1, 8}, fp32 and fp16, it
measures the median time per image of: erank alone, the whole adaptive step (erank + selection),
adaptive selection with a constant tau (no erank), diversity (DivPrune), fps and the attention
entropy, through the public API (`select_tokens`, `erank`) under each backend. Every
configuration also times the BLAS/LAPACK floor in the same interleaved loop: T_gram (x @ x.T,
N x N, fp32) and T_eig (eigvalsh of that matrix). CPU targets (B=1, K=64, fp32):
adaptive <= 1.25 (T_gram + T_eig), constant-tau selection <= 0.5 T_gram, diversity <= 1.25 T_gram.

    python bench/bench_select.py                  # full grid, one thread, out/bench_select.json
    python bench/bench_select.py --quick          # the target configurations only
    python bench/bench_select.py --device cuda    # GPU (targets: adaptive <= 0.5 ms, selection <= 0.1 ms)
    python bench/bench_select.py --baselines      # cdpruner, trim, holov, prumerge_plus vs T_gram
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import llava_agile  # noqa: E402
from llava_agile import backend, select_tokens  # noqa: E402
from llava_agile.api import attention_entropy, erank  # noqa: E402

N = 576
TAU = 0.1  # constant threshold for the "adaptive_tau" rows
CPU_TARGETS = {  # method -> (factor, floor) with floor "gram" or "gram+eig"
    "adaptive": (1.25, "gram+eig"), "adaptive_tau": (0.5, "gram"), "diversity": (1.25, "gram")}
GPU_TARGETS_MS = {"adaptive": 0.5, "adaptive_tau": 0.1}  # H100, D=4096, fp16, K=64


def llava_like(b: int, d: int, dtype, device, seed: int = 0):
    """Tokens with a shared component, low-rank structure and near-duplicate patches."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, N, 48, generator=g) @ torch.randn(48, d, generator=g) / 7
    dup = torch.randint(0, N, (b, N // 3), generator=g)
    base[:, torch.randperm(N, generator=g)[: N // 3]] = torch.gather(
        base, 1, dup[..., None].expand(b, N // 3, d)) + 0.05 * torch.randn(b, N // 3, d, generator=g)
    x = base + 0.3 * torch.randn(b, N, d, generator=g) + 2 * torch.randn(1, 1, d, generator=g)
    a = torch.softmax(3 * torch.randn(b, N, generator=g), dim=-1)
    return x.to(device=device, dtype=dtype), a.to(device=device, dtype=dtype)


def timed(fns: dict, repeat: int, sync) -> dict:
    """(median, min) seconds of each callable, calls interleaved so machine noise hits all alike."""
    for f in fns.values():  # warm-up
        f()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(v), min(v)) for name, v in times.items()}


def method_calls(x, a, k: int, which: str) -> dict:
    """name -> callable running it under the backend `which` ("torch" or "ext")."""
    def under(fn):
        def call():
            llava_agile.set_backend(which)
            return fn()
        return call

    ext = which == "ext"
    return {
        "erank": under(lambda: backend.erank(x) if ext else erank(x)),
        "entropy": under(lambda: backend.attention_entropy(a) if ext else attention_entropy(a)),
        "adaptive": under(lambda: select_tokens(x, a, k, method="adaptive")),
        "adaptive_tau": under(lambda: select_tokens(x, a, k, method="adaptive", tau=TAU)),
        "diversity": under(lambda: select_tokens(x, a, k, method="diversity")),
        "fps": under(lambda: select_tokens(x, a, k, method="fps")),
    }


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": device,
            "ext_has_cuda": bool(backend._C is not None and backend._C.has_cuda)}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["cpu_count"] = os.cpu_count()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def baselines(args, sync) -> list[dict]:
    """The reference implementations of the paper's other baselines (B=1, fp32) against the
    Gram-matrix floor: is any worth a kernel? CDPruner's greedy MAP is O(N K^2)."""
    from llava_agile import prune

    rows = []
    print(f"{'D':>5} {'K':>4} {'method':<14} {'ms':>9} {'T_gram':>7} {'/T_gram':>8}")
    for d in args.dims:
        x, a = llava_like(1, d, torch.float32, args.device)
        emb = torch.randn(1, N, 768, device=args.device)
        txt = torch.randn(1, 768, device=args.device)
        for k in args.keeps:
            calls = {
                "T_gram": lambda: x[0] @ x[0].T,
                "cdpruner": lambda: prune(x, a, k, "cdpruner", stats=False, image_embeds=emb,
                                          text_embeds=txt),
                "trim": lambda: prune(x, a, k, "trim", stats=False, image_embeds=emb,
                                      text_embeds=txt),
                "holov": lambda: prune(x, a, k, "holov", stats=False),
                "prumerge_plus": lambda: prune(x, a, k, "prumerge_plus", stats=False)}
            t = timed(calls, args.repeat, sync)
            gram = t["T_gram"][0]
            for m in list(calls)[1:]:
                rows.append(dict(d=d, k=k, method=m, ms=t[m][0] * 1e3, t_gram_ms=gram * 1e3,
                                 over_gram=t[m][0] / gram))
                print(f"{d:5d} {k:4d} {m:<14} {t[m][0] * 1e3:9.3f} {gram * 1e3:7.3f} "
                      f"{t[m][0] / gram:8.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeat", type=int, default=7,
                   help="timed runs per call (median; 3x as many for the target configurations)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="only B=1, K=64 (the target configurations)")
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--keeps", type=int, nargs="+", default=[32, 64, 128, 192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp16"], choices=("fp32", "fp16"))
    p.add_argument("--baselines", action="store_true",
                   help="time cdpruner, trim, holov and prumerge_plus (reference) instead")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                 "out", "bench_select.json"),
                   help="JSON results (default out/bench_select.json)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeat < 1:
        p.error("--threads and --repeat must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.baselines:
        torch.set_num_threads(args.threads)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        rows = baselines(args, sync)
        out = {"machine": machine(args.device), "n_tokens": N, "repeat": args.repeat,
               "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        return 0
    if not llava_agile.ext_available(args.device):
        p.error(f"the extension cannot run on {args.device}: {backend.unavailable_reason(args.device)}")
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    keeps, batches = ([64], [1]) if args.quick else (args.keeps, args.batches)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    rows = []
    header = (f"{'D':>5} {'K':>4} {'B':>2} {'dtype':>5} {'method':<13} {'ref ms':>9} {'ext ms':>8} "
              f"{'ref/ext':>8} {'T_gram':>7} {'T_eig':>7} {'ext/floor':>9}  target")
    print(header)
    print("-" * len(header))
    for d in args.dims:
        for dname in args.dtypes:
            for b in batches:
                x, a = llava_like(b, d, dtypes[dname], args.device)
                x0 = x[0].float()
                g0 = x0 @ x0.T
                for k in keeps:
                    calls = {"T_gram": lambda: x0 @ x0.T, "T_eig": lambda: torch.linalg.eigvalsh(g0)}
                    for which in ("torch", "ext"):
                        calls.update({f"{which}:{m}": f for m, f in method_calls(x, a, k, which).items()})
                    target_cfg = (b, k, dname) == (1, 64, "fp32") or (
                        args.device == "cuda" and (d, k, dname) == (4096, 64, "fp16"))
                    t = timed(calls, args.repeat * (3 if target_cfg else 1), sync)
                    llava_agile.set_backend("auto")
                    t_gram, t_eig = t["T_gram"][0], t["T_eig"][0]
                    for m in ("erank", "entropy", "adaptive", "adaptive_tau", "diversity", "fps"):
                        ref, ext = t[f"torch:{m}"][0] / b, t[f"ext:{m}"][0] / b
                        row = dict(D=d, K=k, B=b, dtype=dname, method=m, ref_ms=ref * 1e3,
                                   ext_ms=ext * 1e3, speedup=ref / ext, t_gram_ms=t_gram * 1e3,
                                   t_eig_ms=t_eig * 1e3, ref_min_ms=t[f"torch:{m}"][1] / b * 1e3,
                                   ext_min_ms=t[f"ext:{m}"][1] / b * 1e3,
                                   t_gram_min_ms=t["T_gram"][1] * 1e3, t_eig_min_ms=t["T_eig"][1] * 1e3)
                        note = ""
                        if args.device == "cpu" and m in CPU_TARGETS:
                            factor, floor = CPU_TARGETS[m]
                            floor_s = t_gram + (t_eig if floor == "gram+eig" else 0.0)
                            row["ext_over_floor"] = ext / floor_s
                            if target_cfg:
                                row["target"] = f"<= {factor} x {floor.replace('gram', 'T_gram').replace('eig', 'T_eig')}"
                                row["met"] = ext <= factor * floor_s
                                note = f"{row['target']}: {'MET' if row['met'] else 'MISSED'}"
                        if args.device == "cuda" and m in GPU_TARGETS_MS and target_cfg and b == 1:
                            row["target"] = f"<= {GPU_TARGETS_MS[m]} ms"
                            row["met"] = ext * 1e3 <= GPU_TARGETS_MS[m]
                            note = f"{row['target']}: {'MET' if row['met'] else 'MISSED'}"
                        rows.append(row)
                        ratio = f"{row['ext_over_floor']:9.3f}" if "ext_over_floor" in row else " " * 9
                        print(f"{d:5d} {k:4d} {b:2d} {dname:>5} {m:<13} {ref * 1e3:9.3f} {ext * 1e3:8.3f} "
                              f"{ref / ext:8.2f} {t_gram * 1e3:7.3f} {t_eig * 1e3:7.3f} {ratio}  {note}",
                              flush=True)
    out = {"machine": machine(args.device), "n_tokens": N, "tau_constant": TAU,
           "repeat": args.repeat, "per_image": True, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    missed = [r for r in rows if r.get("met") is False]
    print(f"\nwrote {args.out}; targets: {sum(r.get('met') is True for r in rows)} met, {len(missed)} missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
