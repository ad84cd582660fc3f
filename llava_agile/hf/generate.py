"""`llava_agile.generate`: variable K per image (`adaptive_count=True`, or NeXT's data-dependent
`shared` / `per_crop` counts) with the stock `generate`.

The images are encoded and pruned first; each image's run of placeholders is cut to its K
(the surplus dropped from `input_ids` / `attention_mask`, rows re-padded on the left); then the
stock `generate` runs with those features handed to its first forward.
"""
from __future__ import annotations

import torch


def _major() -> int:
    import transformers
    return int(transformers.__version__.split(".")[0])


def _encode(model, state, pixel_values, image_sizes):
    kwargs = {"pixel_values": pixel_values}
    if state.family == "llava_next":
        kwargs["image_sizes"] = image_sizes
    if _major() >= 5:
        kwargs["return_dict"] = True
    state.encoding = True
    try:
        out = state.inner.get_image_features(**kwargs)
    finally:
        state.encoding = False
    feats = list(out.pooler_output if hasattr(out, "pooler_output") else out)
    return out, [int(f.shape[0]) for f in feats], list(state.full_lengths)


def shorten(input_ids, attention_mask, image_token_id: int, full: list, kept: list, pad_id: int):
    """Drop each image's surplus placeholders (its last `full - kept`); left-pad the rows again.
    Returns (input_ids, attention_mask, prompt lengths)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    total = int((input_ids[attention_mask.bool()] == image_token_id).sum())
    if total == sum(kept):
        full = kept
    elif total != sum(full):
        raise ValueError(f"the prompts hold {total} image placeholders, but the images need "
                         f"{sum(full)} (the unpatched processor's count) or {sum(kept)} (pruned); "
                         f"make the inputs with the processor given to llava_agile.enable")
    rows, image = [], 0
    for ids, mask in zip(input_ids, attention_mask):
        ids = ids[mask.bool()]
        keep = torch.ones_like(ids, dtype=torch.bool)
        where = (ids == image_token_id).nonzero().flatten().tolist()
        while where:
            if image >= len(full):
                raise ValueError("more image placeholders than images")
            run, where = where[:full[image]], where[full[image]:]
            if len(run) < full[image]:
                raise ValueError(f"image {image}'s {full[image]} placeholders are split across "
                                 f"prompts; one image's placeholders must be in one prompt")
            keep[run[kept[image]:]] = False
            image += 1
        rows.append(ids[keep])
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max())
    out_ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype,
                         device=input_ids.device)
    out_mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype,
                           device=input_ids.device)
    for i, r in enumerate(rows):
        out_ids[i, width - len(r):] = r
        out_mask[i, width - len(r):] = 1
    return out_ids, out_mask, lengths


def prepare(model, input_ids=None, pixel_values=None, attention_mask=None, image_sizes=None):
    """Encode and prune the images and shorten the prompts; the features wait for the model's
    next forward (`generate` or a plain call with the same `pixel_values`). Returns the shortened
    `(input_ids, attention_mask, prompt lengths)`."""
    state = model.__dict__.get("_agile_state")
    if state is None or not hasattr(state, "inner"):
        raise ValueError("llava_agile.generate needs an HF LLaVA model enabled with "
                         "llava_agile.enable(model, processor=..., ...)")
    if input_ids is None or pixel_values is None:
        raise ValueError("llava_agile.generate needs input_ids and pixel_values (the processor's "
                         "outputs: llava_agile.generate(model, **inputs, max_new_tokens=...))")
    if state.family == "llava_next" and image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes (pass the processor's outputs)")
    if state.questions is not None:  # cdpruner / trim: the question after each image
        state.prompt = (input_ids, attention_mask)
    with torch.no_grad():
        out, kept, full = _encode(model, state, pixel_values, image_sizes)
    cfg = model.config
    image_token_id = getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None))
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else getattr(cfg.get_text_config(), "pad_token_id", None)
    pad = 0 if pad is None else int(pad[0] if isinstance(pad, (list, tuple)) else pad)
    shortened = shorten(input_ids, attention_mask, image_token_id, full, kept, pad)
    state.pending = out
    return shortened


def generate(model, input_ids=None, pixel_values=None, attention_mask=None, image_sizes=None,
             **generate_kwargs):
    """Encode and prune the images, shorten the prompts, run the stock `model.generate`.

    Takes the processor's outputs (`**inputs`) and `generate`'s arguments. Returns
    `(output of generate, prompt lengths)`: the rows are left-padded to `lengths.max()`, so the
    new tokens of row i start at column `lengths.max()` of `output` (or `output.sequences`)."""
    ids, mask, lengths = prepare(model, input_ids, pixel_values, attention_mask, image_sizes)
    extra = {} if image_sizes is None else {"image_sizes": image_sizes}
    try:
        result = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                                **extra, **generate_kwargs)
    finally:
        model._agile_state.pending = None
    return result, lengths
