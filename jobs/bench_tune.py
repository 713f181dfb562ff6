"""Time a 2 x 2 sweep on the demo with trials two at a time, against the same trials one after another, and write
the figures to jobs/benchmarks/tune.json.

    .venv/bin/python -m pipeline.demo .demo && .venv/bin/python jobs/bench_tune.py

Both runs use the demo's pairs and reference output (computed once, first); only the tune stage is timed.
"""
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP = ["train.max_steps=12", "train.eval_every=4", "train.checkpoint_every=0", "train.log_every=4",
         "train.warmup_steps=1", "tune.beta=[0.1, 0.5]", "tune.dpop_lambda=[0.0, 50.0]", "tune.scheduler=none"]


def main() -> None:
    os.chdir(os.path.dirname(HERE))
    from pipeline.config import load_config
    from pipeline.runner import run_stages

    base = load_config(os.path.join(HERE, "demo.yaml"), ["tune.metric=eval/loss"] + SWEEP)
    run_stages(base, ["pairs", "reference"])
    figures = {}
    for concurrent in (2, 1):
        cfg = load_config(os.path.join(HERE, "demo.yaml"),
                          ["tune.metric=eval/loss", f"tune.max_concurrent_trials={concurrent}"] + SWEEP)
        started = time.time()
        manifest = run_stages(cfg, ["tune"], force=["tune"])["tune"]
        figures[f"{concurrent}_at_a_time"] = {"wall_seconds": round(time.time() - started, 1),
                                              "sweep_seconds": manifest["sweep_seconds"],
                                              "trials": manifest["trials"]}
    figures["speedup"] = round(figures["1_at_a_time"]["sweep_seconds"] / figures["2_at_a_time"]["sweep_seconds"], 2)
    figures["setup"] = ("demo model, 2 x 2 grid (beta 0.1/0.5, lambda 0/50), 12 steps of 16 pairs, 2 FSDP2 CPU "
                        f"workers per trial, no early stopping; {os.cpu_count()} cores, ray.init(num_cpus=8)")
    os.makedirs(os.path.join(HERE, "benchmarks"), exist_ok=True)
    with open(os.path.join(HERE, "benchmarks", "tune.json"), "w") as f:
        json.dump(figures, f, indent=2)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
