"""The runner's guards: one run per run folder, GPUs the cluster lacks, and fingerprints by content."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, demo_config
from pipeline.runlock import RunLock
from pipeline.vocab import PlanError

HOLD = """
import sys, time
from pipeline.runlock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_one_folder_refuses_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.time()
        with pytest.raises(PlanError) as error:
            RunLock(run).__enter__()
        assert time.time() - started < 5  # at once, not after a wait
        message = str(error.value)
        assert f"in use by another dpop run: host {socket.gethostname()}, pid {holder.pid}, started 20" in message
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: nothing cleans it up
        holder.wait()
    assert json.loads((tmp_path / "run" / "_lock.json").read_text())["pid"] == holder.pid
    with RunLock(run):  # its holder is dead: taken over
        assert json.loads((tmp_path / "run" / "_lock.json").read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / "_lock.json").exists()  # released on exit


def test_a_lock_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = {"host": "other-node", "pid": 1, "process_started": 0, "started_at": "2026-01-01T00:00:00+00:00"}
    (run / "_lock.json").write_text(json.dumps({**lock, "heartbeat": time.time()}))
    with pytest.raises(PlanError, match="host other-node, pid 1"):
        RunLock(str(run)).__enter__()
    (run / "_lock.json").write_text(json.dumps({**lock, "heartbeat": time.time() - RunLock.STALE_SECONDS - 1}))
    with RunLock(str(run)):
        pass


def test_gpus_the_cluster_lacks_fail_in_seconds_naming_the_key(tmp_path, tiny_model, ray_cluster, capsys):
    """use_gpu defaults to true; this cluster has no GPU: the run must not wait for one forever."""
    from pipeline.cli import main

    config = demo_config(tmp_path, tiny_model, use_gpu=True)
    started = time.time()
    assert main(["run", config]) == 2
    assert time.time() - started < 30
    assert "train.use_gpu is true, which needs 2 GPU(s), but the Ray cluster has 0" in capsys.readouterr().err
    assert main(["run", config, "--stages", "pairs,reference", "--set", "reference.use_gpu=true"]) == 2
    assert "reference.use_gpu is true, which needs 1 GPU(s)" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "demo" / "pairs").exists()  # no stage started
