"""Runtime mode: `enable(model, ...)` prunes the visual tokens of a loaded LLaVA model.

Only instance methods are patched (as ToMe does), with LLaVA's signatures and return types:
`prepare_inputs_labels_for_multimodal` computes the kept tokens of every image (LLaVA-1.5 or
LLaVA-NeXT layout) and hands them to LLaVA's own splice code through `encode_images`;
`encode_images` called directly prunes too. No file of the `llava` package is changed.
"""
from __future__ import annotations

import types

import torch

from ..config import PruneConfig
from ..inllm import METHODS as INLLM_METHODS
from ..methods import MERGING, TEXT
from ..selection import crop_mask, crop_stats, flat_tokens
from ..selection import select as _select  # shared with llava_agile.hf
from . import compat
from .anyres import assemble, grid_layout
from .attention import ClsAttentionHook, attention_module, hook_for, select_layer_index

PATCHED = ("prepare_inputs_labels_for_multimodal", "encode_images", "prepare_inputs_for_generation")
_MISSING = object()
_FIELDS = ("method", "keep", "params", "feature_space", "anyres_mode", "stats", "text_tower")


# ---------------------------------------------------------------- configuration

def config_from_dict(d: dict) -> PruneConfig:
    """`PruneConfig.to_dict()` form, or flat: keys other than its fields are method parameters."""
    d = dict(d)
    params = dict(d.pop("params", None) or {})
    params.update({k: d.pop(k) for k in list(d) if k not in _FIELDS})
    return PruneConfig(params=params, **d)


def as_config(method="adaptive", keep=None, feature_space=None, anyres_mode=None, stats=None,
              text_tower=None, **params) -> PruneConfig:
    """A PruneConfig from `enable`'s arguments (a PruneConfig, a dict, or method/keep/params)."""
    if isinstance(method, (PruneConfig, dict)):
        if keep is not None or feature_space is not None or anyres_mode is not None \
                or stats is not None or text_tower is not None or params:
            raise ValueError("pass either a PruneConfig (or dict) or method/keep/parameters, "
                             "not both")
        cfg = method if isinstance(method, PruneConfig) else config_from_dict(method)
    elif isinstance(method, str):
        extra = {k: v for k, v in (("feature_space", feature_space), ("anyres_mode", anyres_mode),
                                   ("stats", stats), ("text_tower", text_tower)) if v is not None}
        cfg = PruneConfig(method=method, keep=64 if keep is None else keep, params=params, **extra)
    else:
        raise ValueError(f"pruning must be a method name, a PruneConfig or a dict, "
                         f"got {type(method).__name__}")
    if cfg.params.get("similarity_features") is not None:
        raise ValueError("similarity_features is set by the LLaVA integration (the CLIP "
                         "features); do not pass it")
    for name in ("keys", "cls_token"):
        if cfg.params.get(name) is not None:
            raise ValueError(f"{name} is set by the LLaVA integration (from the select layer, "
                             f"recorded by its [CLS]-attention hook); do not pass it")
    return cfg


# ---------------------------------------------------------------- checks

def _check_model(model, cfg: PruneConfig):
    needed = ("get_vision_tower", "get_model", "encode_images", *PATCHED)
    missing = [n for n in needed if not hasattr(model, n)]
    if missing:
        raise ValueError(f"enable() needs a LLaVA model (e.g. LlavaLlamaForCausalLM from "
                         f"llava.model.builder.load_pretrained_model); {type(model).__name__} "
                         f"lacks {', '.join(missing)}")
    tower = model.get_vision_tower()
    if tower is None or not getattr(tower, "is_loaded", False):
        raise ValueError("the model's vision tower is not loaded; load the model with LLaVA's "
                         "load_pretrained_model (it loads the tower) before enable()")
    if getattr(tower, "select_feature", "patch") != "patch":
        raise ValueError(f"mm_vision_select_feature={tower.select_feature!r} is not supported: "
                         f"pruning expects patch tokens only ('patch')")
    if cfg.method in MERGING and getattr(model.config, "image_aspect_ratio", None) == "anyres":
        raise ValueError(f"method {cfg.method!r} {MERGING[cfg.method]}, which have no grid "
                         f"position, so "
                         f"it cannot run on LLaVA-NeXT (anyres) crops; pick an index method")


def is_enabled(model) -> bool:
    return "_agile_state" in getattr(model, "__dict__", {})


# ---------------------------------------------------------------- visual tokens

class _State:
    def __init__(self, config: PruneConfig, hook: ClsAttentionHook):
        self.config = config
        self.hook = hook
        self.saved: dict = {}
        self.orig: dict = {}
        self.pending = None
        self.keys = None  # the select layer's patch keys of the last tower call (visionzip)
        self.cls = None   # ... and its [CLS] hidden states `[B, Dv]` (visionzip)
        self.questions = None  # cdpruner / trim: llava_agile.text.Questions

    def remove(self):
        self.hook.remove()


def _tower(model, state, images: torch.Tensor):
    """CLIP patch features `[B, N, Dv]` (LLaVA's own tower forward) and [CLS] rows `[B, N]`."""
    state.hook.start()
    try:
        clip = model.get_vision_tower()(images)
    finally:
        attn = state.hook.stop()
        state.keys, state.cls = state.hook.stop_keys(), state.hook.stop_cls()
    if attn is None or attn.shape != clip.shape[:2]:
        got = None if attn is None else tuple(attn.shape)
        raise RuntimeError(f"expected one [CLS]-attention row per image from the select layer "
                           f"(features {tuple(clip.shape)}), got {got}; only single-scale CLIP "
                           f"towers are supported (not S2 multi-scale)")
    return clip, attn


def _flat_tokens(model, state, clip, attn):
    """LLaVA-1.5: one crop per image; K tokens (or merged features) per image."""
    q = state.questions
    if q is None:
        return flat_tokens(state.config, model.get_model().mm_projector, clip, attn,
                           keys=state.keys, cls=state.cls)
    questions = q.take(clip.shape[0])
    feats, stats = flat_tokens(state.config, model.get_model().mm_projector, clip, attn,
                               text=q.inputs(clip, questions))
    return feats, [dict(st, question=qu) for st, qu in zip(stats, questions)]


def _image_tokens(model, cfg, clip, attn, proj, image_size, keys=None, cls=None, text=None):
    """One image given as crops (`[n, N, .]`): LLaVA's merge with the kept tokens only."""
    n, N = attn.shape
    merge = getattr(model.config, "mm_patch_merge_type", "flat")
    spatial = merge.startswith("spatial")
    space = clip if cfg.feature_space == "vision" else proj
    newline = model.get_model().image_newline if "unpad" in merge else None
    if cfg.method in MERGING and n > 1:
        raise ValueError(f"method {cfg.method!r} {MERGING[cfg.method]} and cannot run on several "
                         f"crops per image; pick an index method")
    layout = None
    if spatial and n > 1:
        if image_size is None:
            raise ValueError("LLaVA-NeXT images need image_sizes (the original (width, height))")
        side = model.get_vision_tower().num_patches_per_side
        layout = grid_layout(model, image_size, n - 1, side, device=attn.device)
    if cfg.method in MERGING:
        if cls is not None and cfg.feature_space != "vision":
            cls = model.get_model().mm_projector(cls)
        res, ms = _select(cfg, space, attn, clip, cfg.keep, keys, cls, text)
        f = res.features[0]
        f = model.get_model().mm_projector(f) if cfg.feature_space == "vision" else f
        st = dict(res.stats[0], crops=1, kept=int(f.shape[0]), prune_ms=ms)
        if newline is not None and spatial:
            f = torch.cat([f, newline[None].to(f)])
        return f, dict(st, tokens=int(f.shape[0]))

    # global: K over the base crop and every high-res cell LLaVA keeps
    candidates = None if layout is None else layout.candidates(N)
    mask, st, ms, extra = crop_mask(cfg, space, attn, clip, candidates,
                                    None if text is None else (text[0], text[1][0]))

    if layout is not None:
        tokens, fed = assemble(proj[0], mask[0], proj[1:], mask[1:], layout, newline)
    else:
        tokens, fed = torch.cat([proj[c][mask[c]] for c in range(n)]), mask
        if spatial and newline is not None:
            tokens = torch.cat([tokens, newline[None].to(tokens)])
    return tokens, crop_stats(st, extra, fed, int(tokens.shape[0]), ms)


def _list_tokens(model, state, images, image_sizes):
    """LLaVA's list / 5-D path: each image is one or more crops (LLaVA-NeXT anyres)."""
    images = [x.unsqueeze(0) if x.ndim == 3 else x for x in images]
    sizes = [x.shape[0] for x in images]
    clip, attn = _tower(model, state, torch.cat(images))
    proj = model.get_model().mm_projector(clip)
    q = state.questions
    questions = None if q is None else q.take(len(images))
    feats, stats = [], []
    parts = zip(clip.split(sizes), attn.split(sizes), proj.split(sizes))
    for i, (c, a, p) in enumerate(parts):
        size = image_sizes[i] if image_sizes is not None else None
        keys, cls = (None if t is None else t.split(sizes)[i] for t in (state.keys, state.cls))
        text = None if q is None else q.inputs(c, [questions[i]])  # the image's crops
        f, st = _image_tokens(model, state.config, c, a, p, size, keys, cls, text)
        if questions is not None:
            st["question"] = questions[i]
        feats.append(f)
        stats.append(st)
    return feats, stats


def visual_tokens(model, images, image_sizes=None):
    """(list of `[L_i, D]` tokens the LLM gets per image, list of per-image stats)."""
    state = model.__dict__["_agile_state"]
    if type(images) is list or images.ndim == 5:
        return _list_tokens(model, state, images, image_sizes)
    return _flat_tokens(model, state, *_tower(model, state, images))


# ---------------------------------------------------------------- patched methods

def _prepare_inputs_labels_for_multimodal(self, input_ids, position_ids, attention_mask,
                                          past_key_values, labels, images, image_sizes=None):
    state = self.__dict__["_agile_state"]
    orig = state.orig["prepare_inputs_labels_for_multimodal"]
    if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
        return orig(input_ids, position_ids, attention_mask, past_key_values, labels, images,
                    image_sizes)
    if state.questions is not None:  # cdpruner / trim: the question after each image
        from llava.constants import IMAGE_TOKEN_INDEX
        state.questions.read_prompt(input_ids, attention_mask, IMAGE_TOKEN_INDEX)
    try:
        feats, stats = visual_tokens(self, images, image_sizes)
    finally:
        if state.questions is not None:
            state.questions.prompt = None
    self.agile_stats = stats
    # LLaVA's 4-D path calls encode_images once and splices its result per image: hand it ours
    state.pending = feats
    try:
        return orig(input_ids, position_ids, attention_mask, past_key_values, labels,
                    torch.zeros(len(feats), 1, 1, 1), image_sizes)
    finally:
        state.pending = None


def _encode_images(self, images):
    state = self.__dict__["_agile_state"]
    if state.pending is not None:
        feats, state.pending = state.pending, None
        return feats
    feats, stats = visual_tokens(self, images)
    self.agile_stats = stats
    same = all(f.shape == feats[0].shape for f in feats)
    return torch.stack(feats) if same else feats


def _prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None,
                                   **kwargs):
    # same parameters as LLaVA's: transformers inspects them (e.g. for `inputs_embeds`)
    state = self.__dict__["_agile_state"]
    return compat.drop_cache_position(state.orig["prepare_inputs_for_generation"](
        input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs))


_IMPL = {"prepare_inputs_labels_for_multimodal": _prepare_inputs_labels_for_multimodal,
         "encode_images": _encode_images,
         "prepare_inputs_for_generation": _prepare_inputs_for_generation}


# ---------------------------------------------------------------- public

def _install(model, state, methods: dict):
    """Set the instance methods (remembering what they replace) and the state."""
    for name, fn in methods.items():
        state.saved[name] = model.__dict__.get(name, _MISSING)
        state.orig[name] = getattr(model, name)
        setattr(model, name, fn)
    model._agile_state = state


def enable(model, method="adaptive", keep: int | None = None, *, feature_space: str | None = None,
           anyres_mode: str | None = None, stats: str | None = None,
           text_tower: str | None = None, tokenizer=None, **params):
    """Prune the visual tokens of a loaded LLaVA model; returns the model.

    `enable(model, "adaptive", 64, erank_avg=95)`, or `enable(model, PruneConfig(...))` / a dict.
    After it, LLaVA's unchanged code feeds K tokens per image (per crop for LLaVA-NeXT in the
    shared / per_crop modes) to the LLM; `model.agile_stats` describes the last call's images
    (one dict each; `prune_ms`: milliseconds spent in `llava_agile.prune` for that image).
    `stats="basic"` (default) reports the kept count, indices, time and what the method computed
    anyway (adaptive's erank and thresholds, a hybrid's ratio); `stats="full"` also measures every
    image's full-token erank and attention entropy (an eigendecomposition per image).
    The in-LLM methods (fastv, pdrop, dart, sparsevlm) feed every image token to the LLM, whose
    decoder layers drop them (`llava_agile.llava.inllm`); their stats add `layer_tokens` / `avg_tokens`.
    cdpruner / trim: `text_tower`, the CLIP checkpoint folder with the text tower (default: the
    vision tower's path); the question is the prompt's text after each image (decoded with
    `tokenizer`, default: the model folder's), or `llava_agile.set_question(model, text)`.
    """
    compat.check_transformers()
    cfg = as_config(method, keep, feature_space, anyres_mode, stats, text_tower, **params)
    _check_model(model, cfg)
    if tokenizer is not None and cfg.method not in TEXT:
        raise ValueError(f"tokenizer= is for the question-conditioned methods "
                         f"({', '.join(TEXT)}), not {cfg.method!r}")
    if is_enabled(model):
        disable(model)
    if cfg.method in INLLM_METHODS:
        from . import inllm
        inllm.enable(model, cfg, _install)
    else:
        tower = model.get_vision_tower()
        attention_module(tower)  # checks the tower and its select layer
        layers = tower.vision_tower.vision_model.encoder.layers
        state = _State(cfg, hook_for(cfg.method, layers,
                                     select_layer_index(tower.select_layer, len(layers))))
        if cfg.method in TEXT:
            state.questions = _questions(model, cfg.method, cfg.text_tower, tokenizer)
        names = PATCHED if compat.needs_cache_position_shim() else PATCHED[:2]
        _install(model, state, {n: types.MethodType(_IMPL[n], model) for n in names})
    model.agile_config = cfg
    model.agile_stats = []
    return model


def _questions(model, method, path, tokenizer):
    from ..text import Questions, TextTower

    tower = model.get_vision_tower()
    text = TextTower(path or tower.vision_tower_name, tower.device)
    if tokenizer is None:  # LLaVA's builder loads it from the model folder
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path, use_fast=False,
                                                      local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None  # read_prompt then asks for tokenizer= or set_question
    return Questions(method, text, tokenizer)


def set_question(model, question):
    """cdpruner / trim: the question of the next call's images (one string, or one per image),
    instead of the prompt's text; used by that call only."""
    state = model.__dict__.get("_agile_state")
    if state is None or getattr(state, "questions", None) is None:
        raise ValueError(f"set_question is for a model enabled with a question-conditioned "
                         f"method ({', '.join(TEXT)})")
    state.questions.set(question)


def disable(model):
    """Undo `enable`: LLaVA's original methods, no hook; returns the model. No-op if not enabled."""
    if not is_enabled(model):
        return model
    state = model.__dict__.pop("_agile_state")
    state.remove()
    for name, value in state.saved.items():
        if value is _MISSING:
            model.__dict__.pop(name, None)
        else:
            setattr(model, name, value)
    for name in ("agile_config", "agile_stats"):
        model.__dict__.pop(name, None)
    return model
