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

.PHONY: setup demo test bench clean-venv evaluate-builtin evaluate-ablations evaluate-paper

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

# Loss only, on the stores evaluate-builtin collected: other splits (seeds 1, 2) and the ablations
# of GPTfluence's defaults (README, "Accuracy on the built-in tasks").
R := benchmarks/results
STORES = $(addprefix $(BUILTIN_DIR)/,$(BUILTIN_TASKS))
EVAL_LOSS = $(BIN)/gptfluence evaluate $(STORES) --metrics loss --no-progress --no-trajectories
evaluate-ablations: setup
	for s in 1 2; do $(EVAL_LOSS) --seed $$s --out $(R)/evaluate_builtin_seed$$s.json --markdown $(R)/evaluate_builtin_seed$$s.md || exit 1; done
	$(BIN)/python benchmarks/compare_splits.py $(R)/evaluate_builtin.json $(R)/evaluate_builtin_seed1.json $(R)/evaluate_builtin_seed2.json
	$(EVAL_LOSS) --methods gptfluence mean_curve --similarity none --out $(R)/evaluate_no_similarity.json --markdown $(R)/evaluate_no_similarity.md
	$(EVAL_LOSS) --methods gptfluence mean_curve --similarity-checkpoints 1 --no-similarity-norms --out $(R)/evaluate_base_model_gradients.json --markdown $(R)/evaluate_base_model_gradients.md
	$(EVAL_LOSS) --methods gptfluence mean_curve --no-similarity-norms --out $(R)/evaluate_no_similarity_norms.json --markdown $(R)/evaluate_no_similarity_norms.md
	$(EVAL_LOSS) --methods gptfluence mean_curve --similarity features --out $(R)/evaluate_feature_similarity.json --markdown $(R)/evaluate_feature_similarity.md
	$(EVAL_LOSS) --methods gptfluence mean_curve --similarity none --share-projection --out $(R)/evaluate_shared_projection.json --markdown $(R)/evaluate_shared_projection.md
	$(MAKE) evaluate-paper

# The authors' exact configurations (methods gptfluence_paper, simfluence_paper; see
# gptfluence.simulators.presets) beside the mean curve, loss only. Not in evaluate-builtin: at the
# paper's batch 128 and up to 300 epochs, gptfluence_paper costs ~16 CPU-s per epoch per task here
# (938 steps of 384-384-384 MLPs over the 300-example pool): up to 80 min per task (300 epochs) on one
# thread; --device auto uses a GPU when there is one.
evaluate-paper: setup
	$(EVAL_LOSS) --methods gptfluence_paper simfluence_paper mean_curve --device auto \
		--out $(R)/evaluate_paper_presets.json --markdown $(R)/evaluate_paper_presets.md
