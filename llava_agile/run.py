"""Run one of LLaVA's unchanged eval modules with visual-token pruning.

    python -m llava_agile.run llava.eval.model_vqa_loader --pruning adaptive --keep 64 \\
        [--pruning-args key=value,...] [--erank-avg-file F] [the module's own arguments]

Our flags are stripped from the command line; the rest goes to the module, which runs as
`__main__` (LLaVA's eval modules read a module-global `args`). The model that the module loads
through `llava.model.builder.load_pretrained_model` gets `llava_agile.enable(model, config)`.
With no GPU visible, the model loads on the CPU in float32 and the module's own hard-coded
CUDA / float16 calls (`.cuda()`, `device='cuda'`, `.half()`, `torch.float16`) are redirected to
the CPU and float32 in the code that runs (the file on disk is not touched).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.machinery
import importlib.util
import inspect
import re
import runpy
import sys

from .cli_flags import add_pruning_args, config_or_exit

PROG = "python -m llava_agile.run"
MODULES = ("llava.eval.model_vqa_loader", "llava.eval.model_vqa_science",
           "llava.eval.model_vqa_mmbench", "llava.eval.model_vqa", "llava.eval.run_llava")
_CUDA = re.compile(r"cuda(:\d+)?")
_HALF = ("float16", "half", "bfloat16")


class RunnerError(Exception):
    """A problem worth one line on stderr and exit status 2."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, add_help=False,
        usage=f"{PROG} MODULE [--pruning METHOD --keep K --pruning-args K=V,... "
              f"--erank-avg-file F] [MODULE's own arguments]",
        description="Run a LLaVA eval module (e.g. " + ", ".join(MODULES) + ") with pruning.")
    return add_pruning_args(p)


# ---- CPU redirection of the module's own code ------------------------------------------------

class CudaToCpu(ast.NodeTransformer):
    """`.cuda(...)` -> `.cpu()`, `.half()` -> `.float()`, 'cuda'/'cuda:N' call arguments -> 'cpu',
    `torch.float16` / `torch.half` / `torch.bfloat16` -> `torch.float32`. Counts its rewrites."""

    def __init__(self):
        self.count = 0

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "cuda":
            func.attr, node.args, node.keywords = "cpu", [], []
            self.count += 1
        elif isinstance(func, ast.Attribute) and func.attr == "half" and not node.args:
            func.attr = "float"
            self.count += 1
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) \
                    and _CUDA.fullmatch(arg.value):
                arg.value = "cpu"
                self.count += 1
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.value, ast.Name) and node.value.id == "torch" and node.attr in _HALF:
            node.attr = "float32"
            self.count += 1
        return node


class _CpuLoader(importlib.machinery.SourceFileLoader):
    """Loads one module from its source with `CudaToCpu` applied (no bytecode cache use)."""

    def get_code(self, fullname):
        source = self.get_source(fullname)
        tree = ast.fix_missing_locations(CudaToCpu().visit(ast.parse(source, self.path)))
        return compile(tree, self.path, "exec", dont_inherit=True)


class _OneModuleFinder:
    def __init__(self, name: str, origin: str):
        self.name, self.origin = name, origin

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.origin, loader=_CpuLoader(fullname, self.origin))


@contextlib.contextmanager
def cpu_code(name: str, origin: str):
    finder = _OneModuleFinder(name, origin)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


# ---- the model loader --------------------------------------------------------------------------

def _wrap_loader(original, config, on_cpu: bool):
    from .llava.loader import install_identity_pre_layrnorm_hook
    from .patch_hooks import finish_model, is_fastervlm

    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_pretrained_model(*args, **kwargs):
        if on_cpu:
            bound = signature.bind(*args, **kwargs)
            bound.arguments["device"] = bound.arguments["device_map"] = "cpu"
            args, kwargs = bound.args, bound.kwargs
        install_identity_pre_layrnorm_hook()  # DINOv2 conversions: identity pre_layrnorm
        tokenizer, model, image_processor, context_len = original(*args, **kwargs)
        if config is not None and is_fastervlm(model):
            raise RunnerError("this is FasterVLM's LLaVA fork: patch it with patches/apply.sh "
                              "and use its own --pruning flag instead of the runner")
        try:
            model = finish_model(model, config, float32=on_cpu)
        except ValueError as exc:
            raise RunnerError(str(exc)) from exc
        return tokenizer, model, image_processor, context_len

    return load_pretrained_model


@contextlib.contextmanager
def pruned_loader(config, on_cpu: bool):
    """Replace `llava.model.builder.load_pretrained_model` (and the copies already imported
    into loaded `llava.*` modules) for the duration of the run."""
    import llava.model.builder as builder

    original = builder.load_pretrained_model
    wrapped = _wrap_loader(original, config, on_cpu)
    holders = [m for name, m in list(sys.modules.items()) if (name == "llava" or
               name.startswith("llava.")) and getattr(m, "load_pretrained_model", None) is original]
    for module in holders:
        module.load_pretrained_model = wrapped
    try:
        yield
    finally:
        for module in holders:
            module.load_pretrained_model = original


# ---- main ----------------------------------------------------------------------------------------

def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser().print_help()
        return 0 if argv else 2
    module, rest = argv[0], argv[1:]
    if module.startswith("-"):
        return _fail(f"the first argument must be the module to run (e.g. {MODULES[0]}), "
                     f"got {module!r}")
    ours, theirs = parser().parse_known_args(rest)
    config = config_or_exit(ours, PROG)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        return _fail(f"cannot find module {module!r}: {exc}")
    if spec is None or not spec.has_location or not spec.origin.endswith(".py"):
        return _fail(f"cannot find module {module!r} as a Python source file")

    import torch

    on_cpu = not torch.cuda.is_available()
    sys.modules.pop(module, None)    # runpy must execute a fresh copy as __main__
    saved_argv = sys.argv
    sys.argv = [spec.origin, *theirs]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(pruned_loader(config, on_cpu))
            if on_cpu:
                stack.enter_context(cpu_code(module, spec.origin))
                print(f"{PROG}: no GPU visible: running {module} on the CPU in float32",
                      file=sys.stderr)
            if config is not None:
                print(f"{PROG}: pruning {config.method}, keep {config.keep}"
                      f"{', ' + str(config.params) if config.params else ''}", file=sys.stderr)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except RunnerError as exc:
        return _fail(str(exc))
    finally:
        sys.argv = saved_argv
    return 0


if __name__ == "__main__":
    sys.exit(main())
