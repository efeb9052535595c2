# Quick start: `make demo` (set up, pretrain + evaluate + save a small JPmHC model on CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
LOWEST_VENV ?= .venv-lowest
BIN := $(VENV)/bin
LOWEST_BIN := $(LOWEST_VENV)/bin
# CPU build of torch where there is no CUDA (the generic wheel pulls several GB of CUDA libraries).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
DEMO_DIR ?= runs/demo
DEMO_TASKS ?= arc_easy,arc_challenge,drop
# What also runs on the lowest declared transformers / accelerate / peft: models, conversion, remote code,
# generation, PEFT, and checkpoints moving between the two environments.
LOWEST_TESTS ?= tests/test_modeling.py tests/test_config.py tests/test_convert_llama.py tests/test_vit.py \
	tests/test_remote_code.py tests/test_deepseek_v4.py tests/test_peft.py tests/test_cross_version.py

STUDY_DIR ?= runs/study

.PHONY: setup setup-lowest demo test test-newest test-lowest test-fast bench study

# The newest releases pip resolves today (as a new user gets them).
$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[triton,dev]"
	touch $@

# The lowest versions pyproject.toml declares (.ci/lowest_constraints.py reads them from there).
$(LOWEST_BIN)/.installed: pyproject.toml Makefile .ci/lowest_constraints.py
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_BIN)/pip install -q --upgrade pip
	$(LOWEST_BIN)/pip install -q "$(TORCH_SPEC)"
	$(PYTHON) .ci/lowest_constraints.py > $(LOWEST_VENV)/constraints.txt
	$(LOWEST_BIN)/pip install -q -c $(LOWEST_VENV)/constraints.txt -e ".[triton,test]"
	touch $@

setup: $(BIN)/.installed

setup-lowest: $(LOWEST_BIN)/.installed

# The main job: pretrain jpmhc-tiny (n = 4, Stiefel mixer) on offline Shakespeare, evaluate it, and leave a
# Hub-ready checkpoint with the results in its model card.
demo: setup
	$(BIN)/python training/pretrain.py --config training/configs/demo.yaml --output_dir $(DEMO_DIR)
	$(BIN)/python -m eval.prepare --tasks $(DEMO_TASKS)
	$(BIN)/python -m eval.run --model $(DEMO_DIR)/final --tasks $(DEMO_TASKS) --limit 100 \
		--output $(DEMO_DIR)/eval --update-model-card
	@echo "checkpoint: $(DEMO_DIR)/final (README.md model card with eval results)"
	@echo "logs:       $(DEMO_DIR)/logs/metrics.jsonl   evaluation: $(DEMO_DIR)/eval/results.md"

# What CI runs: the lowest declared versions (a subset), then the whole suite on the newest releases. Each leg
# prints its versions under pytest's summary and checks checkpoints against the other environment.
test: test-lowest test-newest

test-newest: setup setup-lowest
	HF_JPMHC_OTHER_PYTHON=$(CURDIR)/$(LOWEST_BIN)/python $(BIN)/python -m pytest -q --durations=15

test-lowest: setup setup-lowest
	HF_JPMHC_OTHER_PYTHON=$(CURDIR)/$(BIN)/python $(LOWEST_BIN)/python -m pytest -q --durations=10 $(LOWEST_TESTS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Side-by-side ratios; on a shared CPU pin one thread where the script allows it.
bench: setup
	$(BIN)/python benchmarks/param_counts.py
	$(BIN)/python benchmarks/bench_train_step.py --threads 1
	$(BIN)/python benchmarks/bench_peer_mhc.py --threads 1
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_fsdp_memory.py
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
