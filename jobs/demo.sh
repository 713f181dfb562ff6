#!/usr/bin/env bash
# The whole demo on a local Ray cluster: install, build the tiny model and data, run pairs -> reference -> train.
# Extra arguments go to `dpop run` (e.g. --force train, --set train.max_steps=60).
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/install.sh
.venv/bin/python -m pipeline.demo .demo
.venv/bin/dpop run jobs/demo.yaml "$@"
.venv/bin/dpop status jobs/demo.yaml
echo "outputs: runs/demo/ (pairs/, reference/, train/metrics.jsonl, train/curves.png, train/model/)"
