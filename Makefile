# Two entry points (see README):  `make demo`  and  `make test`.
# Both create the virtual environment on first use. torch is pinned first so that pip takes the
# CPU wheel that lies on this machine's disk instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-output
DEMO_ARGS ?=
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo test bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/gptfluence demo --out $(DEMO_OUT) $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/collect.py
	$(BIN)/python benchmarks/simulators.py

clean-venv:
	rm -rf $(VENV)
