"""Sum up a finished method comparison (a `tune.methods` sweep with its eval): per method, when its chosen reward
turned down, where its log p(chosen) and margin ended, and the eval results; written to one JSON under
jobs/benchmarks/ and printed as markdown tables. Reads only the run's files, like `dpop report`.

    .venv/bin/python jobs/summarize_methods.py jobs/smollm2_gsm8k_methods.yaml jobs/benchmarks/gsm8k_methods.json

"The chosen reward turns down" is read from the training rows (`rewards/chosen` = β · (log πθ − log π_ref) of the
chosen completions, a mean over each step's batch). With fewer steps than an epoch's worth, every batch is pairs
the policy has not trained on yet, so each row measures the policy before it learns from them. Rows are smoothed
over SMOOTH_STEPS logged steps, since one batch of 8 pairs is noisy.
"""
import json
import platform
import sys

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import load_config
from pipeline.vocab import METHOD_KEYS, method_label, varying_keys

SMOOTH_STEPS = 5


def smoothed(values: list[float], window: int = SMOOTH_STEPS) -> list[float]:
    """A centred moving mean (shorter at the ends)."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def turn_points(steps: list[int], rewards: list[float]) -> dict:
    """The step of the smoothed chosen reward's peak, the first step after it where the reward is below zero for
    good (None if it never is), and the final smoothed value."""
    smooth = smoothed(rewards)
    peak = max(range(len(smooth)), key=smooth.__getitem__)
    below_for_good = next((steps[i] for i in range(len(smooth)) if all(v < 0 for v in smooth[i:])), None)
    return {"peak_step": steps[peak], "peak_reward": smooth[peak], "below_zero_from_step": below_for_good,
            "final_reward": smooth[-1]}


def summarize(config_path: str) -> dict:
    cfg = load_config(config_path)
    run = storage.join(cfg.run.storage, cfg.run.name)
    fs, path = storage.resolve(storage.join(run, "tune", "trials.parquet"))
    trials = pq.read_table(path, filesystem=fs).to_pylist()
    varying = varying_keys(trials)
    methods = {}
    for trial in trials:
        label = method_label(trial, varying)
        rows = [json.loads(line) for line in storage.read_text(storage.join(trial["out"], "metrics.jsonl"))
                .splitlines()]
        train = [r for r in rows if "rewards/chosen" in r]
        held_out = [r for r in rows if "eval/logps/chosen" in r]
        methods[label] = {
            "params": {key: trial[key] for key in METHOD_KEYS},
            "chosen_reward": turn_points([r["step"] for r in train], [r["rewards/chosen"] for r in train]),
            "final_train_margin": smoothed([r["rewards/margins"] for r in train])[-1],
            "train": [{key: r[key] for key in ("step", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                                "logps/chosen", "rewards/accuracies")} for r in train],
            "held_out": [{"step": r["step"], **{key: r[f"eval/{key}"] for key in
                                                ("logps/chosen", "rewards/chosen", "rewards/margins",
                                                 "rewards/accuracies")}} for r in held_out],
        }
    results = json.loads(storage.read_text(storage.join(run, "eval", "results.json")) or "[]")  # [] before eval
    seconds = {stage: (storage.read_json(storage.join(run, stage, "_manifest.json")) or {}).get("seconds")
               for stage in ("pairs", "reference", "tune", "eval")}
    return {"config": config_path, "machine": f"{platform.machine()}, this session's", "seconds": seconds,
            "methods": methods, "eval": results}


def markdown(summary: dict) -> str:
    lines = ["| method | chosen reward peak (step) | below zero for good from step | final chosen reward | "
             "final margin | held-out log p(chosen) − reference, nats, by eval step |", "|---|---|---|---|---|---|"]
    for label, method in summary["methods"].items():
        turn, beta = method["chosen_reward"], method["params"]["beta"]
        curve = ", ".join(f"{r['step']}: {r['rewards/chosen'] / beta:+.1f}" for r in method["held_out"])
        lines.append(f"| {label} | {turn['peak_reward']:+.2f} ({turn['peak_step']}) | "
                     f"{turn['below_zero_from_step'] or 'never'} | {turn['final_reward']:+.2f} | "
                     f"{method['final_train_margin']:+.2f} | {curve} |")
    models = sorted({r["model"] for r in summary["eval"]}, key=lambda m: m != "reference")
    lines += ["", "| task / metric | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for task, metric in sorted({(r["task"], r["metric"]) for r in summary["eval"]}):
        value = {r["model"]: r["value"] for r in summary["eval"] if (r["task"], r["metric"]) == (task, metric)}
        lines.append(f"| {task} {metric} | " + " | ".join(f"{value[m]:.3f}" if m in value else "" for m in models)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    config_path, out = sys.argv[1:3]
    summary = summarize(config_path)
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    print(markdown(summary))
