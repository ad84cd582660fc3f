"""Which transformers versions the LLaVA integration runs on, and the shims newer 4.x needs."""
from __future__ import annotations

import re

REFERENCE = "4.37.2"   # LLaVA 1.2.2.post1's pin; what CI tests
NEWEST = (4, 57)       # newest 4.x known to work with the shims below


def parse_version(text: str) -> tuple[int, int]:
    m = re.match(r"\s*(\d+)\.(\d+)", str(text))
    if not m:
        raise ValueError(f"cannot read a transformers version from {text!r}")
    return int(m.group(1)), int(m.group(2))


def transformers_version() -> str:
    import transformers
    return transformers.__version__


def check_transformers(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of transformers; raises RuntimeError for versions LLaVA cannot run on."""
    version = transformers_version() if version is None else version
    major, minor = parse_version(version)
    if major >= 5:
        raise RuntimeError(
            f"transformers {version} is not supported by llava_agile's LLaVA integration: "
            f"5.x drops the APIs LLaVA 1.2.x relies on. Install transformers=={REFERENCE} "
            f"(the reference) or any 4.37-4.{NEWEST[1]} release.")
    if (major, minor) < (4, 37):
        raise RuntimeError(
            f"transformers {version} is older than LLaVA 1.2.x supports; install "
            f"transformers=={REFERENCE}.")
    return major, minor


def needs_cache_position_shim(version: str | None = None) -> bool:
    """4.38+ passes `cache_position` to `forward`, which LLaVA's forward does not accept."""
    return check_transformers(version) >= (4, 38)


def drop_cache_position(inputs: dict) -> dict:
    inputs.pop("cache_position", None)
    return inputs


def shim_generation(model) -> None:
    """Make plain (un-pruned) LLaVA generate on transformers 4.38-4.57: an instance-level
    `prepare_inputs_for_generation` that drops `cache_position`. No-op on 4.37 or if present."""
    if not needs_cache_position_shim() or "prepare_inputs_for_generation" in model.__dict__:
        return
    orig = model.prepare_inputs_for_generation

    def prepare_inputs_for_generation(input_ids, past_key_values=None, inputs_embeds=None,
                                      **kwargs):
        return drop_cache_position(orig(input_ids, past_key_values=past_key_values,
                                        inputs_embeds=inputs_embeds, **kwargs))

    model.prepare_inputs_for_generation = prepare_inputs_for_generation
