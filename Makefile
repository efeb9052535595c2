# Quick start: `make demo` (set up, pretrain + evaluate + save a small JPmHC model on CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch where there is no CUDA (the generic wheel pulls several GB of CUDA libraries).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: setup demo test test-all bench

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[triton,dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python training/pretrain.py --config training/configs/demo.yaml

test: setup
	CI=$${CI:-} $(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done
