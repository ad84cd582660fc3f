"""transformers' LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL with a method that prunes inside the LLM
(FastV, PDrop, DART, SparseVLM; Qwen2.5-VL: FastV, DART): the shared engine (`llava_agile.inllm.engine`)
on the language model's decoder layers, told where the images are by an instance-level
`forward` that reads the image placeholders of each prefill. The processor and the vision side
run unchanged (every image token reaches the LLM)."""
from __future__ import annotations

import functools

import torch

from ..inllm.engine import Engine, cache_length, runs


class InLLMState:
    def __init__(self, engine: Engine, forward_saved):
        self.engine = engine
        self.forward_saved = forward_saved
        self.processor = None   # nothing of the processor is patched


def enable(model, cfg):
    """Set up `cfg` (an in-LLM method) on a transformers LLaVA / NeXT / Qwen2.5-VL model."""
    lm = model.model.language_model
    token = getattr(model.config, "image_token_id", None)
    if token is None:
        token = model.config.image_token_index

    def on_prefill(stats):
        model.agile_stats = [row for sample in stats for row in sample]

    engine = Engine(lm.layers, cfg.method, cfg.keep, cfg.params, norm=lm.norm,
                    rope=getattr(lm, "rotary_emb", None), on_prefill=on_prefill)
    orig = model.forward

    @functools.wraps(orig)   # generate inspects forward's parameters (logits_to_keep, ...)
    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1 and cache_length(kwargs) == 0:
            if kwargs.get("labels") is not None:
                raise ValueError(f"{cfg.method} prunes inside the LLM, which shortens the "
                                 f"sequence the labels describe: computing a loss is not "
                                 f"supported")
            mask = kwargs.get("attention_mask")
            valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            spans = [runs(row == token) for row in ids]
            given = kwargs.get("image_grid_thw", kwargs.get("pixel_values"))
            if given is not None and sum(map(len, spans)) != given.shape[0]:
                raise ValueError(f"{given.shape[0]} images but {sum(map(len, spans))} separate "
                                 f"runs of image placeholders; in-LLM pruning needs text "
                                 f"between images")
            engine.begin(spans, valid)
        return orig(*args, **kwargs)

    model._agile_state = InLLMState(engine, model.__dict__.get("forward"))
    model.forward = forward
    model.agile_config = cfg
    model.agile_stats = []
    return model


def disable(model) -> None:
    state = model.__dict__.pop("_agile_state")
    state.engine.remove()
    if state.forward_saved is None:
        model.__dict__.pop("forward", None)
    else:
        model.forward = state.forward_saved
    for name in ("agile_config", "agile_stats"):
        model.__dict__.pop(name, None)
