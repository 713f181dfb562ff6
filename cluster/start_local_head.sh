#!/usr/bin/env bash
# A local Ray head with a job server, to try `ray job submit` on one machine. Stop it with stop_local_head.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ray start --head --num-cpus="${NUM_CPUS:-8}" --dashboard-host=127.0.0.1 --disable-usage-stats
echo "submit with: RAY_ADDRESS=http://127.0.0.1:8265 .venv/bin/ray job submit --working-dir . -- python -m pipeline run jobs/demo.yaml"
