# Every target creates the virtualenv first (idempotent: it reinstalls only when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test lint demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check beit tests bench

# ---- make demo: the whole pipeline on the sample images that ship with scikit-learn (1797 digits), a few
# minutes on a laptop CPU: train a tiny dVAE tokenizer → tokenize 2 views per image into shards → verify
# them → pretrain the tiny BEiT. Starts from scratch in $(DEMO) every time.
DEMO ?= runs/demo
demo: setup
	rm -rf $(DEMO)
	$(BIN)/python -m beit.demo $(DEMO)/images
	$(BIN)/beit tokenizer train --data $(DEMO)/images --out $(DEMO)/dvae --preset tiny --steps 150 \
		--batch-size 48 --warmup-steps 20 --kl-warmup-steps 50 --checkpoint-every 150
	$(BIN)/beit tokenize $(DEMO)/images $(DEMO)/shards --tokenizer $(DEMO)/dvae --preset tiny --views 2 \
		--shard-size 500
	$(BIN)/beit shards verify $(DEMO)/shards
	$(BIN)/beit pretrain $(DEMO)/shards --output $(DEMO)/pretrain --preset tiny --steps 300
	$(BIN)/beit checkpoint info $(DEMO)/pretrain

# ---- make tokenize (engineer J): DATA → shards/<name>; rerun it (cron) to resume or extend the set.
#   make tokenize DATA=~/imagenet/train TOKENIZER=weights/encoder.pkl VIEWS=2
#   make tokenize DATA=... TOKENIZER=runs/dvae-tiny PRESET=tiny TOKENIZE_ARGS="--partition 0/4"
.PHONY: tokenize
tokenize: DATA ?= data/images
tokenize: TOKENIZER ?= weights/encoder.pkl
tokenize: OUT ?= shards/$(notdir $(patsubst %/,%,$(DATA)))
tokenize: VIEWS ?= 1
tokenize: PRESET ?= base
tokenize: SEED ?= 0
tokenize: SHARD_SIZE ?= 1000
tokenize: TOKENIZE_ARGS ?=
tokenize: setup
	$(BIN)/beit tokenize $(DATA) $(OUT) --tokenizer $(TOKENIZER) --preset $(PRESET) --views $(VIEWS) \
		--seed $(SEED) --shard-size $(SHARD_SIZE) $(TOKENIZE_ARGS)

# ---- make pretrain (engineer P): SHARDS → runs/pretrain-<preset>; RESUME=1 continues the newest checkpoint.
#   make pretrain SHARDS=shards/train PRESET=base NPROC=8 PRETRAIN_ARGS="--mixed-precision bf16"
#   make pretrain SHARDS=shards/digits PRESET=tiny STEPS=300 RESUME=1
#   make pretrain SHARDS=shards/train PRESET=base STEPS=20000 WARMUP=500   # a short run needs a short warmup
# NPROC > 1 starts one process per GPU on this node with torchrun (gloo on a CPU-only machine).
.PHONY: pretrain
pretrain: SHARDS ?= shards/images
pretrain: PRESET ?= base
pretrain: STEPS ?=
pretrain: WARMUP ?=
pretrain: OUT ?= runs/pretrain-$(PRESET)
pretrain: NPROC ?= 1
pretrain: RESUME ?=
pretrain: PRETRAIN_ARGS ?=
pretrain: setup
	$(if $(filter-out 1,$(NPROC)),$(BIN)/torchrun --nproc_per_node $(NPROC) -m beit,$(BIN)/beit) pretrain \
		$(SHARDS) --output $(OUT) --preset $(PRESET) $(if $(STEPS),--steps $(STEPS)) \
		$(if $(WARMUP),--warmup-steps $(WARMUP)) $(if $(filter 1 yes true,$(RESUME)),--resume) \
		$(PRETRAIN_ARGS)
