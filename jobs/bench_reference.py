"""The reference pass against TRL's `precompute_ref_log_probs`, side by side on one machine.

    bash jobs/install_trl.sh && .venv/bin/python jobs/bench_reference.py [--config jobs/smollm2_dpo_vs_dpop.yaml]

Ours: the `reference` stage on the config's pairs with each backend (`--force reference`), timed from its manifest
(Ray's start excluded, the actor's start and model load included), one actor with --cpus-per-actor CPUs. TRL: `DPOTrainer` with
`precompute_ref_log_probs` on the same pairs as text (it tokenizes them to the same ids), timed around its
precompute pass alone (model loads excluded), as many threads, same precision as the config's `reference.dtype` (fp32 here).
Tokens are counted as prompt + chosen + prompt + rejected per pair, the same for both. Writes
jobs/benchmarks/reference_<model>.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRL_PYTHON = os.path.join(REPO, ".venv-trl", "bin", "python")
TRL_BATCH = 4  # pairs per precompute batch (TRL's per_device_train_batch_size)


def stage_seconds(manifest: dict) -> float:
    started, finished = (datetime.fromisoformat(manifest[k]) for k in ("started_at", "finished_at"))
    return (finished - started).total_seconds()


def positions_computed(pairs: list[dict], trl_batch: int, micro_batch: int) -> dict:
    """Token positions each side runs through the model's layers, where a pass's time goes (the layers' cost is per
    position at these lengths): TRL's collator pads the prompt+chosen and prompt+rejected rows of a batch (file
    order) to the longest; our `hf` engine packs prompt, chosen and rejected into one row (the prompt computed
    once), groups of `micro_batch` pairs sorted by length, padded to the longest. Their ratio bounds what layout
    alone can gain."""
    trl = 0
    for start in range(0, len(pairs), trl_batch):
        batch = pairs[start:start + trl_batch]
        rows = [len(r["prompt_ids"]) + len(r[key]) for key in ("chosen_ids", "rejected_ids") for r in batch]
        trl += len(rows) * max(rows)
    packed = sorted(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in pairs)
    ours = sum(len(packed[i:i + micro_batch]) * max(packed[i:i + micro_batch]) for i in range(0, len(packed),
                                                                                          micro_batch))
    return {"trl": trl, "ours_hf": ours, "trl_over_ours": round(trl / ours, 3), "without_padding": sum(packed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/smollm2_dpo_vs_dpop.yaml")
    parser.add_argument("--backends", default="hf,vllm",
                        help="vllm:N runs the vllm backend with reference.max_num_batched_tokens=N")
    parser.add_argument("--cpus-per-actor", type=int, default=2,
                        help="one actor with this many CPUs (torch threads), as many as TRL's --threads")
    args = parser.parse_args()
    os.chdir(REPO)
    if not os.path.exists(TRL_PYTHON):
        sys.exit("TRL is not installed: run `bash jobs/install_trl.sh` first")
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.config import load_config

    cfg = load_config(args.config)
    run = f"{cfg.run.storage}/{cfg.run.name}"
    subprocess.run([sys.executable, "-m", "pipeline", "run", args.config, "--stages", "pairs"], check=True,
                   stdout=subprocess.DEVNULL)
    pairs = pq.read_table(f"{run}/pairs").to_pylist()
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in pairs)
    rows = []
    for variant in args.backends.split(","):
        backend, _, step_tokens = variant.partition(":")
        budget = ["--set", f"reference.max_num_batched_tokens={step_tokens}"] if step_tokens else []
        if backend == "vllm":  # on CPU vLLM's memory share is of host RAM: its GPU default (0.85) would take it all
            budget += ["--set", "reference.gpu_memory_utilization=0.2"]
        subprocess.run([sys.executable, "-m", "pipeline", "run", args.config, "--stages", "reference", "--force",
                        "reference", "--set", f"reference.backend={backend}", "--set", "reference.num_actors=1",
                        "--set", f"reference.cpus_per_actor={args.cpus_per_actor}", *budget],
                       check=True, stdout=subprocess.DEVNULL)
        seconds = stage_seconds(storage.read_json(f"{run}/reference/_manifest.json"))
        side = f"ours ({backend}, {step_tokens} tokens a step)" if step_tokens else f"ours ({backend})"
        rows.append({"side": side, "seconds": round(seconds, 1), "tokens_per_second": tokens / seconds})
    with tempfile.TemporaryDirectory() as folder:
        pairs_file = os.path.join(folder, "pairs.jsonl")
        with open(pairs_file, "w") as f:
            for r in pairs:
                f.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
        out = subprocess.run([TRL_PYTHON, os.path.join(HERE, "bench_trl_dpo.py"), "--model", cfg.model.name_or_path,
                              "--pairs", pairs_file, "--steps", "1", "--batch", str(TRL_BATCH), "--precompute",
                              "--threads", str(args.cpus_per_actor)],
                             capture_output=True, text=True, check=True)
    trl = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append({"side": "TRL precompute_ref_log_probs", "seconds": round(trl["precompute_seconds"], 1),
                 "tokens_per_second": tokens / trl["precompute_seconds"]})
    for row in rows:
        row["tokens_per_second"] = round(row["tokens_per_second"], 1)
        row["against_trl"] = round(row["tokens_per_second"] / rows[-1]["tokens_per_second"], 2)
    figures = {"config": args.config, "model": cfg.model.name_or_path, "pairs": len(pairs), "pair_tokens": tokens,
               "positions_computed": positions_computed(pairs, TRL_BATCH, cfg.reference.micro_batch_size),
               "dtype": cfg.reference.dtype, "threads": args.cpus_per_actor, "runs": rows}
    name = os.path.basename(cfg.model.name_or_path.rstrip("/"))
    path = os.path.join(HERE, "benchmarks", f"reference_{name}.json")
    with open(path, "w") as f:
        json.dump(figures, f, indent=2)
    print(f"{'side':40} {'seconds':>8} {'tokens/s':>9} {'x TRL':>6}")
    for r in rows:
        print(f"{r['side']:40} {r['seconds']:>8} {r['tokens_per_second']:>9} {r['against_trl']:>6}")
    computed = figures["positions_computed"]
    print(f"positions through the layers: TRL {computed['trl']}, ours {computed['ours_hf']} "
          f"({computed['trl_over_ours']}x fewer)")
    print(f"{len(pairs)} pairs, {tokens} pair tokens; wrote {path}")


if __name__ == "__main__":
    main()
