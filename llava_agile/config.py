"""One configuration object shared by the API, the LLaVA integration, the eval scripts and the CLI."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from . import inllm
from .methods import METHODS as SELECTION_METHODS
from .methods import REGISTRY, TEXT, VISION_SPACE

METHODS = SELECTION_METHODS + inllm.METHODS  # every method name: before the LLM, then inside it

CHOICES = {"ratio_rule": ("fixed", "adaptive", "inverse"), "complexity": ("erank", "entropy"),
           "overflow": ("zeros", "backfill"), "scope": ("batch", "image"),
           "count": ("fixed", "iqr")}
POSITIVE = ("erank_avg", "entropy_avg")
NON_NEGATIVE = ("tau_step", "tau_max", "tau", "ratio_slope")
UNIT_INTERVAL = ("ratio", "ratio_min", "ratio_max")
BOOLS = ("center", "adaptive_count")
STATS = ("basic", "full")  # PruneConfig.stats: what model.agile_stats reports


def check_keep(keep: Any) -> int:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral):
        raise ValueError(f"keep must be an integer >= 1 (the number of visual tokens to keep), "
                         f"got {keep!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the number of visual tokens to keep), got {keep}; "
                         f"use method='none' to keep every token")
    return int(keep)


def check_method(method: Any) -> str:
    if method not in REGISTRY and method not in inllm.METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid methods: {', '.join(METHODS)}")
    return method


def check_selection_method(method: Any) -> str:
    """A method that selects tokens before the LLM (what the tensor API runs)."""
    if check_method(method) in inllm.METHODS:
        raise ValueError(f"{method!r} prunes inside the LLM (between decoder layers), so it has no "
                         f"tensor-level selection: use llava_agile.enable(model, {method!r}, keep) "
                         f"(tensor-level methods: {', '.join(SELECTION_METHODS)})")
    return method


def check_params(method: str, params: dict, keep: int | None = None) -> dict:
    """Validate `params` for `method`; returns the full parameter set with defaults filled in.
    In-LLM methods check their parameters against `keep` too."""
    defaults = inllm.DEFAULTS[method] if check_method(method) in inllm.METHODS \
        else REGISTRY[method][1]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) or "no parameters"
        raise ValueError(f"method {method!r} does not take parameter(s) {', '.join(unknown)}; "
                         f"it accepts: {accepted}")
    full = {**defaults, **params}
    for name, value in params.items():
        if name in CHOICES and value not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {', '.join(CHOICES[name])}, got {value!r}")
        if name in BOOLS and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        if name in POSITIVE + NON_NEGATIVE + UNIT_INTERVAL and value is not None:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if name in POSITIVE and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            if name in NON_NEGATIVE and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            if name in UNIT_INTERVAL and not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if name in ("seed", "bat_knn", "chunks"):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                    or (name != "seed" and value < 1):
                raise ValueError(f"{name} must be an integer{'' if name == 'seed' else ' >= 1'}, "
                                 f"got {value!r}")
        if name == "contextual" and value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
            raise ValueError(f"contextual must be an integer >= 0 (visionzip's merged tokens) or "
                             f"None (round(keep * 10 / 64)), got {value!r}")
    if method in inllm.METHODS:
        return inllm.check_params(method, keep, params)
    if "ratio_min" in full and full["ratio_min"] > full["ratio_max"]:
        raise ValueError(f"ratio_min ({full['ratio_min']}) must not exceed ratio_max "
                         f"({full['ratio_max']})")
    return full


def parse_value(text: str) -> Any:
    """'0.5' -> 0.5, '3' -> 3, 'true' -> True, 'none' -> None, '8/16/24' -> (8, 16, 24) (lists of
    numbers, e.g. PDrop's layers), anything else stays a string."""
    low = text.strip().lower()
    if "/" in low:
        parts = [parse_value(t) for t in text.split("/")]
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in parts):
            return tuple(parts)
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_pruning_args(text: str | None) -> dict:
    """'erank_avg=95,tau_max=0.3' -> {'erank_avg': 95, 'tau_max': 0.3}."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"--pruning-args takes key=value pairs separated by commas, got {item!r}")
        key, value = item.split("=", 1)
        if not key.strip():
            raise ValueError(f"--pruning-args: {item!r} has no parameter name before '='")
        out[key.strip()] = parse_value(value)
    return out


def load_erank_avg(path: str) -> float:
    """The mean full-image erank from a calibration JSON (`{"erank": {"mean": ...}}` or `{"erank_avg": ...}`)."""
    with open(path) as f:
        data = json.load(f)
    value = data.get("erank_avg", data.get("erank", {}).get("mean") if isinstance(
        data.get("erank"), dict) else None)
    if not isinstance(value, numbers.Real) or value <= 0:
        raise ValueError(f"{path}: no positive 'erank_avg' or 'erank.mean' in this calibration file; "
                         f"make one with `python -m llava_agile calibrate`")
    return float(value)


@dataclass
class PruneConfig:
    """Which method, how many tokens, and the method's parameters (validated on creation).

    LLaVA-side options: `feature_space` ("projected": the paper's choice, or "vision": the
    pre-projector CLIP features; default: "vision" for visionzip, trim and prumerge_plus, whose
    official codes merge CLIP features, "projected" for every other method) and `anyres_mode`
    ("shared", "per_crop", "global") for LLaVA-NeXT.
    `stats`: what `model.agile_stats` reports per image: "basic" (kept count, indices, time and
    what the method computed anyway) or "full" (also the full-token erank and attention entropy,
    an eigendecomposition per image: for analysis).
    `text_tower` (cdpruner, trim): the CLIP checkpoint with the text tower (a folder or a hub id
    in the local cache; None: the model's vision tower).
    """
    method: str = "adaptive"
    keep: int = 64
    params: dict = field(default_factory=dict)
    feature_space: str | None = None  # None: the method's default (see above)
    anyres_mode: str = "shared"
    stats: str = "basic"
    text_tower: str | None = None

    def __post_init__(self):
        check_method(self.method)
        self.keep = check_keep(self.keep)
        self.params = dict(self.params)
        full = check_params(self.method, self.params, self.keep)
        if self.method in inllm.METHODS:  # lists as tuples (PDrop's layers, ratios)
            self.params = {k: full[k] for k in self.params}
        if self.feature_space is None:
            self.feature_space = "vision" if self.method in VISION_SPACE else "projected"
        if self.feature_space not in ("projected", "vision"):
            raise ValueError(f"feature_space must be 'projected' or 'vision', got {self.feature_space!r}")
        if self.anyres_mode not in ("shared", "per_crop", "global"):
            raise ValueError(f"anyres_mode must be 'shared', 'per_crop' or 'global', "
                             f"got {self.anyres_mode!r}")
        if self.text_tower is not None and self.method not in TEXT:
            raise ValueError(f"text_tower is for the question-conditioned methods "
                             f"({', '.join(TEXT)}), not {self.method!r}")
        if self.stats not in STATS:
            raise ValueError(f"stats must be 'basic' (kept tokens, indices, time) or 'full' (also "
                             f"the full-token erank and entropy), got {self.stats!r}")

    @classmethod
    def from_args(cls, method: str = "adaptive", keep: int = 64,
                  pruning_args: str | dict | None = None, erank_avg_file: str | None = None,
                  **kwargs) -> "PruneConfig":
        """Build from CLI-style values: `pruning_args` as 'k=v,...' or a dict; an erank calibration file."""
        params = parse_pruning_args(pruning_args) if isinstance(pruning_args, (str, type(None))) \
            else dict(pruning_args)
        if erank_avg_file:
            if "erank_avg" not in REGISTRY[check_method(method)][1]:
                raise ValueError(f"--erank-avg-file: method {method!r} does not use erank_avg")
            params.setdefault("erank_avg", load_erank_avg(erank_avg_file))
        for key in ("feature_space", "anyres_mode", "stats", "text_tower"):
            if key in params:
                kwargs.setdefault(key, params.pop(key))
        return cls(method=method, keep=keep, params=params, **kwargs)

    def to_dict(self) -> dict:
        out = {"method": self.method, "keep": self.keep, "params": dict(self.params),
               "feature_space": self.feature_space, "anyres_mode": self.anyres_mode,
               "stats": self.stats}
        if self.text_tower is not None:
            out["text_tower"] = self.text_tower
        return out
