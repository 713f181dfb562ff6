"""`dpop run` on the demo config, end to end on a local Ray cluster with 2 FSDP2 train workers."""
import json
import math
import os
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import demo_config, read_manifest, saved_weights
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.runner import plan

METRIC_KEYS = ["step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "dpop/penalty", "dpop/penalty_active"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_model, ray_cluster):
    """jobs/demo.yaml (2 train workers) with fewer steps, run once for the module, on its own copy of the model
    (the staleness tests edit it)."""
    tmp = tmp_path_factory.mktemp("demo")
    model = shutil.copytree(tiny_model, tmp / "model", copy_function=shutil.copy2)
    config = demo_config(tmp, str(model), max_steps=12, checkpoint_every=4, eval_every=4, log_every=1)
    assert load_config(config).train.num_workers == 2
    assert main(["run", config]) == 0
    data = {"pairwise": str(tmp / "data" / "pairwise.jsonl"), "conversations": str(tmp / "data" / "conversations.jsonl"),
            "model": model,
            "uninterrupted": [json.loads(line) for line in open(tmp / "runs" / "demo" / "train" / "metrics.jsonl")]}
    return config, tmp / "runs" / "demo", data


def test_every_output_is_there(demo):
    config, run_dir, data = demo
    pairs = read_manifest(run_dir, "pairs")
    lines = sum(1 for key in ("pairwise", "conversations") for _ in open(data[key]))
    assert pairs["records_in"] == lines
    assert pairs["dropped"] == {"malformed_row": 1, "missing_field": 1, "identical": 1, "too_long": 1}
    assert pairs["rows"] == lines - 4 == pq.read_table(run_dir / "pairs").num_rows

    reference = pq.read_table(run_dir / "reference")
    assert reference.num_rows == pairs["rows"]
    assert reference.schema.field("ref_chosen_logp").type == pa.float64()
    assert read_manifest(run_dir, "reference")["backend"] == "vllm"

    train = read_manifest(run_dir, "train")
    assert train["steps"] == 12 and train["resumed_from_step"] is None
    # Every reference row is a train pair, an eval pair, or counted (the eval remainder an equal split leaves out).
    assert train["rows_in"] == reference.num_rows == train["rows_out"] + train["rows_dropped"]
    assert train["rows_dropped"] == train["eval_rows"] % 2 == sum(train["dropped"].values())
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


@pytest.fixture(scope="module")
def evaluated(demo):
    """The demo run with an eval section (held-out pairs, a multiple-choice and a GSM8K-style benchmark), in a
    config file of its own so the other tests keep the three-stage demo; `dpop run` runs only eval."""
    import yaml

    from conftest import write_config
    from pipeline.demo import write_eval_data

    config, run_dir, data = demo
    benchmarks = write_eval_data(str(run_dir.parent / "eval_data"))
    with open(config) as f:
        raw = yaml.safe_load(f)
    raw["eval"] = {"policies": ["train"], "max_length": 384, "sources": [
        {"path": benchmarks["multiple_choice"], "task": "multiple_choice", "name": "sums_choice"},
        {"path": benchmarks["gsm8k"], "task": "gsm8k", "name": "sums_gsm8k", "num_fewshot": 2,
         "max_new_tokens": 24}]}
    eval_config = write_config(run_dir.parent / "demo_eval.yaml", raw)
    assert main(["run", eval_config]) == 0
    return eval_config, run_dir, {**data, **benchmarks}


def _results(run_dir) -> dict[tuple[str, str, str], float]:
    rows = json.loads((run_dir / "eval" / "results.json").read_text())
    return {(r["model"], r["task"], r["metric"]): r for r in rows}


def _slow_logp(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context), one forward pass per token, no batching or padding."""
    import torch

    sequence, total = context + continuation, 0.0
    with torch.no_grad():
        for i in range(len(context), len(sequence)):
            logits = model(torch.tensor([sequence[:i]])).logits[0, -1].double()
            total += torch.log_softmax(logits, -1)[sequence[i]].item()
    return total


def _slow_greedy(model, tokenizer, prompt: list[int], max_new_tokens: int, stop: list[str]) -> str:
    import torch

    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([sequence])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            sequence.append(token)
    text = tokenizer.decode(sequence[len(prompt):], skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def test_eval_scores_policy_and_reference_as_a_slow_computation_does(evaluated, capsys):
    """results.json (vLLM, the demo's backend) against transformers, token by token: multiple-choice accuracy
    from each choice's log-likelihood, greedy answers, and the held-out pairs' change in log p(chosen)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, run_dir, data = evaluated
    results = _results(run_dir)
    manifest = read_manifest(run_dir, "eval")
    train = read_manifest(run_dir, "train")
    assert manifest["inputs"]["train"]["run_id"] == train["run_id"]
    assert set(manifest["inputs"]) == {"reference", "train"}
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_dropped"]
    assert manifest["tasks"]["sums_gsm8k"]["dropped"] == {"fewshot_example": 2}
    assert {m for m, _, _ in results} == {"reference", "train"}
    tokenizer = AutoTokenizer.from_pretrained(data["model"])
    questions = [json.loads(line) for line in open(data["multiple_choice"])]
    problems = [json.loads(line) for line in open(data["gsm8k"])]
    generations = pq.read_table(run_dir / "eval" / "generations.parquet").to_pandas()
    eval_pairs = pq.read_table(run_dir / "reference").to_pandas().query("split == 'eval'")
    for name, path in (("reference", data["model"]), ("train", run_dir / "train" / "model")):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        acc = acc_norm = 0
        for q in questions:
            context = tokenizer(f"Question: {q['question']}\nAnswer:")["input_ids"]
            lls = [_slow_logp(model, context, tokenizer(f"Question: {q['question']}\nAnswer: {c}")["input_ids"]
                              [len(context):]) for c in q["choices"]]
            acc += max(range(len(lls)), key=lls.__getitem__) == q["answer"]
            acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(q["choices"][i])) == q["answer"]
        assert results[(name, "sums_choice", "acc")]["value"] == pytest.approx(acc / len(questions))
        assert results[(name, "sums_choice", "acc_norm")]["value"] == pytest.approx(acc_norm / len(questions))
        assert results[(name, "sums_choice", "acc")]["n"] == len(questions)

        shots = "".join(f"Question: {p['question']}\nAnswer: {p['answer']}\n\n" for p in problems[:2])
        answers = generations[generations.model == name].answer.tolist()
        expected = [_slow_greedy(model, tokenizer, tokenizer(f"{shots}Question: {p['question']}\nAnswer:")["input_ids"],
                                 24, ["Question:", "\n\n"]) for p in problems[2:]]
        assert answers == expected
        if name == "train":
            change = [_slow_logp(model, list(row.prompt_ids), list(row.chosen_ids)) - row.ref_chosen_logp
                      for row in eval_pairs.itertuples()]
            assert results[("train", "pairs", "logps/chosen_change")]["value"] == pytest.approx(
                sum(change) / len(change), abs=1e-4)
            assert results[("train", "pairs", "logps/chosen_change")]["n"] == len(eval_pairs)

    # The graph: eval reads reference and train, and goes stale with either.
    capsys.readouterr()
    assert main(["status", config]) == 0
    assert re.search(r"eval +done +\d+ +reference,train", capsys.readouterr().out)
    assert main(["status", config, "--set", "train.beta=0.2"]) == 0
    assert re.search(r"eval +stale .*\(changed: upstream\)", capsys.readouterr().out)
    manifest_path = run_dir / "train" / "_manifest.json"
    original = manifest_path.read_text()
    manifest_path.write_text(original.replace(train["run_id"], "0" * 32))  # as a forced rerun of train leaves it
    try:
        assert main(["status", config]) == 0
        assert "(train was rerun since)" in capsys.readouterr().out
    finally:
        manifest_path.write_text(original)


def test_eval_backends_agree_and_the_report_is_rebuilt_from_storage(evaluated):
    """The transformers engine gives the vLLM engine's numbers; the report shows them and comes back the same
    from storage alone."""
    config, run_dir, _ = evaluated
    with_vllm = _results(run_dir)
    assert main(["run", config, "--set", "eval.backend=hf"]) == 0
    with_hf = _results(run_dir)
    assert with_hf.keys() == with_vllm.keys()
    for key, row in with_vllm.items():
        assert with_hf[key]["value"] == pytest.approx(row["value"], abs=1e-4), key

    report = (run_dir / "report.md").read_text()
    for heading in ("## Pairs", "## Reference log-probs", "## Training", "## Evaluation"):
        assert heading in report
    figures = re.findall(r"\]\(report/([\w.]+\.png)\)", report)
    assert set(figures) >= {"pair_counts.png", "edit_distance.png", "train_curves.png", "eval.png"}
    for name in figures:
        assert (run_dir / "report" / name).stat().st_size > 5_000
    shutil.rmtree(run_dir / "report")
    (run_dir / "report.md").unlink()
    assert main(["report", config, "--set", "eval.backend=hf"]) == 0  # the config the eval stage last ran with
    rebuilt = (run_dir / "report.md").read_text()
    assert rebuilt.split("\n", 3)[3] == report.split("\n", 3)[3]  # all but the "Built ..." line
    assert {p.name for p in (run_dir / "report").iterdir()} == set(figures)


def test_early_stopping_ends_the_run_and_keeps_the_best_evaluations_weights(demo):
    """min_delta 1e9: only the first evaluation (step 2) counts as an improvement, so the run ends at the second
    evaluation after it (patience 2, step 6) and model/ must be the step-2 policy: the same weights a plain 2-step
    run ends with (constant learning rate, so the first steps do not depend on max_steps)."""
    config, run_dir, _ = demo
    for name in ("early", "two_steps"):  # the demo's pairs and reference, current under another run name
        for stage in ("pairs", "reference"):
            shutil.copytree(run_dir / stage, run_dir.parent / name / stage)
    common = ["--set", "train.lr_schedule=constant", "--set", "train.warmup_steps=1", "--set", "train.eval_every=2",
              "--set", "train.checkpoint_every=0"]
    assert main(["run", config, "--set", "run.name=early", "--set", "train.max_steps=12", *common,
                 "--set", "train.early_stopping={patience: 2, min_delta: 1.0e+9}"]) == 0
    early = read_manifest(run_dir.parent / "early", "train")
    assert read_manifest(run_dir.parent / "early", "reference")["run_id"] == read_manifest(run_dir, "reference")["run_id"]
    assert early["steps"] == 6 and early["model_step"] == 2
    assert early["early_stopping"] == {"stopped": True, "model_step": 2, "metric": "eval/rewards/accuracies",
                                       "best": early["early_stopping"]["best"]}
    rows = [json.loads(line) for line in open(run_dir.parent / "early" / "train" / "metrics.jsonl")]
    assert rows[-1]["step"] == 6 and rows[-1]["early_stopping/stopped"] is True
    assert [r["early_stopping/best_step"] for r in rows if "eval/loss" in r] == [2, 2, 2]

    assert main(["run", config, "--set", "run.name=two_steps", "--set", "train.max_steps=2", *common]) == 0
    best = saved_weights(run_dir.parent / "early" / "train" / "model")
    two_steps = saved_weights(run_dir.parent / "two_steps" / "train" / "model")
    assert best.keys() == two_steps.keys()
    for name, tensor in best.items():
        assert (tensor - two_steps[name]).abs().max().item() < 1e-6, name


def test_the_plain_padded_layout_trains_as_the_packed_one_does(demo):
    """train.layout padded (one right-padded row per sequence, the plain computation) against the demo's packed,
    prefix-shared run: the same losses and log-probs at every step, up to float rounding (summation order)."""
    config, run_dir, data = demo
    for stage in ("pairs", "reference"):
        shutil.copytree(run_dir / stage, run_dir.parent / "padded" / stage)
    assert main(["run", config, "--set", "run.name=padded", "--set", "train.layout=padded",
                 "--set", "train.checkpoint_every=0"]) == 0
    padded = [json.loads(line) for line in open(run_dir.parent / "padded" / "train" / "metrics.jsonl")]
    assert [r["step"] for r in padded] == [r["step"] for r in data["uninterrupted"]]
    for plain, packed in zip(padded, data["uninterrupted"]):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "eval/loss"):
            if key in packed:
                assert plain[key] == pytest.approx(packed[key], abs=1e-4), (packed["step"], key)


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
    # status names the key that made the stage stale, with its recorded and its new value.
    assert "(changed: train.beta 0.1 -> 0.2)" in status
    assert main(["status", config, "--set", "train.max_steps=3", "--set", "train.warmup_steps=1"]) == 0
    assert "(changed: train.max_steps 12 -> 3, train.warmup_steps 3 -> 1)" in capsys.readouterr().out
    # A stage whose upstream is stale cannot run alone: the error names both, before any work.
    assert main(["run", config, "--stages", "train", "--set", "data.max_length=100"]) == 2
    assert "stage train needs reference, which is stale" in capsys.readouterr().err


def test_step_one_scores_pairs_as_the_reference_did(demo):
    """Parity at step 1 (vLLM reference, fp32, dropout off): the policy is the reference, so every log-ratio is 0,
    the loss is log 2 and no pair's chosen log-prob is below the reference."""
    _, run_dir, _ = demo
    first = json.loads(open(run_dir / "train" / "metrics.jsonl").readline())
    assert first["step"] == 1
    assert abs(first["loss"] - math.log(2)) < 1e-3
    assert first["dpop/penalty_active"] == 0
    assert first["logps/ref_gap"] < 1e-3  # nats per completion, policy against the vLLM reference


def test_unfinished_train_resumes_exactly_from_latest_checkpoint(demo):
    """A train stage without its manifest (as after a crash) restarts from its newest sharded checkpoint and logs
    the same losses as the uninterrupted run: same model, optimizer, schedule and data position."""
    config, run_dir, data = demo
    uninterrupted = data["uninterrupted"]
    os.remove(run_dir / "train" / "_manifest.json")
    shutil.rmtree(run_dir / "train" / "model")
    # What a kill in the middle of writing the step-10 checkpoint leaves: a folder of cut shards, never registered.
    (ray_run,) = (run_dir / "train").glob("ray-*")
    partial = ray_run / "step_000010"
    shutil.copytree(ray_run / "step_000008", partial)
    for shard in partial.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    assert main(["run", config]) == 0
    train = read_manifest(run_dir, "train")
    assert train["resumed_from_step"] == 8  # checkpoints at 4 and 8; the last step (12) saves the model instead
    resumed = [json.loads(line) for line in open(run_dir / "train" / "metrics.jsonl")]
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed[:8]] == [r["loss"] for r in uninterrupted[:8]]  # kept as they were
    for before, after in zip(uninterrupted[8:], resumed[8:]):
        # fp32 on CPU, same reduction order: equal up to float rounding.
        for key in ("loss", "logps/chosen", "logps/rejected", "eval/loss"):
            if key in before:
                assert after[key] == pytest.approx(before[key], abs=1e-5), (before["step"], key)
    assert saved_weights(run_dir / "train" / "model")


def test_a_lost_train_worker_is_replaced_and_the_run_finishes(demo):
    """`--force train` reruns only train, afresh. SIGKILL one FSDP2 worker after its step-4 checkpoint is
    registered: Ray Train (train.max_failures) restarts the group from that checkpoint within the same `dpop run`,
    and the run ends as the uninterrupted one did."""
    import threading
    import time

    import ray
    from ray.util.state import list_actors

    config, run_dir, data = demo
    session = ray.get_runtime_context().gcs_address  # this cluster, whatever else runs on the machine
    uninterrupted = data["uninterrupted"]
    before = {s: read_manifest(run_dir, s)["finished_at"] for s in ("pairs", "reference", "train")}
    # Workers of earlier runs can still be listed as alive for a moment: kill one of this run's.
    earlier = {a["actor_id"] for a in list_actors(session, filters=[("class_name", "=", "RayTrainWorker")])}
    killed = []

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            # Registered by Ray Train's controller (reported is not enough: it takes reports in its own time).
            snapshots = list((run_dir / "train").glob("ray-*/checkpoint_manager_snapshot.json"))
            if snapshots and "step_000004" in snapshots[0].read_text() and \
                    not (run_dir / "train" / "_manifest.json").exists():
                workers = [a for a in list_actors(session, filters=[("class_name", "=", "RayTrainWorker"),
                                                           ("state", "=", "ALIVE")]) if a["actor_id"] not in earlier]
                if workers:
                    os.kill(workers[-1]["pid"], 9)
                    killed.append(workers[-1]["pid"])
                    return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    assert main(["run", config, "--force", "train", "--set", "train.max_failures=1"]) == 0
    killer.join()
    assert killed, "no worker was killed"
    after = {s: read_manifest(run_dir, s)["finished_at"] for s in before}
    assert after["pairs"] == before["pairs"] and after["reference"] == before["reference"]
    assert after["train"] != before["train"]
    train = read_manifest(run_dir, "train")
    # Forced: a fresh run (the resume test's checkpoints were cleared); the restart resumes this run's own.
    assert train["steps"] == 12 and train["resumed_from_step"] in (4, 8)
    rows = [json.loads(line) for line in open(run_dir / "train" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))  # each step once
    assert rows[-1]["loss"] == pytest.approx(uninterrupted[-1]["loss"], abs=1e-5)
    assert rows[-1]["eval/loss"] == pytest.approx(uninterrupted[-1]["eval/loss"], abs=1e-5)


def status_of(config, capsys, *overrides) -> dict[str, str]:
    """`dpop status` as {stage: state (why)}."""
    capsys.readouterr()
    assert main(["status", config, *overrides]) == 0
    out = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        stage, state, *rest = line.split()
        if state != "off":
            why = line.split("  (", 1)[1].rstrip(")") if "  (" in line else ""
            out[stage] = f"{state} ({why})" if why else state
    return out


def test_fingerprints_follow_content_not_paths(demo, capsys):
    """What decides each stage's output, changed in place under the same paths, makes exactly the stages that read
    it stale; putting it back makes them current again."""
    from safetensors.torch import load_file, save_file

    config, run_dir, data = demo
    model = data["model"]
    assert status_of(config, capsys) == {"pairs": "done", "reference": "done", "train": "done"}

    # A new training seed: the vLLM reference pass stays current.
    assert status_of(config, capsys, "--set", "run.seed=7") == {
        "pairs": "done", "reference": "done", "train": "stale (changed: seed)"}

    # Same path, new weights (a re-export into the same folder): the reference and the policy are stale.
    weights, backup = model / "model.safetensors", run_dir.parent / "original.safetensors"
    shutil.copy2(weights, backup)
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    assert status_of(config, capsys) == {"pairs": "done", "reference": "stale (changed: model)",
                                         "train": "stale (changed: model, upstream)"}
    shutil.copy2(backup, weights)  # size and time as before
    assert status_of(config, capsys) == {"pairs": "done", "reference": "done", "train": "done"}

    # Only the chat template: the texts of chat pairs change, so pairs and everything after it.
    template = model / "chat_template.jinja"
    original = template.read_text()
    template.write_text(original.replace("<|im_start|>assistant", "<|im_start|>assistant "))
    assert status_of(config, capsys) == {"pairs": "stale (changed: tokenizer)",
                                         "reference": "stale (changed: model, upstream)",
                                         "train": "stale (changed: model, upstream)"}
    template.write_text(original)

    # A data file edited in place with its size and modification time kept: its content decides.
    path = data["pairwise"]
    stat, text = os.stat(path), open(path).read()
    open(path, "w").write(text.replace("plus", "PLUS", 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(path) == stat.st_size
    assert status_of(config, capsys)["pairs"] == "stale (changed: sources)"
    open(path, "w").write(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert status_of(config, capsys) == {"pairs": "done", "reference": "done", "train": "done"}


def test_forced_upstream_rerun_makes_everything_below_it_stale(demo, capsys):
    """Same config, new output: `--force pairs` must not leave the reference log-probs of the old pairs current."""
    config, run_dir, _ = demo
    assert main(["run", config, "--stages", "pairs", "--force", "pairs"]) == 0
    assert status_of(config, capsys) == {"pairs": "done", "reference": "stale (pairs was rerun since)",
                                         "train": "stale (reference is stale)"}
    # `dpop run` reruns both, in order.
    assert [stage.name for stage, _ in plan(load_config(config), None, [])] == ["reference", "train"]
