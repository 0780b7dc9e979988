# Bedside: `make deploy PROFILE=jetson4gb` runs the main job, `make test` the test suite.
# Both create the environment on first use (.venv, pinned dependencies, demo model).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BEDSIDE_CACHE ?= $(HOME)/.cache/bedside
# CPU wheel by default (lies on this machine's disk). A CUDA machine sets e.g.
#   make TORCH_SPEC="torch==2.13.0 --extra-index-url <CUDA wheel index>" LLAMA_CMAKE_ARGS="-DGGML_CUDA=ON"
TORCH_SPEC ?= torch==2.13.0
# Portable AVX2 build of llama.cpp without the AMX backend (quantized batch decode crashes there).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
PROFILE ?= jetson4gb
MODEL ?= demo
CALIB ?=
EVAL ?=
OUT ?= out/deploy-$(PROFILE)
PYTEST_ARGS ?=

export BEDSIDE_CACHE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAMP := $(VENV)/.bedside-setup-stamp
BIN := $(VENV)/bin

.PHONY: setup deploy test test-fast lint clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup_env.sh
	PYTHON="$(PYTHON)" VENV="$(VENV)" TORCH_SPEC="$(TORCH_SPEC)" LLAMA_CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		bash scripts/setup_env.sh
	touch $(STAMP)

deploy: $(STAMP)
	$(BIN)/bedside deploy --profile "$(PROFILE)" --model "$(MODEL)" \
		$(if $(CALIB),--calib "$(CALIB)") $(if $(EVAL),--eval "$(EVAL)") --out "$(OUT)"

lint: $(STAMP)
	$(BIN)/ruff check toolkit exporters runtimes tests bench

test: $(STAMP) lint
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

# The edit loop: everything but the tests marked heavy (end-to-end deploys, demo exports).
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q --durations=10 -m "not heavy" $(PYTEST_ARGS)

# Benchmarks (docs/BENCHMARKS.md, raw results in docs/benchmarks/); each script resumes finished parts.
bench: $(STAMP)
	$(BIN)/python -m bench.compression
	$(BIN)/python -m bench.runtimes
	$(BIN)/python -m bench.awq_budget --threads 2
	$(BIN)/python -m bench.mmap_repack

clean:
	rm -rf out .pytest_cache .ruff_cache
