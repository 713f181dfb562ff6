"""What a K = 4 sweep costs: our β × λ sweep on one reference pass against 4 TRL runs, each with its own.

    bash jobs/install_trl.sh && .venv/bin/python jobs/bench_tune.py [--config jobs/smollm2_dpo_vs_dpop.yaml]
        [--pairs 20] [--steps 3] [--batch 4] [--workers 1] [--concurrent 1] [--out jobs/benchmarks/tune.json]

The config's first source is cut to `--pairs` pairs and its `pairs` stage run first (untimed: TRL gets the same
pairs as a file it only has to read). Then, one after the other on this machine, each timed from start to exit:
- ours: `dpop run --stages reference,tune --force reference,tune`: one reference pass, then a 2 x 2 grid (β 0.1 and
  0.5, λ 0 and 50) of `--steps` steps of `--batch` pairs, `--concurrent` trials at a time of `--workers` FSDP2
  workers each, the machine's CPUs split between them (the default, one trial of one worker with every thread, is
  TRL's own arrangement), no early stopping, evaluated once at the end; Ray's start, the actors' and the workers'
  starts included. Each trial's phases (rank 0's timings.json) show where its time went.
- TRL: 4 `DPOTrainer` runs (jobs/bench_trl_dpo.py, one process of 2 threads) with `precompute_ref_log_probs`, the
  same steps, batch and train pairs, β 0.1, 0.5, 0.1, 0.5 (TRL has no λ: the DPOP trials' cost is the same as
  DPO's), each a fresh process that loads the model and computes its reference log-probs.
fp32 on both sides. Writes jobs/benchmarks/tune.json.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRL_PYTHON = os.path.join(REPO, ".venv-trl", "bin", "python")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/smollm2_dpo_vs_dpop.yaml")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1,
                        help="FSDP2 workers per trial; the machine's CPUs are split between them")
    parser.add_argument("--concurrent", type=int, default=1, help="trials at once")
    parser.add_argument("--out", default=os.path.join(HERE, "benchmarks", "tune.json"))
    args = parser.parse_args()
    os.chdir(REPO)
    if not os.path.exists(TRL_PYTHON):
        sys.exit("TRL is not installed: run `bash jobs/install_trl.sh` first")
    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.train.metrics import phase_seconds

    settings = {"data.sources.0.limit": args.pairs, "train.max_steps": args.steps, "train.batch_size": args.batch,
                "train.micro_batch_size": args.batch // args.workers, "train.num_workers": args.workers,
                "train.cpus_per_worker": max(1, os.cpu_count() // (args.workers * args.concurrent)),
                "train.eval_every": 0, "train.checkpoint_every": 0, "train.warmup_steps": 0,
                "tune.beta": "[0.1, 0.5]", "tune.dpop_lambda": "[0.0, 50.0]", "tune.scheduler": "none",
                "tune.max_concurrent_trials": args.concurrent, "reference.num_actors": 1, "reference.cpus_per_actor": 2}
    overrides = [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]
    cfg = load_config(args.config, [f"{k}={v}" for k, v in settings.items()])
    dpop = [sys.executable, "-m", "pipeline", "run", args.config, *overrides]
    subprocess.run(dpop + ["--stages", "pairs"], check=True, stdout=subprocess.DEVNULL)
    started = time.time()
    subprocess.run(dpop + ["--stages", "reference,tune", "--force", "reference,tune"], check=True,
                   stdout=subprocess.DEVNULL)
    ours_seconds = time.time() - started
    run = f"{cfg.run.storage}/{cfg.run.name}"
    tune = json.load(open(f"{run}/tune/_manifest.json"))
    reference = json.load(open(f"{run}/reference/_manifest.json"))

    # Where each trial's time went (rank 0's timings.json): all but `steps` is a fixed cost of the trial.
    trial_phases = {os.path.basename(folder): phase_seconds(folder)
                    for folder in sorted(glob.glob(f"{run}/tune/trials/*"))}
    for name, phases in trial_phases.items():
        print(f"[bench] {name}: {phases}", flush=True)

    pairs = [r for r in pq.read_table(f"{run}/pairs").to_pylist() if r["split"] == "train"]
    trl_runs = []
    with tempfile.TemporaryDirectory() as folder:
        pairs_file = os.path.join(folder, "pairs.jsonl")
        with open(pairs_file, "w") as f:
            for r in pairs:
                f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
        for beta in (0.1, 0.5, 0.1, 0.5):
            started = time.time()
            out = subprocess.run([TRL_PYTHON, os.path.join(HERE, "bench_trl_dpo.py"), "--model",
                                  cfg.model.name_or_path, "--pairs", pairs_file, "--steps", str(args.steps),
                                  "--batch", str(args.batch), "--beta", str(beta), "--precompute", "--threads", "2"],
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"TRL run failed:\n{out.stderr[-4000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            trl_runs.append({"beta": beta, "wall_seconds": round(time.time() - started, 1),
                             "precompute_seconds": round(result["precompute_seconds"], 1),
                             "step_seconds": [round(s, 2) for s in result["step_seconds"]]})
            print(trl_runs[-1], flush=True)
    trl_seconds = sum(r["wall_seconds"] for r in trl_runs)
    figures = {
        "config": args.config, "model": cfg.model.name_or_path, "train_pairs": len(pairs), "steps": args.steps,
        "batch": args.batch, "workers_per_trial": args.workers, "concurrent_trials": args.concurrent,
        "precision": "float32", "cpus": os.cpu_count(),
        "ours": {"wall_seconds": round(ours_seconds, 1), "reference_pairs": reference["rows_out"],
                 "sweep_seconds": tune["sweep_seconds"], "trials": tune["trials"], "trial_phases": trial_phases},
        "trl_4_runs": {"wall_seconds": round(trl_seconds, 1), "runs": trl_runs},
        "ours_over_trl": round(ours_seconds / trl_seconds, 2),
    }
    with open(args.out, "w") as f:
        json.dump(figures, f, indent=2)
    print(json.dumps(figures, indent=2))
    print(f"K = 4 sweep: ours {ours_seconds:.0f} s, 4 TRL runs {trl_seconds:.0f} s: "
          f"{figures['ours_over_trl']:.2f} of TRL's time (goal: at most 0.6)")


if __name__ == "__main__":
    main()
