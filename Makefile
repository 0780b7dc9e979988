# Bedside: `make deploy PROFILE=jetson4gb` runs the main job, `make test` the test suite.
# Both create the environment on first use (.venv, pinned dependencies, demo model).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BEDSIDE_CACHE ?= $(HOME)/.cache/bedside
# GPU set-up in one variable: `make setup GPU=cuda` takes torch's CUDA 12.8 wheel from PyTorch's
# package index, builds llama.cpp with CUDA, and adds onnxruntime-gpu's CUDA/cuDNN libraries from PyPI.
# Default GPU=cpu: the CPU torch wheel (on this machine's disk) and a portable AVX2 llama.cpp build
# without the AMX backend (its quantized batch decode crashes, docs/ENVIRONMENT.md).
GPU ?= cpu
ifeq ($(GPU),cuda)
TORCH_SPEC ?= torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cu128
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_CUDA=ON
ORT_EXTRAS ?= onnxruntime-gpu[cuda,cudnn]==1.31.1
else ifeq ($(GPU),cpu)
TORCH_SPEC ?= torch==2.13.0
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
ORT_EXTRAS ?=
else
$(error GPU must be cpu or cuda, got '$(GPU)')
endif
PROFILE ?= jetson4gb
MODEL ?= demo
CALIB ?=
EVAL ?=
OUT ?= out/deploy-$(PROFILE)
PYTEST_ARGS ?=

export BEDSIDE_CACHE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAMP := $(VENV)/.bedside-setup-stamp-$(GPU)
BIN := $(VENV)/bin

.PHONY: setup deploy test test-fast lint clean bench bench-target demo-vlm print-demo-vlm

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup_env.sh
	PYTHON="$(PYTHON)" VENV="$(VENV)" TORCH_SPEC="$(TORCH_SPEC)" LLAMA_CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" ORT_EXTRAS="$(ORT_EXTRAS)" \
		bash scripts/setup_env.sh
	touch $(STAMP)

deploy: $(STAMP)
	$(BIN)/bedside deploy --profile "$(PROFILE)" --model "$(MODEL)" \
		$(if $(CALIB),--calib "$(CALIB)") $(if $(EVAL),--eval "$(EVAL)") --out "$(OUT)"

lint: $(STAMP)
	$(BIN)/ruff check toolkit exporters runtimes tests bench

# Two pytest-xdist workers, one per core; tests sharing expensive fixtures run in one group (tests/conftest.py).
# TEST_WORKERS=0 runs everything in this process (for debugging with -x / --pdb).
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(XDIST) --durations=15 $(PYTEST_ARGS)

# The edit loop: everything but the tests marked heavy (demo exports, compress, evaluations, end-to-end deploys).
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q $(XDIST) --durations=10 -m "not heavy" $(PYTEST_ARGS)

# Benchmarks (docs/BENCHMARKS.md, raw results in docs/benchmarks/); each script resumes finished parts.
# The last two build llama.cpp's llama-imatrix and llama-bench from the sdist once (bench/llama_tools.py, ~6 min).
bench: $(STAMP)
	$(BIN)/python -m bench.compression
	$(BIN)/python -m bench.runtimes
	$(BIN)/python -m bench.awq_budget --threads 2
	$(BIN)/python -m bench.quant_methods --threads 2
	$(BIN)/python -m bench.paired_perplexity --threads 2
	$(BIN)/python -m bench.mmap_repack
	$(BIN)/python -m bench.imatrix_parity --threads 2
	$(BIN)/python -m bench.runtime_parity --threads 2

# A target with the base install only (no torch) verifies the bundle of `make deploy`.
bench-target: deploy
	$(BIN)/python -m bench.target_env --bundle "$(OUT)/bundle-$(PROFILE).tar.gz"

# The demo vision-language model (docs/DEMO_VLM.md): a LLaVA trained here on SLAKE + VQA-RAD (../shared/data),
# cached in $(BEDSIDE_CACHE)/models/demo-vlm; a re-run with a valid build returns at once.
demo-vlm: $(STAMP)
	$(BIN)/python -m toolkit.model.demo_vlm

# `make -s print-demo-vlm` prints only the folder (for scripts: MODEL=$$(make -s print-demo-vlm)).
print-demo-vlm:
	@echo "$(BEDSIDE_CACHE)/models/demo-vlm"

clean:
	rm -rf out .pytest_cache .ruff_cache
