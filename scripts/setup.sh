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
.venv/bin/python -m pip install -q -e ".[dev,train,serve,onnx,ray,text]"
# Reference packages of the SAM 2 / SAM-HQ parity tests: their torchvision requirement is not installed
# (the tests put stand-ins for the few transforms they use in place; see tests/reference/).
.venv/bin/python -m pip install -q --no-deps "sam2==1.1.0" "segment-anything-hq==0.3"
# Tests of the web tool: fastapi's TestClient needs httpx; the browser test drives Debian's Chromium with
# Playwright (its own browser download is never used).
.venv/bin/python -m pip install -q "httpx>=0.27" "playwright>=1.45"
# The web page's in-browser decoder: onnxruntime-web from npm, next to the page (git-ignored, ~140 MB of
# wasm builds); the server serves it at /vendor/ort/. Without npm the page still works, without hover.
if command -v npm >/dev/null 2>&1; then
  npm install --prefix src/segany/serve/static --no-audit --no-fund --no-package-lock --omit=dev --silent \
    || echo "npm install failed: the web page's in-browser decoder (onnxruntime-web) is not installed" >&2
else
  echo "npm not found: the web page's in-browser decoder (onnxruntime-web) is not installed" >&2
fi
# The browser test (tests/test_browser.py) drives Debian's Chromium; without it that one test is skipped.
# SEGANY_INSTALL_CHROMIUM=1 installs it here (apt-get, as root or with sudo).
if ! command -v chromium >/dev/null 2>&1 && [ -z "${SEGANY_CHROMIUM:-}" ]; then
  if [ "${SEGANY_INSTALL_CHROMIUM:-0}" = 1 ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get install -y -q chromium || echo "apt-get install chromium failed" >&2
  else
    echo "Chromium not found: the browser test will be skipped. Install it with 'sudo apt-get install -y chromium'" \
      "(or rerun with SEGANY_INSTALL_CHROMIUM=1)." >&2
  fi
fi
echo "segany installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
