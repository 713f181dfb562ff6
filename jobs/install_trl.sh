#!/usr/bin/env bash
# TRL for the side-by-side benchmarks only (jobs/bench_train.py): its own .venv-trl with the versions TRL
# supports. The pipeline never imports it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-trl/bin/python ] || "$PYTHON" -m venv .venv-trl
.venv-trl/bin/pip install -q --upgrade pip
# The CPU build of torch first, the same as the pipeline's, so both sides run the same kernels.
.venv-trl/bin/pip install -q torch==2.13.0
.venv-trl/bin/pip install -q trl==1.16.0 psutil
.venv-trl/bin/python -c "import trl, transformers, torch, accelerate; print(f'installed: trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, accelerate {accelerate.__version__}')"
