# Quick start: `make demo` (set up, pretrain + evaluate + save a small JPmHC model on CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch where there is no CUDA (the generic wheel pulls several GB of CUDA libraries).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
DEMO_DIR ?= runs/demo
DEMO_TASKS ?= arc_easy,arc_challenge,drop

STUDY_DIR ?= runs/study

.PHONY: setup demo test test-fast bench study

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[triton,dev]"
	touch $@

setup: $(BIN)/.installed

# The main job: pretrain jpmhc-tiny (n = 4, Stiefel mixer) on offline Shakespeare, evaluate it, and leave a
# Hub-ready checkpoint with the results in its model card.
demo: setup
	$(BIN)/python training/pretrain.py --config training/configs/demo.yaml --output_dir $(DEMO_DIR)
	$(BIN)/python -m eval.prepare --tasks $(DEMO_TASKS)
	$(BIN)/python -m eval.run --model $(DEMO_DIR)/final --tasks $(DEMO_TASKS) --limit 100 \
		--output $(DEMO_DIR)/eval --update-model-card
	@echo "checkpoint: $(DEMO_DIR)/final (README.md model card with eval results)"
	@echo "logs:       $(DEMO_DIR)/logs/metrics.jsonl   evaluation: $(DEMO_DIR)/eval/results.md"

# Every test, the slow ones included (the whole suite fits CI's budget on 2 CPU cores).
test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Side-by-side ratios; on a shared CPU pin one thread where the script allows it.
bench: setup
	$(BIN)/python benchmarks/param_counts.py
	$(BIN)/python benchmarks/bench_train_step.py --threads 1
	$(BIN)/python benchmarks/bench_peer_mhc.py --threads 1
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_stream_update.py
	$(BIN)/python benchmarks/bench_generate.py --threads 1

# The three residual-mixer studies of docs/mixer_study.md, one after another, one thread each (about 7 CPU-hours);
# resumable: after an interruption run it again. Results and figures go to $(STUDY_DIR) and docs/. The vision study
# needs Debian's dataset-fashion-mnist (installed here when missing: needs root).
study: setup
	$(BIN)/python -c "from hf_jpmhc.data.images import fashion_mnist_available as ok; raise SystemExit(not ok())" \
		|| apt-get install -y dataset-fashion-mnist || sudo apt-get install -y dataset-fashion-mnist
	$(BIN)/python training/study.py run training/configs/studies/mixers.yaml --output_dir $(STUDY_DIR)/mixers --docs docs
	$(BIN)/python training/study.py run training/configs/studies/depth.yaml --output_dir $(STUDY_DIR)/depth --docs docs
	$(BIN)/python training/study.py run training/configs/studies/vision.yaml --output_dir $(STUDY_DIR)/vision --docs docs
