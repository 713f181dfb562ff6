#!/usr/bin/env bash
# Stop the head that cluster/start_local_head.sh started: the `ray start --block` process whose pid it wrote to
# $RAY_TEMP_DIR/head.pid (default /tmp/ray) and every process under it, found by pid, never by matching command
# lines, so other Ray clusters and drivers on the machine live on.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python - "${RAY_TEMP_DIR:-/tmp/ray}/head.pid" <<'PY'
import os
import sys

import psutil

pid_file = sys.argv[1]
if not os.path.exists(pid_file):
    sys.exit(f"no head started by cluster/start_local_head.sh: {pid_file} does not exist")
try:
    head = psutil.Process(int(open(pid_file).read()))
    procs = [head, *head.children(recursive=True)]
except psutil.NoSuchProcess:
    procs = []
for p in procs:
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(procs, timeout=15)
for p in alive:
    p.kill()
os.remove(pid_file)
print(f"stopped {len(procs)} Ray processes of the head in {os.path.dirname(pid_file)}")
PY
