"""What `--model llava_agile` and `--model llava_hf_agile` share: model_args checks, device
placement on the GLOBAL rank, the prefill / TokenCounts / `agile_stats` records, fail-fast and
the statistics files. Imported only by lmms-eval (through `llava_agile.lmms.manifests`).
"""
from __future__ import annotations

import argparse
import atexit
import inspect
import json
import os
import sys
import traceback
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from loguru import logger as eval_logger

from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, TokenCounts

from ..config import PruneConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PRUNING_KEYS = ("keep", "pruning_args", "erank_avg_file")


def _unquote(value):
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def pruning_config(pruning=None, keep=None, pruning_args=None, erank_avg_file=None):
    """The PruneConfig that the model_args ask for (None: no pruning); ValueError on bad input.

    `pruning_args` holds key=value pairs separated by ',' (quote the value: lmms-eval splits
    model_args on unquoted commas) or ';'."""
    if pruning is None:
        given = [k for k, v in zip(PRUNING_KEYS, (keep, pruning_args, erank_avg_file))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given without pruning=METHOD; add e.g. "
                             f"pruning=adaptive to --model_args")
        return None
    text = _unquote(pruning_args)
    if isinstance(text, str):
        text = text.replace(";", ",")
    elif text is not None:
        raise ValueError(f"pruning_args must be key=value pairs, e.g. "
                         f"pruning_args=\"erank_avg=90,tau_max=0.3\", got {pruning_args!r}")
    return PruneConfig.from_args(str(pruning), 64 if keep is None else keep, text,
                                 erank_avg_file=_unquote(erank_avg_file))


def _output_path():
    """lmms-eval's --output_path (results go to OUTPUT/<model>/...), or None."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path", default=None)
    return parser.parse_known_args(sys.argv[1:])[0].output_path


def generated_tokens(row, eos, pad) -> int:
    """Generated tokens before the first end-of-sequence (or padding) token."""
    n = 0
    for tok in row.tolist():
        if tok == eos or tok == pad:
            break
        n += 1
    return n



def _close_process_group():
    """lmms-eval never destroys the process group; left to interpreter shutdown, gloo's threads
    can abort a rank after the results are written ("terminate called without an active
    exception", exit -6)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class AgileLmms:
    """Mixin in front of an lmms-eval model class (`class X(AgileLmms, lmms_eval_class)`).

    Subclasses set `model_id`, implement `_loglikelihood` / `_generate_until`, call
    `_check_args` first and `_place` before loading, set `pruning`, `pretrained`,
    `agile_records = []`, `_prefill = None`, `stats_dir`, and hook `_record_prefill` on the LLM."""

    model_id = "?"

    def _check_args(self, unknown: dict, pruning, keep, pruning_args, erank_avg_file, dtype,
                    batch_size, device_map) -> PruneConfig | None:
        """Every model_arg checked before anything loads: one ValueError naming the fix."""
        name = self.model_id
        if unknown:
            accepted = [p for p in inspect.signature(type(self).__init__).parameters
                        if p not in ("self", "unknown", "max_batch_size")]
            raise ValueError(f"{name}: unknown --model_args {', '.join(sorted(unknown))}; "
                             f"accepted: {', '.join(accepted)}")
        try:
            cfg = pruning_config(pruning, keep, pruning_args, erank_avg_file)
        except ValueError as exc:
            raise ValueError(f"{name} --model_args: {exc}") from None
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"{name} --model_args: dtype must be one of {', '.join(DTYPES)}, "
                             f"got {dtype!r}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"{name}: --batch_size must be an integer >= 1 (1 recommended), "
                             f"got {batch_size!r}")
        if device_map not in (None, "auto"):
            raise ValueError(f"{name} --model_args: device_map must be 'auto' (one process, the "
                             f"model spread over every visible GPU) or left out, got "
                             f"{device_map!r}")
        return cfg

    def _place(self, device, device_map, dtype):
        """Accelerator (lmms-eval's 52-week process-group timeout), GLOBAL rank, device; returns
        the torch dtype to load in (None with device_map=auto: the loader decides)."""
        timeout = InitProcessGroupKwargs(timeout=timedelta(weeks=52))
        accelerator = Accelerator(kwargs_handlers=[timeout])
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if self._world_size > 1:   # the process group accelerate opened for us: close it at exit
            atexit.register(_close_process_group)
        if device_map == "auto" and self._world_size > 1:
            raise ValueError(f"{self.model_id}: device_map=auto spreads one model over all GPUs "
                             f"in one process; run it without torchrun / accelerate launch, or "
                             f"drop it")
        on_cpu = str(device).startswith("cpu") or not torch.cuda.is_available()
        if on_cpu:
            self._device = torch.device("cpu")
        elif self._world_size == 1 and device is not None and str(device).startswith("cuda:"):
            self._device = torch.device(device)  # one process: the GPU asked for
        else:  # one GPU per process of this node
            self._device = torch.device(f"cuda:{accelerator.local_process_index}")
        self.device_map = device_map or str(self._device)
        if device_map is None:
            return DTYPES[dtype or ("float32" if on_cpu else "float16")]
        return DTYPES.get(dtype)

    # ------------------------------------------------------------ measuring

    def _record_prefill(self, module, args, kwargs):
        """The first LLM call of a request (the prefill): tokens per sample, padding excluded."""
        embeds = kwargs.get("inputs_embeds")
        if self._prefill is not None or embeds is None:
            return
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            self._prefill = [int(n) for n in mask.sum(1).tolist()]
        else:
            self._prefill = [int(embeds.shape[1])] * embeds.shape[0]

    def _log_requests(self, reqs, counts, prefill, generated=None):
        """One record per request (not for lmms-eval's padding copies); returns TokenCounts."""
        stats = list(getattr(self.model, "agile_stats", None) or []) if self.pruning else []
        out, start = [], 0
        for i, req in enumerate(reqs):
            images = stats[start:start + counts[i]]
            start += counts[i]
            tc = TokenCounts(input_tokens=prefill[i] if prefill else None,
                             output_tokens=None if generated is None else generated[i])
            out.append(tc)
            if (req.metadata or {}).get("__padding_only__"):
                continue
            record = {
                "task": req.task_name, "doc_id": req.doc_id, "request": req.request_type,
                "images": counts[i], "prefill": tc.input_tokens, "output": tc.output_tokens,
                "kept": [s.get("kept") for s in images],
                "prune_ms": [round(float(s.get("prune_ms", 0.0)), 4) for s in images]}
            if any("question" in s for s in images):  # cdpruner / trim: what they were given
                record["questions"] = [s.get("question") for s in images]
            self.agile_records.append(record)
        return out

    def _fail(self, what):
        """Fail fast: log, then end this process (torchrun / accelerate then stop the others)."""
        message = (f"{self.model_id}: rank {self.rank}/{self.world_size}: {what} failed; ending "
                   f"the run (exit 1)\n{traceback.format_exc()}")
        eval_logger.error(message)
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    # ------------------------------------------------------------ requests

    def _scored(self, req, images: int, loss, max_equal) -> GenerationResult:
        """One loglikelihood answer with its TokenCounts; wrapped, because 0.7.3's
        `unwrap_generation_output` turns a bare (loss, greedy) tuple into a string."""
        (tc,) = self._log_requests([req], [images], self._prefill, [0])
        return GenerationResult(text=(float(loss), bool(max_equal)), token_counts=tc)

    def _ordered(self, requests):
        """lmms-eval's generation order (longest context first), each request kept last."""
        return utils.Collator([(*reg.args, reg) for reg in requests],
                              lambda x: (-len(self.tok_encode(x[0])), x[0]), grouping=True)

    @staticmethod
    def _generation_defaults(gen_kwargs: dict) -> dict:
        """The task's generation kwargs with lmms-eval's llava / llava_hf defaults; stop strings
        dropped (those wrappers do not apply them)."""
        gen_kwargs = dict(gen_kwargs)
        gen_kwargs.pop("until", None)
        for key, value in (("max_new_tokens", 1024), ("temperature", 0), ("top_p", None),
                           ("num_beams", 1)):
            gen_kwargs.setdefault(key, value)
        return gen_kwargs

    def loglikelihood(self, requests):
        try:
            return self._loglikelihood(requests)
        except Exception:
            self._fail("loglikelihood")

    def generate_until(self, requests):
        try:
            return self._generate_until(requests)
        except Exception:
            self._fail("generate_until")

    # ------------------------------------------------------------ statistics

    def agile_summary(self, records=None) -> dict:
        """Per task: requests, images, mean / min / max kept tokens per image, mean prefill."""
        records = self.agile_records if records is None else records
        tasks = {}
        for r in records:
            t = tasks.setdefault(r["task"], {"requests": 0, "images": 0, "kept": [], "prefill": [],
                                             "prune_ms": []})
            t["requests"] += 1
            t["images"] += r["images"]
            t["kept"] += [k for k in r["kept"] if k is not None]
            t["prune_ms"] += r["prune_ms"]
            if r["prefill"] is not None:
                t["prefill"].append(r["prefill"])
        out = {}
        for name, t in tasks.items():
            kept, pre, ms = t.pop("kept"), t.pop("prefill"), t.pop("prune_ms")
            out[name] = dict(t, kept_per_image_mean=sum(kept) / len(kept) if kept else None,
                             kept_per_image_min=min(kept, default=None),
                             kept_per_image_max=max(kept, default=None),
                             prefill_tokens_mean=sum(pre) / len(pre) if pre else None,
                             prune_ms_mean=sum(ms) / len(ms) if ms else None)
        return out

    def _write_stats(self):
        root = self.stats_dir or _output_path()
        records = self.agile_records
        gathered = [records]
        dist = torch.distributed
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, records)
        if root is None:
            return
        from lmms_eval.utils import sanitize_model_name

        folder = root if self.stats_dir else \
            os.path.join(root, sanitize_model_name(str(self.pretrained)))
        os.makedirs(folder, exist_ok=True)
        head = {"model": self.model_id, "pretrained": str(self.pretrained),
                "pruning": self.pruning.to_dict() if self.pruning else None,
                "world_size": self.world_size}
        with open(os.path.join(folder, f"agile_stats_rank{self.rank}.json"), "w") as f:
            json.dump(dict(head, rank=self.rank, summary=self.agile_summary(), samples=records), f,
                      indent=1)
        if self.rank == 0:
            every = [r for part in gathered for r in part]
            with open(os.path.join(folder, "agile_stats.json"), "w") as f:
                json.dump(dict(head, summary=self.agile_summary(every), samples=every), f, indent=1)

    def clean(self):
        """lmms-eval calls this on every rank once all requests ran: write the statistics."""
        try:
            self._write_stats()
        except Exception:
            self._fail("writing agile_stats")
        super().clean()
