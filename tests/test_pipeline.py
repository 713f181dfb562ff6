"""`dpop run` on the demo config, end to end on a local Ray cluster with 2 FSDP2 train workers."""
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import demo_config, read_manifest
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import plan

METRIC_KEYS = ["step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "dpop/penalty", "dpop/penalty_active"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_model, ray_cluster):
    """jobs/demo.yaml (2 train workers) with fewer steps, run once for the module."""
    tmp = tmp_path_factory.mktemp("demo")
    config = demo_config(tmp, tiny_model, max_steps=12, checkpoint_every=4, eval_every=4, log_every=1)
    assert load_config(config).train.num_workers == 2
    assert main(["run", config]) == 0
    data = {"pairwise": str(tmp / "data" / "pairwise.jsonl"), "conversations": str(tmp / "data" / "conversations.jsonl")}
    return config, tmp / "runs" / "demo", data


def test_every_output_is_there(demo):
    config, run_dir, data = demo
    pairs = read_manifest(run_dir, "pairs")
    lines = sum(1 for path in data.values() for _ in open(path))
    assert pairs["records_in"] == lines
    assert pairs["dropped"] == {"malformed_row": 1, "missing_field": 1, "identical": 1, "too_long": 1}
    assert pairs["rows"] == lines - 4 == pq.read_table(run_dir / "pairs").num_rows

    reference = pq.read_table(run_dir / "reference")
    assert reference.num_rows == pairs["rows"]
    assert reference.schema.field("ref_chosen_logp").type == pa.float64()
    assert read_manifest(run_dir, "reference")["backend"] == "vllm"

    train = read_manifest(run_dir, "train")
    assert train["steps"] == 12 and train["resumed_from_step"] is None
    rows = [json.loads(line) for line in open(run_dir / "train" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for row in rows:
        assert set(METRIC_KEYS) <= set(row)
        assert 0 <= row["dpop/penalty_active"] <= 1 and 0 <= row["rewards/accuracies"] <= 1
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert all(f"eval/{k}" in r for r in evals for k in METRIC_KEYS[1:])
    assert os.path.getsize(run_dir / "train" / "curves.png") > 10_000


def test_saved_model_loads_and_moved_from_the_reference(demo, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, _ = demo
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "train" / "model")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "train" / "model")
    assert tokenizer.chat_template
    ids = tokenizer("What is 2 plus 2?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert trained(ids).logits.shape[-1] == initial.config.vocab_size
    moved = [(a - b).abs().max().item() for a, b in zip(trained.parameters(), initial.parameters())]
    assert max(moved) > 1e-4


def test_second_run_skips_every_stage(demo, capsys):
    config, run_dir, _ = demo
    before = {s: read_manifest(run_dir, s)["finished_at"] for s in ("pairs", "reference", "train")}
    assert plan(load_config(config), None, []) == []
    assert main(["run", config]) == 0
    assert {s: read_manifest(run_dir, s)["finished_at"] for s in before} == before
    assert main(["status", config]) == 0
    status = capsys.readouterr().out
    assert all(f"{stage:<10} done" in status for stage in before)
    assert "tune       off" in status  # no tune section in the demo config


def test_changing_beta_makes_only_train_stale(demo, capsys):
    config, _, _ = demo
    assert main(["status", config, "--set", "train.beta=0.2"]) == 0
    status = capsys.readouterr().out
    assert "pairs      done" in status and "reference  done" in status and "train      stale" in status
    # A stage whose upstream is stale cannot run alone: the error names both, before any work.
    assert main(["run", config, "--stages", "train", "--set", "data.max_length=100"]) == 2
    assert "stage train needs reference, which is stale" in capsys.readouterr().err


def test_force_train_reruns_only_train(demo):
    config, run_dir, _ = demo
    before = {s: read_manifest(run_dir, s)["finished_at"] for s in ("pairs", "reference", "train")}
    assert main(["run", config, "--force", "train"]) == 0
    after = {s: read_manifest(run_dir, s)["finished_at"] for s in before}
    assert after["pairs"] == before["pairs"] and after["reference"] == before["reference"]
    assert after["train"] != before["train"]
    assert read_manifest(run_dir, "train")["resumed_from_step"] is None  # forced: a fresh run, not a resume


def test_unfinished_train_resumes_from_latest_checkpoint(demo):
    """A train stage without its manifest (as after a crash) restarts from its newest sharded checkpoint."""
    config, run_dir, _ = demo
    os.remove(run_dir / "train" / "_manifest.json")
    shutil.rmtree(run_dir / "train" / "model")
    assert main(["run", config]) == 0
    train = read_manifest(run_dir, "train")
    assert train["resumed_from_step"] == 8  # checkpoints at 4 and 8; the last step (12) saves the model instead
    steps = [json.loads(line)["step"] for line in open(run_dir / "train" / "metrics.jsonl")]
    assert steps == list(range(1, 13))
    assert (run_dir / "train" / "model" / "model.safetensors").exists()


def test_plain_dpo_on_low_edit_distance_pairs_warns(demo):
    """The demo's pairs differ in one number (median edit distance 1): λ = 0 must warn and name DPOP."""
    from pipeline.train import low_edit_distance_warning

    assert low_edit_distance_warning(50.0, 1.0) is None and low_edit_distance_warning(0.0, 40.0) is None
    config, run_dir, _ = demo
    assert read_manifest(run_dir, "train")["warnings"] == []  # λ = 50
    assert main(["run", config, "--set", "train.dpop_lambda=0", "--set", "train.max_steps=2",
                 "--set", "train.warmup_steps=0", "--set", "train.eval_every=0"]) == 0
    train = read_manifest(run_dir, "train")
    assert train["median_edit_distance"] == 1.0
    (warning,) = train["warnings"]
    assert "plain DPO" in warning and "DPOP" in warning and "train.dpop_lambda" in warning
