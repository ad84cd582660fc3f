"""The paper's erank / entropy study as commands: `python -m llava_agile analyze | calibrate |
visualize | demo` (see docs/analysis.md). Everything is measured on a loaded LLaVA model through
its own code path with `llava_agile.enable`."""
from .commands import analyze, calibrate, visualize
from .measure import Measurer, load_model, make_configs

__all__ = ["analyze", "calibrate", "visualize", "Measurer", "load_model", "make_configs"]
