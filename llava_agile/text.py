"""The question side of cdpruner and trim: a CLIP text tower, its tokenizer and the CLIP
`visual_projection`, loaded offline from one CLIP checkpoint (LLaVA-1.5's vision tower,
openai/clip-vit-large-patch14-336, holds all three), and the question found in a prompt.

Framework-neutral: transformers' CLIP classes only (every environment has them).
"""
from __future__ import annotations

import re

import torch

from .methods import TEXT

# the answer-format lines the official loaders remove before CDPruner encodes the question
# (llava/eval/model_vqa_loader.py, model_vqa_science.py at Theia-4869/CDPruner 9541616c); TRIM
# encodes the question as the eval file gives it
SUFFIXES = {"cdpruner": ("\nAnswer the question using a single word or phrase.",
                         "\nAnswer with the option's letter from the given choices directly."),
            "trim": ()}
# where a user turn ends in the chat templates of LLaVA-1.5 / NeXT (vicuna_v1, llava-hf's
# "USER: ... ASSISTANT:", mistral_instruct, chatml)
TURN_END = re.compile(r"\s*(ASSISTANT:|\[/INST\]|<\|im_end\|>|###\s*Assistant:?).*\Z", re.S)


def question_from_prompt(text: str, method: str) -> str:
    """The question in the text that follows an image placeholder: up to the end of the user's
    turn, without the answer-format lines the method's official loader removes."""
    q = TURN_END.sub("", text).strip()
    for suffix in SUFFIXES[method]:  # after a newline, or a space where a tokenizer lost it
        q = re.sub(r"\s*" + re.escape(suffix.strip()), "", q)
    q = q.strip()
    if not q:
        raise ValueError(f"{method} is conditioned on the question, and this prompt has no text "
                         f"after its image; give the question with "
                         f"llava_agile.set_question(model, text)")
    return q


class TextTower:
    """`embed_text(question, method) -> [M, E]`, `embed_patches(clip [B, N, Dv]) -> [B, N, E]`.

    Loaded once, in float32 (the official towers run in float32), on `device`."""

    def __init__(self, path: str, device):
        from transformers import (AutoTokenizer, CLIPTextModelWithProjection,
                                  CLIPVisionModelWithProjection)
        from transformers.utils import logging

        self.path = str(path)
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the skipped vision layers are reported as unused weights
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.text = CLIPTextModelWithProjection.from_pretrained(
                path, local_files_only=True, torch_dtype=torch.float32).to(device).eval()
            # the embeddings, post_layernorm and visual_projection only: no vision layer
            vision = CLIPVisionModelWithProjection.from_pretrained(
                path, local_files_only=True, torch_dtype=torch.float32, num_hidden_layers=0)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"text_tower={path!r}: cannot load a CLIP text tower, tokenizer "
                             f"and visual projection from it, offline ({type(exc).__name__}: "
                             f"{exc}); give a local folder or cached hub id of a full CLIP "
                             f"checkpoint such as openai/clip-vit-large-patch14-336") from exc
        finally:
            logging.set_verbosity(verbosity)
        self.post_layernorm = vision.vision_model.post_layernorm.to(device)
        self.visual_projection = vision.visual_projection.to(device)
        self.window = self.text.config.max_position_embeddings

    @torch.no_grad()
    def embed_patches(self, clip: torch.Tensor) -> torch.Tensor:
        """The select layer's patch features -> `visual_projection(post_layernorm(.))`."""
        if clip.shape[-1] != self.post_layernorm.normalized_shape[0]:
            raise ValueError(f"text_tower={self.path!r}: its vision width "
                             f"{self.post_layernorm.normalized_shape[0]} does not match the "
                             f"model's vision tower ({clip.shape[-1]}); give the CLIP checkpoint "
                             f"the model's vision tower comes from")
        x = clip.to(self.visual_projection.weight)
        return self.visual_projection(self.post_layernorm(x))

    @torch.no_grad()
    def embed_text(self, question: str, method: str) -> torch.Tensor:
        """cdpruner: one row per `window`-token chunk of the untruncated question (its zero-padded
        ids reshaped, as the official); trim: one row, the question truncated to the window."""
        dev = self.text.device
        if TEXT[method] == 1:
            ids = self.tokenizer(text=[question], return_tensors="pt", truncation=True,
                                 max_length=self.window, padding=True)
            return self.text(**{k: v.to(dev) for k, v in ids.items()}).text_embeds
        ids = self.tokenizer(text=[question], return_tensors="pt")
        length = ids["input_ids"].shape[1]
        pad = self.window * ((length - 1) // self.window + 1) - length
        ids = {k: torch.cat([v, v.new_zeros(1, pad)], 1).reshape(-1, self.window).to(dev)
               for k, v in ids.items() if k in ("input_ids", "attention_mask")}
        return self.text(**ids).text_embeds


class Questions:
    """One enabled model's question side: its text tower, the questions given with
    `set_question` for the next prefill, else those read from that prefill's prompt."""

    def __init__(self, method: str, tower: TextTower, tokenizer=None):
        self.method, self.tower, self.tokenizer = method, tower, tokenizer
        self.given: list[str] | None = None  # set_question, for the next prefill only
        self.prompt: list[str] | None = None  # read from the running prefill's prompt

    def set(self, question) -> None:
        qs = [question] if isinstance(question, str) else list(question)
        if not qs or not all(isinstance(q, str) and q.strip() for q in qs):
            raise ValueError("set_question takes a non-empty string, or one per image of the "
                             "next call")
        self.given = qs

    def read_prompt(self, input_ids: torch.Tensor, attention_mask, image_token: int) -> None:
        """Per image of `input_ids [B, L]` (in order; an image is one placeholder or a run of
        them): the text after its row's last placeholder, decoded with the model's tokenizer,
        up to the end of the user's turn."""
        if self.given is not None:
            return
        if self.tokenizer is None:
            raise ValueError(f"{self.method} reads the question from the prompt with the model's "
                             f"tokenizer: pass tokenizer= to llava_agile.enable, or give the "
                             f"question with llava_agile.set_question(model, text)")
        out = []
        for b, row in enumerate(input_ids):
            if attention_mask is not None:
                row = row[attention_mask[b].bool()]
            image = row == image_token
            starts = int((image[1:] & ~image[:-1]).sum() + image[:1].sum())
            if starts:
                last = int(image.nonzero().flatten()[-1])
                text = self.tokenizer.decode(row[last + 1:].tolist(), skip_special_tokens=True)
                out += [question_from_prompt(text, self.method)] * starts
        self.prompt = out

    def take(self, n_images: int) -> list[str]:
        """The questions of this call's `n_images` images (those given are used up)."""
        qs, self.given = self.given if self.given is not None else self.prompt, None
        if qs is None:
            raise ValueError(f"{self.method} is conditioned on the question and this call has "
                             f"none: give it with llava_agile.set_question(model, text) before "
                             f"encoding images directly")
        if len(qs) == 1:
            qs = qs * n_images
        if len(qs) != n_images:
            raise ValueError(f"{len(qs)} questions for {n_images} images: give one question, or "
                             f"one per image")
        return qs

    def inputs(self, clip: torch.Tensor, questions: list[str]):
        """(CLIP patch embeddings `[B, N, E]`, one text embedding `[M, E]` per image)."""
        cache = {q: self.tower.embed_text(q, self.method) for q in dict.fromkeys(questions)}
        return self.tower.embed_patches(clip), [cache[q] for q in questions]
