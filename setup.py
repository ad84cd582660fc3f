"""Build llava_agile and its C++/CUDA extension `llava_agile._C` (docs/extension.md).

Install with `pip install -e . --no-build-isolation`: the extension must compile against the torch
already installed (an isolated build would fetch another torch). CUDA kernels are built when torch
is a CUDA build and nvcc is found (no GPU needed); LLAVA_AGILE_CUDA=0 forces a CPU-only build,
LLAVA_AGILE_CUDA=1 requires the CUDA kernels.
"""
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - message for an isolated or torch-less build
    sys.exit("llava_agile: building the extension needs the installed torch; install torch first and "
             "run `pip install -e . --no-build-isolation` (see docs/extension.md)")

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


setup(
    name="llava_agile",
    version="0.1.0",
    packages=find_packages(include=["llava_agile", "llava_agile.*"]),
    python_requires=">=3.10",
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
