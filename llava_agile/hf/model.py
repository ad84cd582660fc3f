"""Model side of the Hugging Face adapter: instance patches on `LlavaModel` / `LlavaNextModel`.

LLaVA-1.5: the inner model's `get_image_features` runs unchanged (vision tower, select layer,
projector) while the select layer's [CLS]-attention hook and a forward hook on the projector's
input record what selection needs; its per-image features are then cut to the K kept (or merged)
tokens, so the stock `forward` scatters K features into K placeholders.
LLaVA-NeXT: `pack_image_features` (called by `get_image_features`) packs every crop as
transformers does (unpad, newlines), and the same packing applied to position codes tells which
packed token is which crop/patch; the kept positions and every newline survive.
Only instance attributes are set; `disable` removes them.
"""
from __future__ import annotations

import functools
import warnings

import torch

from ..llava.attention import hook_for, select_layer_index
from ..methods import TEXT
from ..selection import crop_mask, crop_stats, flat_tokens

SUPPORTED = {"llava": "LlavaForConditionalGeneration",
             "llava_next": "LlavaNextForConditionalGeneration"}
_MISSING = object()


def family(model) -> str | None:
    """"llava" / "llava_next" for transformers' LLaVA classes (or subclasses), else None."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in SUPPORTED and any(c.__name__ == SUPPORTED[kind] for c in type(model).__mro__):
        return kind
    return None


def encoder_layers(tower):
    """The CLIP encoder blocks: `vision_model.encoder.layers` (4.x) or `encoder.layers` (5.x)."""
    for owner in (getattr(tower, "vision_model", None), tower):
        layers = getattr(getattr(owner, "encoder", None), "layers", None)
        if layers is not None:
            return layers
    raise ValueError(f"the vision tower {type(tower).__name__} has no encoder.layers (neither "
                     f"vision_model.encoder.layers as in transformers 4.x nor encoder.layers as "
                     f"in 5.x); only CLIP-style towers are supported")


def attention_module(inner) -> torch.nn.Module:
    layer = inner.config.vision_feature_layer
    if isinstance(layer, (list, tuple)):
        raise ValueError(f"vision_feature_layer={list(layer)} (several layers concatenated) is not "
                         f"supported: pruning needs one select layer's [CLS] attention; use a "
                         f"model whose config.vision_feature_layer is one integer (e.g. -2)")
    layers = encoder_layers(inner.vision_tower)
    attn = layers[select_layer_index(int(layer), len(layers))].self_attn
    for name in ("q_proj", "k_proj", "num_heads", "head_dim"):
        if not hasattr(attn, name):
            raise ValueError(f"the select layer's attention {type(attn).__name__} lacks {name}; "
                             f"the [CLS]-attention hook needs a CLIP attention module")
    return attn


def _strategy(inner, kwargs) -> str:
    strategy = kwargs.get("vision_feature_select_strategy") or \
        inner.config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={strategy!r}: expected 'default' or "
                         f"'full'")
    return strategy


def _check_layer(kwargs) -> None:
    layer = kwargs.get("vision_feature_layer")
    if isinstance(layer, (list, tuple)):
        raise ValueError(f"vision_feature_layer={list(layer)}: pruning needs one select layer; "
                         f"pass one integer (or none: the config's)")


class State:
    """What `enable` set on one model: config, hook, saved attributes, processor patch."""

    def __init__(self, cfg, kind, inner, hook):
        self.config, self.family, self.inner, self.hook = cfg, kind, inner, hook
        self.saved: dict = {}
        self.processor = None
        self.processor_saved: dict = {}
        self.fixed_count = True   # the processor emits the pruned count (else llava_agile.generate)
        self.pending = None       # features encoded by llava_agile.generate for the next forward
        self.encoding = False     # inside llava_agile.generate's encoding pass
        self.full_lengths = None  # per image: placeholders the unpatched processor emits
        self.warned = False
        self.stats: list = []     # LLaVA-NeXT: per-image stats of the current call
        self.projector_inputs: list = []
        self.keys = None          # the select layer's patch keys of the last tower call
        self.cls = None           # ... and its [CLS] hidden states (visionzip)
        self.questions = None     # cdpruner / trim: llava_agile.text.Questions
        self.prompt = None        # ... and the running forward's (input_ids, attention_mask)


def _warn_keep(state, n: int) -> None:
    if state.config.keep > n and not state.warned:
        state.warned = True
        warnings.warn(f"keep={state.config.keep} is larger than the image's {n} visual tokens: "
                      f"every token is kept; pass keep <= {n} to prune", stacklevel=4)


def _check_fixed(state, what: str) -> None:
    if not state.fixed_count and not state.encoding:
        raise ValueError(f"{what}: the number of tokens per image is only known after the vision "
                         f"tower runs, so the processor cannot emit it; call "
                         f"llava_agile.generate(model, **inputs, ...) instead of model.generate "
                         f"(or use anyres_mode='global' / adaptive_count=False)")


def _run_tower(state, orig, pixel_values, args, kwargs):
    """The stock get_image_features with the [CLS] hook and the projector-input hook on."""
    state.projector_inputs = []
    handle = state.inner.multi_modal_projector.register_forward_hook(
        lambda m, a, o: state.projector_inputs.append(a[0]))
    state.hook.start()
    try:
        out = orig(pixel_values, *args, **kwargs)
    finally:
        rows = state.hook.stop()
        state.keys, state.cls = state.hook.stop_keys(), state.hook.stop_cls()
        handle.remove()
    return out, rows


def _rewrap(out, feats):
    if hasattr(out, "pooler_output"):  # 5.x: BaseModelOutputWithPooling, features in pooler_output
        out.pooler_output = feats
        return out
    return type(out)(feats) if isinstance(out, tuple) else list(feats)


def _features(out):
    return list(out.pooler_output if hasattr(out, "pooler_output") else out)


def llava_get_image_features(state, orig):
    """Replacement for `LlavaModel.get_image_features` (same arguments and return type)."""

    @functools.wraps(orig)  # same signature: 5.x's generate inspects it to pass arguments
    def get_image_features(pixel_values, *args, **kwargs):
        if state.pending is not None:
            out, state.pending = state.pending, None
            return out
        _check_layer(kwargs)
        cfg = state.config
        _check_fixed(state, "a data-dependent count (adaptive_count=True or count='iqr')")
        strategy = _strategy(state.inner, kwargs)
        out, rows = _run_tower(state, orig, pixel_values, args, kwargs)
        full = _features(out)
        clip = state.projector_inputs[0]
        proj = torch.stack(full)
        cls = 1 if strategy == "full" else 0
        if rows is None or rows.shape != clip[:, cls:].shape[:2]:
            raise RuntimeError(f"expected one [CLS]-attention row per image from the select "
                               f"layer (features {tuple(clip.shape)}), got "
                               f"{None if rows is None else tuple(rows.shape)}")
        _warn_keep(state, rows.shape[1])
        text = questions = None
        if state.questions is not None:
            questions = _questions(state, clip.shape[0])
            text = state.questions.inputs(clip[:, cls:], questions)
        feats, stats = flat_tokens(cfg, state.inner.multi_modal_projector, clip[:, cls:], rows,
                                   proj[:, cls:], state.keys, None if cls else state.cls, text)
        if questions is not None:
            stats = [dict(st, question=q) for st, q in zip(stats, questions)]
        if cls:  # "full": the [CLS] token is fed as transformers does, in front of the kept ones
            feats = [torch.cat([proj[b, :1], f]) for b, f in enumerate(feats)]
        state.full_lengths = [int(f.shape[0]) for f in full]
        state.owner.agile_stats = stats
        return _rewrap(out, feats)

    return get_image_features


def next_get_image_features(state, orig):
    """Replacement for `LlavaNextModel.get_image_features`: hooks on around the stock one."""

    @functools.wraps(orig)  # same signature: 5.x's generate inspects it to pass arguments
    def get_image_features(pixel_values, *args, **kwargs):
        if state.pending is not None:
            out, state.pending = state.pending, None
            return out
        _check_layer(kwargs)
        _check_fixed(state, f"anyres_mode={state.config.anyres_mode!r} on LLaVA-NeXT"
                     if state.config.anyres_mode != "global" else "adaptive_count=True")
        state.stats = []
        out, _ = _run_tower(state, orig, pixel_values, args, kwargs)
        state.owner.agile_stats = state.stats
        return out

    return get_image_features


def next_pack_image_features(state, orig):
    """Replacement for `LlavaNextModel.pack_image_features` (same arguments and return)."""

    @functools.wraps(orig)  # same signature: 5.x's generate inspects it to pass arguments
    def pack_image_features(image_features, image_sizes, vision_feature_select_strategy,
                            image_newline=None):
        if not state.hook.active:  # called on its own: transformers' behaviour
            return orig(image_features, image_sizes, vision_feature_select_strategy,
                        image_newline=image_newline)
        if vision_feature_select_strategy != "default":
            raise ValueError("LLaVA-NeXT with vision_feature_select_strategy='full' is not "
                             "supported: anyres packing needs the patch tokens only ('default')")
        full, _ = orig(image_features, image_sizes, vision_feature_select_strategy,
                       image_newline=image_newline)
        rows = torch.cat(state.hook.rows)
        clip = state.projector_inputs[0]  # "default": the CLS is already dropped
        N = rows.shape[1]
        if clip.shape[:2] != rows.shape:
            raise RuntimeError(f"[CLS] rows {tuple(rows.shape)} do not match the select "
                               f"layer's patches {tuple(clip.shape)}")
        _warn_keep(state, N)
        # the same packing on position codes: 1 + crop * N + patch, newline = 0
        codes = [1 + torch.arange(f.shape[0] * N, dtype=torch.float64, device=rows.device)
                 .view(f.shape[0], N, 1) for f in image_features]
        nl = None if image_newline is None else torch.zeros(1, dtype=torch.float64,
                                                            device=rows.device)
        packed, _ = orig(codes, image_sizes, vision_feature_select_strategy, image_newline=nl)
        cfg, feats, start = state.config, [], 0
        questions = None if state.questions is None else _questions(state, len(image_features))
        for i, proj in enumerate(image_features):
            n = proj.shape[0]
            c, a = clip[start:start + n], rows[start:start + n]
            start += n
            code = packed[i][:, 0].round().long()
            cells = code[code > 0] - 1
            space = c if cfg.feature_space == "vision" else proj
            text = None
            if questions is not None:  # the image's crops and its question
                emb, (t,) = state.questions.inputs(c, questions[i:i + 1])
                text = (emb, t)
            mask, st, ms, extra = crop_mask(cfg, space, a, c, (cells // N, cells % N), text)
            keep = (code == 0) | mask.flatten()[(code - 1).clamp_min(0)]
            tokens = full[i][keep]
            fed = torch.zeros(n * N, dtype=torch.bool, device=mask.device)
            fed[cells[keep[code > 0]]] = True
            state.stats.append(crop_stats(st, extra, fed.view(n, N), int(tokens.shape[0]), ms))
            if questions is not None:
                state.stats[-1]["question"] = questions[i]
            feats.append(tokens)
        state.full_lengths = [int(f.shape[0]) for f in full]
        lens = torch.tensor([f.shape[0] for f in feats], dtype=torch.long,
                            device=feats[0].device)
        return feats, lens

    return pack_image_features


def patch(model, state) -> None:
    inner = state.inner
    targets = {"get_image_features": (llava_get_image_features if state.family == "llava"
                                      else next_get_image_features)}
    if state.family == "llava_next":
        targets["pack_image_features"] = next_pack_image_features
    for name, make in targets.items():
        if not callable(getattr(inner, name, None)):
            raise ValueError(f"{type(inner).__name__} has no {name}: this transformers version "
                             f"lacks the hook point llava_agile patches; install a tested "
                             f"version (pip install -e .[hf])")
        state.saved[name] = inner.__dict__.get(name, _MISSING)
        setattr(inner, name, make(state, getattr(inner, name)))
    if state.questions is not None:  # cdpruner / trim read the question in the prompt
        _keep_prompts(model, state)


def _prompt(args, kwargs):
    ids = kwargs.get("input_ids", args[0] if args else None)
    return None if ids is None else (ids, kwargs.get("attention_mask"))


def _keep_prompts(model, state) -> None:
    """The prompt reaches `get_image_features` through `state.prompt`: from the inner model's
    forward (4.x, or a direct call), or from `generate` (5.x encodes images before the
    prefill, from the pixels only)."""
    def keep(module, args, kwargs):
        state.prompt = _prompt(args, kwargs)

    state.prompt_hook = state.inner.register_forward_pre_hook(keep, with_kwargs=True)
    orig = model.generate

    @functools.wraps(orig)
    def generate(*args, **kwargs):
        state.prompt = _prompt(args, kwargs)
        try:
            return orig(*args, **kwargs)
        finally:
            state.prompt = None

    state.generate_saved = model.__dict__.get("generate", _MISSING)
    model.generate = generate


def unpatch(state) -> None:
    if getattr(state, "prompt_hook", None) is not None:
        state.prompt_hook.remove()
        if state.generate_saved is _MISSING:
            state.owner.__dict__.pop("generate", None)
        else:
            state.owner.generate = state.generate_saved
    for name, value in state.saved.items():
        if value is _MISSING:
            state.inner.__dict__.pop(name, None)
        else:
            setattr(state.inner, name, value)
    state.hook.remove()


def new_state(model, cfg, kind, processor) -> State:
    inner = model.model
    attn = attention_module(inner)
    layers = encoder_layers(inner.vision_tower)
    index = next(i for i, m in enumerate(layers) if m.self_attn is attn)
    state = State(cfg, kind, inner, hook_for(cfg.method, layers, index))
    state.owner = model
    if cfg.method in TEXT:
        from ..text import Questions, TextTower
        state.questions = Questions(cfg.method, TextTower(cfg.text_tower, model.device),
                                    getattr(processor, "tokenizer", None))
    return state


def _questions(state, n_images: int):
    """cdpruner / trim: this call's questions (given, else read from the forward's prompt)."""
    q = state.questions
    if state.prompt is not None:  # used once: a later direct call must not reuse it
        (ids, mask), state.prompt = state.prompt, None
        config = state.inner.config
        q.read_prompt(ids, mask, getattr(config, "image_token_id",
                                         getattr(config, "image_token_index", None)))
    try:
        return q.take(n_images)
    finally:
        q.prompt = None
