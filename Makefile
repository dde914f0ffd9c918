# Two commands matter: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch comes first, on its own: PyPI's Linux wheels are the CUDA build (several GB), so the
# default takes the CPU build from PyTorch's CPU index; `make install TORCH=cuda` takes PyPI's.
TORCH ?= cpu
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(TORCH),cpu)
TORCH_PIP_ARGS := --extra-index-url $(TORCH_CPU_INDEX) --retries 1 --no-deps
else ifeq ($(TORCH),cuda)
TORCH_PIP_ARGS := --no-deps
else
$(error TORCH must be cpu or cuda, got '$(TORCH)')
endif
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-faults lint services bench bench-store clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) 'torch==$(TORCH_VERSION)'
	$(BIN)/pip install -q -e '.[dev,cdc,parquet]'
	touch $(STAMP)

services:
	bash scripts/ensure_rabbitmq.sh
	bash scripts/ensure_postgres_logical.sh
	bash scripts/ensure_chromium.sh

## Index the bundled sample corpus into the embedded store under ./data, then query it.
demo: install
	$(BIN)/feature-pipeline backfill data/samples/posts.jsonl data/samples/articles.jsonl data/samples/repositories.jsonl
	$(BIN)/feature-pipeline search "How do I design a streaming feature pipeline?" --type articles -k 3
	$(BIN)/feature-pipeline search "parse a JSON document" --type repositories -k 3

## Run the whole test suite against the real broker, store and model.
test: install services
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/pytest -q --durations=15

## The fault-injection suite alone at the issue's full counts (~7 min here; `make test` runs it
## at 300 fuzzed messages and 3 kills to stay under 15 minutes).
test-faults: install services
	FAULT_FUZZED=1000 FAULT_KILLS=20 $(BIN)/pytest -q -m faults

lint: install
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

bench: install services
	$(BIN)/python bench/run.py

## The feature store alone: 100,000 points by default; `make bench-store ARGS="--points 1000000"`.
bench-store: install
	$(BIN)/python bench/store.py $(ARGS)

clean:
	rm -rf $(VENV) data/qdrant data/dead_letters.jsonl data/dead_letters
