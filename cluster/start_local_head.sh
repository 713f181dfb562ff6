#!/usr/bin/env bash
# A one-node Ray cluster with a job server, to run the cluster form (`ray job submit`) on this machine.
# Token authentication is on: the token is $RAY_AUTH_TOKEN when set, else ~/.ray/auth_token (made on first use);
# `ray job ...` commands in the same environment find it. The dashboard and job server listen on 127.0.0.1 only.
# Settings: NUM_CPUS (logical CPUs, default 8: more than the cores, so train workers and data tasks all fit),
# DASHBOARD_PORT (default 8265), RAY_TEMP_DIR (default /tmp/ray); extra arguments go to `ray start`.
# Stop it with cluster/stop_local_head.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token
[ -n "${RAY_AUTH_TOKEN:-}" ] || .venv/bin/ray get-auth-token --generate > /dev/null
# Jobs run their entrypoint's `python` from the PATH the head started with: this virtualenv's.
export PATH="$PWD/.venv/bin:$PATH"
port=${DASHBOARD_PORT:-8265}
ray start --head --num-cpus="${NUM_CPUS:-8}" --temp-dir="${RAY_TEMP_DIR:-/tmp/ray}" \
  --dashboard-host=127.0.0.1 --dashboard-port="$port" --disable-usage-stats "$@"
echo "job server: http://127.0.0.1:$port   (export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$port)"
