"""Shared test settings: one CPU thread, a bounded hypothesis profile."""
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile("default", deadline=None, max_examples=60, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


def _eval_samples():
    """LLaVA's real eval sample files: ../shared beside the checkout (as CI lays it out)."""
    from pathlib import Path

    for root in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")):
        if (root / "llava_eval_samples").is_dir():
            return root / "llava_eval_samples"
    raise RuntimeError("shared/llava_eval_samples not found beside the checkout")


EVAL_SAMPLES = _eval_samples()
