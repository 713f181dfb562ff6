#!/usr/bin/env bash
# A one-node Ray cluster with a job server, to run the cluster form (`ray job submit`) on this machine.
# Token authentication is on: the token is $RAY_AUTH_TOKEN when set, else ~/.ray/auth_token (made on first use);
# `ray job ...` commands in the same environment find it. The dashboard and job server listen on 127.0.0.1 only.
# Settings: NUM_CPUS (logical CPUs, default 8: more than the cores, so train workers and data tasks all fit),
# DASHBOARD_PORT (default 8265), RAY_TEMP_DIR (default /tmp/ray); extra arguments go to `ray start`.
# `ray start --block` runs in the background as the parent of every head process; its pid goes to
# $RAY_TEMP_DIR/head.pid, and cluster/stop_local_head.sh stops exactly that process tree.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token
[ -n "${RAY_AUTH_TOKEN:-}" ] || .venv/bin/ray get-auth-token --generate > /dev/null
# Jobs run their entrypoint's `python` from the PATH the head started with: this virtualenv's.
export PATH="$PWD/.venv/bin:$PATH"
port=${DASHBOARD_PORT:-8265}
temp=${RAY_TEMP_DIR:-/tmp/ray}
mkdir -p "$temp"
setsid ray start --head --block --num-cpus="${NUM_CPUS:-8}" --temp-dir="$temp" \
  --dashboard-host=127.0.0.1 --dashboard-port="$port" --disable-usage-stats "$@" > "$temp/head.log" 2>&1 &
echo $! > "$temp/head.pid"
# Up when the job server answers (401 without the token counts: it is listening).
for _ in $(seq 1 180); do
  if python - "$port" <<'PY'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=2)
except urllib.error.HTTPError:
    pass
except OSError:
    sys.exit(1)
PY
  then
    echo "job server: http://127.0.0.1:$port   (export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$port)"
    exit 0
  fi
  if ! kill -0 "$(cat "$temp/head.pid")" 2> /dev/null; then
    echo "ray start failed:" >&2; cat "$temp/head.log" >&2; exit 1
  fi
  sleep 1
done
echo "the job server did not answer within 180 s; see $temp/head.log" >&2
exit 1
