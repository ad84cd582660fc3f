"""Measurements through the real LLaVA code path.

Every number comes from a loaded LLaVA model with `llava_agile.enable(model, config)`: LLaVA's
vision tower, the [CLS]-attention hook and the projector run as in inference
(`llava_agile.llava.visual_tokens`, or `model.generate`); nothing is re-implemented here.
Per image and per (method, K): the full-token erank and [CLS]-attention entropy, the kept
indices, the erank of the kept tokens in the selection space, the threshold range (adaptive) or
attention ratio (hybrids), and the time spent in pruning. erank and entropy are measurements
here, so they are computed in float64 from the captured tensors (the pruning path's float32
values depend on the CPU's BLAS kernels); pruning itself runs as in inference.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .. import inllm
from ..config import PruneConfig, check_keep, check_method, load_erank_avg, parse_pruning_args
from ..methods import MERGING, REGISTRY

RANDOM_PROJECTOR_MARKER = "tiny_llava.json"   # written by llava_agile.assets.build_tiny_llava
FEATURE_SPACES = ("projected", "vision")


# ---------------------------------------------------------------- model

def default_feature_space(model_path: str) -> str:
    """'vision' for the tiny test/demo LLaVAs (random projector), else the paper's 'projected'."""
    return "vision" if (Path(model_path) / RANDOM_PROJECTOR_MARKER).is_file() else "projected"


def load_model(model_path: str, model_base: str | None = None, device: str | None = None):
    """(tokenizer, model, image_processor) via LLaVA's builder; CPU: float32, GPU: float16."""
    from ..llava import load_pretrained_model  # installs the DINOv2 identity pre_layrnorm hook

    p = Path(model_path)
    if (p.is_absolute() or str(model_path).startswith(".")) and not p.is_dir():
        raise ValueError(f"model folder not found: {model_path}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ValueError(f"{model_path} is not a model folder (no config.json)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"device": "cpu", "device_map": "cpu"} if device == "cpu" else {"device": device}
    try:
        tokenizer, model, processor, _ = load_pretrained_model(str(model_path), model_base, **kwargs)
    except OSError as e:
        raise ValueError(f"cannot load model {model_path!r}: {str(e).splitlines()[0]}") from None
    if device == "cpu":
        model = model.float()
    if processor is None:
        raise ValueError(f"{model_path} loaded without an image processor: is it a LLaVA model "
                         f"(its folder name must contain 'llava')?")
    return tokenizer, model.eval(), processor


# ---------------------------------------------------------------- configurations

def make_configs(methods, keeps, pruning_args=None, erank_avg_file=None,
                 feature_space="projected") -> list[PruneConfig]:
    """One PruneConfig per (method, K). Each `--pruning-args` key goes to the methods that take
    it (a key no method takes is an error); `--erank-avg-file` sets erank_avg where used."""
    methods = list(dict.fromkeys(methods))
    keeps = [check_keep(k) for k in dict.fromkeys(keeps)]
    if not methods or not keeps:
        raise ValueError("give at least one method and one K")
    for m in methods:
        check_method(m)
    params = parse_pruning_args(pruning_args) if isinstance(pruning_args, (str, type(None))) \
        else dict(pruning_args)
    extra = {"feature_space": params.pop("feature_space", feature_space)}
    if "anyres_mode" in params:
        extra["anyres_mode"] = params.pop("anyres_mode")
    takes = {m: REGISTRY[m][1] if m in REGISTRY else inllm.DEFAULTS[m] for m in methods}
    unused = [k for k in params if not any(k in takes[m] for m in methods)]
    if unused:
        raise ValueError(f"--pruning-args {', '.join(unused)}: no method among "
                         f"{', '.join(methods)} takes it")
    erank_avg = None
    if erank_avg_file:
        if not any("erank_avg" in takes[m] for m in methods):
            raise ValueError(f"--erank-avg-file: none of {', '.join(methods)} uses erank_avg")
        erank_avg = load_erank_avg(erank_avg_file)
    out = []
    for m in methods:
        p = {k: v for k, v in params.items() if k in takes[m]}
        if erank_avg is not None and "erank_avg" in takes[m]:
            p.setdefault("erank_avg", erank_avg)
        out.extend(PruneConfig(method=m, keep=k, params=p, **extra) for k in keeps)
    return out


# ---------------------------------------------------------------- capture

@contextlib.contextmanager
def capture(model):
    """Record the vision tower's outputs, the select layer's [CLS] rows and the projector's
    inputs while active."""
    from ..llava.attention import attention_module, cls_attention_row

    seen = {"tower": [], "cls": [], "projector": []}
    tower = model.get_vision_tower()
    handles = [
        tower.register_forward_hook(lambda m, a, out: seen["tower"].append(out)),
        attention_module(tower).register_forward_hook(
            lambda m, a, kw, out: seen["cls"].append(
                cls_attention_row(m, kw["hidden_states"] if "hidden_states" in kw else a[0])),
            with_kwargs=True),
        model.get_model().mm_projector.register_forward_pre_hook(
            lambda m, a: seen["projector"].append(a[0])),
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _base_indices(indices):
    """Kept indices of the base crop (LLaVA-NeXT gives one list per crop)."""
    if indices and isinstance(indices[0], list):
        return indices[0]
    return indices


@torch.no_grad()
def image_tokens(model, cfg: PruneConfig, seen: dict) -> torch.Tensor:
    """Every token of the (base crop of the) image in the selection space (`cfg.feature_space`)."""
    clip = seen["tower"][0][0]
    return clip if cfg.feature_space == "vision" else model.get_model().mm_projector(clip)


@torch.no_grad()
def kept_tokens(model, cfg: PruneConfig, stats: dict, seen: dict, fed: torch.Tensor):
    """The kept tokens in the selection space (`cfg.feature_space`) of the (base crop of the)
    image: index methods -> the tower's / projector's features at the kept indices; merging
    methods -> the merged features (projected: what the LLM got; vision: the projector's input)."""
    if cfg.method in MERGING:
        return fed if cfg.feature_space == "projected" else seen["projector"][-1]
    space = image_tokens(model, cfg, seen)
    idx = torch.as_tensor(_base_indices(stats["indices"]), dtype=torch.long, device=space.device)
    return space[idx]


def erank_of(x: torch.Tensor, center: bool = True) -> float:
    """Effective rank of one `[K, D]` token matrix, measured in float64 (the definition: svdvals)."""
    from ..metrics import erank_from_singular_values, singular_values

    return float(erank_from_singular_values(singular_values(x.double(), center)))


def entropy_of_row(row: torch.Tensor) -> float:
    """Entropy (nats) of one [CLS]-attention row, measured in float64."""
    from ..metrics import entropy_of

    return float(entropy_of(row.double()))


# ---------------------------------------------------------------- one image

class Measurer:
    """Measures images on a loaded LLaVA model, one (method, K) configuration at a time."""

    def __init__(self, model, processor, tokenizer=None, conv_mode: str = "vicuna_v1"):
        self.model, self.processor, self.tokenizer = model, processor, tokenizer
        self.conv_mode = conv_mode
        self.device = next(model.parameters()).device
        self.dtype = next(model.get_model().mm_projector.parameters()).dtype

    def pixels(self, image):
        """LLaVA's `process_images` of one PIL image -> (pixels on the model's device, sizes)."""
        from llava.mm_utils import process_images

        x = process_images([image], self.processor, self.model.config)
        if isinstance(x, list):
            x = [t.to(self.device, self.dtype) for t in x]
        else:
            x = x.to(self.device, self.dtype)
        return x, [image.size]

    def input_view(self, pixels):
        """The (base-crop) image the vision tower sees, as a uint8 HxWx3 array."""
        x = pixels[0] if isinstance(pixels, list) else pixels[0]
        if x.dim() == 4:
            x = x[0]
        mean = torch.tensor(self.processor.image_mean).view(3, 1, 1)
        std = torch.tensor(self.processor.image_std).view(3, 1, 1)
        img = (x.float().cpu() * std + mean).clamp(0, 1)
        return (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")

    def prompt(self, question: str):
        from ..assets.tiny import tiny_prompt

        if self.tokenizer is None:
            raise ValueError("generation needs the tokenizer")
        return tiny_prompt(self.tokenizer, question, self.conv_mode).to(self.device)

    @torch.inference_mode()
    def run(self, pixels, sizes, cfg: PruneConfig, question: str | None = None,
            max_new_tokens: int = 16) -> dict:
        """One configuration on one image. With `question`, LLaVA's `generate` runs first (its
        pruning time (`prune_ms` of `model.agile_stats`) and answer are recorded); the kept
        tokens then come from `visual_tokens`."""
        from .. import disable, enable
        from ..llava import visual_tokens

        model = self.model
        if cfg.method in inllm.METHODS:
            return _in_llm_record(self, pixels, sizes, cfg, question, max_new_tokens)
        enable(model, cfg)
        try:
            answer, gen_stats = None, None
            if question is not None:
                ids = self.prompt(question)
                out = model.generate(ids, images=pixels, image_sizes=sizes, do_sample=False,
                                     max_new_tokens=max_new_tokens, use_cache=True,
                                     attention_mask=torch.ones_like(ids))
                answer = self.tokenizer.decode(out[0], skip_special_tokens=True).strip()
                gen_stats = model.agile_stats[0]
            with capture(model) as seen:
                fed, stats = visual_tokens(model, pixels, sizes)
            st = stats[0]
            if question is not None and gen_stats.get("indices") != st.get("indices"):
                raise RuntimeError(f"{cfg.method}: generate and visual_tokens kept different "
                                   f"tokens for the same image")
            center = cfg.params.get("center", True)
            retained = erank_of(kept_tokens(model, cfg, st, seen, fed[0]), center)
            full_erank = erank_of(image_tokens(model, cfg, seen), center)
            entropy = entropy_of_row(seen["cls"][0][0])
        finally:
            disable(model)
        n = int(seen["tower"][0].shape[1])
        tau = st.get("tau_range")
        ms = (gen_stats or st).get("prune_ms")
        rec = {"method": cfg.method, "keep": cfg.keep, "kept": int(st["kept"]),
               "tokens": int(st.get("tokens", st["kept"])), "n_tokens": n,
               "erank": full_erank, "entropy": entropy, "retained_erank": retained,
               "tau_range": [float(tau[0]), float(tau[1])] if tau is not None else None,
               "ratio": float(st["ratio"]) if "ratio" in st else None,
               "indices": st.get("indices"), "attention_indices": st.get("attention_indices"),
               "prune_ms": round(ms, 3) if ms is not None else None}
        if answer is not None:
            rec["answer"] = answer
        return rec


def _in_llm_record(measurer, pixels, sizes, cfg, question, max_new_tokens) -> dict:
    """An in-LLM method (FastV, PDrop, DART) on one image: it ranks by the prompt, so LLaVA's
    `generate` runs with the question; the kept tokens are the image tokens the layers after the
    (first) pruning layer see, their erank measured on the LLM's input (projected) features."""
    from .. import disable, enable

    model = measurer.model
    if question is None:
        raise ValueError(f"{cfg.method} prunes inside the LLM by the prompt's attention: give "
                         f"a question (--question)")
    if getattr(model.config, "image_aspect_ratio", None) == "anyres":
        raise ValueError(f"{cfg.method}: the analysis of in-LLM methods maps kept tokens onto "
                         f"LLaVA-1.5's one 24 x 24 grid; LLaVA-NeXT's are not supported")
    ids = measurer.prompt(question)
    enable(model, cfg)
    try:
        out = model.generate(ids, images=pixels, image_sizes=sizes, do_sample=False,
                             max_new_tokens=max_new_tokens, use_cache=True,
                             attention_mask=torch.ones_like(ids))
        st = model.agile_stats[0]
    finally:
        disable(model)
    with capture(model) as seen:
        model.encode_images(pixels)
    center = cfg.params.get("center", True)
    return {"method": cfg.method, "keep": cfg.keep, "kept": int(st["kept"]),
            "tokens": int(st["tokens"]), "n_tokens": int(seen["tower"][0].shape[1]),
            "erank": erank_of(image_tokens(model, cfg, seen), center),
            "entropy": entropy_of_row(seen["cls"][0][0]),
            "retained_erank": erank_of(kept_tokens(model, cfg, st, seen, None), center),
            "tau_range": None, "ratio": None, "indices": st["indices"],
            "attention_indices": None, "avg_tokens": st["avg_tokens"],
            "prune_ms": round(st["prune_ms"], 3),
            "answer": measurer.tokenizer.decode(out[0], skip_special_tokens=True).strip()}


def measure_image(measurer: Measurer, item: dict, configs, question: str | None = None,
                  max_new_tokens: int = 16, image=None) -> dict:
    """The per-image record: image, category, size, full erank / entropy, one run per config.
    With no configs only the full-token signals are measured (method 'none')."""
    from .inputs import open_image

    image = open_image(item["path"]) if image is None else image
    pixels, sizes = measurer.pixels(image)
    fs = configs[0].feature_space if configs else "projected"
    runs = [measurer.run(pixels, sizes, c, question, max_new_tokens) for c in configs]
    if not runs:
        runs_for_stats = [measurer.run(pixels, sizes, PruneConfig("none", 1, feature_space=fs))]
    else:
        runs_for_stats = runs
    first = runs_for_stats[0]
    return {"image": item["image"], "category": item["category"],
            "categories": item.get("categories", [item["category"]]),
            "width": image.size[0], "height": image.size[1], "n_tokens": first["n_tokens"],
            "feature_space": fs, "erank": first["erank"], "entropy": first["entropy"],
            "runs": [{k: v for k, v in r.items() if k not in ("erank", "entropy", "n_tokens")}
                     for r in runs]}
