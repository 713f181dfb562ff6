#!/usr/bin/env bash
# Stop the head that cluster/start_local_head.sh started. With RAY_TEMP_DIR set, only that head's processes and
# their children (found by the temp dir or the head's address in their command lines), so other Ray clusters on
# the machine live on; without it, `ray stop`, which stops every Ray process of this user.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${RAY_TEMP_DIR:-}" ]; then
  exec .venv/bin/ray stop
fi
exec .venv/bin/python - "$RAY_TEMP_DIR" <<'PY'
import os
import sys

import psutil

temp_dir = sys.argv[1]
address_file = os.path.join(temp_dir, "ray_current_cluster")
marks = [temp_dir] + ([open(address_file).read().strip()] if os.path.exists(address_file) else [])
this = psutil.Process()
callers = {this.pid, *(p.pid for p in this.parents())}  # a caller's command line may name the temp dir too
heads = [p for p in psutil.process_iter(["cmdline"])
         if p.pid not in callers and any(m in arg for arg in p.info["cmdline"] or [] for m in marks)]
procs = {p for head in heads for p in [head, *head.children(recursive=True)]}
for p in procs:
    p.terminate()
_, alive = psutil.wait_procs(procs, timeout=10)
for p in alive:
    p.kill()
print(f"stopped {len(procs)} Ray processes of the head in {temp_dir}")
PY
