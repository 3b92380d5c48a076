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
# Where `setup` takes torch from. Empty: pip's own configuration decides, and a public PyPI serves
# Linux the multi-GB CUDA build, which runs on the CPU too. For the CPU build from any machine:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Only a venv without torch takes it from here; to switch builds, remove .venv first.
TORCH_INDEX ?=
# Two ranks on two cores: one thread each, or they fight over the cores.
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup curriculum smoke smoke-text smoke-gpu test test-slow test-slurm bench learn learn-lora learn-parallel plan plan-lora activation-costs lint format lock clean

setup: $(STAMP) $(REFERENCE)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first, alone: any later resolver run then sees it installed and never pulls a CUDA build.
	@if $(BIN)/python -c "import importlib.metadata as m; m.version('torch')" 2>/dev/null; then \
	  echo "setup: torch is already in $(VENV); kept"; \
	elif [ -n "$(TORCH_INDEX)" ]; then \
	  echo "setup: installing $(TORCH_PIN) from $(TORCH_INDEX)"; \
	  $(BIN)/pip install -q --no-deps --index-url "$(TORCH_INDEX)" "$(TORCH_PIN)"; \
	else \
	  echo "setup: installing $(TORCH_PIN) from pip's own index settings (PyPI, whose Linux" \
	    "build is the CUDA one, unless configured otherwise; TORCH_INDEX chooses):"; \
	  $(BIN)/pip config list | grep -E 'index-url|find-links' | sed 's/^/  /' || true; \
	  $(BIN)/pip install -q "$(TORCH_PIN)"; \
	fi
	@# --no-deps above: torch's own dependencies come from here, pinned, not from the torch index.
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev,audio]"
	@$(BIN)/python -c "import torch; print('setup: torch', torch.__version__, \
	  f'(CUDA {torch.version.cuda} build)' if torch.version.cuda else '(CPU build)')"
	@touch $(STAMP)

$(REFERENCE): | $(STAMP)
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/reference "$(REFERENCE_TORCHVISION)"
	@touch $(REFERENCE)

SYNTH := runs/data/synthetic

# The main job: the seven-stage curriculum with the tiny model on CPU (2 ranks, data parallel),
# each stage from the previous one's weights, on synthetic omni data it makes once (the
# learnability tasks); every stage scores its answers to held-out questions at its end;
# about 13 minutes. A re-run skips completed stages; FROM=<stage> re-runs from there.
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

# GPU smoke (never run by this repository's CI: it has no GPU): the omni smoke stage in bf16 with
# packing on NGPUS GPUs of this machine: 1 -> one process; 2 -> TP2+SP, then CP2, then EP2, each a
# fresh run. In NVIDIA's container or any CUDA PyTorch with omni-train installed, GPU_PYTHON is
# that interpreter (`python`, default), not the CPU venv. OMNI_TRAIN_PLATFORM=cuda makes a run
# without a GPU fail instead of falling back to the CPU; SMOKE_PLATFORM=cpu runs the same recipes
# on the CPU (what this repository's tests check of this target).
NGPUS ?= 1
GPU_PYTHON ?= python
SMOKE_PLATFORM ?= cuda
SMOKE_LAYOUTS := $(if $(filter 1,$(NGPUS)),single,tp2 cp2 ep2)
smoke-gpu:
	OMNI_TRAIN_PLATFORM=$(SMOKE_PLATFORM) $(GPU_PYTHON) -m omni_train.cli data synth --out $(SYNTH) --samples 64 --seed 0
	@for layout in $(SMOKE_LAYOUTS); do \
	  echo "smoke-gpu: parallel=$$layout on $(NGPUS) $(SMOKE_PLATFORM) process(es)"; \
	  rm -rf runs/smoke_gpu/$$layout; \
	  OMNI_TRAIN_PLATFORM=$(SMOKE_PLATFORM) $(GPU_PYTHON) -m omni_train.cli run --no-plan \
	    --nproc-per-node $(NGPUS) stage=smoke_omni_gpu model=tiny parallel=$$layout \
	    data.synthetic_root=$(SYNTH) checkpoint.output_dir=runs/smoke_gpu/$$layout || exit 1; \
	done

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --timeout 900

test-slow: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --timeout 1800 -m slow

# launchers/slurm.sbatch under a real one-node Slurm (Debian's slurmctld/slurmd/munge, installed
# on first use: needs root and apt; daemons and jobs in runs/slurm/, stopped at the end): the
# smoke stage on the CPU with 2 ranks, GPUs per node from Slurm, SIGUSR1 -> checkpoint ->
# requeue -> resume (tests/test_slurm.py). About 4 minutes; not part of `make test`.
test-slurm: setup
	$(BIN)/python -m pytest -q -s --timeout 1200 -m slurm tests/test_slurm.py

# Parallel-layout equivalence, the CPU Mamba2 scan, data throughput, the packer's plan cache,
# packing and HF checkpoint import/export (about 19 minutes on 2 cores; the last writes ~12 GB
# of scratch files); results in benchmarks/results/.
bench: setup
	$(BIN)/python benchmarks/equivalence.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/mamba_scan.py --out benchmarks/results/mamba_scan_cpu.md
	$(BIN)/python benchmarks/data_throughput.py --data $(SYNTH) --out benchmarks/results/data_throughput_cpu.md
	$(BIN)/python benchmarks/convert_rows.py --rows 100000 --out benchmarks/results/convert_rows_cpu.md
	$(BIN)/python benchmarks/plan_cache.py --batches 40 --out benchmarks/results/plan_cache_cpu.md
	$(BIN)/python benchmarks/packing.py
	$(BIN)/python benchmarks/hf_checkpoint.py --out benchmarks/results/hf_checkpoint_cpu.md
	$(BIN)/python benchmarks/encoder_balance.py --out benchmarks/results/encoder_balance.md

# Does the tiny omni model read its media? Trains it on the learnability tasks (answers only
# the image, page, video or tone tell) with real media, with noise in their place and without
# them, then scores held-out answers per task (benchmarks/learning.py; targets: real >= 90 %,
# controls <= chance + 10 points). About 11 minutes on 2 cores, making the data (~1 min)
# included: real and noise 1000 steps side by side, text-only 200.
# learn-parallel: the real run against TP2 + SP and CP2 on 2 processes (same accuracies within
# 5 points), 1000 steps each, one run after the other (about 30 minutes).
learn: setup
	$(BIN)/python benchmarks/learning.py --out benchmarks/results/learning_cpu.md

# learn-lora: the same tasks training LoRA adapters (rank 16) on the LM and both encoders, the
# projectors whole, from the text-only run's weights, 1500 steps: real media >= 90 %, noise at
# chance (benchmarks/results/learning_lora_cpu.md; about 15 minutes).
learn-lora: setup
	$(BIN)/python benchmarks/learning.py --runs text_only,real_lora,noise_lora --jobs 2 --steps 1500 \
	  --out benchmarks/results/learning_lora_cpu.md

learn-parallel: setup
	$(BIN)/python benchmarks/learning.py --runs real,real_tp2,real_cp2 --jobs 1 \
	  --out benchmarks/results/learning_parallel_cpu.md

# The seven full-scale stages' plans: per-rank memory with activations, verdict on the cluster's
# GPUs, smallest fix, time (one CPU process, about a minute).
plan: setup
	$(BIN)/python benchmarks/plan_stages.py --out benchmarks/results/plan_stages.md

# The same stages with peft=lora: memory, time and the fewest nodes each fits on, full against
# LoRA (a dry run per node count: a few minutes).
plan-lora: setup
	$(BIN)/python benchmarks/plan_lora.py --out benchmarks/results/plan_lora.md

# Measure activation bytes per layer kind for the planner (MODEL, TP; CPU, bf16): the released
# model at TP 2 takes about 25 minutes and 12 GB of memory, the tiny one 2 minutes at TP 1.
MODEL ?= nano_omni_30b_a3b
TP ?= 2
activation-costs: setup
	$(BIN)/python benchmarks/activation_costs.py --model $(MODEL) --tp $(TP) --out benchmarks/results/activation_costs_cpu.md

lint: setup
	$(BIN)/ruff check omni_train tests benchmarks docker
	$(BIN)/ruff format --check omni_train tests benchmarks docker

format: setup
	$(BIN)/ruff format omni_train tests benchmarks docker
	$(BIN)/ruff check --fix omni_train tests benchmarks docker

# Re-resolve the pinned stack after a dependency change in pyproject.toml (the GPU image's too).
lock: setup
	@{ head -2 $(CONSTRAINTS); $(BIN)/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > $(CONSTRAINTS).new
	@mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@$(MAKE) --no-print-directory lock-gpu

.PHONY: lock-gpu docker-check

# requirements/constraints-gpu.txt from the CPU pins: without what NVIDIA's container provides,
# with the source-built mamba-ssm and causal-conv1d (docker/pins.py says which and why).
lock-gpu:
	$(PYTHON) docker/pins.py gpu

# The GPU image's build, as far as this machine allows: the offline checks of
# tests/test_docker_build.py, then every pin of constraints-gpu.txt looked up on PyPI for the
# image's CPython 3.12 on x86_64 (network, under a minute), then `docker build` if a Docker engine
# answers (the client alone is not enough; it says so and skips).
docker-check: setup
	$(BIN)/python docker/check_build.py --resolve --build

clean:
	rm -rf runs .pytest_cache .ruff_cache
