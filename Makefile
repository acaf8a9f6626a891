# One entry point for humans and CI. `make test` builds the environment when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: env demo test test-fast clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[cpu,serve,dev]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/llmopt convert recipes/quickstart.yaml -w work/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" --timeout=900 --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu and not slow"

clean:
	rm -rf work .pytest_cache
