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

.PHONY: setup setup-peers demo test bench clean-venv evaluate-builtin evaluate-ablations evaluate-paper evaluate-paper-simfluence lds-builtin lds-splits lds-objective-metrics lds-kfac lds-kfac-generation lds-lexical lds-ensemble lds-a-factors lds-b-projection lds-b-lags lds-b-lags6 lds-b-lags24 lds-draw2 lds-draw3 unseen-b-lags verify-builtin applications-builtin

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test,peers]'
	$(BIN)/pip install -q --no-deps $(KRONFLUENCE_PIN)
	touch $@

# Peer attribution libraries (README, "Peer libraries"); make setup already installs them. kronfluence
# goes in with --no-deps: its metadata requires torchvision, whose install would replace this torch.
KRONFLUENCE_PIN ?= kronfluence==1.0.1
setup-peers: setup
	$(BIN)/pip install -q -e '.[peers]'
	$(BIN)/pip install -q --no-deps $(KRONFLUENCE_PIN)

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
# of GPTfluence's defaults (README, "Accuracy on the built-in tasks"); evaluate_builtin_raw_gradients.*: every metric.
R := benchmarks/results
# GPTfluence's settings before the lexical term, rank-1 projections and the bagged ensemble (the
# defaults since then: lexical term, 32 dimensions, 3 members): the targets below that re-make results
# measured under earlier defaults pin them. ONE: one model, not an ensemble (the default until --ensemble 3),
# with the paper's per-pair A factors (the default until --a-factors pool_mean).
ONE = --ensemble 1 --a-factors pair --b-projection pair
PROJ32 = --proj-dim 32 --no-lexical $(ONE)
STORES = $(addprefix $(BUILTIN_DIR)/,$(BUILTIN_TASKS))
EVAL_LOSS = $(BIN)/gptfluence evaluate $(STORES) --metrics loss --no-progress --no-trajectories
# Earlier defaults of GPTfluence on every metric (GPTfluence only: --objective would apply to Simfluence too):
# the two-phase objective everywhere (the default before objective=auto), also with raw gradients only.
EVAL_EARLIER = $(BIN)/gptfluence evaluate $(STORES) --methods gptfluence mean_curve --no-progress --no-trajectories \
	--objective teacher_forcing_then_rollout $(PROJ32)
evaluate-ablations: setup
	for s in 1 2; do $(EVAL_LOSS) --seed $$s --out $(R)/evaluate_builtin_seed$$s.json --markdown $(R)/evaluate_builtin_seed$$s.md || exit 1; done
	$(BIN)/python benchmarks/compare_splits.py $(R)/evaluate_builtin.json $(R)/evaluate_builtin_seed1.json $(R)/evaluate_builtin_seed2.json
	$(EVAL_EARLIER) --similarity-preconditioner none \
		--out $(R)/evaluate_builtin_raw_gradients.json --markdown $(R)/evaluate_builtin_raw_gradients.md
	$(EVAL_EARLIER) --out $(R)/evaluate_builtin_two_phase.json --markdown $(R)/evaluate_builtin_two_phase.md
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
# One task at a time: make evaluate-paper BUILTIN_TASKS=sentiment PAPER_OUT=evaluate_paper_presets_sentiment
PAPER_OUT ?= evaluate_paper_presets
evaluate-paper: setup
	$(EVAL_LOSS) --methods gptfluence_paper simfluence_paper mean_curve --device auto \
		--out $(R)/$(PAPER_OUT).json --markdown $(R)/$(PAPER_OUT).md

# simfluence_paper alone costs ~5 CPU-min per (task, metric): every built-in task and metric beside
# the mean curve (benchmarks/results/evaluate_simfluence_paper_builtin.*).
evaluate-paper-simfluence: setup
	$(BIN)/gptfluence evaluate $(STORES) --methods simfluence_paper mean_curve --no-progress --no-trajectories \
		--device auto --out $(R)/evaluate_simfluence_paper_builtin.json --markdown $(R)/evaluate_simfluence_paper_builtin.md

# LDS on the built-in tasks (benchmarks/results/lds_builtin.{json,md}; README, "Checking attribution"):
# the 32-run fit stores of evaluate-builtin, and per task LDS_N held-out curricula per design (both,
# membership, order) collected with --record-steps ends (metrics at steps 0 and T only).
# Smaller: make lds-builtin BUILTIN_TASKS=data2text LDS_FIT_RUNS=16 BUILTIN_DIR=runs/lds16 LDS_OUT=lds_data2text_16fit (one task)
# Another draw of the task data (benchmarks/results/lds_draw1.*, loss only): make lds-builtin
#   BUILTIN_TASKS="sentiment yesno data2text translation" BUILTIN_DIR=runs/draw1 LDS_DIR=runs/draw1
#   LDS_OUT=lds_draw1 LDS_COLLECT_ARGS="--task-seed 1 --gen-every 0"; lds_draw1_teacher_forcing.*: the
#   same stores, `gptfluence lds FIT HELDOUT --methods gptfluence --no-references --objective
#   teacher_forcing` per task, merged with benchmarks/merge_lds.py; lds_draw1_no_lexical.*: the default before the
#   TF-IDF term, the same command with `gptfluence lds ... --no-lexical --ensemble 1 --a-factors pair` (lds_builtin_no_lexical.*: likewise)
LDS_COLLECT_ARGS ?=
LDS_N ?= 48
LDS_FIT_RUNS ?= 32
LDS_DIR ?= runs/lds-builtin
LDS_OUT ?= lds_builtin
lds-builtin: setup
	for t in $(BUILTIN_TASKS); do \
		$(BIN)/gptfluence collect --quiet --task $$t $(LDS_COLLECT_ARGS) --runs $(LDS_FIT_RUNS) --out $(BUILTIN_DIR)/$$t || exit 1; \
		$(BIN)/gptfluence curricula --dynamics $(BUILTIN_DIR)/$$t --design both membership order --n $(LDS_N) \
			--out $(LDS_DIR)/$$t-heldout.jsonl || exit 1; \
		$(BIN)/gptfluence collect --quiet --config $(BUILTIN_DIR)/$$t/collect_config.json \
			--curriculum-file $(LDS_DIR)/$$t-heldout.jsonl --record-steps ends --out $(LDS_DIR)/$$t-heldout || exit 1; \
		$(BIN)/gptfluence lds $(BUILTIN_DIR)/$$t $(LDS_DIR)/$$t-heldout --no-progress --out $(LDS_DIR)/$$t-lds.json || exit 1; \
	done
	$(BIN)/python benchmarks/merge_lds.py $(foreach t,$(BUILTIN_TASKS),$(LDS_DIR)/$(t)-lds.json) \
		--out $(R)/$(LDS_OUT).json --markdown $(R)/$(LDS_OUT).md

# GPTfluence's loss LDS per validation split (seeds 0, 1, 2): fitting objectives with raw gradient
# features (the default objective, teacher forcing only, rollout phase always kept) and today's
# default (raw_and_kfac = none+kfac), on the stores of lds-builtin (benchmarks/results/lds_splits.*;
# README "What raised LDS (1)"). Sentiment's held-out store is in runs/lds-builtin, the others' in
# runs/lds-builtin-full (see lds_builtin.json's configs).
LDS_JOBS ?= 2
LDS_SPLITS = $(BIN)/python benchmarks/lds_splits.py --builtin-dir $(BUILTIN_DIR) --lds-dir '*=runs/lds-builtin-full' \
	--lds-dir sentiment=runs/lds-builtin --work runs/lds-splits --jobs $(LDS_JOBS)
# the same on the second task-data draw (runs/draw1: four tasks, loss only)
LDS_SPLITS_DRAW1 = $(BIN)/python benchmarks/lds_splits.py --builtin-dir runs/draw1 --lds-dir '*=runs/draw1' \
	--work runs/lds-splits-draw1 --jobs $(LDS_JOBS) --tasks sentiment yesno data2text translation
# $(call lds_compare,NAME,BEFORE,AFTER,FEATURES_BEFORE,FEATURES_AFTER): a default change measured three ways,
# $(R)/NAME_splits.* (BEFORE vs AFTER, split seeds 0-8 on the lds-builtin stores), NAME_draw1.* (seeds 0-2 on
# the second draw) and NAME_features.* (the no-model variants, seeds 0-2)
define lds_compare
	$(LDS_SPLITS) --seeds 0 1 2 3 4 5 6 7 8 --variants $(2) $(3) \
		--out $(R)/$(1)_splits.json --markdown $(R)/$(1)_splits.md
	$(LDS_SPLITS_DRAW1) --seeds 0 1 2 --variants $(2) $(3) \
		--out $(R)/$(1)_draw1.json --markdown $(R)/$(1)_draw1.md
	$(LDS_SPLITS) --variants $(4) $(5) \
		--out $(R)/$(1)_features.json --markdown $(R)/$(1)_features.md
endef
lds-splits: setup
	$(LDS_SPLITS) \
		--variants raw_gradients teacher_forcing rollout_phase_keep_best_epoch raw_and_kfac \
		--out $(R)/lds_splits.json --markdown $(R)/lds_splits.md

# GPTfluence's objective="auto" (rollout for BLEU, ROUGE-L and accuracy): against the two-phase objective
# on those metrics, seeds 0, 1, 2 (benchmarks/results/lds_objective_metrics.*; README "What raised LDS (4)"),
# and the two-phase objective that always keeps its rollout phase (seed 0; lds_objective_keep_best_epoch.*)
lds-objective-metrics: setup
	$(LDS_SPLITS) --metrics bleu rougeL accuracy --variants raw_and_kfac raw_and_kfac_rollout4 \
		--out $(R)/lds_objective_metrics.json --markdown $(R)/lds_objective_metrics.md
	$(LDS_SPLITS) --metrics bleu rougeL accuracy --seeds 0 \
		--variants raw_and_kfac raw_and_kfac_rollout4 raw_and_kfac_keep_best_epoch \
		--out $(R)/lds_objective_keep_best_epoch.json --markdown $(R)/lds_objective_keep_best_epoch.md

# The bagged ensemble (--ensemble 3, the default since this version; README "What raised LDS (6)"): loss
# LDS of one model (raw_and_kfac_lexical: the default before) and of the ensemble over validation
# split seeds 0-8 on the lds-builtin stores (lds_ensemble_splits.*; a model's LDS depends on which runs
# validate it, so both are averaged over nine splits) and seeds 0-2 on the second task-data draw
# (lds_ensemble_draw1.*); without a model (--similarity features, as imported GPTDynamics), split seeds
# 0-2 (lds_ensemble_features.*). The default before on every method and metric: lds_builtin_single.* and
# evaluate_builtin_single.* (the commands of lds-builtin / evaluate-builtin with --ensemble 1 --a-factors pair).
lds-ensemble: setup
	$(call lds_compare,lds_ensemble,raw_and_kfac_lexical,raw_and_kfac_lexical_ensemble3,features_lexical,features_lexical_ensemble3)

# Pool-mean A factors (--a-factors pool_mean, the default since this version; README "What raised LDS (7)"):
# loss LDS of the ensemble with the paper's per-pair A (the default before) and with pool-mean A over
# validation split seeds 0-8 on the lds-builtin stores (lds_a_factors_splits.*), seeds 0-2 on the second
# task-data draw (lds_a_factors_draw1.*) and without a model (--similarity features; lds_a_factors_features.*).
# The default before on every method and metric: lds_builtin_a_pair.*, evaluate_builtin_a_pair.*,
# lds_draw1_a_pair.*, verify_builtin{,_pool,_by_label}_a_pair.json (lds-builtin / evaluate-builtin /
# verify-builtin at commit 07f07ef; gptfluence lds / evaluate take --a-factors pair --b-projection pair for the
# same rows).
lds-a-factors: setup
	$(call lds_compare,lds_a_factors,raw_and_kfac_lexical_ensemble3,raw_and_kfac_lexical_ensemble3_pool_mean,features_lexical_ensemble3,features_lexical_ensemble3_pool_mean)

# Pool-mean B projection (--b-projection pool_mean; the default 'auto' uses it when the similarity terms are
# gradients; README "What raised LDS (8)"): loss LDS of the ensemble with pool-mean A, per-pair vs pool-mean B
# projection, split seeds 0-8 (lds_b_projection_splits.*), the second draw (lds_b_projection_draw1.*) and
# without a model (lds_b_projection_features.*: there 'auto' keeps pair). The default before on every method
# and metric: lds_builtin_b_pair.*, evaluate_builtin_b_pair.*, lds_draw1_b_pair.*,
# verify_builtin{,_pool,_by_label}_b_pair.json (lds-builtin / evaluate-builtin / verify-builtin at commit
# 6649eeb; gptfluence lds / evaluate take --b-projection pair for the same rows).
lds-b-projection: setup
	$(call lds_compare,lds_b_projection,raw_and_kfac_lexical_ensemble3_pool_mean,raw_and_kfac_lexical_ensemble3_pool_mean_b,features_lexical_ensemble3_pool_mean,features_lexical_ensemble3_pool_mean_b)

# Lagged additive factors (--b-lags 3, the default since this version; README "What raised LDS (9)"): whether
# recent similar examples help or hurt (lds_similarity_recency.json); loss LDS of the ensemble with pool-mean A
# and B projection without and with D_1..D_3, split seeds 0-8 (lds_b_lags_splits.*), the second draw (lds_b_lags_draw1.*) and without a model (lds_b_lags_features.*);
# other lag counts on split seed 0 (lds_b_lags_count.*; 6 against 3: lds-b-lags6). The default before on every method and metric:
# lds_builtin_b_lags0.*, evaluate_builtin_b_lags0.*, lds_draw1_b_lags0.* (gptfluence lds / evaluate take
# --b-lags 0 for the same rows).
lds-b-lags: setup
	$(BIN)/python benchmarks/lds_similarity_recency.py runs/lds-builtin-full/data2text-heldout runs/draw1/data2text-heldout \
		runs/lds-builtin-full/translation-heldout runs/draw1/translation-heldout --out $(R)/lds_similarity_recency.json
	$(call lds_compare,lds_b_lags,raw_and_kfac_lexical_ensemble3_pool_mean_b,raw_and_kfac_lexical_ensemble3_pool_mean_b_lags3,features_lexical_ensemble3_pool_mean,features_lexical_ensemble3_pool_mean_lags3)
	$(LDS_SPLITS) --seeds 0 --variants raw_and_kfac_lexical_ensemble3_pool_mean_b \
		raw_and_kfac_lexical_ensemble3_pool_mean_b_lags1 raw_and_kfac_lexical_ensemble3_pool_mean_b_lags3 \
		raw_and_kfac_lexical_ensemble3_pool_mean_b_lags6 --out $(R)/lds_b_lags_count.json --markdown $(R)/lds_b_lags_count.md

# Six lagged additive factors (--b-lags 6, the default of the version before 24; README "What raised LDS (11)"): loss
# LDS of the ensemble with 3 and with 6 lags, split seeds 0-2 (lds_b_lags6_splits.*), the second draw
# (lds_b_lags6_draw1.*) and without a model (lds_b_lags6_features.*); BLEU, ROUGE-L and accuracy with each metric's
# default objective, split seeds 0-2 (lds_b_lags6_metrics.*); 3, 6 and 12 lags on split seed 0
# (lds_b_lags12.*) and 12 lags alone on split seeds 1, 2 (lds_b_lags12_splits.*; 6 lags there: lds_b_lags6_splits).
# The default before on every method
# and metric: lds_builtin_b_lags3.*, evaluate_builtin_b_lags3.* (gptfluence lds / evaluate take --b-lags 3
# for the same rows).
LAGS3 = raw_and_kfac_lexical_ensemble3_pool_mean_b_lags3
LAGS6 = raw_and_kfac_lexical_ensemble3_pool_mean_b_lags6
lds-b-lags6: setup
	$(LDS_SPLITS) --seeds 0 1 2 --variants $(LAGS3) $(LAGS6) \
		--out $(R)/lds_b_lags6_splits.json --markdown $(R)/lds_b_lags6_splits.md
	$(LDS_SPLITS_DRAW1) --seeds 0 1 2 --variants $(LAGS3) $(LAGS6) \
		--out $(R)/lds_b_lags6_draw1.json --markdown $(R)/lds_b_lags6_draw1.md
	$(LDS_SPLITS) --variants features_lexical_ensemble3_pool_mean_lags3 features_lexical_ensemble3_pool_mean_lags6 \
		--out $(R)/lds_b_lags6_features.json --markdown $(R)/lds_b_lags6_features.md
	$(LDS_SPLITS) --metrics bleu rougeL accuracy --variants ensemble3_pool_mean_b_lags3_auto ensemble3_pool_mean_b_lags6_auto \
		--out $(R)/lds_b_lags6_metrics.json --markdown $(R)/lds_b_lags6_metrics.md
	$(LDS_SPLITS) --seeds 0 --variants $(LAGS3) $(LAGS6) raw_and_kfac_lexical_ensemble3_pool_mean_b_lags12 \
		--out $(R)/lds_b_lags12.json --markdown $(R)/lds_b_lags12.md
	$(LDS_SPLITS) --seeds 1 2 --variants raw_and_kfac_lexical_ensemble3_pool_mean_b_lags12 \
		--out $(R)/lds_b_lags12_splits.json --markdown $(R)/lds_b_lags12_splits.md

# Longer lags (README "What raised LDS (12)"): loss LDS of the ensemble with 6, 12, 24 and 48 lagged additive factors on
# split seed 0 (lds_b_lags_long.*); BLEU, ROUGE-L and accuracy with each metric's default objective, 6 / 12 / 24 lags,
# split seed 0 (lds_b_lags24_metrics.*); 6 against 24 on the second draw, split seeds 0-2 (lds_b_lags24_draw1.*),
# without a model, split seed 0 (lds_b_lags24_features.*) and on split seeds 1, 2 (lds_b_lags24_splits.*)
LAGS12 = raw_and_kfac_lexical_ensemble3_pool_mean_b_lags12
LAGS24 = raw_and_kfac_lexical_ensemble3_pool_mean_b_lags24
lds-b-lags24: setup
	$(LDS_SPLITS) --seeds 0 --variants $(LAGS6) $(LAGS12) $(LAGS24) raw_and_kfac_lexical_ensemble3_pool_mean_b_lags48 \
		--out $(R)/lds_b_lags_long.json --markdown $(R)/lds_b_lags_long.md
	$(LDS_SPLITS) --seeds 0 --metrics bleu rougeL accuracy \
		--variants ensemble3_pool_mean_b_lags6_auto ensemble3_pool_mean_b_lags12_auto ensemble3_pool_mean_b_lags24_auto \
		--out $(R)/lds_b_lags24_metrics.json --markdown $(R)/lds_b_lags24_metrics.md
	$(LDS_SPLITS_DRAW1) --seeds 0 1 2 --variants $(LAGS6) $(LAGS24) \
		--out $(R)/lds_b_lags24_draw1.json --markdown $(R)/lds_b_lags24_draw1.md
	$(LDS_SPLITS) --seeds 0 --variants features_lexical_ensemble3_pool_mean_lags6 features_lexical_ensemble3_pool_mean_lags24 \
		--out $(R)/lds_b_lags24_features.json --markdown $(R)/lds_b_lags24_features.md
	$(LDS_SPLITS) --seeds 1 2 --variants $(LAGS6) $(LAGS24) \
		--out $(R)/lds_b_lags24_splits.json --markdown $(R)/lds_b_lags24_splits.md

# Task kinds and settings never used to choose a default (runs/draw2: the mixed task, sentiment with batch 4 and
# a decaying learning rate, translation on a larger model; loss only): every method at today's defaults
# (lds_draw2.*), GPTfluence before lagged factors and learning-rate scaling (lds_draw2_previous.*), with 3 and 6
# lagged factors (lds_draw2_b_lags3.*, lds_draw2_b_lags6.*) and without learning-rate scaling
# (lds_draw2_no_lr_scaling.*); see benchmarks/lds_draw2.sh
lds-draw2: setup
	BIN=$(BIN) benchmarks/lds_draw2.sh

# How lagged factors scale with a decaying learning rate (--b-lags-lr-scaling): a new entailment store
# trained under warmup and linear decay (runs/draw3; every method at the defaults -> lds_draw3.*, GPTfluence
# with the other scaling -> lds_draw3_b_lags_lr_batch.*, and on draw 2's decaying-rate sentiment store ->
# lds_draw2_b_lags_lr_batch.*; run lds-draw2 first), then both scalings over split seeds 0-2 on both stores
# (lds_b_lags_lr_draw3.*, lds_b_lags_lr_draw2.*). README "What raised LDS (13)".
# held-out trajectory MSE on both decaying-rate stores, both scalings, split seeds 0-2 (evaluate_decay*)
EVAL_DECAY = $(BIN)/gptfluence evaluate runs/draw3/entailment-decay runs/draw2/sentiment-b4 --methods gptfluence mean_curve \
	--metrics loss --no-progress --no-trajectories
# ... and 6 / 12 / 24 lags with batch_and_step, split seed 0 (lds_b_lags_lr_count_draw3.*, _draw2.*)
LR_STEP_COUNTS := ensemble3_pool_mean_b_lags6_auto_lr_step ensemble3_pool_mean_b_lags12_auto_lr_step \
	ensemble3_pool_mean_b_lags24_auto_lr_step
LR_STEP_VARIANTS := ensemble3_pool_mean_b_lags24_auto ensemble3_pool_mean_b_lags24_auto_lr_step
lds-draw3: setup
	BIN=$(BIN) benchmarks/lds_draw3.sh
	$(BIN)/python benchmarks/lds_splits.py --tasks entailment-decay --builtin-dir runs/draw3 --lds-dir '*=runs/draw3' \
		--seeds 0 1 2 --variants $(LR_STEP_VARIANTS) --jobs 2 --work runs/lds-splits-decay \
		--out $(R)/lds_b_lags_lr_draw3.json --markdown $(R)/lds_b_lags_lr_draw3.md
	$(BIN)/python benchmarks/lds_splits.py --tasks sentiment-b4 --builtin-dir runs/draw2 --lds-dir '*=runs/draw2' \
		--seeds 0 1 2 --variants $(LR_STEP_VARIANTS) --jobs 2 --work runs/lds-splits-decay \
		--out $(R)/lds_b_lags_lr_draw2.json --markdown $(R)/lds_b_lags_lr_draw2.md
	for d in draw3:entailment-decay draw2:sentiment-b4; do $(BIN)/python benchmarks/lds_splits.py --tasks $${d#*:} \
		--builtin-dir runs/$${d%%:*} --lds-dir "*=runs/$${d%%:*}" --seeds 0 --variants $(LR_STEP_COUNTS) --jobs 2 \
		--work runs/lds-splits-decay --out $(R)/lds_b_lags_lr_count_$${d%%:*}.json \
		--markdown $(R)/lds_b_lags_lr_count_$${d%%:*}.md || exit 1; done
	for s in 0 1 2; do sfx=$$( [ $$s = 0 ] || echo _seed$$s ); \
		$(EVAL_DECAY) --seed $$s --out $(R)/evaluate_decay$$sfx.json --markdown $(R)/evaluate_decay$$sfx.md || exit 1; \
		$(EVAL_DECAY) --seed $$s --b-lags-lr-scaling batch --out $(R)/evaluate_decay_b_lags_lr_batch$$sfx.json \
			--markdown $(R)/evaluate_decay_b_lags_lr_batch$$sfx.md || exit 1; done

# K-FAC-whitened gradient features (split seed 0; benchmarks/results/lds_kfac.*; README "What raised LDS")
lds-kfac: setup
	$(LDS_SPLITS) --seeds 0 \
		--variants raw_gradients teacher_forcing rollout kfac kfac_rollout raw_and_kfac raw_and_kfac_rollout \
		--out $(R)/lds_kfac.json --markdown $(R)/lds_kfac.md
	$(LDS_SPLITS) --seeds 1 2 \
		--variants raw_gradients teacher_forcing kfac_rollout raw_and_kfac --out $(R)/lds_kfac_splits.json --markdown $(R)/lds_kfac_splits.md
	$(LDS_SPLITS) --seeds 0 \
		--variants raw_gradients raw_and_kfac raw_and_kfac_8checkpoints \
		--out $(R)/lds_kfac_8checkpoints.json --markdown $(R)/lds_kfac_8checkpoints.md
	$(LDS_SPLITS) --seeds 0 \
		--variants raw_gradients raw_and_kfac raw_and_kfac_damping1 \
		--out $(R)/lds_kfac_damping.json --markdown $(R)/lds_kfac_damping.md

# The lexical (word TF-IDF) similarity term, the default since this version, and rank-1 / 8-dimensional
# projections beside it (README "What raised LDS (5)"): loss LDS of the previous default (raw_and_kfac),
# the lexical term (raw_and_kfac_lexical = today's default), with proj_dim 1 or 8, proj_dim 1 alone, and
# what a store without a model gets (features), split seeds 0-2 on the lds-builtin stores
# (lds_lexical_splits.*) and split seed 0 on the second task-data draw (lds_lexical_draw1.*); every
# method and metric with --proj-dim 1 (lds_builtin_lexical_proj1.*, evaluate_builtin_lexical_proj1.*;
# the stores of lds-builtin as there); held-out MSE of the lexical term alone at 32 dimensions
# (evaluate_lexical_only.*: GPTfluence's rows of evaluate_builtin) and of proj_dim 1 alone
# (evaluate_proj1_only.*). The default before: lds_builtin_no_lexical.*, evaluate_builtin_no_lexical.*.
LEXICAL_VARIANTS = raw_and_kfac raw_and_kfac_lexical raw_and_kfac_lexical_proj1 raw_and_kfac_lexical_proj8 \
	raw_and_kfac_proj1 features features_lexical features_lexical_proj1
lds-lexical: setup
	$(LDS_SPLITS) --variants $(LEXICAL_VARIANTS) --out $(R)/lds_lexical_splits.json --markdown $(R)/lds_lexical_splits.md
	$(LDS_SPLITS_DRAW1) --seeds 0 --variants $(LEXICAL_VARIANTS) \
		--out $(R)/lds_lexical_draw1.json --markdown $(R)/lds_lexical_draw1.md
	for t in $(BUILTIN_TASKS); do d=runs/lds-builtin-full; if [ $$t = sentiment ]; then d=runs/lds-builtin; fi; \
		$(BIN)/gptfluence lds $(BUILTIN_DIR)/$$t $$d/$$t-heldout --no-progress --proj-dim 1 $(ONE) --out $$d/$$t-lds-proj1.json || exit 1; \
	done
	$(BIN)/python benchmarks/merge_lds.py runs/lds-builtin/sentiment-lds-proj1.json \
		$(foreach t,entailment yesno data2text translation,runs/lds-builtin-full/$(t)-lds-proj1.json) \
		--out $(R)/lds_builtin_lexical_proj1.json --markdown $(R)/lds_builtin_lexical_proj1.md
	$(BIN)/gptfluence evaluate $(STORES) --no-progress --proj-dim 1 $(ONE) \
		--out $(R)/evaluate_builtin_lexical_proj1.json --markdown $(R)/evaluate_builtin_lexical_proj1.md
	$(BIN)/gptfluence evaluate $(STORES) --methods gptfluence mean_curve --no-progress --no-trajectories \
		--lexical --proj-dim 32 $(ONE) --out $(R)/evaluate_lexical_only.json --markdown $(R)/evaluate_lexical_only.md
	$(BIN)/gptfluence evaluate $(STORES) --methods gptfluence mean_curve --no-progress --no-trajectories \
		--no-lexical --proj-dim 1 $(ONE) --out $(R)/evaluate_proj1_only.json --markdown $(R)/evaluate_proj1_only.md

# K-FAC features on the generation tasks, every metric, with references (lds_kfac_generation.*: default
# objective; lds_kfac_rollout_generation.*: rollout only), and rollout only on the second task-data
# draw of lds_draw1 (lds_kfac_rollout_draw1.*; the draw1 stores as in the lds-builtin comment above).
KFAC = --similarity-preconditioner kfac $(PROJ32)
lds-kfac-generation: setup
	mkdir -p runs/lds-kfac-gen runs/lds-kfac-draw1
	for t in data2text translation; do \
		$(BIN)/gptfluence lds $(BUILTIN_DIR)/$$t runs/lds-builtin-full/$$t-heldout --methods gptfluence --no-progress $(KFAC) \
			--objective teacher_forcing_then_rollout --out runs/lds-kfac-gen/$$t-kfac.json || exit 1; \
		$(BIN)/gptfluence lds $(BUILTIN_DIR)/$$t runs/lds-builtin-full/$$t-heldout --methods gptfluence --no-progress $(KFAC) \
			--objective rollout --rollout-runs 8 --out runs/lds-kfac-gen/$$t-kfac_rollout.json || exit 1; \
	done
	$(BIN)/python benchmarks/merge_lds.py runs/lds-kfac-gen/data2text-kfac.json runs/lds-kfac-gen/translation-kfac.json \
		--out $(R)/lds_kfac_generation.json --markdown $(R)/lds_kfac_generation.md
	$(BIN)/python benchmarks/merge_lds.py runs/lds-kfac-gen/data2text-kfac_rollout.json runs/lds-kfac-gen/translation-kfac_rollout.json \
		--out $(R)/lds_kfac_rollout_generation.json --markdown $(R)/lds_kfac_rollout_generation.md
	for t in data2text translation sentiment yesno; do \
		$(BIN)/gptfluence lds runs/draw1/$$t runs/draw1/$$t-heldout --methods gptfluence --metrics loss --no-progress $(KFAC) \
			--objective rollout --rollout-runs 8 --out runs/lds-kfac-draw1/$$t.json || exit 1; \
	done
	$(BIN)/python benchmarks/merge_lds.py $(foreach t,data2text translation sentiment yesno,runs/lds-kfac-draw1/$(t).json) \
		--out $(R)/lds_kfac_rollout_draw1.json --markdown $(R)/lds_kfac_rollout_draw1.md
	mkdir -p runs/lds-rawkfac-draw1
	for t in data2text translation sentiment yesno; do \
		$(BIN)/gptfluence lds runs/draw1/$$t runs/draw1/$$t-heldout --methods gptfluence --metrics loss --no-progress \
			--similarity-preconditioner none+kfac $(PROJ32) --out runs/lds-rawkfac-draw1/$$t.json || exit 1; \
	done
	$(BIN)/python benchmarks/merge_lds.py $(foreach t,data2text translation sentiment yesno,runs/lds-rawkfac-draw1/$(t).json) \
		--out $(R)/lds_raw_and_kfac_draw1.json --markdown $(R)/lds_raw_and_kfac_draw1.md
	$(BIN)/gptfluence evaluate $(BUILTIN_DIR)/data2text $(BUILTIN_DIR)/translation $(BUILTIN_DIR)/sentiment --methods gptfluence mean_curve \
		--no-progress --no-trajectories $(KFAC) --objective rollout --rollout-runs 8 \
		--out $(R)/evaluate_kfac_rollout.json --markdown $(R)/evaluate_kfac_rollout.md
	mkdir -p runs/lds-gen-exp
	for t in data2text translation; do \
		$(BIN)/gptfluence lds $(BUILTIN_DIR)/$$t runs/lds-builtin-full/$$t-heldout --methods gptfluence --no-references \
			--metrics bleu rougeL --no-progress --objective rollout --rollout-runs 8 $(PROJ32) --out runs/lds-gen-exp/$$t-rollout.json || exit 1; \
	done
	$(BIN)/python benchmarks/merge_lds.py runs/lds-gen-exp/data2text-rollout.json runs/lds-gen-exp/translation-rollout.json \
		--out $(R)/lds_generation_metrics_rollout.json --markdown $(R)/lds_generation_metrics_rollout.md

# Verification by re-training on the built-in tasks (benchmarks/results/verify_builtin.json): per task
# and method, remove the top-k helpful / harmful / k random examples of held-out run run-0002 for the
# whole test set, simulate and re-train (plus the noise floor: other seeds, other orders); removed
# slots padded (verify_builtin.json) or filled with unseen pool examples (verify_builtin_pool.json).
# --by-label (label tasks): the same per label, the test set restricted to that label (verify_builtin_by_label.json).
VERIFY_METHODS ?= gptfluence simfluence
VERIFY_K ?= 10
verify-builtin: setup
	for t in $(BUILTIN_TASKS); do $(BIN)/gptfluence collect --quiet --task $$t --runs 32 --out $(BUILTIN_DIR)/$$t || exit 1; done
	$(BIN)/python benchmarks/verify_builtin.py $(STORES) --methods $(VERIFY_METHODS) --k $(VERIFY_K) \
		--work runs/verify-builtin --out $(R)/verify_builtin.json
	$(BIN)/python benchmarks/verify_builtin.py $(STORES) --methods $(VERIFY_METHODS) --k $(VERIFY_K) --fill pool \
		--work runs/verify-builtin --out $(R)/verify_builtin_pool.json
	$(BIN)/python benchmarks/verify_builtin.py $(STORES) --methods $(VERIFY_METHODS) --k $(VERIFY_K) --by-label \
		--work runs/verify-builtin --out $(R)/verify_builtin_by_label.json

# Unseen data against the lag count (README "Applications", "Unseen data"): the stores of applications-builtin,
# GPTfluence (and the mean curve) with 6 / 12 / 24 lagged factors (sentiment: 6 / 24), loss only
# -> benchmarks/results/unseen_b_lags/TASK-b_lagsL.{json,md}
unseen-b-lags: setup
	mkdir -p $(R)/unseen_b_lags
	for x in data2text:6 data2text:12 data2text:24 sentiment:6 sentiment:24; do t=$${x%%:*}; L=$${x#*:}; \
		$(BIN)/gptfluence evaluate $(APPS_DIR)/$$t-part --unseen-heldout $(APPS_DIR)/$$t-unseen-heldout \
			--methods gptfluence mean_curve --metrics loss --no-progress --b-lags $$L \
			--out $(R)/unseen_b_lags/$$t-b_lags$$L.json --markdown $(R)/unseen_b_lags/$$t-b_lags$$L.md || exit 1; done

# The paper's applications (benchmarks/results/applications_builtin.json; README, "Applications"):
# mislabelled data (sentiment, 40% of the training labels flipped), unseen data (fit curricula from 75%
# of the pool, 30% of the test examples hidden; held-out curricula from that part and from the whole
# pool), data selection and the peer libraries (their own scripts write their parts first); also needs
# the sentiment LDS held-out store of lds-builtin (collected here if missing). About 1-1.5 h on 2 cores.
APPS_DIR ?= runs/apps
APPS_UNSEEN_TASKS ?= sentiment data2text
APPS_FLIP_TASKS ?= sentiment yesno
APPS_ARGS ?=
applications-builtin: setup
	for t in $(APPS_FLIP_TASKS); do \
		$(BIN)/gptfluence collect --quiet --task $$t --flip-fraction 0.4 --runs 32 --out $(APPS_DIR)/$$t-flip40 || exit 1; \
	done
	for t in $(APPS_UNSEEN_TASKS); do \
		$(BIN)/gptfluence collect --quiet --task $$t --runs 32 --out $(BUILTIN_DIR)/$$t || exit 1; \
		$(BIN)/gptfluence curricula --dynamics $(BUILTIN_DIR)/$$t --design both --n 32 --pool-fraction 0.75 \
			--out $(APPS_DIR)/$$t-part.jsonl || exit 1; \
		$(BIN)/gptfluence collect --quiet --config $(BUILTIN_DIR)/$$t/collect_config.json \
			--curriculum-file $(APPS_DIR)/$$t-part.jsonl --out $(APPS_DIR)/$$t-part || exit 1; \
		$(BIN)/gptfluence curricula --dynamics $(APPS_DIR)/$$t-part --design both --n 12 --pool-fraction 0.75 \
			--whole-pool-too --out $(APPS_DIR)/$$t-unseen-heldout.jsonl || exit 1; \
		$(BIN)/gptfluence collect --quiet --config $(APPS_DIR)/$$t-part/collect_config.json \
			--curriculum-file $(APPS_DIR)/$$t-unseen-heldout.jsonl --out $(APPS_DIR)/$$t-unseen-heldout || exit 1; \
	done
	$(BIN)/gptfluence curricula --dynamics $(BUILTIN_DIR)/sentiment --design both membership order --n $(LDS_N) \
		--out $(LDS_DIR)/sentiment-heldout.jsonl
	$(BIN)/gptfluence collect --quiet --config $(BUILTIN_DIR)/sentiment/collect_config.json \
		--curriculum-file $(LDS_DIR)/sentiment-heldout.jsonl --record-steps ends --out $(LDS_DIR)/sentiment-heldout
	$(BIN)/python benchmarks/applications_peers.py --fit $(BUILTIN_DIR)/sentiment --heldout $(LDS_DIR)/sentiment-heldout \
		--flipped $(APPS_DIR)/sentiment-flip40 --methods captum/tracincp dattri/tracin dattri/trak kronfluence/identity \
		kronfluence/diagonal kronfluence/kfac kronfluence/ekfac --ensemble 4 --ensemble-methods ours kronfluence/ekfac \
		dattri/trak --out $(R)/applications_parts/peer.json
	$(BIN)/python benchmarks/applications_selection.py $(BUILTIN_DIR)/sentiment --budget 64 --targets 0 20 \
		--methods gptfluence grad_dot tracin_cp --seeds 5 --random-subsets 4 --work $(APPS_DIR)/selection \
		--out $(R)/applications_parts/selection.json
	$(BIN)/python benchmarks/applications_builtin.py --flipped $(foreach t,$(APPS_FLIP_TASKS),$(APPS_DIR)/$(t)-flip40) \
		--unseen $(foreach t,$(APPS_UNSEEN_TASKS),$(APPS_DIR)/$(t)-part $(APPS_DIR)/$(t)-unseen-heldout) \
		--parts $(R)/applications_parts --out $(R)/applications_builtin.json $(APPS_ARGS)
