"""A multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head and two worker nodes, each its own
raylet and object store, 3 logical CPUs each standing in for GPUs), reached as `ray job submit` users reach one
(RAY_ADDRESS), with run.storage on the S3 stand-in: the nodes share no run folder. (The model and the source data
are read from this machine's disk, as each node of a real cluster reads them from its image or a hub cache.)"""
import json
import os
import subprocess
import sys
import tempfile

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, demo_config
from pipeline import storage
from test_cluster import BUCKET, s3_env  # noqa: F401 (the S3 stand-in fixture)

CLUSTER = """
import sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # all work on the worker nodes
nodes = [cluster.add_node(num_cpus=3) for _ in range(2)]
cluster.wait_for_nodes()
print(cluster.address, flush=True)
for line in sys.stdin:
    if line.startswith("remove"):
        cluster.remove_node(nodes.pop(int(line.split()[1])))  # the index among the nodes there now
        print("removed", flush=True)
    elif line.startswith("add"):
        nodes.append(cluster.add_node(num_cpus=3))
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


def replace_node(cluster: subprocess.Popen, index: int) -> None:
    """Remove the `index`-th of the worker nodes there now (its raylet and every process on it killed), then add a
    new node (it goes last)."""
    for command, answer in ((f"remove {index}", "removed"), ("add", "added")):
        cluster.stdin.write(command + "\n")
        cluster.stdin.flush()
        assert cluster.stdout.readline().strip() == answer


def run(env: dict, config: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", config, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def hsdp_config(tmp_path_factory, tiny_model):
    """The demo config on S3, 4 CPU train workers of 1.5 logical CPUs each (the cluster's worker nodes have 3, the
    head none: two workers a node), a checkpoint every 2 steps; 6 steps, so that a node can be removed well before
    the end."""
    tmp = tmp_path_factory.mktemp("multinode")
    config = demo_config(tmp, tiny_model, name="hsdp", n_pairs=120, num_workers=4, cpus_per_worker=1.5,
                         batch_size=8, micro_batch_size=2, max_steps=6, log_every=1, eval_every=0,
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
    assert [r["step"] for r in hsdp_rows] == [r["step"] for r in fsdp_rows] == list(range(1, 7))
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
    replace_node(cluster, 1)
    output = driver.communicate(timeout=900)[0]
    assert driver.returncode == 0, output[-3000:]
    resumed = [json.loads(line) for line in storage.read_text(f"{run_uri}/train/metrics.jsonl").splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert any(r.get("resumed_from_step") for r in resumed), "the run never restarted"
    for a, b in zip(resumed, uninterrupted):
        for key in ("loss", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_a_node_lost_during_the_reference_pass_the_rerun_scores_only_what_is_missing(multinode, tmp_path,
                                                                                     tiny_model):
    """800 pairs scored one sequence per forward by two transformers actors of 2 CPUs each, so one on each worker
    node, written 40 pairs a file to S3. Node 1 is removed once 3 files are written, and a new node joins: Ray Data
    restarts the lost actor there and retries its batches, and the pass goes on. Then the driver is killed, and the
    rerun keeps every finished file on S3 and scores only the pairs they lack: every pair ends scored exactly once,
    with the log-probs of a plain computation."""
    import signal
    import time
    from collections import Counter

    cluster, env = multinode
    config = demo_config(tmp_path, tiny_model, name="refloss", n_pairs=800, max_steps=1, warmup_steps=0)
    raw = yaml.safe_load(open(config))
    raw["run"]["storage"] = f"s3://{BUCKET}/multinode"
    raw["reference"].update(backend="hf", batch_size=40, micro_batch_size=1, rows_per_file=40, num_actors=2,
                            cpus_per_actor=2.0)
    with open(config, "w") as f:
        yaml.safe_dump(raw, f)
    run_uri = f"s3://{BUCKET}/multinode/refloss"
    args = ["--stages", "pairs,reference"]

    def files() -> int:
        return sum(uri.endswith(".parquet") for uri, _ in storage.list_files(f"{run_uri}/reference"))

    driver = subprocess.Popen([sys.executable, "-m", "pipeline", "run", config, *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait_for_files(count: int) -> None:
        deadline = time.time() + 600
        while files() < count:
            assert driver.poll() is None and time.time() < deadline, driver.stdout.read()[-3000:]
            time.sleep(0.2)

    wait_for_files(3)
    replace_node(cluster, 1)
    wait_for_files(files() + 3)  # the pass went on after the loss
    os.killpg(driver.pid, signal.SIGKILL)
    assert "The actor was restarted" in driver.communicate()[0]  # the lost node's actor, on the new node
    interrupted = files()

    rerun = run(env, config, *args)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    manifest = storage.read_json(f"{run_uri}/reference/_manifest.json")
    assert manifest["resumed"]["pairs_kept"] >= 40 * (interrupted - 1)
    assert manifest["resumed"]["pairs_scored"] == manifest["rows_in"] - manifest["resumed"]["pairs_kept"]
    pairs = storage.read_parquet(f"{run_uri}/pairs", ["pair_id"]).column(0).to_pylist()
    scored = storage.read_parquet(f"{run_uri}/reference").to_pylist()
    assert Counter(row["pair_id"] for row in scored) == Counter(pairs)
    assert manifest["rows"] == manifest["rows_in"] == len(pairs)
    # The log-probs of pairs from kept and rescored files alike are those of a plain full-logits computation.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for row in scored[::40]:
        ids = torch.tensor([row["prompt_ids"] + row["chosen_ids"]])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        expected = logps[len(row["prompt_ids"]) - 1:].gather(1, ids[0, len(row["prompt_ids"]):, None]).sum()
        assert row["ref_chosen_logp"] == pytest.approx(float(expected), abs=1e-4)


def test_the_main_demo_end_to_end_across_nodes(multinode, tmp_path):
    """jobs/dpo_vs_dpop.yaml, the README's demo (its tiny math Llama built here), with run.storage on S3: pairs, the
    vLLM reference pass, DPO against DPOP as a two-trial sweep of two workers each, eval and the report, on the
    worker nodes. Every stage ends done on S3, and the demo's finding holds: DPOP's held-out chosen log-probs fall
    less than DPO's, and fewer of them fall below the reference."""
    from pipeline.demo import build_math_model, write_problem_data

    _, env = multinode
    data = write_problem_data(str(tmp_path / "data"))
    raw = yaml.safe_load((REPO / "jobs" / "dpo_vs_dpop.yaml").read_text())
    raw["run"].update(storage=f"s3://{BUCKET}/multinode", name="demo")
    raw["run"].pop("num_cpus")  # the cluster's
    raw["model"]["name_or_path"] = build_math_model(str(tmp_path / "math_model"))
    raw["data"]["sources"][0]["path"] = data["problems"]
    raw["eval"]["sources"][0]["path"] = data["problems_test"]
    config = tmp_path / "dpo_vs_dpop.yaml"
    config.write_text(yaml.safe_dump(raw))
    demo = run(env, str(config), "--stages", "pairs,reference,tune,eval")
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    run_uri = f"s3://{BUCKET}/multinode/demo"
    for stage in ("pairs", "reference", "tune", "eval"):  # a stage's manifest is written when it is done
        assert "finished_at" in (storage.read_json(f"{run_uri}/{stage}/_manifest.json") or {}), stage
    assert storage.exists(f"{run_uri}/report.md") and storage.exists(f"{run_uri}/eval/best.json")
    fs, path = storage.resolve(run_uri)
    trials = pq.read_table(f"{path}/tune/trials.parquet", filesystem=fs).to_pylist()
    assert sorted(t["dpop_lambda"] for t in trials) == [0.0, 50.0] and all(t["status"] == "finished" for t in trials)
    files = {i.path.removeprefix(path + "/") for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if i.type == pafs.FileType.File}
    assert any(f.startswith("tune/ray-") and "/experiment_state-" in f for f in files)  # restorable from the bucket
    secret = env["AWS_SECRET_ACCESS_KEY"].encode()  # in every worker's environment: in no output
    assert not [f for f in files if secret in fs.open_input_stream(f"{path}/{f}").read()]
    results = json.loads(storage.read_text(f"{run_uri}/eval/results.json"))
    value = {(r["model"], r["metric"]): r["value"] for r in results if r["task"] == "pairs"}
    dpo, dpop = sorted({model for model, _ in value if "lambda_" in model}, key=lambda m: "lambda_50" in m)
    assert "lambda_0-" in dpo and "lambda_50-" in dpop
    assert value[(dpop, "logps/chosen_change")] > value[(dpo, "logps/chosen_change")]
    assert value[(dpop, "logps/chosen_below_reference")] < value[(dpo, "logps/chosen_below_reference")]


def test_online_rounds_across_nodes_on_s3(multinode, tmp_path, capsys):
    """DPO and DPOP, two online rounds each from the demo's math model, each method's loop a Ray Tune trial
    (online.concurrent_methods), with run.storage on S3 and each train stage on two workers, one a node (2.5 of its
    3 CPUs: a trial's own process takes 0.1): each round-2 worker reads its own slices of the round-1 policy from
    S3. Round 1's samples, pairs and reference pass
    are shared; each method's round 2 starts from its own round-1 policy; the starting model is scored once; the
    report has a row per method and round. A new temperature makes round 1's
    generation stale and everything after it; rerunning one round's train alone leaves its generation as it was."""
    from pipeline.cli import main
    from pipeline.demo import build_math_model, write_problem_data

    _, env = multinode
    data = write_problem_data(str(tmp_path / "data"), n_train=16, n_eval=6)
    config = tmp_path / "rounds.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "rounds", "storage": f"s3://{BUCKET}/multinode"},
        "model": {"name_or_path": build_math_model(str(tmp_path / "math_model"))},
        "data": {"sources": [{"path": data["problems"], "format": "math_corruption"}], "max_prompt_length": 64,
                 "max_length": 160, "eval_fraction": 0.0},
        "reference": {"backend": "hf", "dtype": "float32", "use_gpu": False},
        "train": {"batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "num_workers": 2, "cpus_per_worker": 2.5,
                  "use_gpu": False, "eval_every": 0, "checkpoint_every": 0, "warmup_steps": 0,
                  "learning_rate": 1e-4},
        "eval": {"pairs": False, "backend": "hf", "max_length": 256,
                 "sources": [{"path": data["problems_test"], "task": "gsm8k", "num_fewshot": 0,
                              "max_new_tokens": 48}]},
        "online": {"rounds": 2, "prompts": [{"path": data["problems"]}], "samples_per_prompt": 4,
                   "max_new_tokens": 48, "temperature": 1.0, "methods": [{"dpop_lambda": 0}, {"dpop_lambda": 50}],
                   "concurrent_methods": 2},
    }))

    def states(*overrides) -> dict:  # (status reads the manifests on S3 alone: no cluster needed)
        capsys.readouterr()
        assert main(["status", str(config), *overrides]) == 0
        return {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]
                if "round" in line.split()[0]}

    rounds = run(env, str(config))
    assert rounds.returncode == 0, rounds.stdout[-3000:] + rounds.stderr[-3000:]
    logs = rounds.stdout + rounds.stderr
    assert "online: 2 methods (dpo, dpop), 2 at a time as Ray Tune trials" in logs
    # Every train stage: a worker a node (the trials' lines may be folded into one by Ray's log dedup).
    assert "FSDP2 over 2 shard(s), on 2 node(s)" in logs and "on 1 node(s)" not in logs
    done = states()
    assert set(done.values()) == {"done"} and len(done) == 3 + 2 * 7, done  # shared, then 2 methods x 7 stages
    run_uri = f"s3://{BUCKET}/multinode/rounds"
    assert storage.list_files(f"{run_uri}/online_methods")  # the trials' Tune experiment, on S3 too
    manifest = lambda stage: storage.read_json(f"{run_uri}/{stage}/_manifest.json")
    for method, dpop_lambda in (("dpo", 0.0), ("dpop", 50.0)):
        assert manifest(f"{method}/round1/train")["inputs"].keys() == {"round1/reference"}
        assert manifest(f"{method}/round1/train")["config"]["train"]["dpop_lambda"] == dpop_lambda
        policy = manifest(f"{method}/round1/train")["model"]
        assert policy.startswith(f"s3://{BUCKET}/") and storage.exists(f"{policy}/config.json")
        assert manifest(f"{method}/round2/generate")["model_path"] == policy
        # online.reference: previous, so round 2's reference is the method's round-1 policy
        assert manifest(f"{method}/round2/reference")["model_path"] == policy
        assert manifest(f"{method}/round2/train")["config"]["train"]["dpop_lambda"] == dpop_lambda
    # The starting model's benchmark score: once, in the first method's round 1.
    scored = {stage: [m["name"] for m in manifest(stage)["models"]]
              for stage in ("dpo/round1/eval", "dpo/round2/eval", "dpop/round1/eval", "dpop/round2/eval")}
    assert scored == {"dpo/round1/eval": ["reference", "train"], "dpo/round2/eval": ["train"],
                      "dpop/round1/eval": ["train"], "dpop/round2/eval": ["train"]}
    assert manifest("round1/generate")["sampling"]["temperature"] == 1.0 and manifest("round1/pairs")["rows"] > 0
    report = storage.read_text(f"{run_uri}/report.md")
    assert "## Online rounds" in report and storage.exists(f"{run_uri}/report/online_rounds.png")
    assert report.count("| DPO (λ 0) |") == 2 and report.count("| DPOP (λ 50) |") == 2  # a row per round

    stale = states("--set", "online.temperature=0.7")
    assert set(stale.values()) == {"stale"}, stale
    generated_at = manifest("round1/generate")["finished_at"]
    again = run(env, str(config), "--stages", "dpop/round1/train", "--force", "dpop/round1/train")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert manifest("round1/generate")["finished_at"] == generated_at
    after = states()
    assert after["round1/generate"] == after["dpop/round1/train"] == after["dpo/round2/train"] == "done"
    assert after["dpop/round1/eval"] == after["dpop/round2/generate"] == "stale"  # built on the old policy
