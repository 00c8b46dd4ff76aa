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

.PHONY: setup demo test bench clean-venv evaluate-builtin

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

# The table behind benchmarks/results/evaluate_builtin.json: 32 runs of each built-in task
# (25 fit / 2 validate / 5 held out), default collection settings, every simulator.
BUILTIN_TASKS ?= sentiment entailment yesno data2text translation
BUILTIN_DIR ?= runs/builtin
evaluate-builtin: setup
	for t in $(BUILTIN_TASKS); do $(BIN)/gptfluence collect --quiet --task $$t --runs 32 --out $(BUILTIN_DIR)/$$t || exit 1; done
	$(BIN)/gptfluence evaluate $(addprefix $(BUILTIN_DIR)/,$(BUILTIN_TASKS)) --no-progress \
		--out benchmarks/results/evaluate_builtin.json --markdown benchmarks/results/evaluate_builtin.md
