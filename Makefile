# cityseg: every target sets itself up (.venv + pip install -e .[dev]) on first use.
#   make run [EXP=experiments/baseline.yaml] [SET="trainer.epochs=3 loss.pos_weight=8"] [NPROC=2]
#   make sweep [SWEEP=experiments/sweeps/fg_weight_quick.yaml] [JOBS=2] [STORAGE=URL] [SET="trainer.epochs=2"]
#   make compare [ARGS="--metric val/iou"]
#   make test | test-slow [TEST_JOBS=2] | lint | ui | validate | schema | bench

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXP    ?= experiments/quickstart.yaml
SET    ?=
PORT   ?= 5000
# the port every printed MLflow UI link names (make run, make sweep, make ui)
export CITYSEG_UI_PORT := $(PORT)

.PHONY: setup run sweep compare test test-slow lint format ui validate schema bench

setup: $(STAMP)

# Re-installs only when pyproject.toml changes. torch is never pinned: torchvision picks its torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# NPROC=N trains on N processes with PyTorch's launcher (one per GPU; on a CPU, N gloo processes)
NPROC  ?= 1
run: $(STAMP)
ifeq ($(NPROC),1)
	$(BIN)/cityseg run $(EXP) $(foreach s,$(SET),--set $(s))
else
	$(BIN)/torchrun --standalone --nproc-per-node=$(NPROC) -m cityseg run $(EXP) $(foreach s,$(SET),--set $(s))
endif

SWEEP  ?= experiments/sweeps/fg_weight_quick.yaml
JOBS   ?= 1
STORAGE ?=
sweep: $(STAMP)
	$(BIN)/cityseg sweep $(SWEEP) --jobs $(JOBS) $(if $(STORAGE),--storage $(STORAGE)) $(foreach s,$(SET),--set $(s))

compare: $(STAMP)
	$(BIN)/cityseg compare $(ARGS)

# the fast suite; the 15 slowest tests are listed at its end. TEST_JOBS=N runs it on N
# pytest-xdist workers, a test file each (1.35x on 2 cores, where CI keeps it serial)
TEST_JOBS ?= 1
XDIST := $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile)
test: $(STAMP)
	$(BIN)/python -m pytest --durations=15 $(XDIST)

# the tests marked slow (servers, a browser, several training processes); CI runs both
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow --durations=15 $(XDIST)

lint: $(STAMP)
	$(BIN)/ruff check cityseg tests

format: $(STAMP)
	$(BIN)/ruff format cityseg tests

ui: $(STAMP)
	@test ! -f runs/mlflow.db || $(BIN)/cityseg runs links --port $(PORT)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --host 127.0.0.1 --port $(PORT)

validate: $(STAMP)
	$(BIN)/cityseg validate experiments/*.yaml experiments/sweeps/*.yaml

# experiment.schema.json is committed (editors read it); a test fails when it is stale.
schema: $(STAMP)
	$(BIN)/cityseg schema > experiment.schema.json

# Figures, not asserts. BENCH_ARGS="--cityscapes ../shared/data/cityscapes-mini" adds real PNGs.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m cityseg.bench $(BENCH_ARGS)
