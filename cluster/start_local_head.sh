#!/usr/bin/env bash
# A local Ray head with a job server on 127.0.0.1, to try `ray job submit` on one machine.
# Stop it with cluster/stop_local_head.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ray start --head --num-cpus="${NUM_CPUS:-8}" --dashboard-host=127.0.0.1 --disable-usage-stats
