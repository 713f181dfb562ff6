"""A multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head and two worker nodes, each its own
raylet and object store, logical CPUs standing in for GPUs), reached as `ray job submit` users reach one
(RAY_ADDRESS), with run.storage on the S3 stand-in: the nodes share no run folder."""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import yaml

from conftest import REPO, demo_config
from pipeline import storage
from test_cluster import BUCKET, s3_env  # noqa: F401 (the S3 stand-in fixture)

CLUSTER = """
import sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # all work on the worker nodes
nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
cluster.wait_for_nodes()
print(cluster.address, flush=True)
for line in sys.stdin:
    if line.startswith("remove"):
        cluster.remove_node(nodes[int(line.split()[1])])
        print("removed", flush=True)
    elif line.startswith("add"):
        nodes.append(cluster.add_node(num_cpus=2))
        cluster.wait_for_nodes()
        print("added", flush=True)
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def multinode(s3_env):  # noqa: F811
    """The cluster's address, in an environment that reaches it and the S3 stand-in; the cluster's own temp
    folder keeps it apart from the session's cluster."""
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, **s3_env, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-c", CLUSTER], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    address = process.stdout.readline().strip()
    assert address, "the cluster did not start"
    yield process, {**env, "RAY_ADDRESS": address}
    process.stdin.close()
    process.wait(timeout=120)


def run(env: dict, config: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", config, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def hsdp_config(tmp_path_factory, tiny_model):
    """The demo config on S3, 4 CPU train workers of one logical CPU each (the cluster's worker nodes have 2, the
    head none), a checkpoint every 2 steps; 12 steps, so that a node can be removed well before the end."""
    tmp = tmp_path_factory.mktemp("multinode")
    config = demo_config(tmp, tiny_model, name="hsdp", n_pairs=120, num_workers=4, cpus_per_worker=1.0,
                         batch_size=8, micro_batch_size=2, max_steps=12, log_every=1, eval_every=0,
                         checkpoint_every=2, warmup_steps=1)
    raw = yaml.safe_load(open(config))
    raw["run"]["storage"] = f"s3://{BUCKET}/multinode"
    raw["reference"]["backend"] = "hf"
    with open(config, "w") as f:
        yaml.safe_dump(raw, f)
    return config


def test_hsdp_two_by_two_across_two_nodes_equals_fsdp(multinode, hsdp_config):
    """train.shard_size 2 on 4 workers: 2 replicas of 2 shards, each shard group on one node (Ray packs the
    workers 2 to a node and numbers them node by node), the steps' losses those of plain FSDP over all 4."""
    _, env = multinode
    hsdp = run(env, hsdp_config, "--set", "train.shard_size=2")
    assert hsdp.returncode == 0, hsdp.stdout[-3000:] + hsdp.stderr[-3000:]
    logs = hsdp.stdout + hsdp.stderr
    assert "FSDP2 over 2 replica(s) x 2 shard(s), on 2 node(s)" in logs
    assert "spans nodes" not in logs
    run_uri = f"s3://{BUCKET}/multinode/hsdp"
    hsdp_rows = [json.loads(line) for line in storage.read_text(f"{run_uri}/train/metrics.jsonl").splitlines()]
    fsdp = run(env, hsdp_config, "--stages", "train", "--force", "train", "--set", "train.shard_size=4")
    assert fsdp.returncode == 0, fsdp.stdout[-3000:] + fsdp.stderr[-3000:]
    assert "FSDP2 over 4 shard(s)" in fsdp.stdout + fsdp.stderr
    fsdp_rows = [json.loads(line) for line in storage.read_text(f"{run_uri}/train/metrics.jsonl").splitlines()]
    assert [r["step"] for r in hsdp_rows] == [r["step"] for r in fsdp_rows] == list(range(1, 13))
    for a, b in zip(hsdp_rows, fsdp_rows):
        for key in ("loss", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_a_node_lost_after_the_first_checkpoint_the_run_finishes_on_a_new_one(multinode, hsdp_config):
    """A worker node (two of the four train workers) is removed once the step-2 checkpoint is on S3; a new node
    joins. Ray Train restarts the workers from that checkpoint, each reading its own slices from S3, and the run
    ends with the uninterrupted run's steps and losses (the test above's last run, the same but for shard_size).
    """
    import time

    cluster, env = multinode
    run_uri = f"s3://{BUCKET}/multinode/hsdp"
    uninterrupted = [json.loads(line) for line in storage.read_text(f"{run_uri}/train/metrics.jsonl").splitlines()]
    config = hsdp_config
    args = ["--stages", "train", "--force", "train", "--set", "train.shard_size=2", "--set", "train.max_failures=2"]
    driver = subprocess.Popen([sys.executable, "-m", "pipeline", "run", config, *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.time()

    def steps_logged() -> list[int]:  # by this run (the file is the last run's until this one rewrites it)
        text = storage.read_text(f"{run_uri}/train/metrics.jsonl") or ""
        return [row["step"] for row in map(json.loads, text.splitlines()) if row["time"] > started]

    def checkpoint_registered() -> bool:  # Train's controller has taken the step-2 checkpoint (on S3 before)
        return any(uri.endswith("/checkpoint_manager_snapshot.json") and "step_000002" in storage.read_text(uri)
                   for uri, _ in storage.list_files(f"{run_uri}/train"))

    while not (any(step >= 3 for step in steps_logged()) and checkpoint_registered()):
        assert driver.poll() is None and time.time() < started + 600, driver.stdout.read()[-3000:]
        time.sleep(0.2)
    cluster.stdin.write("remove 1\n")
    cluster.stdin.flush()
    assert cluster.stdout.readline().strip() == "removed"
    cluster.stdin.write("add\n")
    cluster.stdin.flush()
    assert cluster.stdout.readline().strip() == "added"
    output = driver.communicate(timeout=900)[0]
    assert driver.returncode == 0, output[-3000:]
    resumed = [json.loads(line) for line in storage.read_text(f"{run_uri}/train/metrics.jsonl").splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert any(r.get("resumed_from_step") for r in resumed), "the run never restarted"
    for a, b in zip(resumed, uninterrupted):
        for key in ("loss", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
