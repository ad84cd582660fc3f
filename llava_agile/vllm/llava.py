"""`AgileLlava`: vLLM's `LlavaForConditionalGeneration` (LLaVA-1.5) with visual-token pruning.

Without an `agile` entry in the model config it is vLLM's class unchanged. With one:
- the processing info's `get_num_image_tokens` returns K (`min(keep, N)`, N for method "none",
  plus the [CLS] token under `vision_feature_select_strategy="full"`), so the prompt gets K
  placeholders per image and vLLM's profiling, encoder budget and KV cache follow;
- `_process_image_input` runs vLLM's CLIP tower (built only up to the select layer, so its last
  block is the select layer) with a hook on that block's attention: its input (after
  `layer_norm1`) goes through the fused `qkv_proj` to give the [CLS] attention row
  (`llava.attention.cls_attention_row`; under tensor parallelism the heads of every rank are
  summed with an all-reduce before the mean); `selection.flat_tokens` then keeps exactly K tokens
  in raster order, as every other llava_agile integration does.
A request may carry its own budget (`mm_processor_kwargs` `{"agile": {"keep": K}}`,
`RequestBudget`). Refused with a ValueError: `adaptive_count=True` (vLLM fixes the placeholder
count before the tower runs), precomputed `image_embeds` inputs (no [CLS] row to select with),
non-CLIP towers and several feature layers. LLaVA-NeXT (`llava_next.py`) reuses the config
check, the tower hook, the request budgets and the `image_embeds` refusal.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

import torch
from transformers import CLIPVisionConfig
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaImageEmbeddingInputs,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo,
                                              _build_llava_or_pixtral_hf_info,
                                              _build_llava_or_pixtral_hf_processor)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems

from ..config import PruneConfig
from ..inllm import METHODS as INLLM_METHODS
from ..llava.attention import cls_attention_row, select_layer_index, single_head_row
from ..llava.runtime import as_config
from ..methods import TEXT, variable_count
from ..selection import flat_tokens, needs_keys

KEY = "agile"  # the model-config entry: hf_overrides={"agile": {...}}


def agile_config(hf_config) -> PruneConfig | None:
    """The validated PruneConfig of `hf_config.agile`, or None (plugin off for this model)."""
    cfg = parse_config(hf_config)
    return None if cfg is None else _check(cfg, hf_config)


def parse_config(hf_config) -> PruneConfig | None:
    """`hf_config.agile` as a PruneConfig (None: absent), checked by `check_engine` only."""
    raw = getattr(hf_config, KEY, None)
    if raw is None:
        return None
    if isinstance(raw, PruneConfig):
        cfg = raw
    elif isinstance(raw, Mapping):
        try:
            cfg = as_config(dict(raw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"llava_agile: bad hf_overrides {{'{KEY}': {dict(raw)!r}}}: {e}") \
                from None
    else:
        raise ValueError(f"llava_agile: hf_overrides '{KEY}' must be a dict such as "
                         f"{{\"method\": \"adaptive\", \"keep\": 64}}, got {type(raw).__name__}")
    return check_engine(cfg)


def request_config(engine: PruneConfig | None, mm_kwargs: Mapping) -> PruneConfig | None:
    """The config of one request: the engine's, with the request's `mm_processor_kwargs`
    `{"agile": {"keep": K, <the method's parameters>}}` over it (validated: a bad value is that
    request's error). The method itself is the engine's."""
    raw = mm_kwargs.get(KEY)
    if raw is None:
        return engine
    if engine is None:
        raise ValueError(f"llava_agile: this request sets mm_processor_kwargs '{KEY}', but the "
                         f"engine was started without hf_overrides {{'{KEY}': {{...}}}}, so it "
                         f"does not prune")
    if not isinstance(raw, Mapping):
        raise ValueError(f"llava_agile: mm_processor_kwargs '{KEY}' must be a dict such as "
                         f"{{\"keep\": 128}}, got {type(raw).__name__}")
    if raw.get("method", engine.method) != engine.method:
        raise ValueError(f"llava_agile: a request may set keep and {engine.method}'s parameters, "
                         f"not another method ({raw['method']!r}; the engine runs "
                         f"{engine.method!r}, whose vision hooks are set up at start-up)")
    params = {k: v for k, v in raw.items() if k not in ("method", "keep")}
    try:
        cfg = PruneConfig(method=engine.method, keep=raw.get("keep", engine.keep),
                          params={**engine.params, **params}, feature_space=engine.feature_space,
                          anyres_mode=engine.anyres_mode, stats=engine.stats)
    except (TypeError, ValueError) as e:
        raise ValueError(f"llava_agile: bad mm_processor_kwargs {{'{KEY}': {dict(raw)!r}}}: "
                         f"{e}") from None
    if variable_count(cfg.method, cfg.params):
        raise ValueError("llava_agile: a data-dependent count (adaptive_count=True, count='iqr') "
                         "is not possible under vLLM, which fixes the placeholder count first")
    return cfg


def check_engine(cfg: PruneConfig) -> PruneConfig:
    """What vLLM cannot hold, whatever the model: ValueError with the reason."""
    if cfg.method in INLLM_METHODS:
        raise ValueError(f"llava_agile: {cfg.method} prunes inside the LLM (fewer tokens from one "
                         f"decoder layer on), which vLLM's paged KV cache (one length per sequence "
                         f"for every layer) cannot hold; under vLLM use a method that prunes "
                         f"before the LLM")
    if cfg.method in TEXT:
        raise ValueError(f"llava_agile: {cfg.method} is conditioned on each request's question, "
                         f"which vLLM does not hand to the vision encoder, and vLLM caches an "
                         f"image's encoder output across requests (one image asked two questions "
                         f"would reuse the first question's tokens); under vLLM use a method that "
                         f"needs no question")
    if variable_count(cfg.method, cfg.params):
        raise ValueError("llava_agile: a data-dependent count (adaptive_count=True, count='iqr') "
                         "is not possible under vLLM, which fixes the number of image "
                         "placeholders before the vision tower runs; drop it (every image then "
                         "keeps exactly `keep` tokens)")
    return cfg


def _check(cfg: PruneConfig, hf_config) -> PruneConfig:
    """What LLaVA's CLIP tower under vLLM cannot hold: ValueError with the reason."""
    if not isinstance(hf_config.vision_config, CLIPVisionConfig):
        raise ValueError(f"llava_agile: pruning needs a CLIP vision tower, this model has "
                         f"{type(hf_config.vision_config).__name__}; remove the '{KEY}' override")
    if not isinstance(hf_config.vision_feature_layer, int):
        raise ValueError(f"llava_agile: vision_feature_layer={hf_config.vision_feature_layer!r} "
                         f"(several layers) is not supported: pruning needs one select layer")
    if hf_config.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(f"llava_agile: vision_feature_select_strategy="
                         f"{hf_config.vision_feature_select_strategy!r}: expected 'default' or 'full'")
    return cfg


def kept(cfg: PruneConfig, n: int) -> int:
    """Tokens `cfg` keeps out of `n` candidates (method "none" keeps all)."""
    return n if cfg.method == "none" else min(cfg.keep, n)


def kept_count(cfg: PruneConfig, n: int, strategy: str) -> int:
    """Tokens per image the LLM sees when vLLM's count is `n` (with [CLS] under "full")."""
    if strategy == "full":
        return 1 + kept(cfg, n - 1)
    return kept(cfg, n)


class AgileLlavaProcessingInfo(LlavaProcessingInfo):
    def agile_config(self) -> PruneConfig | None:
        return agile_config(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.agile_count(self.agile_config(), image_width, image_height)

    def agile_count(self, cfg, image_width: int, image_height: int) -> int:
        """Placeholders of one image under `cfg` (None: vLLM's own count)."""
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        if cfg is None:
            return n
        return kept_count(cfg, n, self.get_hf_config().vision_feature_select_strategy)


EMBEDS_REFUSED = ("llava_agile: precomputed image_embeds cannot be pruned (no [CLS] attention "
                  "row comes with them); send the image itself, or serve without the "
                  f"'{KEY}' override")


class RefuseEmbeds:
    """Processor mixin: under the plugin an `image_embeds` input is refused while the prompt is
    built (it would otherwise reach the LLM unpruned)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        if self.info.agile_config() is not None and \
                isinstance(mm_items.get("image"), ImageEmbeddingItems):
            raise ValueError(EMBEDS_REFUSED)
        return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)


class BudgetField:
    """Processor mixin, a budget per request: the request's `mm_processor_kwargs`
    `{"agile": {"keep": K, ...}}` (`request_config`) travels to the model as the per-image field
    `agile_keep` (every image of a pruned engine carries one, the engine's K by default, so
    batches stay uniform). vLLM hashes the kwargs into each image's multimodal hash: the same
    image under two budgets shares no cache entry."""

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        cfg = request_config(self.info.agile_config(), hf_kwargs)
        out = super()._apply_hf_processor_main(mm_items, {k: v for k, v in hf_kwargs.items()
                                                          if k != KEY})
        if cfg is not None and "pixel_values" in out:  # Qwen: pixel_values holds patches
            images = out["image_grid_thw"] if "image_grid_thw" in out else out["pixel_values"]
            out["agile_keep"] = torch.full((len(images),), cfg.keep)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if "agile_keep" in hf_inputs:
            fields["agile_keep"] = MultiModalFieldConfig.batched("image")
        return fields


class RequestBudget(BudgetField):
    """`BudgetField`, and the request's K sets its images' placeholder count (the info's
    `agile_count`)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if KEY not in hf_processor_mm_kwargs:
            return updates
        cfg = request_config(self.info.agile_config(), hf_processor_mm_kwargs)
        token = self.info.get_hf_config().image_token_index

        def count(item: int) -> list[int]:
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item)
            return [token] * self.info.agile_count(cfg, size.width, size.height)

        return [replace(u, replacement=count) for u in updates]


class AgileLlavaMultiModalProcessor(RequestBudget, RefuseEmbeds, LlavaMultiModalProcessor):
    pass


def _info(ctx):
    info = _build_llava_or_pixtral_hf_info(ctx)
    return AgileLlavaProcessingInfo(ctx) if type(info) is LlavaProcessingInfo else info


def _processor(info, dummy_inputs):
    if isinstance(info, AgileLlavaProcessingInfo):
        return AgileLlavaMultiModalProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


class _LocalHeads:
    """vLLM's CLIPAttention seen as `cls_attention_row` expects (q_proj, k_proj, heads of this
    tensor-parallel rank)."""

    def __init__(self, attn):
        self.num_heads = attn.num_heads_per_partition
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self._qkv = attn.qkv_proj
        self._width = self.num_heads * self.head_dim

    def q_proj(self, x):
        return self._qkv(x)[0][..., :self._width]

    def k_proj(self, x):
        return self._qkv(x)[0][..., self._width:2 * self._width]


class _SelectLayerRecorder:
    """Hooks on the select block (vLLM's last built CLIP block): [CLS] rows, keys, [CLS] output
    (with `full`, the whole output: PruMerge+ scores it with the next block's q / k)."""

    def __init__(self, tower: CLIPVisionModel, keys: bool, full: bool = False):
        self.block = tower.vision_model.encoder.layers[-1]
        self.attn = self.block.self_attn
        self.local = _LocalHeads(self.attn)
        self.with_keys, self.full = keys, full
        self.rows, self.keys, self.cls, self.outputs = [], [], [], []

    def _attn_hook(self, module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = cls_attention_row(self.local, hidden, with_keys=self.with_keys)
        row, keys = out if self.with_keys else (out, None)
        total = self.attn.num_heads
        if self.attn.tp_size > 1:  # each rank holds num_heads / tp heads: sum, all-reduce, mean
            from vllm.distributed import tensor_model_parallel_all_reduce
            local = self.local.num_heads
            row = tensor_model_parallel_all_reduce(row * local) / total
            keys = None if keys is None else tensor_model_parallel_all_reduce(keys * local) / total
        self.rows.append(row)
        if keys is not None:
            self.keys.append(keys)

    def _block_hook(self, module, args, output):
        self.cls.append(output[:, 0])
        if self.full:
            self.outputs.append(output)

    def __enter__(self):
        self.handles = [self.attn.register_forward_hook(self._attn_hook, with_kwargs=True),
                        self.block.register_forward_hook(self._block_hook)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class _NextBlockScorer(torch.nn.Module):
    """PruMerge+ under vLLM: `layer_norm1`, `q_proj` and `k_proj` of the CLIP block after the
    select layer, which vLLM's tower does not build (it stops at the select layer); their
    weights are picked out of the checkpoint by `AgileLlava.load_weights`."""

    def __init__(self, vision_config, select_layer: int):
        super().__init__()
        width = vision_config.hidden_size
        index = select_layer_index(select_layer, vision_config.num_hidden_layers) + 1
        if index >= vision_config.num_hidden_layers:
            raise ValueError("llava_agile: prumerge_plus scores with the vision block after the "
                             "select layer, and this model selects the tower's last block")
        self.pattern = re.compile(rf"vision_tower\.vision_model\.encoder\.layers\.{index}\."
                                  r"(layer_norm1|self_attn\.q_proj|self_attn\.k_proj)\."
                                  r"(weight|bias)$")
        self.layer_norm1 = torch.nn.LayerNorm(width, eps=vision_config.layer_norm_eps)
        self.q_proj = torch.nn.Linear(width, width)
        self.k_proj = torch.nn.Linear(width, width)

    def take(self, name: str, tensor: torch.Tensor) -> str | None:
        """Load `tensor` if `name` is one of ours; returns our parameter's name, else None."""
        m = self.pattern.search(name)
        if m is None:
            return None
        name = f"{m.group(1).removeprefix('self_attn.')}.{m.group(2)}"
        param = self.get_parameter(name)
        param.data.copy_(tensor.to(param.dtype))
        return name

    def forward(self, hidden: torch.Tensor):
        """The select block's output `[B, T, C]` -> PruMerge+'s [CLS] row and patch keys."""
        return single_head_row(self, self.layer_norm1(hidden))


class AgileModel:
    """Mixin of `AgileLlava` and `AgileLlavaNext` (before vLLM's class in the bases): the
    validated config (`check`), per-image stats of the last encoder call (`agile_stats`, with the
    kept indices), the count of vision-tower runs (`agile_encoder_calls`: the encoder cache saves
    some), the `image_embeds` refusal; the subclass's `_agile_tokens` prunes."""

    check = staticmethod(agile_config)
    embeds_input: type = type(None)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.agile_config = self.check(self.config)
        self.agile_stats: list[dict] = []
        self.agile_encoder_calls = 0
        self.agile_keeps = None  # per image of the current encoder call (request budgets)

    def _parse_and_validate_image_input(self, **kwargs):
        keep = kwargs.pop("agile_keep", None)  # the per-image budgets (`RequestBudget`)
        self.agile_keeps = None if keep is None else [int(k) for k in keep]
        return super()._parse_and_validate_image_input(**kwargs)

    def _is_embeds(self, image_input) -> bool:
        return isinstance(image_input, self.embeds_input)

    def agile_budgets(self, cfg, n: int) -> list:
        """The config of each of this call's `n` images (the request budgets over `cfg`)."""
        keeps = self.agile_keeps or [cfg.keep] * n
        return [cfg if k == cfg.keep else replace(cfg, keep=k) for k in keeps]

    @torch.no_grad()
    def _process_image_input(self, image_input):
        self.agile_encoder_calls += 1
        if self.agile_config is None:
            return super()._process_image_input(image_input)
        if self._is_embeds(image_input):
            raise ValueError(EMBEDS_REFUSED)
        out, self.agile_stats = self._agile_tokens(self.agile_config, image_input)
        return out


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class AgileLlava(AgileModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 model; prunes to K visual tokens per image when configured."""

    embeds_input = LlavaImageEmbeddingInputs

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.agile_next = None
        if self.agile_config is not None and self.agile_config.method == "prumerge_plus":
            self.agile_next = _NextBlockScorer(self.config.vision_config,
                                               self.config.vision_feature_layer)

    def load_weights(self, weights):
        """vLLM's loading, plus the next block's weights PruMerge+ needs (`_NextBlockScorer`)."""
        if self.agile_next is None:
            return super().load_weights(weights)
        ours = set()

        def rest():
            for name, tensor in weights:
                taken = self.agile_next.take(name, tensor)
                if taken is None:
                    yield name, tensor
                else:
                    ours.add(f"agile_next.{taken}")
        loaded = super().load_weights(rest())
        missing = {f"agile_next.{n}" for n, _ in self.agile_next.named_parameters()} - ours
        if missing:
            raise ValueError(f"llava_agile: prumerge_plus needs {sorted(missing)} from the "
                             f"checkpoint (the vision block after the select layer)")
        return set(loaded) | ours

    def _agile_tokens(self, cfg, image_input):
        scorer = self.agile_next
        with _SelectLayerRecorder(self.vision_tower, needs_keys(cfg.method) and scorer is None,
                                  full=scorer is not None) as rec:
            feats = self._image_pixels_to_features(self.vision_tower, image_input["pixel_values"])
        full = self.config.vision_feature_select_strategy == "full"
        clip = feats[:, 1:] if full else feats
        rows = torch.cat(rec.rows)
        if scorer is not None:  # PruMerge+: the next block's single-head row and keys
            rows, keys = scorer(torch.cat(rec.outputs))
            rec.keys = [keys]
        if rows.shape != clip.shape[:2]:
            raise RuntimeError(f"llava_agile: expected one [CLS]-attention row per image "
                               f"{tuple(clip.shape[:2])} from the select layer, got "
                               f"{tuple(rows.shape)}")
        keys = torch.cat(rec.keys) if rec.keys else None
        cls = torch.cat(rec.cls)
        proj = None if cfg.feature_space == "vision" else self.multi_modal_projector(feats)
        patches = None if proj is None else (proj[:, 1:] if full else proj)
        budgets = self.agile_budgets(cfg, clip.shape[0])
        out, stats = [None] * clip.shape[0], [None] * clip.shape[0]
        for k in sorted({c.keep for c in budgets}):  # one selection call per budget
            sel = [b for b, c in enumerate(budgets) if c.keep == k]
            part = (lambda t: None if t is None else t[sel])  # noqa: E731
            feats_k, stats_k = flat_tokens(budgets[sel[0]], self.multi_modal_projector,
                                           clip[sel], rows[sel], part(patches), part(keys),
                                           cls[sel])
            for b, f, st in zip(sel, feats_k, stats_k):
                out[b], stats[b] = f, st
        if full:  # the [CLS] token in front of the kept ones, as vLLM feeds it
            head = proj[:, :1] if proj is not None else self.multi_modal_projector(feats[:, :1])
            out = [torch.cat([head[b], f]) for b, f in enumerate(out)]
        for f, c in zip(out, budgets):
            want = kept_count(c, feats.shape[1], self.config.vision_feature_select_strategy)
            if f.shape[0] != want:
                raise RuntimeError(f"llava_agile: {cfg.method} returned {f.shape[0]} tokens, the "
                                   f"prompt holds {want} placeholders")
        same = all(f.shape == out[0].shape for f in out)
        return torch.stack(out) if same else tuple(out), stats
