"""Convert an original-format LLaVA-1.5 / LLaVA-NeXT folder (haotian-liu's layout: LLaMA +
`model.mm_projector` + `mm_vision_tower` pointing at a local CLIP folder) into the llava-hf layout
with the same weights, loadable by `LlavaForConditionalGeneration` /
`LlavaNextForConditionalGeneration.from_pretrained` on transformers 4.57 and 5.x.

Key mapping as in transformers' `convert_llava_weights_to_hf.py` (the hub checkpoints' layout):
`model.embed_tokens|layers|norm` -> `language_model.model.*`, `lm_head` ->
`language_model.lm_head`, `model.mm_projector.0|2` -> `multi_modal_projector.linear_1|2`,
`model.image_newline` -> `image_newline`, the CLIP tower's `vision_model.*` ->
`vision_tower.vision_model.*`. An `<image>` token is appended to the vocabulary (id = old vocab
size); its input embedding is the mean embedding (never used: placeholders are replaced) and its
output row copies token 0's, so greedy decoding (first maximum) picks the same ids as before.
Used by the equivalence tests; not needed for real llava-hf checkpoints.
"""
from __future__ import annotations

import json
import os

import torch

TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
             "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias")


def _load(folder: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    if not out:
        raise ValueError(f"no *.safetensors in {folder}")
    return out


def convert_original(src: str, dst: str) -> str:
    """Write the llava-hf version of the original-format LLaVA folder `src` to `dst`."""
    from safetensors.torch import save_file
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig,
                              LlavaConfig, LlavaNextConfig, LlavaNextImageProcessor,
                              LlavaNextProcessor, LlavaProcessor)

    with open(os.path.join(src, "config.json")) as f:
        orig = json.load(f)
    if orig.get("mm_projector_type") != "mlp2x_gelu" or orig.get("mm_vision_select_feature",
                                                                  "patch") != "patch":
        raise ValueError("only mlp2x_gelu projectors with mm_vision_select_feature='patch' convert")
    nxt = orig.get("image_aspect_ratio") == "anyres"
    if nxt and orig.get("mm_patch_merge_type") != "spatial_unpad":
        raise ValueError("LLaVA-NeXT converts only with mm_patch_merge_type='spatial_unpad'")
    vision_dir = orig["mm_vision_tower"]
    vcfg = CLIPVisionConfig.from_pretrained(vision_dir)
    weights = _load(src)
    vocab = weights["model.embed_tokens.weight"].shape[0]

    state = {}
    for key, value in weights.items():
        if key.startswith("model.mm_projector."):
            idx, rest = key[len("model.mm_projector."):].split(".", 1)
            state[f"multi_modal_projector.linear_{1 if idx == '0' else 2}.{rest}"] = value
        elif key == "model.image_newline":
            state["image_newline"] = value
        elif key.startswith("model.vision_tower."):
            continue  # the tower comes from its own folder (LLaVA loads it from there too)
        elif key.startswith("model."):
            state["language_model." + key] = value
        elif key == "lm_head.weight":
            state["language_model.lm_head.weight"] = value
        else:
            raise ValueError(f"unexpected key in the original checkpoint: {key}")
    for key, value in _load(vision_dir).items():
        if key.startswith("vision_model."):
            state["vision_tower." + key] = value
    emb = state["language_model.model.embed_tokens.weight"]
    state["language_model.model.embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True)])
    head = state["language_model.lm_head.weight"]
    state["language_model.lm_head.weight"] = torch.cat([head, head[:1]])

    text = LlamaConfig(vocab_size=vocab + 1, tie_word_embeddings=False,
                       **{k: orig[k] for k in TEXT_KEYS if k in orig})
    common = dict(vision_config=vcfg.to_dict(), text_config=text.to_dict(), image_token_index=vocab,
                  projector_hidden_act="gelu", vision_feature_select_strategy="default",
                  vision_feature_layer=orig.get("mm_vision_select_layer", -2),
                  tie_word_embeddings=False)
    side = vcfg.image_size // vcfg.patch_size
    if nxt:
        config = LlavaNextConfig(image_grid_pinpoints=orig["image_grid_pinpoints"],
                                 image_seq_length=side * side, **common)
    else:
        config = LlavaConfig(image_seq_length=side * side, **common)
    config.architectures = ["LlavaNextForConditionalGeneration" if nxt
                            else "LlavaForConditionalGeneration"]

    os.makedirs(dst, exist_ok=True)
    config.save_pretrained(dst)
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})

    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.pad_token is None:  # LLaVA's config pads with id 0 (<unk>)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(orig.get("pad_token_id") or 0)
    if tokenizer.convert_tokens_to_ids("<image>") != vocab:
        raise RuntimeError("the <image> token did not get the id after the vocabulary")
    size = {"shortest_edge": vcfg.image_size}
    crop = {"height": vcfg.image_size, "width": vcfg.image_size}
    kw = dict(tokenizer=tokenizer, patch_size=vcfg.patch_size,
              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if nxt:
        image_processor = LlavaNextImageProcessor(size=size, crop_size=crop,
                                                  image_grid_pinpoints=orig["image_grid_pinpoints"])
        processor = LlavaNextProcessor(image_processor=image_processor, **kw)
    else:
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=crop),
                                   **kw)
    processor.save_pretrained(dst)
    return dst
