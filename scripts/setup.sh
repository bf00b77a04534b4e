#!/usr/bin/env bash
# Create .venv and install segany with its test and optional extras, from scratch.
# torch is pinned to the CPU build that lies on this machine's disk (a looser pin pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,train,serve,onnx]"
echo "segany installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
