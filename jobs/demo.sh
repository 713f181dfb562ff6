#!/usr/bin/env bash
# The main demo on a local Ray cluster: install, build the tiny models and data, then DPO against DPOP
# (pairs -> reference -> a two-trial tune -> eval -> report). Extra arguments go to `dpop run`
# (e.g. --force tune, --set train.max_steps=48).
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/install.sh
.venv/bin/python -m pipeline.demo .demo
# No `train` stage: the sweep's two trials are the DPO and DPOP runs.
.venv/bin/dpop run jobs/dpo_vs_dpop.yaml --stages pairs,reference,tune,eval "$@"
.venv/bin/dpop status jobs/dpo_vs_dpop.yaml
echo "outputs: runs/dpo_vs_dpop/ (report.md, eval/results.md, tune/heatmap.png, tune/trials/*/model/)"
