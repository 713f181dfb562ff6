"""Each scoring change on its own: one training micro-batch's forward + backward, in a fresh process per variant.

    .venv/bin/python jobs/bench_logprobs.py [--model .demo/smollm2-135m-f32] [--pairs 4] [--repeats 3]

Variants, on the same pairs of a reference stage's output (SmolLM2-135M's GSM8K pairs by default, fp32):
  full_logits  the plain computation: right-padded rows, the model's full (rows, length, vocabulary) logits, log
               softmax, gather (what this trainer did before, and TRL does);
  padded       the same rows, the output head only on completion positions, in chunks (ChunkedTokenLogps);
  packed       prompt + chosen + rejected as one run, runs packed without padding (prefix sharing), chunked head.
Each reports seconds per forward + backward (median of --repeats after one warm-up), the process's peak resident
memory, and the largest difference of its summed log-probs from `full_logits` and from the same computation in
float64 (the rounding each one makes). Writes jobs/benchmarks/logprobs.json.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("full_logits", "padded", "packed")
EXACT = "float64"  # the plain computation in float64, forward only: the yardstick for every variant's rounding


def pairs_of(reference: str, count: int) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(reference, columns=["pair_id", "prompt_ids", "chosen_ids", "rejected_ids"]).to_pylist()
    return sorted(rows, key=lambda r: r["pair_id"])[:count]


def run_variant(variant: str, model_path: str, reference: str, count: int, repeats: int) -> dict:
    """In this process: load the model, score `count` pairs `repeats` + 1 times with gradients."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.logprobs import make_batch, completion_logps, pad_groups

    torch.manual_seed(0)
    dtype = torch.float64 if variant == EXACT else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).train()
    groups = [(r["prompt_ids"], [r["chosen_ids"], r["rejected_ids"]]) for r in pairs_of(reference, count)]

    def full_logits() -> torch.Tensor:
        batch = pad_groups(groups, pad_id=0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logps = torch.log_softmax(logits if variant == EXACT else logits.float(), dim=-1)
        token_logps = logps.reshape(-1, logits.shape[-1])[batch.predictor, batch.targets]
        return torch.zeros(batch.num_completions, dtype=token_logps.dtype).index_add(0, batch.owner, token_logps)

    def ours() -> torch.Tensor:
        return completion_logps(model, make_batch(groups, pad_id=0, layout=variant))

    if variant == EXACT:
        with torch.no_grad():
            return {"variant": variant, "logps": full_logits().tolist()}
    score = full_logits if variant == "full_logits" else ours
    seconds, values = [], None
    for _ in range(repeats + 1):
        started = time.perf_counter()
        logps = score()
        logps.sum().backward()
        seconds.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
        values = logps.detach().tolist()
    tokens = sum(len(p) + len(c) for p, cs in groups for c in cs)
    return {"variant": variant, "seconds": statistics.median(seconds[1:]), "tokens": tokens,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "logps": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=".demo/smollm2-135m-f32")
    parser.add_argument("--reference", default="runs/smollm2_dpo_vs_dpop/reference")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=(*VARIANTS, EXACT), help="(internal) run one variant in this process")
    parser.add_argument("--out", default=os.path.join(HERE, "benchmarks", "logprobs.json"))
    args = parser.parse_args()
    os.chdir(os.path.dirname(HERE))
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model, args.reference, args.pairs, args.repeats)))
        return
    results = {}
    for variant in (*VARIANTS, EXACT):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--model", args.model, "--reference",
                              args.reference, "--pairs", str(args.pairs), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base, exact = results["full_logits"], results.pop(EXACT)
    rows = []
    for variant, r in results.items():
        rows.append({"variant": variant, "seconds": round(r["seconds"], 3),
                     "speedup": round(base["seconds"] / r["seconds"], 2),
                     "peak_rss_mb": round(r["peak_rss_mb"]),
                     "max_logp_difference": max(abs(a - b) for a, b in zip(r["logps"], base["logps"])),
                     "max_error_vs_float64": max(abs(a - b) for a, b in zip(r["logps"], exact["logps"]))})
    figures = {"model": args.model, "pairs": args.pairs, "pair_tokens": base["tokens"], "precision": "float32",
               "torch_threads": __import__("torch").get_num_threads(), "machine": platform.processor() or
               platform.machine(), "cpus": os.cpu_count(), "variants": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(figures, f, indent=2)
    print(f"{'variant':12} {'s/fwd+bwd':>10} {'speed-up':>9} {'peak RSS MB':>12} {'max |Δ| plain':>14} "
          f"{'max |Δ| fp64':>13}")
    for r in rows:
        print(f"{r['variant']:12} {r['seconds']:>10.3f} {r['speedup']:>9.2f} {r['peak_rss_mb']:>12} "
              f"{r['max_logp_difference']:>14.2e} {r['max_error_vs_float64']:>13.2e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
