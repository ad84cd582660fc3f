"""Processor side: the processor INSTANCE emits the pruned number of `<image>` placeholders.

transformers 4.57 and 5.x count LLaVA-1.5 placeholders as
`(H // patch_size) * (W // patch_size) + num_additional_image_tokens (- 1 for "default")` in
`__call__` (4.x), `replace_image_token` (5.x) and `_get_num_multimodal_tokens` (both): setting the
instance's `num_additional_image_tokens` makes all three emit K. LLaVA-NeXT counts with
`_get_number_of_features` (both versions): an instance method returning K + newlines in the
`global` anyres mode. `restore` puts the original attribute values back.
"""
from __future__ import annotations

_MISSING = object()
PROCESSORS = {"llava": "LlavaProcessor", "llava_next": "LlavaNextProcessor"}


def check_identity(processor, model_name: str, processor_name: str, placeholder: str) -> None:
    """ValueError unless `processor` is given and is a `processor_name` (or a subclass)."""
    if processor is None:
        raise ValueError(f"an HF {model_name} needs its processor: llava_agile.enable(model, "
                         f"processor=AutoProcessor.from_pretrained(path), ...), so that it emits "
                         f"the pruned number of {placeholder} placeholders")
    if not any(c.__name__ == processor_name for c in type(processor).__mro__):
        raise ValueError(f"processor is a {type(processor).__name__}, not the {processor_name} of "
                         f"this model; pass AutoProcessor.from_pretrained(<the model's path>)")


def refuse_mismatch(problems: list) -> None:
    if problems:
        raise ValueError("the processor does not belong to this model (" + "; ".join(problems) +
                         "); pass AutoProcessor.from_pretrained(<the model's path>)")


def check(processor, model, kind: str) -> None:
    """ValueError unless `processor` is a LLaVA processor made for `model`."""
    check_identity(processor, SUPPORTED_NAME[kind], PROCESSORS[kind], "<image>")
    cfg = model.config
    problems = []
    image_token_id = getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None))
    if getattr(processor, "image_token_id", None) != image_token_id:
        problems.append(f"image token id {getattr(processor, 'image_token_id', None)} != the "
                        f"model's {image_token_id}")
    if getattr(processor, "patch_size", None) != cfg.vision_config.patch_size:
        problems.append(f"patch_size {getattr(processor, 'patch_size', None)} != the vision "
                        f"tower's {cfg.vision_config.patch_size}")
    if getattr(processor, "vision_feature_select_strategy", None) != \
            cfg.vision_feature_select_strategy:
        problems.append(f"vision_feature_select_strategy "
                        f"{getattr(processor, 'vision_feature_select_strategy', None)!r} != the "
                        f"model's {cfg.vision_feature_select_strategy!r}")
    refuse_mismatch(problems)


SUPPORTED_NAME = {"llava": "LlavaForConditionalGeneration",
                  "llava_next": "LlavaNextForConditionalGeneration"}


def _crop_tokens(processor, model) -> int:
    """Placeholders the unpatched LLaVA-1.5 processor emits per image."""
    crop = getattr(processor.image_processor, "crop_size", None)
    size = model.config.vision_config.image_size
    h, w = (crop["height"], crop["width"]) if crop else (size, size)
    n = (h // processor.patch_size) * (w // processor.patch_size)
    n += processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def patch(processor, model, state) -> None:
    """Make `processor` emit the pruned count; records what `restore` needs on `state`."""
    cfg = state.config
    state.processor = processor
    if state.family == "llava":
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        patches = side * side
        full = _crop_tokens(processor, model)
        cls = 1 if processor.vision_feature_select_strategy == "full" else 0
        if full != patches + cls:
            raise ValueError(f"the processor emits {full} placeholders per image but the vision "
                             f"tower gives {patches + cls} features; the processor's crop size "
                             f"must match the tower's image_size {model.config.vision_config.image_size}")
        if not state.fixed_count:
            return
        want = (patches if cfg.method == "none" else min(cfg.keep, patches)) + cls
        state.processor_saved["num_additional_image_tokens"] = \
            processor.__dict__.get("num_additional_image_tokens", _MISSING)
        processor.num_additional_image_tokens += want - full
        return
    if not state.fixed_count:
        return
    from transformers.image_processing_utils import select_best_resolution

    orig = processor._get_number_of_features
    keep = None if cfg.method == "none" else cfg.keep  # "none" keeps every token

    def _get_number_of_features(orig_height, orig_width, height, width):
        full = orig(orig_height, orig_width, height, width)
        best_h, best_w = select_best_resolution([orig_height, orig_width],
                                                processor.image_processor.image_grid_pinpoints)
        ph, pw = height // processor.patch_size, width // processor.patch_size
        _, newlines = processor._get_unpadded_features(orig_height, orig_width, ph, pw,
                                                       best_h // height, best_w // width)
        extra = processor.num_additional_image_tokens
        cells = full - extra - newlines
        return (cells if keep is None else min(keep, cells)) + newlines + extra

    state.processor_saved["_get_number_of_features"] = \
        processor.__dict__.get("_get_number_of_features", _MISSING)
    processor._get_number_of_features = _get_number_of_features


def restore(state) -> None:
    processor = state.processor
    for name, value in state.processor_saved.items():
        if value is _MISSING:
            processor.__dict__.pop(name, None)
        else:
            setattr(processor, name, value)
    state.processor_saved = {}
