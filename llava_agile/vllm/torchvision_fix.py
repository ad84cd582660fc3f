"""Lets PyPI's torchvision 0.28.0 import beside torch 2.13.0+cpu (.venv-vllm; README "Serving
with vLLM"). Installed by `make vllm-setup` as a top-level module plus a .pth line; no effect
where torchvision's compiled ops load (any CUDA machine, any CPU build of torchvision).

PyPI's Linux torchvision wheels are CUDA builds: their `_C.so` needs libtorch_cuda, so beside
the CPU torch it does not load. torchvision handles that (`extension._has_ops()` is False and
every op raises "Couldn't load custom C++ ops"), except that `_meta_registrations` registers
fake kernels for `torchvision::nms` / `qnms` unconditionally, which fails with "operator
torchvision::nms does not exist". vLLM imports torchvision through transformers' Pixtral image
processor even for LLaVA. This hook declares those two operator schemas (no kernels: calling
them still raises torchvision's own error) right after `torchvision.extension` finds no ops.
"""
import importlib.abc
import importlib.machinery
import sys

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib = None


def _declare(module):
    global _lib
    if module._has_ops():
        return
    import torch

    _lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _lib.define(schema)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchvision.extension":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _declare(module)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
