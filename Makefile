# omni-train developer targets. Every target that runs code depends on `setup`, which is idempotent:
# a second run finds its stamp up to date and does nothing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.omni-train-setup
# The released processor's torchvision, for the parity tests only: installed beside the venv on no
# import path, because the index's builds are CUDA-linked and would break every transformers
# import (docs/data_format.md, "Running the reference processor on the CPU").
REFERENCE_TORCHVISION := torchvision==0.28.0
REFERENCE := $(VENV)/reference/.installed
CONSTRAINTS := requirements/constraints-cpu.txt
TORCH_PIN := $(shell grep '^torch==' $(CONSTRAINTS))
# Two ranks on two cores: one thread each, or they fight over the cores.
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup curriculum smoke smoke-text test test-slow bench plan activation-costs lint format lock clean

setup: $(STAMP) $(REFERENCE)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first, alone: any later resolver run then sees it installed and never pulls a CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev,audio]"
	@touch $(STAMP)

$(REFERENCE): | $(STAMP)
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/reference "$(REFERENCE_TORCHVISION)"
	@touch $(REFERENCE)

SYNTH := runs/data/synthetic

# The main job: the seven-stage curriculum with the tiny model on CPU (2 ranks, TP=2 + SP), each
# stage from the previous one's weights, on synthetic omni data it makes once; about 7 minutes.
# A re-run skips completed stages; FROM=<stage> re-runs from there.
curriculum: setup
	$(BIN)/omni-train curriculum --nproc-per-node 2 model=tiny $(if $(FROM),--from $(FROM))

# One stage: synthetic omni data (every modality, energon datasets; made once), then the tiny
# omni model trains on it with every component trainable, 2 ranks (TP=2 + SP), on CPU.
smoke: setup
	$(BIN)/omni-train data synth --out $(SYNTH) --samples 64 --seed 0
	$(BIN)/omni-train run --nproc-per-node 2 stage=smoke_omni model=tiny parallel=tp2 data.synthetic_root=$(SYNTH)

# The text-only LM smoke stage (synthetic token sequences, no data files).
smoke-text: setup
	$(BIN)/omni-train run --nproc-per-node 2 stage=smoke model=tiny parallel=tp2

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --timeout 900

test-slow: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --timeout 1800 -m slow

# Parallel-layout equivalence, the CPU Mamba2 scan, data throughput, packing and HF checkpoint
# import/export (about 16 minutes on 2 cores; the last writes ~12 GB of scratch files);
# results in benchmarks/results/.
bench: setup
	$(BIN)/python benchmarks/equivalence.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/mamba_scan.py --out benchmarks/results/mamba_scan_cpu.md
	$(BIN)/python benchmarks/data_throughput.py --data $(SYNTH) --out benchmarks/results/data_throughput_cpu.md
	$(BIN)/python benchmarks/convert_rows.py --rows 100000 --out benchmarks/results/convert_rows_cpu.md
	$(BIN)/python benchmarks/packing.py
	$(BIN)/python benchmarks/hf_checkpoint.py --out benchmarks/results/hf_checkpoint_cpu.md

# The seven full-scale stages' plans: per-rank memory with activations, verdict on the cluster's
# GPUs, smallest fix, time (one CPU process, about a minute).
plan: setup
	$(BIN)/python benchmarks/plan_stages.py --out benchmarks/results/plan_stages.md

# Measure activation bytes per layer kind for the planner (MODEL, TP; CPU, bf16): the released
# model at TP 2 takes about 25 minutes and 12 GB of memory, the tiny one 2 minutes at TP 1.
MODEL ?= nano_omni_30b_a3b
TP ?= 2
activation-costs: setup
	$(BIN)/python benchmarks/activation_costs.py --model $(MODEL) --tp $(TP) --out benchmarks/results/activation_costs_cpu.md

lint: setup
	$(BIN)/ruff check omni_train tests benchmarks
	$(BIN)/ruff format --check omni_train tests benchmarks

format: setup
	$(BIN)/ruff format omni_train tests benchmarks
	$(BIN)/ruff check --fix omni_train tests benchmarks

# Re-resolve the pinned stack after a dependency change in pyproject.toml.
lock: setup
	@{ head -2 $(CONSTRAINTS); $(BIN)/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > $(CONSTRAINTS).new
	@mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf runs .pytest_cache .ruff_cache
