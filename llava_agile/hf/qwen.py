"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) and Qwen3-VL
(`Qwen3VLForConditionalGeneration`), transformers 5.x: pruning after the patch merger with the
kept tokens' original M-RoPE positions.

- Scores (`attention_source="received_mean"`; Qwen's ViT has no [CLS]): a forward hook on one
  vision block's attention (default: the last full-attention block, Qwen2.5-VL's
  `fullatt_block_indexes[-1]`; Qwen3-VL's blocks all attend fully: its last block) recomputes
  that layer's q / k with its 2-D rotary embedding and
  averages, over heads and over every query of the same image (`cu_seqlens`), the softmax
  attention each patch receives. The ViT itself keeps its fast kernel. The patch scores are
  mean-pooled over each 2x2 merge group, Qwen2.5-VL's window reordering is undone (merged
  tokens in raster order) and each image's scores are renormalised to sum to 1, like a [CLS] row.
- Qwen3-VL's deepstack features (one merger per deepstack block, added to the LLM's hidden
  states after its first decoder layers at the image placeholders) are cut with the same kept
  indices as the main features, so every level matches the placeholders.
- Selection (`llava_agile.selection.select`) runs per image on the merger's output (the LLM
  tokens; `feature_space="vision"`: the merger's input, the 4 patch states of a group
  concatenated); the kept indices are sorted (raster order).
- Positions: `get_rope_index` walks the prompt and asks `get_vision_position_ids` for each
  image's (t, h, w) grid; the patched instance returns the full grid's columns of the kept
  tokens, so they keep their original positions, and the text after an image continues from
  the full image's extent (`rope_deltas` then accounts for the removed tokens). In `generate`
  the positions are computed before the first forward: the images are encoded there once and
  the features handed to that forward.
- Processor: the instance's `replace_image_token` / `_get_num_multimodal_tokens` emit
  min(K, N) placeholders per image (`mm_token_type_ids` follows `input_ids`). `adaptive_count`:
  `llava_agile.generate(model, **inputs, ...)` (`generate` below) cuts each image's run.

Only instance attributes are set; `disable` removes them. Videos are refused, and so are the
in-LLM methods on Qwen3-VL (deepstack adds the full image's features after decoder layers that
FastV / DART would already have shortened).
"""
from __future__ import annotations

import functools
import inspect
import re
import sys
import warnings

import torch

from .. import inllm, qwenvl
from ..llava.runtime import as_config
from ..methods import MERGING, TEXT
from . import llm
from .processor import check_identity, refuse_mismatch

TESTED = "5.24.0"
# model_type -> (model class, processor class, name)
FAMILIES = {"qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                           "Qwen2.5-VL"),
            "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3-VL")}
SOURCES = ("received_mean",)
_MISSING = object()
_PATCHED = ("get_image_features", "get_video_features", "get_rope_index", "get_vision_position_ids")


def is_qwen(model) -> bool:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    return kind in FAMILIES and any(c.__name__ == FAMILIES[kind][0] for c in type(model).__mro__)


def _name(model) -> str:
    return FAMILIES[model.config.model_type][2]


def check_transformers(version: str | None = None) -> None:
    if version is None:
        import transformers
        version = transformers.__version__
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    major, minor = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if major < 5:
        raise RuntimeError(
            f"Qwen-VL pruning needs transformers 5.x (tested on {TESTED}); {version} computes "
            f"the M-RoPE positions in one get_rope_index without the per-image hook "
            f"get_vision_position_ids that keeps the pruned tokens' positions: "
            f"pip install transformers=={TESTED}")
    if (major, minor) != (5, 24):
        warnings.warn(f"transformers {version}: llava_agile's Qwen-VL adapter is tested on "
                      f"{TESTED}; install it if pruning misbehaves", stacklevel=3)


# ---------------------------------------------------------------- scores

def received_mean(attn, hidden, cu_seqlens, position_embeddings, chunk: int = 512):
    """`qwenvl.received_mean` of transformers' vision attention `attn` on its input `hidden`:
    the block's own q / k with its rotary embedding (transformers' own helper): `[seq]` (the
    ViT's window order)."""
    mod = sys.modules[type(attn).__module__]  # transformers' own rotary helper for this class
    n = hidden.shape[0]
    q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
    return qwenvl.received_mean(q.transpose(0, 1), k.transpose(0, 1), cu_seqlens, attn.scaling,
                                chunk)


class _Hook:
    """Forward hook on the scoring block's attention; records while `active`."""

    def __init__(self, attn):
        self.attn, self.active, self.rows = attn, False, []
        self.handle = attn.register_forward_hook(self._fire, with_kwargs=True)

    def _fire(self, module, args, kwargs, output):
        if not self.active:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        pe = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
        cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        with torch.no_grad():
            self.rows.append(received_mean(module, hidden, cu, pe))

    def remove(self):
        self.handle.remove()


# ---------------------------------------------------------------- state

class State:
    def __init__(self, cfg, model, layer: int, hook: _Hook):
        self.config, self.owner, self.inner = cfg, model, model.model
        self.layer, self.hook = layer, hook
        self.family = model.config.model_type
        self.saved: dict = {}
        self.processor = None
        self.processor_saved: dict = {}
        self.fixed_count = not cfg.params.get("adaptive_count")
        self.encoding = False
        self.pending = None       # (key of the pixels, encoder output, the pixels) for the
        #                           next forward; holding the pixels keeps their memory (and so
        #                           the key's data_ptr) from being reused by other pixels
        self.kept: list = []      # per image of the last encoding: kept indices (raster order)
        self.full_lengths: list = []
        self.rope_kept = None     # iterator over `kept` while get_rope_index runs
        self.scores: list = []    # per image: the received_mean scores of the merged tokens
        self.full: list = []      # per image: every merged token of the last encoding
        self.warned = False


def _key(pixel_values, grid):
    return (pixel_values.data_ptr(), tuple(pixel_values.shape),
            None if grid is None else tuple(grid.flatten().tolist()))


def _check_fixed(state) -> None:
    if not state.fixed_count and not state.encoding:
        raise ValueError("adaptive_count=True: the number of tokens per image is only known after "
                         "the vision tower runs, so the processor cannot emit it; call "
                         "llava_agile.generate(model, **inputs, ...) instead of model.generate")


def _encode(state, orig, pixel_values, grid, kwargs):
    """The stock get_image_features with the hook on; features cut to the kept tokens."""
    from transformers.vision_utils import get_vision_window_index

    if grid is None:
        raise ValueError(f"{_name(state.owner)} needs image_grid_thw (pass the processor's "
                         f"outputs)")
    cfg, visual = state.config, state.inner.visual
    state.hook.rows, state.hook.active = [], True
    try:
        out = orig(pixel_values, grid, **dict(kwargs, return_dict=True))
    finally:
        state.hook.active = False
    if len(state.hook.rows) != 1:
        raise RuntimeError(f"expected one call of vision block {state.layer}'s attention, got "
                           f"{len(state.hook.rows)}")
    unit = visual.spatial_merge_size ** 2
    scores = qwenvl.merged_scores(state.hook.rows[0], unit)              # merged tokens
    hidden = out.last_hidden_state
    vision = hidden.reshape(-1, unit * hidden.shape[-1])                 # the merger's input
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: back from the window order to raster
        window, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                            visual.patch_size)
        back = torch.argsort(window.to(grid.device))
        scores, vision = scores[back], vision[back]
    sizes = [int(f.shape[0]) for f in out.pooler_output]
    small = qwenvl.too_few(cfg, sizes)
    if small is not None and not state.warned:
        state.warned = True
        warnings.warn(f"keep={cfg.keep} is larger than the image's {small} visual tokens: every "
                      f"token is kept; pass keep <= {small} to prune", stacklevel=4)
    feats, stats, kept = qwenvl.select_images(cfg, out.pooler_output, scores.split(sizes),
                                              vision.split(sizes))
    state.scores, state.full = list(scores.split(sizes)), list(out.pooler_output)
    state.kept, state.full_lengths = kept, sizes
    state.owner.agile_stats = stats
    out.pooler_output = tuple(feats)
    if getattr(out, "deepstack_features", None):  # Qwen3-VL: every level cut alike
        out.deepstack_features = [tuple(f[i.to(f.device)] for f, i in zip(level, kept))
                                  for level in out.deepstack_features]
    return out


def _get_image_features(state, orig):
    @functools.wraps(orig)  # same signature: generate inspects it
    def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
        if state.pending is not None and state.pending[0] == _key(pixel_values, image_grid_thw):
            out, state.pending = state.pending[1], None
            return out
        _check_fixed(state)
        out = _encode(state, orig, pixel_values, image_grid_thw, kwargs)
        return out if kwargs.get("return_dict", True) else out.to_tuple()

    return get_image_features


def _get_video_features(state, orig):
    @functools.wraps(orig)
    def get_video_features(*args, **kwargs):
        raise ValueError(f"llava_agile's {_name(state.owner)} pruning supports images only; "
                         f"videos are not supported: llava_agile.disable(model) for video inputs")

    return get_video_features


def _count_images(input_ids, attention_mask, token) -> int:
    ids = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    return int((ids == token).sum())


def _get_rope_index(state, orig):
    signature = inspect.signature(orig)  # Qwen2.5-VL's has second_per_grid_ts, Qwen3-VL's not

    @functools.wraps(orig)
    def get_rope_index(*args, **kwargs):
        given = signature.bind(*args, **kwargs).arguments
        input_ids, attention_mask = given["input_ids"], given.get("attention_mask")
        image_grid_thw = given.get("image_grid_thw")
        if given.get("video_grid_thw") is not None:
            raise ValueError(f"llava_agile's {_name(state.owner)} pruning supports images only; "
                             f"videos are not supported: llava_agile.disable(model) for video "
                             f"inputs")
        call = functools.partial(orig, *args, **kwargs)
        if image_grid_thw is None:
            return call()
        pixels = given.get("kwargs", {}).get("pixel_values")
        if pixels is not None and (state.pending is None or
                                   state.pending[0] != _key(pixels, image_grid_thw)):
            # generate computes the positions before its first forward: encode the images now
            _check_fixed(state)
            out = _encode(state, state.saved_get_image_features, pixels, image_grid_thw, {})
            state.pending = (_key(pixels, image_grid_thw), out, pixels)
        total = _count_images(input_ids, attention_mask, state.inner.config.image_token_id)
        full = int((image_grid_thw.prod(-1) // state.inner.visual.spatial_merge_size ** 2).sum())
        kept = state.kept if len(state.kept) == len(image_grid_thw) else None
        want = full if kept is None else sum(int(k.numel()) for k in kept)
        if total != want:
            raise ValueError(f"the prompts hold {total} image placeholders, but the images need "
                             f"{want} (pruned; {full} unpruned); make the inputs with the "
                             f"processor given to llava_agile.enable (adaptive_count: "
                             f"llava_agile.generate(model, **inputs, ...))")
        if want == full:
            return call()
        state.rope_kept = iter(kept)
        try:
            return call()
        finally:
            state.rope_kept = None

    return get_rope_index


def _get_vision_position_ids(state, orig):
    @functools.wraps(orig)
    def get_vision_position_ids(*args, **kwargs):
        pos = orig(*args, **kwargs)
        if state.rope_kept is None:
            return pos
        idx = next(state.rope_kept)
        return pos[:, idx.to(pos.device)]

    return get_vision_position_ids


# ---------------------------------------------------------------- processor

def _check_processor(processor, model) -> None:
    model_name, processor_name, _ = FAMILIES[model.config.model_type]
    check_identity(processor, model_name, processor_name, "<|image_pad|>")
    problems = []
    if getattr(processor, "image_token_id", None) != model.config.image_token_id:
        problems.append(f"image token id {getattr(processor, 'image_token_id', None)} != the "
                        f"model's {model.config.image_token_id}")
    merge = getattr(processor.image_processor, "merge_size", None)
    if merge != model.config.vision_config.spatial_merge_size:
        problems.append(f"merge_size {merge} != the vision tower's "
                        f"{model.config.vision_config.spatial_merge_size}")
    refuse_mismatch(problems)


def _patch_processor(processor, state) -> None:
    state.processor = processor
    if not state.fixed_count:
        return
    cfg = state.config

    def count(n: int) -> int:
        return n if cfg.method == "none" else min(cfg.keep, n)

    orig_replace, orig_num = processor.replace_image_token, processor._get_num_multimodal_tokens

    def replace_image_token(image_inputs, image_idx, **kwargs):
        text = orig_replace(image_inputs, image_idx, **kwargs)
        n = len(text) // len(processor.image_token)
        return processor.image_token * count(n)

    def _get_num_multimodal_tokens(image_sizes=None, video_sizes=None, **kwargs):
        data = orig_num(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if image_sizes is not None:
            data.num_image_tokens = [count(n) for n in data.num_image_tokens]
        return data

    for name, fn in (("replace_image_token", replace_image_token),
                     ("_get_num_multimodal_tokens", _get_num_multimodal_tokens)):
        state.processor_saved[name] = processor.__dict__.get(name, _MISSING)
        setattr(processor, name, fn)


def _restore(obj, saved: dict) -> None:
    for name, value in saved.items():
        if value is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            setattr(obj, name, value)
    saved.clear()


# ---------------------------------------------------------------- public

def scoring_layer(visual, attention_layer: int | None) -> int:
    """The vision block whose attention scores the tokens (default: the last full-attention one)."""
    depth = len(visual.blocks)
    if attention_layer is None:
        full = list(getattr(visual, "fullatt_block_indexes", None) or [])
        return int(full[-1]) if full else depth - 1
    if not isinstance(attention_layer, int) or not -depth <= attention_layer < depth:
        raise ValueError(f"attention_layer={attention_layer!r}: expected a vision block index in "
                         f"[-{depth}, {depth}) (or None: the last full-attention block)")
    return attention_layer % depth


def enable(model, processor=None, method="adaptive", keep: int | None = None, *,
           feature_space: str | None = None, attention_source: str = "received_mean",
           attention_layer: int | None = None, **params):
    """Prune the visual tokens of an HF Qwen2.5-VL / Qwen3-VL model after its patch merger;
    returns it."""
    check_transformers()
    if not is_qwen(model):
        raise ValueError(f"{type(model).__name__} is not transformers' "
                         f"{' or '.join(f[0] for f in FAMILIES.values())}")
    family = _name(model)
    inner = getattr(model, "model", None)
    visual = getattr(inner, "visual", None)
    if visual is None or not hasattr(visual, "blocks") or not hasattr(visual, "merger"):
        raise ValueError(f"{type(model).__name__} has no model.visual with blocks and a merger "
                         f"({family}'s vision transformer); install transformers=={TESTED}")
    for name in _PATCHED:
        if not callable(getattr(inner, name, None)):
            raise ValueError(f"{type(inner).__name__} has no {name}: this transformers version "
                             f"lacks the hook point llava_agile patches; install "
                             f"transformers=={TESTED}")
    if attention_source not in SOURCES:
        raise ValueError(f"attention_source={attention_source!r}: {family} has no [CLS] token; "
                         f"supported: {', '.join(SOURCES)}")
    cfg = as_config(method, keep, feature_space, None, **params)
    if cfg.method in inllm.METHODS:
        if model.config.model_type == "qwen3_vl":
            raise ValueError(f"{cfg.method} prunes inside the LLM, and Qwen3-VL's deepstack adds "
                             f"the whole image's features to the hidden states after its first "
                             f"decoder layers, at every image placeholder: the shortened "
                             f"sequence no longer matches them; on Qwen3-VL use a method that "
                             f"prunes before the LLM")
        if cfg.method in inllm.RENUMBER:
            raise ValueError(f"{cfg.method} renumbers positions after each drop, which has no "
                             f"M-RoPE (t, h, w) counterpart in its authors' code; on {family} "
                             f"use fastv or dart (kept tokens keep their M-RoPE positions)")
        disable(model)
        return llm.enable(model, cfg)
    if cfg.method in TEXT:
        raise ValueError(f"{cfg.method} is conditioned on the question with a CLIP text tower, "
                         f"which {family}'s vision encoder has no counterpart of; it runs on "
                         f"LLaVA-1.5 / NeXT")
    if cfg.method in MERGING:
        raise ValueError(f"method {cfg.method!r} {MERGING[cfg.method]}, which have no single "
                         f"(t, h, w) M-RoPE position (and visionzip needs a [CLS] layer's "
                         f"keys); pick an index method on {family}")
    _check_processor(processor, model)
    layer = scoring_layer(visual, attention_layer)
    attn = visual.blocks[layer].attn
    for name in ("qkv", "num_heads", "scaling"):
        if not hasattr(attn, name):
            raise ValueError(f"vision block {layer}'s attention {type(attn).__name__} lacks "
                             f"{name}; the received_mean hook needs Qwen's vision attention")
    if is_enabled(model):
        disable(model)
    state = State(cfg, model, layer, _Hook(attn))
    makers = {"get_image_features": _get_image_features, "get_video_features": _get_video_features,
              "get_rope_index": _get_rope_index,
              "get_vision_position_ids": _get_vision_position_ids}
    try:
        for name, make in makers.items():
            state.saved[name] = inner.__dict__.get(name, _MISSING)
            current = getattr(inner, name)
            if name == "get_image_features":
                state.saved_get_image_features = current
            setattr(inner, name, make(state, current))
        _patch_processor(processor, state)
    except Exception:
        _restore(inner, state.saved)
        if state.processor is not None:
            _restore(state.processor, state.processor_saved)
        state.hook.remove()
        raise
    model._agile_state = state
    model.agile_config = cfg
    model.agile_stats = []
    return model


def is_enabled(model) -> bool:
    return isinstance(getattr(model, "__dict__", {}).get("_agile_state"),
                      (State, llm.InLLMState))


def disable(model, processor=None):
    state = getattr(model, "__dict__", {}).get("_agile_state")
    if state is None:
        return model
    if isinstance(state, llm.InLLMState):
        llm.disable(model)
        return model
    if processor is not None and state.processor is not None and processor is not state.processor:
        raise ValueError("this processor is not the one llava_agile.enable patched for this "
                         "model; pass that one (or none)")
    model.__dict__.pop("_agile_state")
    _restore(state.inner, state.saved)
    state.hook.remove()
    if state.processor is not None:
        _restore(state.processor, state.processor_saved)
    for name in ("agile_config", "agile_stats"):
        model.__dict__.pop(name, None)
    return model


def generate(model, input_ids=None, pixel_values=None, attention_mask=None,
             image_grid_thw=None, mm_token_type_ids=None, **generate_kwargs):
    """Variable K per image (`adaptive_count=True`): encode and prune, cut each image's run of
    placeholders to its K, run the stock `generate`. Returns (output, prompt lengths) as
    `llava_agile.hf.generate` does (rows left-padded to `lengths.max()`)."""
    from .generate import shorten

    state = model.__dict__.get("_agile_state")
    if not isinstance(state, State):
        raise ValueError("llava_agile.generate needs a Qwen2.5-VL / Qwen3-VL model enabled with "
                         "llava_agile.enable(model, processor=..., ...)")
    if input_ids is None or pixel_values is None or image_grid_thw is None:
        raise ValueError("llava_agile.generate needs input_ids, pixel_values and image_grid_thw "
                         "(the processor's outputs: llava_agile.generate(model, **inputs, ...))")
    if generate_kwargs.get("pixel_values_videos") is not None:
        raise ValueError("videos are not supported by llava_agile's Qwen pruning")
    state.encoding = True
    try:
        with torch.no_grad():
            out = _encode(state, state.saved_get_image_features, pixel_values, image_grid_thw, {})
    finally:
        state.encoding = False
    token = model.config.image_token_id
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else getattr(model.config.get_text_config(), "pad_token_id", None)
    pad = 0 if pad is None else int(pad[0] if isinstance(pad, (list, tuple)) else pad)
    kept = [int(k.numel()) for k in state.kept]
    ids, mask, lengths = shorten(input_ids, attention_mask, token, state.full_lengths, kept, pad)
    types = (ids == token).to(torch.int32 if mm_token_type_ids is None else mm_token_type_ids.dtype)
    state.pending = (_key(pixel_values, image_grid_thw), out, pixel_values)
    try:
        result = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                                image_grid_thw=image_grid_thw, mm_token_type_ids=types,
                                **generate_kwargs)
    finally:
        state.pending = None
    return result, lengths


def calibrate(model, processor, images, prompt: str, out_file=None, center: bool = True) -> dict:
    """Mean (and spread) over `images` of the full merged-token erank and the received_mean
    entropy of a Qwen2.5-VL / Qwen3-VL model enabled with llava_agile.enable: the `erank_avg` /
    `entropy_avg` to use for it (the paper's 90 was measured on LLaVA's features). Written as
    JSON like `llava_agile calibrate` (read by `--erank-avg-file`) when `out_file` is given."""
    import json
    from pathlib import Path

    from ..analysis.summary import spread
    from ..api import attention_entropy, erank

    state = model.__dict__.get("_agile_state")
    if not isinstance(state, State):
        raise ValueError("calibrate needs a Qwen-VL model enabled with llava_agile.enable("
                         "model, processor=..., ...) (any method: the full tokens are measured)")
    per_image = []
    for image in images:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            _encode(state, state.saved_get_image_features, inputs["pixel_values"],
                    inputs["image_grid_thw"], {})
        feats, scores = state.full[0], state.scores[0]
        per_image.append({"erank": float(erank(feats.double(), center)),
                          "entropy": float(attention_entropy(scores.double()))})
    er, en = spread(r["erank"] for r in per_image), spread(r["entropy"] for r in per_image)
    result = {"model_path": getattr(model.config, "_name_or_path", ""), "feature_space":
              "projected", "n_images": len(per_image), "erank_avg": er["mean"],
              "entropy_avg": en["mean"], "erank": er, "entropy": en, "images": per_image}
    if out_file is not None:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(json.dumps(result, indent=1))
    return result
