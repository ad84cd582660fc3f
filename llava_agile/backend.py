"""Which implementation runs a method: the reference (plain PyTorch) or the C++/CUDA extension.

`set_backend("auto" | "ext" | "torch")` or the environment variable `LLAVA_AGILE_BACKEND` choose:
- "auto" (default): the extension `llava_agile._C` for the tensor's device when it is built for it,
  else the reference, with one warning that says why;
- "ext": the extension, failing loudly when it is unavailable;
- "torch": always the reference.
The extension implements adaptive (all variants), diversity and fps, plus erank and entropy; the
other methods always run on the reference.
"""
from __future__ import annotations

import os
import warnings

import torch

from .methods import REGISTRY

BACKENDS = ("auto", "ext", "torch")
ENV = "LLAVA_AGILE_BACKEND"
ACCELERATED = frozenset({"adaptive", "diversity", "fps", "erank", "entropy"})  # methods + signals

try:
    from . import _C
    _IMPORT_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    if isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}._C":
        _IMPORT_ERROR = ("the extension llava_agile._C is not built; run `make setup` or "
                         "`pip install -e . --no-build-isolation`")
    else:
        _IMPORT_ERROR = f"llava_agile._C failed to import: {exc}"

_choice: str | None = None
_warned: set = set()


def _check_name(name, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def unavailable_reason(device=None) -> str | None:
    """None when the extension can run on `device` (default: CPU), else why it cannot."""
    if _C is None:
        return _IMPORT_ERROR
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        return None if _C.has_cuda else ("llava_agile._C was built without CUDA kernels (torch was "
                                         "not a CUDA build or nvcc was not found)")
    return f"llava_agile._C has no kernels for {dev.type} tensors"


def ext_available(device=None) -> bool:
    """Whether the C++/CUDA extension is built and has kernels for `device` (default: CPU)."""
    return unavailable_reason(device) is None


def set_backend(name: str) -> None:
    """Choose "auto", "ext" or "torch" for this process (overrides LLAVA_AGILE_BACKEND)."""
    global _choice
    _check_name(name, "set_backend(name)")
    if name == "ext" and _C is None:
        raise RuntimeError(f"backend 'ext' requested but {_IMPORT_ERROR}")
    _choice = name


def get_backend() -> str:
    """The backend in force: set_backend's choice, else LLAVA_AGILE_BACKEND, else "auto"."""
    if _choice is not None:
        return _choice
    return _check_name(os.environ.get(ENV, "auto").strip().lower() or "auto", ENV)


def use_ext(method: str, device) -> bool:
    """Whether `method` on `device` runs on the extension under the current backend."""
    choice = get_backend()
    if method not in ACCELERATED or choice == "torch":
        return False
    reason = unavailable_reason(device)
    if reason is None:
        return True
    if choice == "ext":
        raise RuntimeError(f"backend 'ext' requested but {reason}")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"llava_agile: using the PyTorch reference: {reason}", RuntimeWarning,
                      stacklevel=3)
    return False


def implementation(method: str, device: torch.device):
    """The reference function that runs `method` on one image on `device`."""
    return REGISTRY[method][0]


def batch_implementation(method: str, device: torch.device):
    """`fn(feats [B, N, D], attn [B, N], keep, params, with_stats) -> [(indices, stats)] * B`
    running `method` on the extension, or None when the reference should run it."""
    return _BATCH[method] if use_ext(method, device) else None


# --- extension wrappers: same results and per-image stats as the reference (keep < N; api._run
# handles keep >= N for every method) ---------------------------------------------------------

def _adaptive(feats, attn, keep, params, with_stats):
    entropy_signal = params["complexity"] == "entropy"
    idx, counts, eranks, entropies, walked, lo, hi = _C.adaptive(
        feats, attn, keep, erank_avg=float(params["erank_avg"]),
        tau_step=float(params["tau_step"]), tau_max=float(params["tau_max"]),
        tau=None if params["tau"] is None else float(params["tau"]),
        complexity=params["complexity"], entropy_avg=float(params["entropy_avg"]),
        center=bool(params["center"]), adaptive_count=bool(params["adaptive_count"]),
        need_erank=with_stats, need_entropy=with_stats and entropy_signal)
    counts = counts.tolist()
    out = []
    if not with_stats:
        return [(idx[b, :counts[b]].to(feats.device), {}) for b in range(len(counts))]
    eranks, entropies, walked = eranks.tolist(), entropies.tolist(), walked.tolist()
    lo, hi = lo.tolist(), hi.tolist()
    for b, count in enumerate(counts):
        stats = {"erank": eranks[b]}
        if entropy_signal:
            stats["entropy"] = entropies[b]
            stats["complexity"] = entropies[b] / params["entropy_avg"]
        else:
            stats["complexity"] = eranks[b] / params["erank_avg"]
        stats["walk_selected"] = walked[b]
        stats["tau_range"] = (lo[b], hi[b])
        out.append((idx[b, :count].to(feats.device), stats))
    return out


def _maxmin(fps: bool):
    def run(feats, attn, keep, params, with_stats):
        idx = _C.maxmin(feats, attn, keep, fps=fps)
        return [(row, {}) for row in idx.to(feats.device)]
    return run


_BATCH = {"adaptive": _adaptive, "diversity": _maxmin(False), "fps": _maxmin(True)}


def erank(features: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Extension erank of `[B, N, D]` -> `[B]` (raises when the extension is unavailable)."""
    reason = unavailable_reason(features.device)
    if reason:
        raise RuntimeError(reason)
    return _C.erank(features, center)


def attention_entropy(cls_attn: torch.Tensor) -> torch.Tensor:
    """Extension attention entropy of `[B, N]` -> `[B]` (raises when the extension is unavailable)."""
    reason = unavailable_reason(cls_attn.device)
    if reason:
        raise RuntimeError(reason)
    return _C.entropy(cls_attn)
