"""Train throughput side by side with TRL's DPOTrainer: same machine, model, pairs, batch, β, precision (fp32).

    bash jobs/install_trl.sh                      # TRL in its own .venv-trl (once)
    .venv/bin/python jobs/bench_train.py [--config jobs/smollm2_dpo_vs_dpop.yaml] [--steps 6] [--batch 4]

1. Makes sure the config's `pairs` and `reference` stages are done (they are reused when current).
2. Exports steps x batch train pairs as text for TRL (its tokenizer gives the same ids: completions end with the
   end-of-sequence token already).
3. Runs, one after the other on this machine:
   - ours, `train.layout: packed` (the default) and `padded`: `dpop run --stages train` with 2 FSDP2 workers of
     1 CPU each, λ = 0 (plain DPO, TRL's sigmoid loss), no checkpoints; and packed on 1 worker of 2 threads, TRL's
     own arrangement, which shows what the two workers' weight all-gathers and gradient reduce-scatters cost;
   - TRL with its live reference model, and with `precompute_ref_log_probs`, one process with 2 threads.
   Both sides get the machine's 2 cores.
4. Fairness: TRL's precomputed reference log-probs of the exported pairs against our reference stage's, and both
   first-step losses (log 2 = 0.6931 when the policy is the reference).
Step time is the median over steps 2..S (step 1 warms up; the last one also evaluates on ours). pairs/s = batch /
step time; tokens/s counts prompt + chosen + prompt + rejected tokens of the mean pair. Peak memory is resident
memory: ours the largest worker's, TRL's its one process's. Writes jobs/benchmarks/train_<model>.json.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRL_PYTHON = os.path.join(REPO, ".venv-trl", "bin", "python")


def dpop(config: str, *args: str) -> float:
    """Run the pipeline CLI; return its wall time."""
    started = time.time()
    subprocess.run([sys.executable, "-m", "pipeline", "run", config, *args], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    return time.time() - started


def ours(config: str, cfg, steps: int, batch: int, layout: str, workers: int = 2) -> dict:
    from pipeline.train.metrics import read_metrics

    settings = {"train.max_steps": steps, "train.batch_size": batch, "train.micro_batch_size": batch // workers,
                "train.num_workers": workers, "train.cpus_per_worker": 2 // workers, "train.log_every": 1,
                "train.eval_every": 0,
                "train.checkpoint_every": 0, "train.dpop_lambda": 0.0, "train.beta": 0.1,
                "train.learning_rate": 1e-6, "train.warmup_steps": 0, "train.lr_schedule": "constant",
                "train.layout": layout}
    overrides = [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]
    wall = dpop(config, "--stages", "train", "--force", "train", *overrides)
    rows = read_metrics(f"{cfg.run.storage}/{cfg.run.name}/train")
    side = f"ours ({layout})" if workers == 2 else f"ours ({layout}, 1 worker of 2 threads)"
    return {"side": side, "step_seconds": [r["seconds_per_step"] for r in rows],
            "wall_seconds": wall, "peak_rss_mb": max(r["peak_memory_mb"] for r in rows),
            "first_loss": rows[0]["loss"]}


def trl(model: str, pairs_file: str, steps: int, batch: int, precompute: bool) -> dict:
    started = time.time()
    out = subprocess.run([TRL_PYTHON, os.path.join(HERE, "bench_trl_dpo.py"), "--model", model, "--pairs",
                          pairs_file, "--steps", str(steps), "--batch", str(batch), "--threads", "2"]
                         + (["--precompute"] if precompute else []), capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"TRL run failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(side=f"TRL ({'precomputed reference' if precompute else 'live reference'})",
                  wall_seconds=time.time() - started)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/smollm2_dpo_vs_dpop.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    os.chdir(REPO)
    if not os.path.exists(TRL_PYTHON):
        sys.exit("TRL is not installed: run `bash jobs/install_trl.sh` first")
    import pyarrow.parquet as pq

    from pipeline.config import load_config

    cfg = load_config(args.config)
    dpop(args.config, "--stages", "pairs,reference")
    reference = pq.read_table(f"{cfg.run.storage}/{cfg.run.name}/reference").to_pylist()
    train = sorted((r for r in reference if r["split"] == "train"), key=lambda r: r["pair_id"])
    exported = train[:args.steps * args.batch]
    pair_tokens = statistics.mean(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                                  for r in train)

    with tempfile.TemporaryDirectory() as folder:
        pairs_file = os.path.join(folder, "pairs.jsonl")
        with open(pairs_file, "w") as f:
            for r in exported:
                f.write(json.dumps({k: r[k] for k in ("pair_id", "prompt", "chosen", "rejected")}) + "\n")
        runs = [ours(args.config, cfg, args.steps, args.batch, "packed"),
                ours(args.config, cfg, args.steps, args.batch, "padded"),
                ours(args.config, cfg, args.steps, args.batch, "packed", workers=1),
                trl(cfg.model.name_or_path, pairs_file, args.steps, args.batch, precompute=False),
                trl(cfg.model.name_or_path, pairs_file, args.steps, args.batch, precompute=True)]

    precomputed = runs[4]
    gaps = [abs(a - r["ref_chosen_logp"]) for a, r in zip(precomputed.pop("ref_chosen_logps"), exported)] + \
           [abs(a - r["ref_rejected_logp"]) for a, r in zip(precomputed.pop("ref_rejected_logps"), exported)]
    table = []
    for run in runs:
        seconds = statistics.median(run["step_seconds"][1:]) if len(run["step_seconds"]) > 1 \
            else run["step_seconds"][0]
        table.append({"side": run["side"], "seconds_per_step": round(seconds, 3),
                      "pairs_per_second": round(args.batch / seconds, 3),
                      "tokens_per_second": round(args.batch * pair_tokens / seconds, 1),
                      "peak_rss_mb": round(run["peak_rss_mb"]), "first_loss": run["first_loss"],
                      "wall_seconds": round(run["wall_seconds"], 1),
                      "reference_pre_pass_seconds": run.get("precompute_seconds")})
    for row in table:
        row["ours_packed_speedup"] = round(table[0]["pairs_per_second"] / row["pairs_per_second"], 2)
    figures = {"config": args.config, "model": cfg.model.name_or_path, "steps": args.steps, "batch": args.batch,
               "precision": "float32", "mean_pair_tokens": round(pair_tokens, 1),
               "step0_reference_logp_gap": {"max": max(gaps), "mean": statistics.mean(gaps),
                                            "pairs": len(exported), "ours": cfg.reference.backend, "trl": "precompute"},
               "trl_versions": subprocess.run(
                   [TRL_PYTHON, "-c", "import trl, transformers, torch; "
                                      "print(trl.__version__, transformers.__version__, torch.__version__)"],
                   capture_output=True, text=True).stdout.split(),
               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "runs": table}
    name = os.path.basename(cfg.model.name_or_path.rstrip("/"))
    out = os.path.join(HERE, "benchmarks", f"train_{name}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(figures, f, indent=2)
    print(f"{'side':34} {'s/step':>7} {'pairs/s':>8} {'tokens/s':>9} {'peak MB':>8} {'loss@1':>7} "
          f"{'ours packed ×':>13}")
    for r in table:
        print(f"{r['side']:34} {r['seconds_per_step']:>7.2f} {r['pairs_per_second']:>8.3f} "
              f"{r['tokens_per_second']:>9.1f} {r['peak_rss_mb']:>8} {r['first_loss']:>7.4f} "
              f"{r['ours_packed_speedup']:>13.2f}")
    gap = figures["step0_reference_logp_gap"]
    print(f"step 0: |TRL reference - ours| max {gap['max']:.2e} mean {gap['mean']:.2e} nats over "
          f"{2 * gap['pairs']} sequences; wrote {out}")


if __name__ == "__main__":
    main()
