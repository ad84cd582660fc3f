"""A tiny random LLaVA-1.5 (or LLaVA-NeXT-shaped) checkpoint for tests and demos, built offline.

CLIP ViT 336/14 (64-d, a few layers) saved as a local folder, a 64-d LLaMA, an mlp2x_gelu
projector and a sentencepiece tokenizer trained on generated text. LLaVA's own
`load_pretrained_model` loads it; `load_tiny` does that on CPU in float32.
"""
from __future__ import annotations

import io
import json
import math
import os
import random

import torch

WORDS = ("a chat between curious user and an artificial intelligence assistant the gives helpful "
         "detailed polite answers to questions USER ASSISTANT Human Assistant what is in this image "
         "describe picture please answer with single word or phrase yes no there color red green "
         "blue white black how many people cat dog car tree sky on left right of it Answer "
         "directly from given options letter A B C D E question context hint text reading "
         "system you are vision language model count zero one two three four five six seven "
         "eight nine ten . , ? ! : ; ' \" ( ) - # < > / \\ _ = + * & % $ @ [ ] { } | ~ ` ^ 0 1 2 3 "
         "4 5 6 7 8 9 ###").split()

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _corpus(seed: int, lines: int = 600) -> str:
    rng = random.Random(seed)
    out = ["A chat between a curious user and an artificial intelligence assistant. The assistant "
           "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
           "What is in this image? ASSISTANT: a cat.</s>"]
    for _ in range(lines):
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))))
    return "\n".join(out)


def _train_tokenizer(out_dir: str, seed: int, vocab_size: int = 400) -> None:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed).splitlines()), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, split_digits=True,
        hard_vocab_limit=False, max_sentence_length=4096)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    tok = LlamaTokenizer(vocab_file=path, legacy=False, add_bos_token=True, add_eos_token=False)
    tok.model_max_length = 4096
    tok.save_pretrained(out_dir)


@torch.no_grad()
def _init_(module: torch.nn.Module, gen: torch.Generator, attn_gain: float = 1.0) -> None:
    """Deterministic init of every parameter (immune to LLaVA's `disable_torch_init`)."""
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if p.dim() == 1:
            base = 1.0 if ("norm" in name or "layrnorm" in name) and name.endswith("weight") else 0.0
            p.copy_(base + 0.02 * torch.randn(p.shape, generator=gen))
            if "image_newline" in name or "class_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.numel()) * 4)
            continue
        fan_in = p[0].numel() if p.dim() > 1 else 1
        std = 1.0 / math.sqrt(fan_in)
        if "embed_tokens" in name or "position_embedding" in name:
            std = 0.5
        if "q_proj" in name or "k_proj" in name:
            std *= attn_gain
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_tiny_llava(out_dir: str, next: bool = False, seed: int = 0, image_size: int = 336,
                     patch_size: int = 14, vision_layers: int = 3,
                     vision_tower: str | None = None, llm_layers: int = 2) -> str:
    """Write a loadable tiny random LLaVA folder; returns its path (its name contains 'llava').

    `next=True`: anyres with `image_grid_pinpoints`, `spatial_unpad` and an `image_newline`.
    `vision_tower`: a local CLIPVisionModel folder used as is (e.g. the DINOv2 conversion) instead
    of a random 64-d CLIP; its config gives the image size, layers and the projector's input width
    (`image_size`, `patch_size` and `vision_layers` are then ignored). `llm_layers`: LLaMA decoder
    layers (in-LLM pruning needs a few).
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    if vision_tower is not None:
        vision_dir = os.path.abspath(vision_tower)
        if not os.path.isfile(os.path.join(vision_dir, "config.json")):
            raise ValueError(f"vision_tower must be a CLIPVisionModel folder (no config.json): "
                             f"{vision_dir}")
        vcfg = CLIPVisionConfig.from_pretrained(vision_dir)
        image_size, vision_layers = vcfg.image_size, vcfg.num_hidden_layers
    if vision_layers < 2:
        raise ValueError(f"vision_layers must be >= 2 (LLaVA uses layer -2), got {vision_layers}")
    if vision_tower is None and image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    out_dir = os.path.abspath(out_dir)
    path = out_dir if "llava" in os.path.basename(out_dir).lower() else \
        os.path.join(out_dir, "tiny-llava-next" if next else "tiny-llava-v1.5")
    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    if vision_tower is None:
        vision_dir = os.path.join(path, "clip-vision")
        vcfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                                num_hidden_layers=vision_layers, num_attention_heads=4,
                                image_size=image_size, patch_size=patch_size, projection_dim=64,
                                hidden_act="quick_gelu")
        clip = CLIPVisionModel(vcfg)
        _init_(clip, gen, attn_gain=3.0)
        clip.save_pretrained(vision_dir, safe_serialization=True)
        CLIPImageProcessor(size={"shortest_edge": image_size},
                           crop_size={"height": image_size, "width": image_size}
                           ).save_pretrained(vision_dir)

    _train_tokenizer(path, seed)
    from transformers import LlamaTokenizer
    vocab = len(LlamaTokenizer.from_pretrained(path))

    cfg = LlavaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=llm_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        torch_dtype="float32", use_cache=True,
        mm_vision_tower=vision_dir, mm_hidden_size=vcfg.hidden_size, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
        mm_use_im_patch_token=False, image_aspect_ratio="anyres" if next else "pad",
        tokenizer_padding_side="right", tokenizer_model_max_length=4096,
        mm_patch_merge_type="spatial_unpad" if next else "flat", freeze_mm_mlp_adapter=False,
        tune_mm_mlp_adapter=False, use_mm_proj=True)
    if next:
        cfg.image_grid_pinpoints = [[image_size * w // 336, image_size * h // 336]
                                    for w, h in PINPOINTS]
    model = LlavaLlamaForCausalLM(cfg)
    _init_(model, gen)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "tiny_llava.json"), "w") as f:
        json.dump({"seed": seed, "next": next, "vision_layers": vision_layers,
                   "vision_tower": vision_tower and vision_dir}, f)
    return path


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 bytes (`bytes_to_unicode`), in order."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b if b in keep else next(extra)) for b in range(256)]


def build_tiny_text_tower(vision_dir: str, out_dir: str, seed: int = 0) -> str:
    """A CLIP checkpoint folder as openai's (vision tower + text tower + projections + tokenizer)
    for cdpruner / trim: the vision weights of `vision_dir`, a random 2-layer text tower, a
    character-level CLIP tokenizer (no merges; 77-token window). Returns `out_dir`."""
    import json as _json

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(vision_dir)
    os.makedirs(out_dir, exist_ok=True)
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        _json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(out_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    CLIPTokenizer(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"),
                  model_max_length=77).save_pretrained(out_dir)
    # eos_token_id=2 as openai's configs (transformers then pools at the largest token id)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                bos_token_id=len(vocab) - 2, eos_token_id=2, projection_dim=16)
    cfg = CLIPConfig(text_config=text, vision_config=dict(vision.config.to_dict(),
                     projection_dim=16), projection_dim=16)
    model = CLIPModel(cfg)
    _init_(model, torch.Generator().manual_seed(seed + 1))
    model.vision_model.load_state_dict(vision.vision_model.state_dict())
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load_tiny(path: str):
    """(tokenizer, model, image_processor, context_len) through LLaVA's builder (via
    `llava_agile.load_pretrained_model`), float32 on CPU."""
    from ..llava.loader import load_pretrained_model

    name = os.path.basename(os.path.normpath(path))
    tokenizer, model, image_processor, ctx = load_pretrained_model(
        path, None, name, device="cpu", device_map="cpu")
    model = model.float().eval()
    return tokenizer, model, image_processor, ctx


def tiny_image(seed: int = 0, size: tuple = (500, 300), kind: str = "shapes"):
    """A synthetic RGB PIL image: 'noise' (uniform pixels), 'shapes' (rectangles on a gradient)
    or 'flat' (one colour)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    w, h = size
    if kind == "noise":
        arr = rng.randint(0, 256, (h, w, 3))
    elif kind == "flat":
        arr = np.broadcast_to(rng.randint(0, 256, 3), (h, w, 3))
    elif kind == "shapes":
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1),
                        np.full((h, w), 128.0)], -1)
        for _ in range(6):
            x0, y0 = rng.randint(0, w), rng.randint(0, h)
            arr[y0:y0 + rng.randint(10, h // 2 + 11), x0:x0 + rng.randint(10, w // 2 + 11)] = \
                rng.randint(0, 256, 3)
    else:
        raise ValueError(f"kind must be 'noise', 'shapes' or 'flat', got {kind!r}")
    return Image.fromarray(np.ascontiguousarray(arr).astype("uint8"))


def tiny_prompt(tokenizer, question: str = "What is in this image?", conv_mode: str = "vicuna_v1"):
    """`[1, T]` input ids of LLaVA's prompt for one image and one question (its own template)."""
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX,
                                 return_tensors="pt")[None]
