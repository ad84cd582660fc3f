"""`--model qwen2_5_vl_agile` and `--model qwen3_vl_agile`: lmms-eval's own Qwen2.5-VL / Qwen3-VL
chat classes (what `--model qwen2_5_vl` / `qwen3_vl` resolve to) with pruning through
`llava_agile.enable(model, processor=...)` (transformers 5.x, `llava_agile.hf.qwen`).

Requests are handled by lmms-eval 0.7.3's own `generate_until` (chat messages, qwen_vl_utils,
the processor, `model.generate`, the same defaults); the subclasses only load, enable and watch.
What differs from the stock classes:
- model_args: pruning, keep, pruning_args, erank_avg_file, dtype and stats_dir, checked with
  every other one before anything loads (one ValueError naming the fix; an unknown name too:
  the stock classes assert); the checkpoint must be a Qwen2.5-VL (`qwen2_5_vl`) resp. Qwen3-VL
  (`qwen3_vl`) one (the stock `qwen3_vl` also loads Qwen3.5 and the MoE variants);
- placement: `device` defaults to cuda when there is a GPU, else cpu (stock: cuda), and the model
  is loaded with `device_map=<device>` unless `device_map=auto` is given (stock: auto, which then
  moves every input to "cuda", so the stock classes need `device_map=cpu` on CPU); auto needs a
  GPU and one process; several processes need GPUs (as the stock classes); the rank is the
  GLOBAL one (stock: the node-local one) and the process group waits 52 weeks, as in
  `llava_agile.lmms.common`;
- dtype: bfloat16 as the stock classes load; `dtype=float32|float16` casts after loading
  (lossless from a bfloat16 checkpoint, as Qwen's are);
- the patched processor emits K placeholders per image, so the stock `generate` sees K tokens;
  with `adaptive_count=True` (K known only after the vision tower) each batch goes through
  `llava_agile.generate`, and the prompt plus the new tokens are handed back as the stock
  `generate` would;
- TokenCounts: input_tokens (the prefill the LLM received, padding excluded) added to the stock
  output_tokens; `agile_stats.json` per run, as in `llava_agile.lmms.common`;
- image tasks only: a request whose messages hold a video is refused (the adapter prunes images),
  and a failed `generate_until` ends the run (fail-fast, as our other classes);
- loglikelihood stays lmms-eval's: NotImplementedError (and chat tasks build generation
  requests only: a multiple_choice task fails in lmms-eval before reaching the model).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import warnings
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from loguru import logger as eval_logger

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as Qwen2_5_VLChat
from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as Qwen3_VLChat

from .common import DTYPES, AgileLmms

TESTED_LMMS_EVAL = "0.7.3"
OURS = ("pretrained", "pruning", "keep", "pruning_args", "erank_avg_file", "dtype", "device",
        "device_map", "batch_size", "stats_dir")


def _check_lmms_eval(name: str) -> None:
    try:
        version = importlib.metadata.version("lmms_eval")
    except importlib.metadata.PackageNotFoundError:
        return
    if version != TESTED_LMMS_EVAL:
        warnings.warn(f"{name}: tested with lmms-eval {TESTED_LMMS_EVAL}, this is {version}: its "
                      f"Qwen classes' request handling may differ", stacklevel=3)


def _has_video(messages) -> bool:
    for message in messages or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
                isinstance(c, dict) and c.get("type") == "video" for c in content):
            return True
    return False


class _QwenAgile(AgileLmms):
    """Shared by both families; a subclass puts it before lmms-eval's chat class."""

    is_simple = False
    model_type = "?"   # the checkpoint's config.model_type
    stock: type = None  # lmms-eval's chat class

    def __init__(self, pretrained: str | None = None, pruning: str | None = None,
                 keep: int | None = None, pruning_args: str | None = None,
                 erank_avg_file: str | None = None, dtype: str | None = None,
                 device: str | None = None, device_map: str | None = None, batch_size=1,
                 max_batch_size=None, stats_dir: str | None = None, **kwargs) -> None:
        name, stock = self.model_id, self.stock
        theirs = [p for p in inspect.signature(stock.__init__).parameters
                  if p not in ("self", "kwargs")]
        unknown = sorted(k for k in kwargs if k not in theirs)
        if unknown:
            accepted = list(OURS) + [p for p in theirs if p not in OURS]
            raise ValueError(f"{name}: unknown --model_args {', '.join(unknown)}; accepted: "
                             f"{', '.join(accepted)}")
        cfg = self._check_args({}, pruning, keep, pruning_args, erank_avg_file, dtype,
                               batch_size, device_map)
        _check_lmms_eval(name)
        from transformers import AutoConfig

        from ..hf import qwen

        qwen.check_transformers()
        if pretrained is None:
            pretrained = inspect.signature(stock.__init__).parameters["pretrained"].default
        kind = getattr(AutoConfig.from_pretrained(pretrained), "model_type", None)
        if kind != self.model_type:
            raise ValueError(f"{name}: {pretrained} is a {kind!r} model; {name} takes "
                             f"{self.model_type} checkpoints")
        # the process group first, with lmms-eval's 52-week timeout (the stock class's own
        # Accelerator() then reuses it)
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(
            timeout=timedelta(weeks=52))])
        gpu = torch.cuda.is_available() and not str(device).startswith("cpu")
        if accelerator.num_processes > 1 and not gpu:
            raise ValueError(f"{name}: several processes need one GPU each (lmms-eval's class "
                             f"puts process i on cuda:i); on CPU run one process")
        if device_map == "auto" and (not gpu or accelerator.num_processes > 1):
            raise ValueError(f"{name}: device_map=auto spreads one model over the GPUs of one "
                             f"process (lmms-eval's class then moves every input to 'cuda'); "
                             f"it needs a GPU and no torchrun / accelerate launch: drop it")
        device = (device if str(device).startswith("cuda") else "cuda") if gpu else "cpu"
        stock.__init__(self, pretrained=pretrained, device=device,
                       device_map=device_map or device, batch_size=batch_size, **kwargs)
        self._rank = accelerator.process_index  # the stock class: the node-local index
        model = self.model
        if dtype is not None and model.dtype != DTYPES[dtype]:
            model.to(DTYPES[dtype])
        if cfg is not None:
            import llava_agile

            llava_agile.enable(model, processor=self.processor, method=cfg)
        self.variable = cfg is not None and not getattr(model._agile_state, "fixed_count", True)
        self.pruning = cfg
        self.pretrained = pretrained
        self.stats_dir = stats_dir
        self.agile_records: list[dict] = []
        self._prefill: list[int] | None = None
        self._order: list[int] = []     # requests whose messages were built, not yet generated
        self._requests: list | None = None  # while our generate_until runs
        self._counts: dict[int, TokenCounts] = {}
        self._stock_generate, self._inside = model.generate, False
        model.generate = self._generate  # instance attribute: the stock loop calls it
        model.model.language_model.register_forward_pre_hook(self._record_prefill,
                                                             with_kwargs=True)
        eval_logger.info(f"{name}: rank {self._rank}/{self._world_size} on {self._device} "
                         f"({model.dtype}, device_map={self.device_map}), pruning "
                         f"{cfg.to_dict() if cfg else 'off'}"
                         f"{' (variable K: llava_agile.generate)' if self.variable else ''}")

    # ------------------------------------------------------------ watching the stock loop

    def _messages(self, index: int, doc_to_messages):
        """The request's doc_to_messages, noting that its batch is being built."""
        def build(doc, *args, **kwargs):
            messages = doc_to_messages(doc, *args, **kwargs)
            if _has_video(messages):
                raise ValueError(f"{self.model_id} prunes images; this task gives videos, which "
                                 f"llava_agile's Qwen pruning does not support (use lmms-eval's "
                                 f"own {self.model_id.removesuffix('_agile')})")
            self._order.append(index)
            return messages
        return build

    def _generate(self, *args, **kwargs):
        """model.generate as the stock loop calls it: the same output, and for each row of the
        batch (the requests whose messages were just built, in order) its TokenCounts and
        agile_stats record."""
        if self._inside or self._requests is None:  # llava_agile.generate's own call, or
            return self._stock_generate(*args, **kwargs)  # a stock path we do not watch
        rows, self._order = self._order, []
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or len(rows) != ids.shape[0]:
            raise RuntimeError(f"{self.model_id}: generate got {None if ids is None else len(ids)} "
                               f"prompts for {len(rows)} requests: lmms-eval's "
                               f"{self.stock.__module__} is not the loop {self.model_id} was "
                               f"written for (lmms-eval {TESTED_LMMS_EVAL})")
        self._prefill = None
        if self.variable and kwargs.get("pixel_values") is not None:
            import llava_agile

            self._inside = True
            try:
                out, lengths = llava_agile.generate(self.model, *args, **kwargs)
            finally:
                self._inside = False
            # what the stock generate returns: the prompt as given, then the new tokens
            out = torch.cat([ids, out[:, int(lengths.max()):]], dim=1)
        else:
            out = self._stock_generate(*args, **kwargs)
        cfg = self.model.config
        starts = (ids[:, :-1] == cfg.vision_start_token_id) & (ids[:, 1:] == cfg.image_token_id)
        counts = [int(n) for n in starts.sum(1).tolist()]
        reqs = [self._requests[i] for i in rows]
        new = [int(out.shape[1] - ids.shape[1])] * len(rows)  # as the stock loop counts them
        for i, tc in zip(rows, self._log_requests(reqs, counts, self._prefill, new)):
            self._counts[i] = tc
        return out

    def _generate_until(self, requests):
        """The stock generate_until on the requests, each with its doc_to_messages watched;
        its answers with the prefill added to their TokenCounts."""
        self._requests, self._order, self._counts = list(requests), [], {}
        watched = []
        for i, req in enumerate(self._requests):
            ctx, doc_to_messages, *rest = req.arguments
            watched.append(dataclasses.replace(
                req, arguments=(ctx, self._messages(i, doc_to_messages), *rest)))
        try:
            answers = self.stock.generate_until(self, watched)
        finally:
            self._requests = None
        out = []
        for i, answer in enumerate(answers):
            tc = self._counts.get(i)
            if isinstance(answer, GenerationResult) and tc is not None:
                stock = answer.token_counts or TokenCounts()
                answer = GenerationResult(text=answer.text, token_counts=dataclasses.replace(
                    stock, input_tokens=tc.input_tokens))
            out.append(answer)
        return out

    def loglikelihood(self, requests):
        """lmms-eval's own: NotImplementedError."""
        return self.stock.loglikelihood(self, requests)


class Qwen2_5_VLAgile(_QwenAgile, Qwen2_5_VLChat):
    """lmms-eval model `qwen2_5_vl_agile`; see the module docstring."""

    model_id = "qwen2_5_vl_agile"
    model_type = "qwen2_5_vl"
    stock = Qwen2_5_VLChat


class Qwen3_VLAgile(_QwenAgile, Qwen3_VLChat):
    """lmms-eval model `qwen3_vl_agile`; see the module docstring."""

    model_id = "qwen3_vl_agile"
    model_type = "qwen3_vl"
    stock = Qwen3_VLChat
