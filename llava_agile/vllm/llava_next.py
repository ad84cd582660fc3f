"""`AgileLlavaNext`: vLLM's `LlavaNextForConditionalGeneration` with visual-token pruning.

Without an `agile` entry in the model config it is vLLM's class unchanged. With one, the
`global` anyres mode: K tokens over the base crop and the high-res cells that survive
unpadding, every `image_newline` kept, in vLLM's order (base crop, then the unpadded grid row by
row, a newline closing each row). Per image the LLM gets `min(K, base + cells) + rows` tokens,
which depends on the image size only, so the processing info's `get_num_image_tokens` returns it
and vLLM's placeholders, profiling and encoder budget follow. The `shared` and `per_crop` modes
are refused: which kept positions survive unpadding depends on the selection, and vLLM fixes
the placeholder count before the tower runs. Also refused: merging methods (several crops per
image), strategy "full", the refusals of `AgileLlava` (llava_agile/vllm/llava.py).
"""
from __future__ import annotations

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration,
                                                   LlavaNextImageEmbeddingInputs,
                                                   LlavaNextMultiModalProcessor,
                                                   LlavaNextProcessingInfo,
                                                   get_anyres_image_grid_shape, unpad_image)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..config import PruneConfig
from ..llava.anyres import Layout, assemble
from ..methods import MERGING
from ..selection import crop_mask, crop_stats, needs_keys
from .llava import (KEY, AgileModel, RefuseEmbeds, RequestBudget, _SelectLayerRecorder,
                    agile_config, kept)


def next_config(hf_config) -> PruneConfig | None:
    """`agile_config` plus what LLaVA-NeXT under vLLM needs; None: plugin off for this model."""
    cfg = agile_config(hf_config)
    if cfg is None:
        return None
    if cfg.anyres_mode != "global":
        raise ValueError(f"llava_agile: anyres_mode={cfg.anyres_mode!r} is not possible under "
                         f"vLLM: how many tokens survive LLaVA-NeXT's unpadding depends on the "
                         f"selection, and vLLM fixes the number of image placeholders before "
                         f"the vision tower runs; use anyres_mode='global' (K tokens over the "
                         f"base crop and the unpadded high-res cells, newlines kept), e.g. "
                         f"--hf-overrides '{{\"{KEY}\": {{\"method\": \"{cfg.method}\", "
                         f"\"keep\": {cfg.keep}, \"anyres_mode\": \"global\"}}}}'")
    if cfg.method in MERGING:
        raise ValueError(f"llava_agile: method {cfg.method!r} {MERGING[cfg.method]} and cannot "
                         f"run on LLaVA-NeXT's several crops per image; pick an index method")
    if hf_config.vision_feature_select_strategy != "default":
        raise ValueError("llava_agile: LLaVA-NeXT with vision_feature_select_strategy="
                         f"{hf_config.vision_feature_select_strategy!r} is not supported: anyres "
                         f"packing needs the patch tokens only ('default')")
    return cfg


def next_layout(hf_config, image_size, device=None) -> tuple[Layout, int]:
    """(where each unpadded high-res cell comes from, number of high-res crops) for an image of
    `image_size` (height, width): vLLM's `_merge_image_patch_embeddings` steps (grid shape, view,
    permute, `unpad_image`) applied to cell ids."""
    vision = hf_config.vision_config
    side = vision.image_size // vision.patch_size
    height, width = (int(v) for v in image_size)
    nph, npw = get_anyres_image_grid_shape((height, width), hf_config.image_grid_pinpoints,
                                           vision.image_size)
    ids = torch.arange(nph * npw * side * side, device=device).view(nph, npw, side, side, 1)
    grid = unpad_image(ids.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3), (height, width))[0]
    return Layout(crop=grid // (side * side), patch=grid % (side * side), newline=True), nph * npw


def image_tokens(cfg: PruneConfig, hf_config, image_size, proj, clip, rows, newline):
    """One image's LLM tokens and stats. `proj` `[n, N, D]`: its projected crops, base first
    (vLLM may pad the high-res crops of a batch; the padding is dropped as vLLM drops it), `clip`
    `[n, N, Dv]` the projector's inputs, `rows` `[n, N]` the [CLS] attention rows."""
    layout, crops = next_layout(hf_config, image_size, rows.device)
    n = 1 + crops
    if proj.shape[0] < n:
        raise RuntimeError(f"llava_agile: image {tuple(image_size)} needs {n} crops, got "
                           f"{proj.shape[0]}")
    proj, clip, rows = proj[:n], clip[:n], rows[:n]
    space = clip if cfg.feature_space == "vision" else proj
    mask, st, ms, extra = crop_mask(cfg, space, rows, clip, layout.candidates(rows.shape[1]))
    tokens, fed = assemble(proj[0], mask[0], proj[1:], mask[1:], layout, newline)
    return tokens, crop_stats(st, extra, fed, int(tokens.shape[0]), ms)


class AgileLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    def agile_config(self) -> PruneConfig | None:
        return next_config(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.agile_count(self.agile_config(), image_width, image_height)

    def agile_count(self, cfg, image_width: int, image_height: int) -> int:
        """Placeholders of one image under `cfg` (None: vLLM's own count)."""
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        if cfg is None:
            return n
        hf_config, vision = self.get_hf_config(), self.get_vision_encoder_info()
        nph, npw = get_anyres_image_grid_shape((image_height, image_width),
                                               hf_config.image_grid_pinpoints,
                                               vision.get_image_size())
        _, rows = self._get_num_unpadded_features(
            original_height=image_height, original_width=image_width,
            npatches=vision.get_patch_grid_length(), num_patch_height=nph, num_patch_width=npw)
        return kept(cfg, n - rows) + rows  # the newlines are never pruned


class AgileLlavaNextMultiModalProcessor(RequestBudget, RefuseEmbeds,
                                        LlavaNextMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(AgileLlavaNextMultiModalProcessor,
                                        info=AgileLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class AgileLlavaNext(AgileModel, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT model; prunes each image to `min(K, cells) + rows` tokens when
    configured (anyres_mode "global")."""

    check = staticmethod(next_config)
    embeds_input = LlavaNextImageEmbeddingInputs

    def _agile_tokens(self, cfg, image_input):
        inputs = []  # the projector's input: the select layer's patch features of every crop
        handle = self.multi_modal_projector.register_forward_hook(
            lambda m, a, o: inputs.append(a[0]))
        try:
            with _SelectLayerRecorder(self.vision_tower, needs_keys(cfg.method)) as rec:
                crops = self._process_image_pixels(image_input)
        finally:
            handle.remove()
        clip = torch.cat([x.flatten(0, -3) for x in inputs])
        rows = torch.cat(rec.rows)
        if rows.shape != clip.shape[:2]:
            raise RuntimeError(f"llava_agile: expected one [CLS]-attention row per crop "
                               f"{tuple(clip.shape[:2])} from the select layer, got "
                               f"{tuple(rows.shape)}")
        sizes = image_input.get("image_sizes")
        out, stats, start = [], [], 0
        budgets = self.agile_budgets(cfg, len(crops))
        for i, proj in enumerate(crops):
            n = proj.shape[0]
            size = sizes[i] if sizes is not None else [self.config.vision_config.image_size] * 2
            tokens, st = image_tokens(budgets[i], self.config, size, proj, clip[start:start + n],
                                      rows[start:start + n], self.image_newline)
            start += n
            out.append(tokens)
            stats.append(st)
        return out, stats
