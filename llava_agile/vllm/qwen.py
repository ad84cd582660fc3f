"""`AgileQwen2_5_VL` and `AgileQwen3VL`: vLLM's `Qwen2_5_VLForConditionalGeneration` and
`Qwen3VLForConditionalGeneration` with visual-token pruning after the patch merger, the kept
tokens at their original M-RoPE positions.

Without an `agile` entry in the model config each is vLLM's class unchanged. With one:
- Processor: each image's run of `<|image_pad|>` is cut to its K (`min(keep, N)`; the request's
  own K when it sets `mm_processor_kwargs {"agile": {"keep": K}}`, carried by the per-image
  field `agile_keep`), so the prompt, profiling, the encoder budget and the KV cache follow.
  Videos (the video limit is 0) and precomputed `image_embeds` are refused.
- Scores: a forward hook on the attention kernel (`MMEncoderAttention`) of the last
  full-attention vision block (Qwen3-VL: the last block) takes its rotated q / k and
  `cu_seqlens` and computes `qwenvl.received_mean`, as the transformers adapter does
  (llava_agile/hf/qwen.py); the patch scores are averaged per merge group and, on Qwen2.5-VL,
  put back from the window order to raster order with vLLM's own `reverse_indices`. Under tensor
  parallelism the ranks' head means are averaged with an all-reduce.
- Selection: `qwenvl.select_images`, per image, on the merger's output (its input under
  `feature_space="vision"`); on Qwen3-VL the kept rows carry every deepstack level alike (vLLM's
  tower returns them side by side).
- Positions: vLLM's EVS machinery (`SupportsMultiModalPruning`): each image's embeddings carry
  extra channels, the kept tokens' (t, h, w) positions in the full grid and the full grid's
  extent max(t, h, w) (`_postprocess_image_embeds_evs`), and the runner's
  `recompute_mrope_positions` places them and continues the text after the image from the full
  extent, as transformers' `get_rope_index` does for the pruned run (llava_agile.hf.qwen).
  `get_mrope_input_positions` gives the request's first positions with the pruned runs' lengths
  (the image rows are placeholders until the recompute). The runner takes that path only when
  the multimodal config reports pruning: the model sets it on its config instance, and on the
  CPU runner, which never reads it, `llava_agile.vllm.register` sets the runner's flag for our
  models (`cpu_pruning_flag`).
"""
from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder,
                                                   Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor,
                                                   Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder,
                                                 Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor,
                                                 Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import DictEmbeddingItems, EmbeddingItems
from vllm.multimodal.video_prune.evs import compute_mrope_for_media, recompute_mrope_positions

from .. import qwenvl
from ..methods import MERGING
from .llava import KEY, AgileModel, BudgetField, check_engine, kept, parse_config

VIDEOS_REFUSED = ("llava_agile: under the '{key}' override this model prunes images only; "
                  "videos are not supported (serve without the override for video)")
EMBEDS_REFUSED = ("llava_agile: precomputed image_embeds cannot be pruned (no vision attention "
                  f"comes with them); send the image itself, or serve without the '{KEY}' "
                  "override")


def qwen_config(hf_config):
    """The validated PruneConfig of `hf_config.agile` for Qwen2.5-VL / Qwen3-VL, or None
    (plugin off)."""
    cfg = parse_config(hf_config)
    if cfg is None:
        return None
    check_engine(cfg)
    if cfg.method in MERGING:
        raise ValueError(f"llava_agile: method {cfg.method!r} {MERGING[cfg.method]}, which have "
                         f"no single (t, h, w) M-RoPE position; pick an index method on Qwen")
    return cfg


class AgileQwenInfo:
    """Processing-info mixin: the config, and no video under the plugin (refused by vLLM's own
    limit check, and not profiled)."""

    def agile_config(self):
        return qwen_config(self.get_hf_config())

    def get_supported_mm_limits(self):
        limits = super().get_supported_mm_limits()
        return limits if self.agile_config() is None else {**limits, "video": 0}


class AgileQwenProcessor(BudgetField):
    """Processor mixin: each image's run of placeholders cut to its K (`agile_keep`)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        cfg = self.info.agile_config()
        if cfg is None:
            return updates
        if mm_items.get_count("video", strict=False):
            raise ValueError(VIDEOS_REFUSED.format(key=KEY))
        if isinstance(mm_items.get("image"), (EmbeddingItems, DictEmbeddingItems)):
            raise ValueError(EMBEDS_REFUSED)

        def cut(orig, item: int):
            full = orig(item)
            keep = int(out_mm_kwargs["image"][item]["agile_keep"].data)
            return full[:kept(replace(cfg, keep=keep), len(full))]

        return [replace(u, replacement=functools.partial(cut, u.replacement))
                if u.modality == "image" else u for u in updates]


class _ScoreRecorder:
    """Forward hook on one vision block's attention kernel: `qwenvl.received_mean` of each call
    (the rotated q / k `[1, seq, heads, d]` it gets), and the merger's input (a pre-hook on its
    first norm: vLLM calls its compilable blocks and merger through `forward`, bypassing their
    own hooks)."""

    def __init__(self, visual, layer: int, merger_norm):
        self.kernel = visual.blocks[layer].attn.attn
        self.merger = merger_norm
        self.tp = visual.blocks[layer].attn.tp_size
        self.rows, self.merger_inputs = [], []

    def _kernel_hook(self, module, args, kwargs, output):
        q, k = kwargs["query"], kwargs["key"]
        row = qwenvl.received_mean(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                   kwargs["cu_seqlens"], module.scale)
        if self.tp > 1:  # each rank's mean over its num_heads / tp heads: mean over the ranks
            from vllm.distributed import tensor_model_parallel_all_reduce
            row = tensor_model_parallel_all_reduce(row) / self.tp
        self.rows.append(row)

    def _merger_hook(self, module, args):
        self.merger_inputs.append(args[0])

    def __enter__(self):
        self.handles = [self.kernel.register_forward_hook(self._kernel_hook, with_kwargs=True),
                        self.merger.register_forward_pre_hook(self._merger_hook)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class AgileQwenModel(AgileModel):
    """Mixin of `AgileQwen2_5_VL` and `AgileQwen3VL` (before vLLM's class in the bases)."""

    check = staticmethod(qwen_config)
    position_channels = 4  # the channels vLLM's recompute_mrope_positions strips

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.agile_mrope = self.agile_config is not None
        if self.agile_mrope:  # the runner's recompute_mrope_positions path (module docstring)
            self.is_multimodal_pruning_enabled = True
            self.multimodal_config.is_multimodal_pruning_enabled = lambda: True

    def _is_embeds(self, image_input) -> bool:
        return image_input["type"] == "image_embeds"

    def _agile_tokens(self, cfg, image_input):
        grid = image_input["image_grid_thw"]
        sizes_thw = grid.tolist()
        visual, layer = self.visual, self.agile_layer()
        meta = visual.prepare_encoder_metadata(sizes_thw)  # what the tower's forward would make
        with _ScoreRecorder(visual, layer, self.agile_merger_norm()) as rec:
            embeds = visual(image_input["pixel_values"], grid_thw=sizes_thw,
                            encoder_metadata=meta)
        if len(rec.rows) != 1 or len(rec.merger_inputs) != 1:
            raise RuntimeError(f"llava_agile: expected one call of vision block {layer}'s "
                               f"attention and of the merger, got {len(rec.rows)} and "
                               f"{len(rec.merger_inputs)}")
        unit = visual.spatial_merge_size ** 2
        scores = qwenvl.merged_scores(rec.rows[0], unit)
        hidden = rec.merger_inputs[0]
        vision = hidden.reshape(-1, unit * hidden.shape[-1])
        back = meta.get("reverse_indices")  # Qwen2.5-VL: its window order -> raster order
        if back is not None:
            back = back.to(embeds.device)
            scores, vision = scores[back], vision[back]
        sizes = (grid.prod(-1) // unit).tolist()
        width = self.config.vision_config.out_hidden_size  # the main merger's (Qwen3-VL: the
        #                                                    deepstack levels follow)
        budgets = self.agile_budgets(cfg, len(sizes))
        out, stats = [], []
        for c, rows, a, v in zip(budgets, embeds.split(sizes), scores.split(sizes),
                                 vision.split(sizes)):
            _, st, (idx,) = qwenvl.select_images(c, [rows[:, :width]], [a], [v])
            if idx.numel() != kept(c, rows.shape[0]):
                raise RuntimeError(f"llava_agile: {cfg.method} returned {idx.numel()} tokens, "
                                   f"the prompt holds {kept(c, rows.shape[0])} placeholders")
            out.append(rows[idx.to(rows.device)])
            stats += st
        return tuple(out), stats

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        """Each image's kept tokens with their positions in the full grid (t, h, w) and the full
        grid's extent, for the runner's `recompute_mrope_positions`."""
        if self.agile_config is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        merge = self.visual.spatial_merge_size
        out = []
        for emb, thw, st in zip(image_embeds_split, image_input["image_grid_thw"].tolist(),
                                self.agile_stats):
            pos = compute_mrope_for_media(torch.tensor(thw), merge)
            pos[:, 3] = max(thw[0], thw[1] // merge, thw[2] // merge)
            pos = pos[torch.tensor(st["indices"])]
            pad = pos.new_zeros(pos.shape[0], self.position_channels - 4)
            out.append(torch.cat([emb, pos.to(emb.dtype), pad.to(emb.dtype)], dim=1))
        return tuple(out)

    def _process_video_input(self, video_input):
        if self.agile_config is not None:
            raise ValueError(VIDEOS_REFUSED.format(key=KEY))
        return super()._process_video_input(video_input)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """vLLM's positions with each image's run at its placeholder length (K): the kept
        tokens' rows are the first K of the grid's until `recompute_mrope_positions` sets
        them; the text after an image continues from the full grid's extent."""
        if self.agile_config is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        parts, st, st_idx = [], 0, 0
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if f.modality != "image":
                raise ValueError(VIDEOS_REFUSED.format(key=KEY))
            offset, length = f.mm_position.offset, f.mm_position.length
            t, h, w = f.data["image_grid_thw"].data.tolist()
            t, h, w = 1, h // merge, w // merge
            text = offset - st
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + st_idx)
            grid = np.indices((t, h, w)).reshape(3, -1)[:, :length]
            parts.append(grid + text + st_idx)
            st, st_idx = offset + length, st_idx + text + max(t, h, w)
        text = len(input_tokens) - st
        parts.append(np.broadcast_to(np.arange(text), (3, text)) + st_idx)
        positions = np.concatenate(parts, axis=1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))


class AgileQwen2_5_VLProcessingInfo(AgileQwenInfo, Qwen2_5_VLProcessingInfo):
    pass


class AgileQwen2_5_VLMultiModalProcessor(AgileQwenProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(AgileQwen2_5_VLMultiModalProcessor,
                                        info=AgileQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class AgileQwen2_5_VL(AgileQwenModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; prunes to K visual tokens per image when configured."""

    def agile_layer(self) -> int:
        return int(self.config.vision_config.fullatt_block_indexes[-1])

    def agile_merger_norm(self):
        return self.visual.merger.ln_q


class AgileQwen3VLProcessingInfo(AgileQwenInfo, Qwen3VLProcessingInfo):
    pass


class AgileQwen3VLMultiModalProcessor(AgileQwenProcessor, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(AgileQwen3VLMultiModalProcessor,
                                        info=AgileQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class AgileQwen3VL(AgileQwenModel, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL; prunes to K visual tokens per image when configured. The tower's rows
    hold the main merger's output and every deepstack level side by side: the kept rows cut
    every level alike."""

    position_channels = 5  # Qwen3-VL's layout (4 of ours, then zeros)

    def agile_layer(self) -> int:
        return len(self.visual.blocks) - 1  # every block attends fully: the last one

    def agile_merger_norm(self):
        return self.visual.merger.norm

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions,
                                  num_computed_tokens):
        """vLLM's Qwen3-VL recompute reads 5 channels and continues the text after an image
        from its kept tokens' largest position; transformers continues it from the full grid's
        extent. Images only under the plugin: the 4-channel (Qwen2.5-VL) layout, which takes the
        extent from channel 4."""
        if self.agile_config is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings,
                                                     mrope_positions, num_computed_tokens)
        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else \
            mrope_positions.device
        ids = input_ids.to(torch.long) if isinstance(input_ids, torch.Tensor) else \
            torch.tensor(input_ids, dtype=torch.long, device=device)
        positions, delta = recompute_mrope_positions(
            ids, [mm[:, -5:-1].permute(1, 0).long() for mm in multimodal_embeddings],
            mrope_positions, num_computed_tokens, self.config.vision_start_token_id,
            self.config.image_token_id, self.config.video_token_id)
        return [mm[:, :-5] for mm in multimodal_embeddings], positions, delta
