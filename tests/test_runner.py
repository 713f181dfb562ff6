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


def test_only_the_holder_removes_the_lock_and_its_heartbeat_survives_a_failed_write(tmp_path, monkeypatch, capsys):
    """A run whose lock was taken over (its heartbeat stopped long enough for another host) leaves the new holder's
    lock in place on exit; a failed heartbeat write is retried, with a warning, not the end of the heartbeat."""
    from pipeline import storage

    run = tmp_path / "run"
    with RunLock(str(run)):
        other = {"host": "other-node", "pid": 1, "process_started": 0, "started_at": "2026-01-01T00:00:00+00:00",
                 "heartbeat": time.time()}
        (run / "_lock.json").write_text(json.dumps(other))
    assert json.loads((run / "_lock.json").read_text()) == other
    assert "now names another run (host other-node, pid 1): left in place" in capsys.readouterr().out
    (run / "_lock.json").unlink()

    monkeypatch.setattr(RunLock, "HEARTBEAT_SECONDS", 0.05)
    write_text, failures = storage.write_text, []

    def fails_once(uri, text):
        if not failures:
            failures.append(uri)
            raise OSError("the store is unreachable")
        write_text(uri, text)

    monkeypatch.setattr(storage, "write_text", fails_once)
    with RunLock(str(run)):
        first = json.loads((run / "_lock.json").read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((run / "_lock.json").read_text())["heartbeat"] > first + 0.1
    assert failures and "could not refresh the run lock" in capsys.readouterr().out


def start_together(commands: list[list[str]], env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Start the commands within a few ms of each other and wait for all of them."""
    processes = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), p.stdout.read(), p.stderr.read())
            for p in processes]


TAKE_LOCK = """
import os, sys, time
from pipeline.runlock import RunLock
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both start at the same instant
with RunLock(sys.argv[1]):
    print("held", os.getpid(), flush=True)
    time.sleep(1)
"""


def test_of_two_runs_started_together_exactly_one_holds_the_lock(tmp_path):
    """Ten rounds of two processes taking the lock at the same instant (to the OS scheduler's precision): in each,
    one holds it and the other is refused with the holder named."""
    for round_ in range(10):
        run = str(tmp_path / f"run{round_}")
        at = str(time.time() + 1.5)  # after both interpreters have started
        results = start_together([[sys.executable, "-c", TAKE_LOCK, run, at]] * 2)
        held = [r for r in results if r.returncode == 0]
        refused = [r for r in results if r.returncode != 0]
        assert len(held) == 1 and len(refused) == 1, [r.stdout + r.stderr[-500:] for r in results]
        holder_pid = held[0].stdout.split()[1]
        assert f"in use by another dpop run: host {socket.gethostname()}, pid {holder_pid}" in refused[0].stderr


def test_gpus_the_cluster_lacks_fail_in_seconds_naming_the_key(tmp_path, tiny_model, ray_cluster, capsys):
    """use_gpu defaults to true; this cluster has no GPU: the run must not wait for one forever."""
    from pipeline.cli import main

    config = demo_config(tmp_path, tiny_model, use_gpu=True)
    started = time.time()
    assert main(["run", config]) == 2
    assert time.time() - started < 30
    assert "train.use_gpu is true, which needs 2 GPU(s) (train.num_workers), but the Ray cluster has 0" in \
        capsys.readouterr().err
    assert main(["run", config, "--stages", "pairs,reference", "--set", "reference.use_gpu=true"]) == 2
    assert "reference.use_gpu is true, which needs 1 GPU(s)" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "demo" / "pairs").exists()  # no stage started


def test_gpu_count_covers_every_actor_and_the_hf_engine_takes_one(tiny_model, tmp_path, monkeypatch):
    """reference.num_actors x tensor_parallel_size GPUs for vLLM (4 here, where the cluster has 3), one per actor
    for the transformers engine, which runs on one GPU whatever tensor_parallel_size says."""
    import ray

    from pipeline.config import load_config
    from pipeline.engines import engine_actor
    from pipeline.runner import STAGES, check_gpus

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 3.0})
    cfg = load_config(demo_config(tmp_path, tiny_model)).copy_with(
        {"reference.use_gpu": True, "reference.num_actors": 2, "reference.tensor_parallel_size": 2})
    reference = [s for s in STAGES if s.name == "reference"]
    with pytest.raises(PlanError, match=r"needs 4 GPU\(s\) \(2 actor\(s\) \(reference.num_actors\) x 2\)"):
        check_gpus(cfg, reference)
    hf = cfg.copy_with({"reference.backend": "hf"})
    check_gpus(hf, reference)  # 2 actors x 1 GPU
    assert engine_actor(hf, tiny_model, 64, "hf")["num_gpus"] == 1
    assert engine_actor(cfg, tiny_model, 64, "vllm")["num_gpus"] == 2


INIT_RAY = """
import sys, ray
from pipeline.runner import init_ray
init_ray(address=sys.argv[1] or None, num_cpus=1)
print("CPUs", ray.cluster_resources()["CPU"], flush=True)
ray.shutdown()
"""


def test_a_stale_cluster_file_is_ignored_and_a_dead_address_is_named(tmp_path):
    """Without an address the driver starts its own local cluster, whatever cluster Ray's `ray_current_cluster`
    file names (a `ray start` or a crashed test cluster leaves one; seen: every run failed with "When connecting to
    an existing cluster, num_cpus and num_gpus must not be provided"). An address nobody answers at fails in
    seconds, named."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.makedirs(os.path.join(ray_tmp, "ray"))
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write("127.0.0.1:1")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    run = subprocess.run([sys.executable, "-c", INIT_RAY, ""], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0 and "CPUs 1.0" in run.stdout, run.stderr[-2000:]
    started = time.time()
    dead = subprocess.run([sys.executable, "-c", INIT_RAY, "127.0.0.1:1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert dead.returncode != 0 and time.time() - started < 30
    assert "run.ray_address is '127.0.0.1:1', but no Ray cluster answers there" in dead.stderr
