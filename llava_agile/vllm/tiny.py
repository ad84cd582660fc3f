"""A tiny random llava-hf checkpoint (LLaVA-1.5 or LLaVA-NeXT) that vLLM loads offline.

Same recipe as `llava_agile.assets.tiny` (its tokenizer trainer and deterministic init), written
directly in transformers' format: `LlavaForConditionalGeneration` (or
`LlavaNextForConditionalGeneration`) with a 64-d CLIP tower and a 64-d Llama (2 heads: head_dim
32, the smallest vLLM's CPU attention supports), weights named as llava-hf's checkpoints name them
(`vision_tower.vision_model.*`, `language_model.model.*`, `multi_modal_projector.*`,
`language_model.lm_head.*`, `image_newline`), its processor and a chat template. No vLLM import.
"""
from __future__ import annotations

import json
import os

import torch

CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: "
                 "{% endif %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for c in m['content'] %}{% if c['type'] == 'image' or c['type'] == 'image_url' "
                 "%}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{% endif %}{% if m['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@torch.no_grad()
def build_tiny_hf_llava(out_dir: str, seed: int = 0, image_size: int = 224, patch_size: int = 14,
                        vision_layers: int = 3, next: bool = False) -> str:
    """Write the checkpoint into `out_dir` (created); returns it. N = (image_size/patch_size)^2.
    `next`: a `LlavaNextForConditionalGeneration` (anyres grids of 1x2, 2x1 and 2x2 crops)."""
    from safetensors.torch import save_file
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor, LlavaProcessor)

    from ..assets.tiny import _init_

    os.makedirs(out_dir, exist_ok=True)
    _tokenizer(seed).save_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    image_id = tok.convert_tokens_to_ids("<image>")
    vcfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers,
                            num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                            projection_dim=64, hidden_act="quick_gelu")
    tcfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=False)
    common = dict(vision_config=vcfg, text_config=tcfg, image_token_index=image_id,
                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                  projector_hidden_act="gelu", tie_word_embeddings=False)
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size],
                 [2 * image_size, 2 * image_size]]
    if next:
        cfg = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
        model_cls, arch = LlavaNextForConditionalGeneration, "LlavaNextForConditionalGeneration"
    else:
        cfg = LlavaConfig(**common)
        model_cls, arch = LlavaForConditionalGeneration, "LlavaForConditionalGeneration"
    cfg.architectures = [arch]
    model = model_cls(cfg)
    _init_(model, torch.Generator().manual_seed(seed))
    cfg.save_pretrained(out_dir)
    save_file({_hf_name(k): v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    sizes = dict(size={"shortest_edge": image_size},
                 crop_size={"height": image_size, "width": image_size})
    if next:
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(image_grid_pinpoints=pinpoints, **sizes),
            tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="default",
            chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    else:
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(**sizes), tokenizer=tok,
                                   patch_size=patch_size, vision_feature_select_strategy="default",
                                   chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f)
    return out_dir


def _tokenizer(seed: int, vocab_size: int = 400):
    """A Llama-style BPE tokenizer (<unk>=0, <s>=1, </s>=2, then <image>) trained with `tokenizers`
    on `assets.tiny`'s generated corpus (its sentencepiece recipe does not load in transformers
    5.x)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ..assets.tiny import _corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_corpus(seed).splitlines(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.add_special_tokens(["<image>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>", model_max_length=4096)


def _hf_name(key: str) -> str:
    """transformers 5.x state-dict names -> the names llava-hf checkpoints carry."""
    for new, old in (("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.language_model.", "language_model.model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline"),
                     ("lm_head.", "language_model.lm_head.")):
        if key.startswith(new):
            return old + key[len(new):]
    raise ValueError(f"unexpected LLaVA weight name {key!r}")


QWEN_WORDS = ["describe", "the", "image", "what", "is", "in", "this", "picture", "a", "cat",
              "and", "dog", "please"]
QWEN_TOKENS = {"<|vision_start|>": 118, "<|vision_end|>": 119, "<|image_pad|>": 120,
               "<|video_pad|>": 121}


@torch.no_grad()
def build_tiny_qwen(out_dir: str, seed: int = 0, family: str = "qwen2_5_vl",
                    max_tokens: int = 64) -> str:
    """A tiny random Qwen2.5-VL (`family="qwen2_5_vl"`) or Qwen3-VL (`"qwen3_vl"`) checkpoint
    with its processor and a word-level tokenizer, written into `out_dir`; returns it. Pixels
    between 1 and `max_tokens` merge groups, so 112x112 (Qwen2.5-VL's 14-px patches) or 128x128 (Qwen3-VL's
    16-px ones) give 16 merged tokens. Vision: 4 blocks with q / k made 16x larger, so that the
    received attention is peaked (at init every patch receives nearly the same); Qwen2.5-VL: full
    attention in blocks 1 and 3, windows of 2x2 merged tokens in 0 and 2; Qwen3-VL: deepstack
    levels from blocks 0 and 1. LLM: 2 layers, head_dim 32 (vLLM's CPU attention needs >= 32),
    M-RoPE sections [4, 6, 6] (interleaved on Qwen3-VL)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor

    os.makedirs(out_dir, exist_ok=True)
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(QWEN_WORDS)},
             **QWEN_TOKENS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", model_max_length=4096,
                                   additional_special_tokens=list(QWEN_TOKENS))
    ids = {name: fast.convert_tokens_to_ids(name) for name in QWEN_TOKENS}
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=2, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6])
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    if family == "qwen2_5_vl":
        from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                                  Qwen2_5_VLProcessor)
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import \
            Qwen2VLVideoProcessor as Video
        patch, model_cls, processor_cls = 14, Qwen2_5_VLForConditionalGeneration, \
            Qwen2_5_VLProcessor
        cfg = Qwen2_5_VLConfig(vision_config=dict(vision, patch_size=patch, window_size=56,
                                                  fullatt_block_indexes=[1, 3]),
                               text_config=dict(text, rope_parameters=rope), **tokens)
        cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import \
            Qwen3VLVideoProcessor as Video
        patch, model_cls, processor_cls = 16, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        cfg = Qwen3VLConfig(vision_config=dict(vision, patch_size=patch,
                                               num_position_embeddings=64,
                                               deepstack_visual_indexes=[0, 1]),
                            text_config=dict(text, head_dim=32,
                                             rope_parameters=dict(rope, mrope_interleaved=True)),
                            **tokens)
        cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    else:
        raise ValueError(f"family={family!r}: expected 'qwen2_5_vl' or 'qwen3_vl'")
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    for block in model.model.visual.blocks:
        qk = 2 * block.attn.qkv.in_features  # the q and k rows of the fused projection
        block.attn.qkv.weight[:qk] *= 16
        block.attn.qkv.bias[:qk] *= 16
    model.save_pretrained(out_dir)
    unit = (2 * patch) ** 2
    pixels = dict(patch_size=patch, merge_size=2, min_pixels=unit, max_pixels=unit * max_tokens)
    processor_cls(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=fast,
                  video_processor=Video(**pixels),
                  chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(out_dir)
    return out_dir


QWEN_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
                      "{% else %}{% for c in m['content'] %}{% if c['type'] in ('image', "
                      "'image_url') %}<|vision_start|> <|image_pad|> <|vision_end|> {% elif "
                      "c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
                      "{% endfor %}")
