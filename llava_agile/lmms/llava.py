"""`--model llava_agile`: lmms-eval's `llava` wrapper (haotian-liu's LLaVA codebase) with pruning.

Requests are handled as lmms-eval 0.7.3's `Llava` handles them (same prompt: `<image>` tokens
before the context, LLaVA's conversation template, `tokenizer_image_token`, same generation
defaults); what differs:
- loading: `llava_agile.load_pretrained_model(..., pruning=cfg)`, model_args `pruning`, `keep`,
  `pruning_args`, `erank_avg_file` checked by `PruneConfig.from_args` before anything loads
  (one ValueError naming the fix; unknown model_args are refused the same way);
- devices: the GLOBAL rank (multi-node), CPU runs in float32 (also several processes: gloo),
  GPU in float16 (`dtype=` overrides), one GPU per process; `device_map=auto` loads as the
  wrapper does with it (one process, LLaVA's builder places and casts); images in the model's
  dtype;
- `loglikelihood` returns its `(loss, greedy)` pairs wrapped so that lmms-eval 0.7.3's
  `unwrap_generation_output` keeps them (it turns bare tuples into strings), so
  multiple-choice tasks score;
- every request reports `TokenCounts`: input_tokens = the LLM's prefill length (text + kept
  visual tokens), output_tokens = generated tokens; lmms-eval's efficiency block sums them;
- `agile_stats` (kept tokens per image, prefill, pruning time) per rank, padding requests
  excluded, written next to the results (`agile_stats_rank{R}.json`, and on rank 0
  `agile_stats.json` over all ranks);
- any exception while handling requests logs the error and ends the process with exit code 1
  (lmms-eval would otherwise report exit 0, and the other ranks would wait at the next barrier).
"""
from __future__ import annotations

import copy

import torch
from loguru import logger as eval_logger
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.models.simple.llava import Llava

from ..llava.loader import load_pretrained_model
from .common import AgileLmms, generated_tokens


class LlavaAgile(AgileLmms, Llava):
    """lmms-eval model `llava_agile`; see the module docstring."""

    is_simple = True
    model_id = "llava_agile"

    def __init__(self, pretrained: str = "liuhaotian/llava-v1.5-7b", pruning: str | None = None,
                 keep: int | None = None, pruning_args: str | None = None,
                 erank_avg_file: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size=1, max_batch_size=None,
                 model_name: str | None = None, model_base: str | None = None,
                 conv_template: str = "vicuna_v1", use_cache: bool = True,
                 truncation: bool = True, truncate_context: bool = False,
                 tie_weights: bool = True, attn_implementation: str | None = None,
                 device_map: str | None = None, stats_dir: str | None = None, **unknown) -> None:
        lmms.__init__(self)
        cfg = self._check_args(unknown, pruning, keep, pruning_args, erank_avg_file, dtype,
                               batch_size, device_map)
        if int(batch_size) > 1:
            eval_logger.warning("llava_agile: --batch_size > 1 pads prompts on the tokenizer's "
                                "side (right for LLaVA), as lmms-eval's llava does; use 1 for "
                                "LLaVA's answers")
        dtype = self._place(device, device_map, dtype)
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        if model_name is None:
            from llava.mm_utils import get_model_name_from_path
            model_name = get_model_name_from_path(pretrained)
        if device_map is None:
            extra.update(device=self.device_map, device_map=self.device_map)
        else:  # as lmms-eval's llava with device_map=auto
            extra.update(device_map=device_map)
        loaded = load_pretrained_model(pretrained, model_base, model_name, pruning=cfg, **extra)
        self._tokenizer, self._model, self._image_processor, self._max_length = loaded
        if dtype is not None:
            self._model.to(dtype=dtype)
        self._model.eval()
        if device_map is not None:  # inputs go where the embeddings are
            self._device = self._model.get_model().embed_tokens.weight.device
        if tie_weights:
            self._model.tie_weights()
        self._config = self._model.config
        self.pruning = cfg
        self.pretrained = pretrained
        self.batch_size_per_gpu = int(batch_size)
        self.conv_template = conv_template
        self.use_cache = use_cache
        self.truncation = truncation
        self.truncate_context = truncate_context
        self.stats_dir = stats_dir
        self.agile_records: list[dict] = []
        self._prefill: list[int] | None = None
        self._model.get_model().register_forward_pre_hook(self._record_prefill, with_kwargs=True)
        eval_logger.info(f"llava_agile: rank {self._rank}/{self._world_size} on {self._device} "
                         f"({self._model.dtype}), pruning {cfg.to_dict() if cfg else 'off'}")

    def _images(self, visuals):
        from llava.mm_utils import process_images

        if not visuals:
            return None
        image = process_images(visuals, self._image_processor, self._config)
        dtype = self.model.dtype
        if type(image) is list:
            return [x.to(dtype=dtype, device=self.device) for x in image]
        return image.to(dtype=dtype, device=self.device)

    def _prompt(self, question):
        from llava.conversation import conv_templates

        template = conv_templates[self.conv_template]
        conv = copy.deepcopy(template) if "llama_3" in self.conv_template else template.copy()
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], None)
        return conv

    def _ids(self, prompt):
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import tokenizer_image_token

        return tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX,
                                     return_tensors="pt").unsqueeze(0).to(self.device)

    def _loglikelihood(self, requests):
        """lmms-eval's Llava.loglikelihood, model dtype images, results kept as tuples."""
        from llava.constants import DEFAULT_IMAGE_TOKEN

        res = []
        pbar = tqdm(total=len(requests), disable=(self.rank != 0), desc="Model Responding")
        for req in requests:
            contexts, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if type(doc_to_target) is str else doc_to_target(doc)
            visuals = self.flatten([doc_to_visual(doc)])
            image_sizes = [[v.size[0], v.size[1]] for v in visuals]
            image = self._images(visuals)
            prompts_input = contexts[0] if isinstance(contexts, list) else contexts
            if image is not None and len(image) != 0 and DEFAULT_IMAGE_TOKEN not in prompts_input:
                prompts_input = " ".join([DEFAULT_IMAGE_TOKEN] * len(visuals)) + "\n" + \
                    prompts_input
            conv = self._prompt(prompts_input)
            context_ids = self._ids(conv.get_prompt())
            conv.messages[1][1] = continuation
            input_ids = self._ids(conv.get_prompt())
            labels = input_ids.clone()
            labels[0, :context_ids.shape[1]] = -100
            self._prefill = None
            with torch.inference_mode():
                outputs = self.model(input_ids=input_ids, labels=labels, images=image,
                                     use_cache=True, image_sizes=image_sizes)
            greedy = outputs["logits"].argmax(dim=-1)[:, context_ids.shape[1]:input_ids.shape[1]]
            max_equal = (greedy == input_ids[:, context_ids.shape[1]:]).all()
            res.append(self._scored(req, len(visuals), outputs["loss"].item(), max_equal))
            pbar.update(1)
        pbar.close()
        return res

    def _generate_until(self, requests):
        """lmms-eval's Llava.generate_until, model dtype images, TokenCounts and agile_stats."""
        from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
        from llava.mm_utils import tokenizer_image_token

        res = []
        re_ords = self._ordered(requests)
        chunks = re_ords.get_batched(n=self.batch_size, batch_fn=None)
        pbar = tqdm(total=-(-len(requests) // self.batch_size), disable=(self.rank != 0),
                    desc="Model Responding")
        for chunk in chunks:
            contexts, all_gen_kwargs, doc_to_visual, doc_id, task, split, reqs = zip(*chunk)
            task, split = task[0], split[0]
            batched_visuals = [doc_to_visual[0](self.task_dict[task][split][i]) for i in doc_id]
            flattened_visuals = self.flatten(batched_visuals)
            gen_kwargs = self._generation_defaults(all_gen_kwargs[0])
            if "image_aspect_ratio" in gen_kwargs and \
                    "image_aspect_ratio" not in self._config.__dict__:
                self._config.image_aspect_ratio = gen_kwargs.pop("image_aspect_ratio")
            image_tensor = self._images(flattened_visuals)
            prompts, counts = [], []
            for visual, context in zip(batched_visuals, contexts):
                n = len(visual) if isinstance(visual, list) else 1
                if image_tensor is not None and len(image_tensor) != 0 and \
                        DEFAULT_IMAGE_TOKEN not in context:
                    context = " ".join([DEFAULT_IMAGE_TOKEN] * n) + "\n" + context
                prompts.append(self._prompt(context).get_prompt())
                counts.append(len(visual) if isinstance(visual, list) else int(visual is not None))
            gen_kwargs["image_sizes"] = [v.size for v in flattened_visuals]
            ids = [tokenizer_image_token(p, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
                   for p in prompts]
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
                else self.tokenizer.eos_token_id
            input_ids = self.pad_sequence(ids, batch_first=True, padding_value=pad).to(self.device)
            self._prefill = None
            cont = self.model.generate(
                input_ids, attention_mask=input_ids.ne(pad).to(self.device), pad_token_id=pad,
                images=image_tensor, image_sizes=gen_kwargs["image_sizes"],
                do_sample=gen_kwargs["temperature"] > 0, temperature=gen_kwargs["temperature"],
                top_p=gen_kwargs["top_p"], num_beams=gen_kwargs["num_beams"],
                max_new_tokens=gen_kwargs["max_new_tokens"], use_cache=self.use_cache)
            text_outputs = self.tokenizer.batch_decode(cont, skip_special_tokens=True)
            # transformers 4.37 starts the output of an inputs_embeds generate with the BOS
            bos = self.tokenizer.bos_token_id
            start = int(cont.shape[1] > 0 and bos is not None and bool((cont[:, 0] == bos).all()))
            generated = [generated_tokens(row[start:], self.tokenizer.eos_token_id, pad)
                         for row in cont]
            counts_tc = self._log_requests(reqs, counts, self._prefill, generated)
            res.extend(GenerationResult(text=t, token_counts=tc)
                       for t, tc in zip(text_outputs, counts_tc))
            self.cache_hook.add_partial("generate_until", (contexts[-1], gen_kwargs), text_outputs)
            pbar.update(1)
        res = re_ords.get_original(res)
        pbar.close()
        return res
