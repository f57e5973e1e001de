# The README's two commands. Each creates .venv and installs lensray (pinned by constraints.txt) first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_output

.PHONY: demo test test-fast lint bench quality clean install reproduce

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lensray demo --out $(DEMO_OUT)

LINTED := lensray tests tools benchmarks

# Two xdist workers, each test file on one worker (--dist loadscope) so a module fixture is built once: the
# suite mostly waits on Ray and subprocesses. (Not loadgroup: with pytest 9.2 its groups are silently ignored,
# pytest-dev/pytest-xdist#1386.)
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -ra --durations=15 -n $(TEST_WORKERS) --dist loadscope tests

lint: $(STAMP)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/ruff check $(LINTED)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -n $(TEST_WORKERS) --dist loadscope -m "not slow" tests

# Speed and memory benchmarks (each prints ratios against a baseline measured in the same run); the quality
# benchmark is its own target: it trains for ~30 min.
bench: $(STAMP)
	for b in benchmarks/*.py; do [ $$b = benchmarks/quality.py ] || $(BIN)/python $$b || exit 1; done

# `make quality`: own test vs a shifted simulation the model never saw (benchmarks/quality.py; README "Quality").
# QUALITY_ARGS="--quick" runs the whole chain in minutes; "--full --gpu" at 4x200x200 on a CUDA machine;
# "--ablate" the ablation table (ablation.md: one change per row against LASTRO/challenge, seeds 0 1), and
# "--ablate --quick" that chain on a small set.
QUALITY_ARGS ?=
quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py $(QUALITY_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache

# `make reproduce`: the study's 9 runs (LASTRO spatial dropout, LASTRO dropout, ResNet-20, each under the
# paper / official / challenge label rules, the study's clip preprocessing and recipes) against the platform's
# recipes (configs/lastro.yaml, and configs/resnet.yaml with PLATFORM_NETS="lastro resnet"; asinh stores) under
# the same three rules, on one simulated challenge-like set, then the comparison table (REPRO/compare/compare.md,
# .html, .json). Every run gets the same training budget: EPOCHS epochs of STUDY_STEPS x 10 images (the study's
# epoch: 600 steps of batches of 10); the platform's batches of 32 take STUDY_STEPS x 10 / 32 steps per epoch.
# Full size by default (a GPU job: add TRAIN_ARGS="--device cuda"); a CPU-sized run, e.g.:
#   make reproduce N=3000 CROP=100 BINNING=2 EPOCHS=12 STUDY_STEPS=150 PLATFORM_NETS=lastro
# (BINNING, not BIN: BIN is the venv's bin folder). Rerunning continues: finished steps are skipped.
N             ?= 20000
SEED          ?= 2020
CROP          ?=
BINNING       ?= 1
EPOCHS        ?=
STUDY_STEPS   ?= 600
PLATFORM_NETS ?= lastro resnet
TRAIN_ARGS    ?=
REPRO         ?= reproduce_output
STUDY_NETS    := lastro_spatial lastro_dropout resnet
LABEL_RULES   := paper official challenge
STUDY_BATCH   := 10
PLATFORM_BATCH := 32
PLATFORM_STEPS = $(shell echo $$(( ($(STUDY_STEPS) * $(STUDY_BATCH) + $(PLATFORM_BATCH) / 2) / $(PLATFORM_BATCH) )))
REPRO_DIR      = $(abspath $(REPRO))
RAW            = $(REPRO_DIR)/data
GEOMETRY       = $(if $(CROP),--crop $(CROP)) --bin $(BINNING)
EPOCH_KNOB     = $(if $(EPOCHS),--epochs $(EPOCHS))

reproduce: $(STAMP)
	test -e $(RAW)/image_catalog2.0train.csv || $(BIN)/lensray simulate --out $(RAW) --n $(N) --seed $(SEED)
	for rule in $(LABEL_RULES); do \
	  $(BIN)/lensray preprocess --config configs/study_resnet_$$rule.yaml --images $(RAW) \
	    --catalog $(RAW)/image_catalog2.0train.csv --out $(REPRO_DIR)/stores/clip_$$rule.zarr $(GEOMETRY) || exit 1; \
	  $(BIN)/lensray preprocess --config configs/lastro.yaml --labels $$rule --images $(RAW) \
	    --catalog $(RAW)/image_catalog2.0train.csv --out $(REPRO_DIR)/stores/asinh_$$rule.zarr $(GEOMETRY) || exit 1; \
	done
	for net in $(STUDY_NETS); do for rule in $(LABEL_RULES); do \
	  test -e $(REPRO_DIR)/runs/study_$${net}_$$rule/history.json || \
	  $(BIN)/lensray train --config configs/study_$${net}_$$rule.yaml --store $(REPRO_DIR)/stores/clip_$$rule.zarr \
	    --out $(REPRO_DIR)/runs --name study_$${net}_$$rule $(EPOCH_KNOB) \
	    --steps-per-epoch $(STUDY_STEPS) --batch-size $(STUDY_BATCH) $(TRAIN_ARGS) || exit 1; \
	done; done
	for net in $(PLATFORM_NETS); do for rule in $(LABEL_RULES); do \
	  test -e $(REPRO_DIR)/runs/platform_$${net}_$$rule/history.json || \
	  $(BIN)/lensray train --config configs/$$net.yaml --set data.labels=$$rule --store $(REPRO_DIR)/stores/asinh_$$rule.zarr \
	    --out $(REPRO_DIR)/runs --name platform_$${net}_$$rule $(EPOCH_KNOB) \
	    --steps-per-epoch $(PLATFORM_STEPS) --batch-size $(PLATFORM_BATCH) $(TRAIN_ARGS) || exit 1; \
	done; done
	$(BIN)/lensray compare $(foreach net,$(STUDY_NETS),$(foreach rule,$(LABEL_RULES),$(REPRO_DIR)/runs/study_$(net)_$(rule))) \
	  $(foreach net,$(PLATFORM_NETS),$(foreach rule,$(LABEL_RULES),$(REPRO_DIR)/runs/platform_$(net)_$(rule))) \
	  --out $(REPRO_DIR)/compare
	@echo "comparison: $(REPRO_DIR)/compare/compare.md and compare.html"
