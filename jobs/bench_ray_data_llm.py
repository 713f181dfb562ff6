"""The reference pass through Ray's own batch-inference API (`ray.data.llm`) against our vLLM actor, same engine.

    .venv/bin/python -m pipeline.demo .demo && .venv/bin/python jobs/bench_ray_data_llm.py [--config jobs/demo.yaml]

Both score the config's pairs (its `pairs` stage is run first when missing) with vLLM's prompt log-probs, in one Ray
session, one engine of `reference.cpus_per_actor` CPUs each, the config's dtype and memory share:
- ours: `pipeline.reference.score_pairs` (a Ray Data actor pool holding `vllm.LLM`, run in the actor's process);
- Ray's: `ray.data.llm.build_processor` with a `vLLMEngineProcessorConfig` (an `AsyncLLM` engine that overlaps
  batches), fed token ids (`tokenized_prompt`), `prompt_logprobs=0`, one generated token, and the completion's
  log-probs summed in its postprocess.
Each runs twice, alternately; the second run of each has vLLM's compile cache warm, as any run after the first on a
machine does. Writes jobs/benchmarks/ray_data_llm.json: seconds per run, sequences/s, and the largest difference
between the two sides' summed log-probs.
"""
import argparse
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def ray_data_llm_scores(ds, cfg) -> dict[tuple[str, str], float]:
    """{(pair_id, "chosen" | "rejected"): summed completion log-prob} through ray.data.llm."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    ref = cfg.reference

    def one_row_per_completion(batch):
        rows = {"pair_id": [], "side": [], "prompt_length": [], "tokenized_prompt": []}
        for pair_id, prompt, chosen, rejected in zip(batch["pair_id"], batch["prompt_ids"], batch["chosen_ids"],
                                                      batch["rejected_ids"]):
            for side, completion in (("chosen", chosen), ("rejected", rejected)):
                rows["pair_id"].append(pair_id)
                rows["side"].append(side)
                rows["prompt_length"].append(len(prompt))
                rows["tokenized_prompt"].append(list(prompt) + list(completion))
        return rows

    def summed_completion_logp(row):
        ids, logprobs = row["prompt_token_ids"], row["prompt_logprobs"]
        return {"pair_id": row["pair_id"], "side": row["side"],
                "logp": sum(logprobs[i][ids[i]]["logprob"] for i in range(row["prompt_length"], len(ids)))}

    processor = build_processor(
        vLLMEngineProcessorConfig(
            model_source=os.path.abspath(cfg.model.name_or_path),
            engine_kwargs=dict(dtype=ref.dtype, enable_prefix_caching=False, max_model_len=cfg.data.max_length,
                               gpu_memory_utilization=ref.gpu_memory_utilization,
                               distributed_executor_backend="uni", seed=cfg.run.seed),
            batch_size=ref.batch_size, concurrency=1,
            # CPU engine: its one bundle holds CPUs only (the default asks for a GPU).
            placement_group_config={"bundles": [{"CPU": ref.cpus_per_actor}]},
            # vLLM's Ray metrics import ray.serve, which ray[data,train,tune] does not install.
            log_engine_metrics=False,
            tokenize_stage=False, detokenize_stage=False, chat_template_stage=False),
        preprocess=lambda row: dict(row, sampling_params=dict(max_tokens=1, prompt_logprobs=0, detokenize=False)),
        postprocess=summed_completion_logp,
    )
    rows = processor(ds.map_batches(one_row_per_completion, batch_format="numpy")).take_all()
    return {(r["pair_id"], r["side"]): r["logp"] for r in rows}


def our_scores(ds, cfg) -> dict[tuple[str, str], float]:
    from pipeline.reference import score_pairs

    scores = {}
    for row in score_pairs(ds, cfg).iter_rows():
        scores[(row["pair_id"], "chosen")] = row["ref_chosen_logp"]
        scores[(row["pair_id"], "rejected")] = row["ref_rejected_logp"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/demo.yaml")
    args = parser.parse_args()
    os.chdir(REPO)
    import ray

    from pipeline.config import load_config
    from pipeline.runner import init_ray, run_stages

    cfg = load_config(args.config, ["reference.backend=vllm", "reference.num_actors=1"])
    run_stages(cfg, ["pairs"])
    init_ray(cfg.run.ray_address, cfg.run.num_cpus)
    pairs = ray.data.read_parquet(os.path.abspath(f"{cfg.run.storage}/{cfg.run.name}/pairs")).materialize()
    sequences = 2 * pairs.count()
    runs, scores = [], {}
    for attempt in (1, 2):
        for side, score in (("ours (vllm.LLM in a Ray Data actor)", our_scores),
                            ("ray.data.llm vLLMEngineProcessor", ray_data_llm_scores)):
            started = time.time()
            scores[side] = score(pairs, cfg)
            seconds = time.time() - started
            runs.append({"side": side, "run": attempt, "seconds": round(seconds, 1),
                         "sequences_per_second": round(sequences / seconds, 2)})
            print(runs[-1], flush=True)
    ours, theirs = scores.values()
    figures = {"config": args.config, "model": cfg.model.name_or_path, "sequences": sequences,
               "dtype": cfg.reference.dtype, "cpus_per_engine": cfg.reference.cpus_per_actor,
               "max_abs_logp_difference": max(abs(ours[k] - theirs[k]) for k in ours), "runs": runs}
    with open(os.path.join(HERE, "benchmarks", "ray_data_llm.json"), "w") as f:
        json.dump(figures, f, indent=2)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
