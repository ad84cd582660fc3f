"""LLaVA's own model with a method that prunes inside the LLM (FastV, PDrop, DART, SparseVLM).

LLaVA's `prepare_inputs_labels_for_multimodal` is wrapped to learn where each sample's image
tokens land (it is run with marker labels: LLaVA labels image positions IGNORE_INDEX) and to
announce the prefill to the shared engine (`llava_agile.inllm.engine`), which patches the LLaMA
decoder layers. The vision tower and projector run unchanged (every token reaches the LLM).
"""
from __future__ import annotations

import types

import torch

from ..inllm.engine import Engine, runs
from . import compat

IGNORE_INDEX, IMAGE_TOKEN_INDEX = -100, -200   # llava.constants
TESTED = "4.37.2"


class InLLMState:
    def __init__(self, config, engine: Engine):
        self.config = config
        self.engine = engine
        self.saved: dict = {}
        self.orig: dict = {}

    def remove(self):
        self.engine.remove()


def image_spans(labels: torch.Tensor, valid: torch.Tensor, counts: list[int]) -> list[list[range]]:
    """Per sample, the runs of image positions (labels == IGNORE_INDEX on real tokens)."""
    out = []
    for b in range(labels.shape[0]):
        found = runs((labels[b] == IGNORE_INDEX) & valid[b])
        if len(found) != counts[b]:
            raise ValueError(f"sample {b}: {counts[b]} <image> tokens but {len(found)} separate "
                             f"image-token runs in the LLM input; in-LLM pruning needs text "
                             f"between images")
        out.append(found)
    return out


def _prepare(self, input_ids, position_ids, attention_mask, past_key_values, labels, images,
             image_sizes=None):
    state = self.__dict__["_agile_state"]
    orig = state.orig["prepare_inputs_labels_for_multimodal"]
    if self.get_vision_tower() is None or images is None or input_ids.shape[1] == 1:
        if past_key_values is None:     # a prefill without images: nothing to prune
            valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
                else attention_mask.bool()
            state.engine.begin([[] for _ in range(input_ids.shape[0])], valid)
        return orig(input_ids, position_ids, attention_mask, past_key_values, labels, images,
                    image_sizes)
    if labels is not None:
        raise ValueError(f"{state.config.method} prunes inside the LLM, which shortens the "
                         f"sequence the labels describe: computing a loss is not supported")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
        else attention_mask.bool()
    counts = [int((ids[m] == IMAGE_TOKEN_INDEX).sum()) for ids, m in zip(input_ids, mask)]
    marker = torch.full_like(input_ids, -1)   # text: -1; LLaVA writes IGNORE_INDEX for images
    _, pos, new_mask, pkv, embeds, new_labels = orig(input_ids, position_ids, mask,
                                                     past_key_values, marker, images, image_sizes)
    valid = new_mask.bool()
    state.engine.begin(image_spans(new_labels, valid, counts), valid)
    if attention_mask is not None:
        new_mask = new_mask.to(attention_mask.dtype)
    return None, pos, None if attention_mask is None else new_mask, pkv, embeds, None


def enable(model, cfg, state_patch) -> InLLMState:
    """Patch `model` for in-LLM method `cfg.method`; `state_patch(model, state, impls)` installs
    the instance methods (shared with the pre-LLM path)."""
    version = compat.transformers_version()
    if not version.startswith("4.37."):
        raise RuntimeError(f"in-LLM pruning ({cfg.method}) on LLaVA's own model is built and "
                           f"tested with transformers {TESTED} (LLaVA 1.2.2's pin); found "
                           f"{version}")
    llm = model.get_model()

    def on_prefill(stats):
        model.agile_stats = [row for sample in stats for row in sample]

    engine = Engine(llm.layers, cfg.method, cfg.keep, cfg.params, norm=llm.norm,
                    on_prefill=on_prefill)
    state = InLLMState(cfg, engine)
    try:
        state_patch(model, state, {"prepare_inputs_labels_for_multimodal":
                                   types.MethodType(_prepare, model)})
    except Exception:
        engine.remove()
        raise
    return state
