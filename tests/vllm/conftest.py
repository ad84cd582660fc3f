"""vLLM plugin tests: run in .venv-vllm (`make vllm-test`); not collected where vllm is missing."""
import importlib.util

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]
