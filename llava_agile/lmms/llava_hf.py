"""`--model llava_hf_agile`: lmms-eval's `llava_hf` wrapper (transformers' LLaVA-1.5 / LLaVA-NeXT
classes, `llava-hf/*` checkpoints) with pruning through `llava_agile.enable(model, processor=...)`.

Requests are handled as lmms-eval 0.7.3's `LlavaHf` handles them (same prompt: `<image>` tokens
before the context, the tokenizer's chat template or its Vicuna fallback, the processor with
left padding, same generation defaults); what differs, besides what `llava_agile.lmms.common`
adds to both our classes (model_args checks, global rank, CPU float32 / GPU float16 by default,
TokenCounts, agile_stats, fail-fast):
- the patched processor emits K placeholders per image, so the stock `generate` sees K tokens;
  where K is only known after the vision tower (`adaptive_count=True`, LLaVA-NeXT's `shared` /
  `per_crop` modes) requests go through `llava_agile.generate` (generate_until) and
  `llava_agile.hf.generate.prepare` (loglikelihood);
- `loglikelihood` masks the whole context, image placeholders included: lmms-eval's `llava_hf`
  measures the context without its images (one `<image>` token instead of the expanded run), so
  its loss also scores the placeholders; the greedy check compares each continuation token
  with the prediction of the position before it (llava_hf: of its own position); results are
  wrapped as in `llava_agile.lmms.llava`;
- a failed `generate` ends the run (lmms-eval's `llava_hf` logs it and answers "");
- image tasks only (`llava_hf` also feeds videos to LLaVA-OneVision); `--batch_size` 1 as there.
"""
from __future__ import annotations

import torch
from loguru import logger as eval_logger
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, VICUNA_CHAT_TEMPLATE, LlavaHf

from .common import AgileLmms, generated_tokens

FAMILIES = {"llava": "LlavaForConditionalGeneration",
            "llava_next": "LlavaNextForConditionalGeneration"}


class LlavaHfAgile(AgileLmms, LlavaHf):
    """lmms-eval model `llava_hf_agile`; see the module docstring."""

    is_simple = True
    model_id = "llava_hf_agile"

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", pruning: str | None = None,
                 keep: int | None = None, pruning_args: str | None = None,
                 erank_avg_file: str | None = None, revision: str = "main",
                 device: str | None = None, dtype: str | None = None, batch_size=1,
                 max_batch_size=None, trust_remote_code: bool = False,
                 attn_implementation: str | None = None, device_map: str | None = None,
                 chat_template: str | None = None, use_cache: bool = True,
                 stats_dir: str | None = None, **unknown) -> None:
        lmms.__init__(self)
        cfg = self._check_args(unknown, pruning, keep, pruning_args, erank_avg_file, dtype,
                               batch_size, device_map)
        if int(batch_size) != 1:
            raise ValueError(f"llava_hf_agile: --batch_size must be 1 (as lmms-eval's llava_hf), "
                             f"got {batch_size}")
        import transformers
        from transformers import AutoConfig, AutoProcessor

        import llava_agile

        dtype = self._place(device, device_map, dtype)
        config = AutoConfig.from_pretrained(pretrained, revision=revision,
                                            trust_remote_code=trust_remote_code)
        kind = getattr(config, "model_type", None)
        if kind not in FAMILIES:
            raise ValueError(f"llava_hf_agile: {pretrained} is a {kind!r} model; supported: "
                             f"llava (LLaVA-1.5) and llava_next (LLaVA-NeXT) checkpoints")
        model = getattr(transformers, FAMILIES[kind]).from_pretrained(
            pretrained, revision=revision, dtype=dtype or "auto", device_map=self.device_map,
            trust_remote_code=trust_remote_code, attn_implementation=attn_implementation).eval()
        processor = AutoProcessor.from_pretrained(pretrained, revision=revision,
                                                  trust_remote_code=trust_remote_code)
        processor.tokenizer.padding_side = "left"  # as llava_hf: batched generation pads left
        if cfg is not None:
            llava_agile.enable(model, processor=processor, method=cfg)
        # in-LLM methods (FastV, PDrop, DART) keep every placeholder: a fixed count
        self.variable = cfg is not None and not getattr(model._agile_state, "fixed_count", True)
        if device_map is not None:  # inputs go where the embeddings are
            self._device = model.get_input_embeddings().weight.device
        self._model, self._image_processor = model, processor
        self._tokenizer, self._config = processor.tokenizer, model.config
        self.pruning = cfg
        self.pretrained = pretrained
        self.batch_size_per_gpu = 1
        self.chat_template = chat_template
        self.use_cache = use_cache
        self.stats_dir = stats_dir
        self.agile_records: list[dict] = []
        self._prefill: list[int] | None = None
        model.model.language_model.register_forward_pre_hook(self._record_prefill,
                                                             with_kwargs=True)
        eval_logger.info(f"llava_hf_agile: rank {self._rank}/{self._world_size} on "
                         f"{self._device} ({model.dtype}), pruning "
                         f"{cfg.to_dict() if cfg else 'off'}"
                         f"{' (variable K: llava_agile.generate)' if self.variable else ''}")

    # ------------------------------------------------------------ prompts and inputs

    def _template(self, messages, generation: bool) -> str:
        """llava_hf's choice: chat_template model_arg, else the tokenizer's, else Vicuna's."""
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        elif self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation)

    def _visuals(self, doc_to_visual, doc):
        visuals = self.flatten([doc_to_visual(doc)])
        if any(isinstance(v, str) for v in visuals):
            raise ValueError("llava_hf_agile prunes images; this task gives videos, which "
                             "LLaVA-1.5 / LLaVA-NeXT do not take")
        return visuals

    def _inputs(self, text, visuals):
        images = {"images": visuals} if visuals else {}
        return self._image_processor(text=text, return_tensors="pt", **images).to(
            self._device, self.model.dtype)

    @property
    def _image_token_id(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", -1)))

    # ------------------------------------------------------------ requests

    def _loglikelihood(self, requests):
        """llava_hf's loglikelihood; the context (placeholders included) is masked in labels."""
        from llava_agile.hf.generate import prepare

        res = []
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if type(doc_to_target) is str else doc_to_target(doc)
            visuals = self._visuals(doc_to_visual, doc)
            context = f"{' '.join([DEFAULT_IMAGE_TOKEN] * len(visuals))}\n{context}"
            messages = [{"role": "user", "content": context},
                        {"role": "assistant", "content": continuation}]
            prompt = self._template(messages[:-1], True)
            inputs = self._inputs([self._template(messages, False)], visuals)
            # the context's length with its images expanded as in `inputs`
            context_ids = self._image_processor(text=[prompt], return_tensors="pt")["input_ids"]
            image = self._image_token_id
            n_context = context_ids.shape[1] - int((context_ids == image).sum()) + \
                int((inputs["input_ids"] == image).sum())
            self._prefill = None
            with torch.inference_mode():
                if self.variable and visuals:
                    full = inputs["input_ids"].shape[1]
                    ids, mask, _ = prepare(self.model, **inputs)
                    inputs["input_ids"], inputs["attention_mask"] = ids, mask
                    n_context -= full - ids.shape[1]
                labels = inputs["input_ids"].clone()
                labels[:, :n_context] = -100
                try:
                    outputs = self.model(**inputs, labels=labels)
                finally:
                    if self.pruning and hasattr(self.model._agile_state, "pending"):
                        self.model._agile_state.pending = None
            # position i predicts token i + 1 (llava_hf compares without this shift)
            greedy = outputs["logits"].argmax(dim=-1)[:, n_context - 1:-1]
            max_equal = (greedy == inputs["input_ids"][:, n_context:]).all()
            res.append(self._scored(req, len(visuals), outputs["loss"].item(), max_equal))
            pbar.update(1)
        pbar.close()
        return res

    def _generate_until(self, requests):
        """llava_hf's generate_until (image tasks), TokenCounts and agile_stats."""
        from llava_agile.hf.generate import generate as variable_generate

        res = []
        re_ords = self._ordered(requests)
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        for chunk in re_ords.get_batched(n=1, batch_fn=None):
            (context,), (gen_kwargs,), (doc_to_visual,), (doc_id,), (task,), (split,), (req,) = \
                zip(*chunk)
            visuals = self._visuals(doc_to_visual, self.task_dict[task][split][doc_id])
            gen_kwargs = self._generation_defaults(gen_kwargs)
            if visuals and DEFAULT_IMAGE_TOKEN not in context:
                context = f"{' '.join([DEFAULT_IMAGE_TOKEN] * len(visuals))}\n{context}"
            text = self._template([{"role": "user", "content": context}], True)
            inputs = self._inputs(text, visuals)
            do_sample = gen_kwargs["temperature"] > 0
            kwargs = dict(do_sample=do_sample,
                          temperature=gen_kwargs["temperature"] if do_sample else None,
                          top_p=gen_kwargs["top_p"], num_beams=gen_kwargs["num_beams"],
                          max_new_tokens=gen_kwargs["max_new_tokens"], use_cache=self.use_cache,
                          pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id)
            self._prefill = None
            if self.variable and visuals:
                cont, lengths = variable_generate(self.model, **inputs, **kwargs)
                cont = cont[:, int(lengths.max()):]
            else:
                cont = self.model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[-1]:]
            answer = self.tokenizer.batch_decode(cont, skip_special_tokens=True)[0]
            n_new = generated_tokens(cont[0], self.eot_token_id, self.eot_token_id)
            (tc,) = self._log_requests([req], [len(visuals)], self._prefill, [n_new])
            res.append(GenerationResult(text=answer, token_counts=tc))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
            pbar.update(1)
        res = re_ords.get_original(res)
        pbar.close()
        return res
