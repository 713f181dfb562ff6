"""The cluster form, for real: a head started by cluster/start_local_head.sh (`ray start --head`, token
authentication on), the stages submitted one by one with `ray job submit`, and run.storage on an S3 server
(moto's) listening on loopback."""
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, write_config
from pipeline import storage

RAY = str(Path(sys.executable).parent / "ray")
BUCKET = "dpop"
TERMINAL = ("succeeded", "failed", "stopped")  # as `ray job status` words them


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@contextlib.contextmanager
def atomic_conditional_puts():
    """moto serves each request on its own thread and checks `If-None-Match: *` before it writes, so two PUTs at
    the same instant can both succeed (seen in CI: two run locks held at once). S3 makes that check and write one
    atomic step; one lock around moto's PUT handler gives the stand-in the same guarantee."""
    import threading

    from moto.s3.responses import S3Response

    put_object, one_at_a_time = S3Response.put_object, threading.Lock()

    def atomic_put_object(self, *args, **kwargs):
        with one_at_a_time:
            return put_object(self, *args, **kwargs)

    S3Response.put_object = atomic_put_object
    try:
        yield
    finally:
        S3Response.put_object = put_object


@pytest.fixture(scope="module")
def s3_env():
    """An S3 server on loopback with one bucket; the AWS variables that point pyarrow (and so Ray Data, Ray Train
    and the manifests) at it are set here for the test's own reads, and given to the head below."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request would bury any failure
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with atomic_conditional_puts():
        server.start()
        host, port = server.get_host_and_port()
        # A secret no output may hold (test_no_secret_reaches_any_output); moto accepts any.
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": f"aws-secret-{secrets.token_hex(12)}",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield env
        server.stop()


@pytest.fixture(scope="module")
def head(s3_env):
    """A local head with a job server; returns the environment in which `ray job ...` reaches it. Its own temp
    dir and ports keep it apart from the session's in-process cluster, and the stop script stops only it."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard, agent, client = free_ports(3)
    env = {**os.environ, **s3_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_TEMP_DIR": temp_dir, "DASHBOARD_PORT": str(dashboard), "HF_HUB_OFFLINE": "1",
           "HF_TOKEN": f"hf_{secrets.token_hex(16)}"}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(["bash", "cluster/start_local_head.sh", "--port=0",
                              f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    yield {**env, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    import psutil

    head_pid = int(open(os.path.join(temp_dir, "head.pid")).read())
    tree = [psutil.Process(head_pid), *psutil.Process(head_pid).children(recursive=True)]
    subprocess.run(["bash", "cluster/stop_local_head.sh"], cwd=REPO, env=env, timeout=120)
    # Every process of that head is gone, found by pid; the session's own cluster was never touched.
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_config(tmp_path_factory, tiny_model):
    """jobs/cluster_demo.yaml with its /tmp inputs swapped for this test's and run.storage on the S3 bucket."""
    from pipeline.demo import write_demo_data

    tmp = tmp_path_factory.mktemp("cluster")
    data = write_demo_data(str(tmp / "data"))
    raw = yaml.safe_load((REPO / "jobs" / "cluster_demo.yaml").read_text())
    raw["run"]["storage"] = f"s3://{BUCKET}/runs"
    raw["model"]["name_or_path"] = tiny_model
    raw["data"]["sources"][0]["path"] = data["pairwise"]
    raw["data"]["sources"][1]["path"] = data["conversations"]
    raw["train"].update(max_steps=6, warmup_steps=1, log_every=1, eval_every=3, checkpoint_every=3)
    return write_config(tmp / "cluster_demo.yaml", raw)


def ray_job(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def submit(env: dict, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit` in its cluster form. It follows the job's output until the job ends and exits 1 if the
    job failed (one waiting process: polling `ray job status` would cost a Python start every few seconds)."""
    return ray_job(env, "submit", "--submission-id", submission_id, "--working-dir", ".",
                   "--runtime-env", "jobs/runtime_env.yaml", "--", *entrypoint, timeout=900)


def final_status(env: dict, submission_id: str) -> str | None:
    out = ray_job(env, "status", submission_id)
    for status in TERMINAL:
        if f"Job '{submission_id}' {status}" in out.stdout + out.stderr:
            return status.upper()
    return None


def logs(env: dict, submission_id: str) -> str:
    return ray_job(env, "logs", submission_id).stdout


def run_job(env: dict, submission_id: str, *entrypoint: str) -> str:
    """Submit, wait for SUCCEEDED; the job's logs."""
    submitted = submit(env, submission_id, *entrypoint)
    assert submitted.returncode == 0, submitted.stdout[-5000:] + submitted.stderr[-3000:]
    assert final_status(env, submission_id) == "SUCCEEDED"
    return logs(env, submission_id)


def read_s3_manifest(run: str, stage: str) -> dict | None:
    return storage.read_json(f"{run}/{stage}/_manifest.json")


def test_storage_round_trip_on_s3(s3_env):
    """The storage helpers on the object store: one PUT per file (no leftover .tmp), listing, clearing."""
    root = f"s3://{BUCKET}/unit"
    storage.write_json(f"{root}/a/_manifest.json", {"rows": 3})
    assert storage.read_json(f"{root}/a/_manifest.json") == {"rows": 3}
    assert storage.read_text(f"{root}/a/missing.json") is None
    fs, path = storage.resolve(root)
    assert isinstance(fs, pafs.S3FileSystem)
    names = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    assert names == [f"{BUCKET}/unit/a/_manifest.json"]
    # Source fingerprints read the object's content from S3, as they do a local file's.
    from pipeline.fingerprint import source_identity

    before = source_identity(f"{root}/a")
    storage.write_json(f"{root}/a/_manifest.json", {"rows": 4})
    assert [name for name, _ in before] == ["_manifest.json"] and source_identity(f"{root}/a") != before
    storage.clear_dir(f"{root}/a")
    assert not storage.exists(f"{root}/a/_manifest.json")


def test_of_two_runs_started_together_on_s3_exactly_one_holds_the_lock(s3_env):
    """The run lock on S3 is a conditional PUT: of two processes taking it at the same instant, in each of five
    rounds, exactly one holds it and the other names the holder."""
    from test_runner import TAKE_LOCK, start_together

    env = {**os.environ, **s3_env}
    for round_ in range(5):
        run = f"s3://{BUCKET}/locks/run{round_}"
        results = start_together([[sys.executable, "-c", TAKE_LOCK, run, str(time.time() + 2)]] * 2, env=env)
        held = [r for r in results if r.returncode == 0]
        assert len(held) == 1, [r.stdout + r.stderr[-500:] for r in results]
        refused = next(r for r in results if r.returncode != 0)
        assert f"pid {held[0].stdout.split()[1]}, started 20" in refused.stderr
        assert not storage.exists(f"{run}/_lock.json")  # the holder removed it


def test_an_engine_on_an_object_store_policy_leaves_no_copy_behind(s3_env, tiny_model):
    """An engine reads a policy saved to S3 from a local copy that it removes once loaded (one per actor per model
    would fill a node's disk over a sweep), and scores as the local folder does."""
    import glob

    from pipeline.engines import HFEngine

    uri = f"s3://{BUCKET}/models/tiny"
    storage.upload_dir(tiny_model, uri)
    copies = set(glob.glob(os.path.join(tempfile.gettempdir(), "dpop-model-*")))
    engine = HFEngine(uri, "float32", False, 4, False)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "dpop-model-*"))) == copies
    local = HFEngine(tiny_model, "float32", False, 4, False)
    assert engine.logps([[5, 6, 7]], [[8, 9]]) == local.logps([[5, 6, 7]], [[8, 9]])


def test_token_authentication_is_on(head):
    accepted = ray_job(head, "list")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    refused = ray_job({**head, "RAY_AUTH_TOKEN": "not-the-token"}, "list")
    assert refused.returncode != 0
    assert "Invalid authentication token" in refused.stdout + refused.stderr


def test_stages_as_separate_jobs_with_storage_on_s3(head, cluster_config):
    """pairs, then reference, then train, each its own `ray job submit`; every output lands in the bucket. (A sweep
    on S3 is test_multinode's demo.)"""
    run = f"s3://{BUCKET}/runs/demo"
    entry = ["python", "-m", "pipeline", "run", cluster_config, "--stages"]

    pairs_logs = run_job(head, "dpop-pairs", *entry, "pairs")
    assert "[dpop] pairs: done" in pairs_logs
    pairs = read_s3_manifest(run, "pairs")
    assert pairs is not None and pairs["rows"] > 200
    assert read_s3_manifest(run, "reference") is None and read_s3_manifest(run, "train") is None

    run_job(head, "dpop-reference", *entry, "reference")
    reference = read_s3_manifest(run, "reference")
    assert reference["rows"] == pairs["rows"] and reference["backend"] == "vllm"
    assert read_s3_manifest(run, "pairs")["finished_at"] == pairs["finished_at"]  # not rerun

    train_logs = run_job(head, "dpop-train", *entry, "train")
    assert "[dpop] train: step 6/6" in train_logs
    train = read_s3_manifest(run, "train")
    assert train["steps"] == 6
    assert read_s3_manifest(run, "reference")["finished_at"] == reference["finished_at"]

    # The outputs, read back from S3.
    fs, path = storage.resolve(run)
    table = pq.read_table(f"{path}/reference", filesystem=fs)
    assert table.num_rows == pairs["rows"]
    assert {"ref_chosen_logp", "ref_rejected_logp"} <= set(table.column_names)
    metrics = [json.loads(line) for line in storage.read_text(f"{run}/train/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    files = {i.path.removeprefix(path + "/") for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))}
    assert {"pairs/_edit_distance.png", "train/curves.png", "train/model/config.json",
            "train/model/model.safetensors.index.json"} <= files
    # The policy's safetensors files, one run of them from each of the 2 train workers, all on S3.
    weight_map = storage.read_json(f"{run}/train/model/model.safetensors.index.json")["weight_map"]
    assert len(set(weight_map.values())) == 2 and {f"train/model/{f}" for f in weight_map.values()} <= files
    assert any(f.startswith("train/ray-") and "/step_000003/" in f for f in files)  # Ray Train's checkpoint

    status = subprocess.run([sys.executable, "-m", "pipeline", "status", cluster_config], env=head,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[1:]}
    assert states == {"pairs": "done", "reference": "done", "train": "done", "tune": "off", "eval": "off"}
    assert storage.exists(f"{run}/report.md")  # each job ends by rebuilding the report from the bucket


def test_no_secret_reaches_any_output(head):
    """The S3 secret, the Hugging Face token and Ray's auth token were in every job's environment: none may appear
    in a manifest, metric, plot, model file or job log of the run above (test_multinode's demo checks a sweep's
    Tune state)."""
    fs, path = storage.resolve(f"s3://{BUCKET}/runs")
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File]
    assert len(files) > 20, "run test_stages_as_separate_jobs_with_storage_on_s3 first"
    blobs = {f: fs.open_input_stream(f).read() for f in files}
    blobs.update({f"logs of {job}": logs(head, job).encode()
                  for job in ("dpop-pairs", "dpop-reference", "dpop-train")})
    for name in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "RAY_AUTH_TOKEN"):
        secret = head[name].encode()
        assert len(secret) >= 16
        assert not [where for where, blob in blobs.items() if secret in blob], name


def test_bad_config_job_fails_fast_with_the_error_in_its_logs(head, cluster_config):
    started = time.time()
    submitted = submit(head, "dpop-bad-config", "python", "-m", "pipeline", "run", cluster_config,
                       "--set", "run.name=bad", "--set", "train.beta=-1")
    assert submitted.returncode == 1 and final_status(head, "dpop-bad-config") == "FAILED"
    assert time.time() - started < 60
    assert "dpop: config error: train.beta: must be > 0, got -1.0" in logs(head, "dpop-bad-config")
    status = ray_job(head, "status", "dpop-bad-config")
    assert "exit code 2" in status.stdout + status.stderr
    assert not storage.exists(f"s3://{BUCKET}/runs/bad")
