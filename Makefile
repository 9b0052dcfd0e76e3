# Quick start (see README.md):
#   make demo    set up .venv and run the offline demo (tiny T5 + tiny toxicity classifier, PPO on CPU)
#   make test    set up .venv and run the test suite (what CI runs)
# GPU users: install your CUDA build of torch into .venv first, then `make setup TORCH=skip`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned (a CPU wheel here; an unpinned torch pulls GBs of CUDA wheels), then the rest with a
# constraint that keeps that torch.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	@if [ "$(TORCH)" != "skip" ]; then $(BIN)/pip install --quiet "$(TORCH)"; fi
	$(BIN)/pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[test,eval]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/detoxrl-train

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
