"""`reference` stage (Ray Data actor pool): pairs + the reference model's log-probs of both completions.

Each actor holds one model: a `vllm.LLM` (backend `vllm`) that scores prompt+completion token ids with prompt
log-probs, or a transformers model (backend `hf`). Both sum log p over completion tokens only and write
`ref_chosen_logp`, `ref_rejected_logp` (float64) beside the pair columns.
"""
import pyarrow as pa

from pipeline.config import Config

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


def _with_reference(batch: pa.Table, logps: list[float]) -> pa.Table:
    """`logps` holds the chosen sequences' sums, then the rejected ones'."""
    n = batch.num_rows
    batch = batch.append_column(REF_COLUMNS[0], pa.array(logps[:n], pa.float64()))
    return batch.append_column(REF_COLUMNS[1], pa.array(logps[n:], pa.float64()))


def _sequences(batch: pa.Table) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and completions for every chosen, then every rejected, completion of the batch."""
    prompts = batch["prompt_ids"].to_pylist()
    return prompts * 2, batch["chosen_ids"].to_pylist() + batch["rejected_ids"].to_pylist()


class VLLMScorer:
    """One vLLM engine per actor. prompt_logprobs=0 returns the log-prob of each actual prompt token."""

    def __init__(self, model: str, tokenizer: str | None, dtype: str, tensor_parallel_size: int,
                 gpu_memory_utilization: float, max_model_len: int, trust_remote_code: bool, seed: int):
        from vllm import LLM, SamplingParams

        self.llm = LLM(
            model=model,
            tokenizer=tokenizer or model,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            # One GPU: run in this process (starts in seconds instead of spawning and re-importing vLLM).
            distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp",
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            # Cached prefix tokens produce no prompt log-probs; every token must be computed.
            enable_prefix_caching=False,
            trust_remote_code=trust_remote_code,
            seed=seed,
        )
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from vllm.inputs import TokensPrompt

        prompts, completions = _sequences(batch)
        sequences = [p + c for p, c in zip(prompts, completions)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], self.params, use_tqdm=False)
        logps = []
        for output, sequence, prompt in zip(outputs, sequences, prompts):
            # prompt_logprobs[i] is {token_id: Logprob} for token i given tokens < i (None at i = 0).
            logps.append(sum(output.prompt_logprobs[i][sequence[i]].logprob for i in range(len(prompt), len(sequence))))
        return _with_reference(batch, logps)


class HFScorer:
    """A transformers model per actor; the same summed completion log-probs through pipeline.logprobs."""

    def __init__(self, model: str, dtype: str, use_gpu: bool, micro_batch_size: int, trust_remote_code: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.micro_batch_size = micro_batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from pipeline.logprobs import completion_logps, pad_pairs

        prompts, completions = _sequences(batch)
        logps = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.micro_batch_size):
                end = start + self.micro_batch_size
                padded = pad_pairs(prompts[start:end], completions[start:end], self.pad_id)
                padded = {k: v.to(self.device) for k, v in padded.items()}
                logps.extend(completion_logps(self.model, padded).double().tolist())
        return _with_reference(batch, logps)


def score_pairs(ds, cfg: Config):
    """Add the reference columns to a Ray Dataset of pairs (lazy; nothing runs until it is consumed)."""
    ref, model = cfg.reference, cfg.model
    gpus = ref.tensor_parallel_size if ref.use_gpu else 0
    if ref.backend == "vllm":
        scorer, kwargs = VLLMScorer, dict(
            model=model.name_or_path,
            tokenizer=model.tokenizer,
            dtype=ref.dtype,
            tensor_parallel_size=ref.tensor_parallel_size,
            gpu_memory_utilization=ref.gpu_memory_utilization,
            max_model_len=cfg.data.max_length + 1,  # + the one token vLLM must generate
            trust_remote_code=model.trust_remote_code,
            seed=cfg.run.seed,
        )
        # Set in the actor's own process, before vLLM is imported there.
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if ref.tensor_parallel_size == 1 else {}
        runtime_env = {"env_vars": env}
    else:
        scorer, kwargs = HFScorer, dict(
            model=model.name_or_path,
            dtype=ref.dtype,
            use_gpu=ref.use_gpu,
            micro_batch_size=ref.micro_batch_size,
            trust_remote_code=model.trust_remote_code,
        )
        runtime_env = None
    return ds.map_batches(
        scorer,
        fn_constructor_kwargs=kwargs,
        batch_size=ref.batch_size,
        batch_format="pyarrow",
        concurrency=ref.num_actors,
        num_gpus=gpus,
        num_cpus=ref.cpus_per_actor,
        runtime_env=runtime_env,
    )


def compute_reference(cfg: Config, stage) -> dict:
    import ray

    pairs = ray.data.read_parquet(stage.inputs["pairs"])
    score_pairs(pairs, cfg).write_parquet(stage.out, min_rows_per_file=20_000)
    summary = ray.data.read_parquet(stage.out).select_columns(["split", *REF_COLUMNS]).to_pandas()
    means = summary.groupby("split")[list(REF_COLUMNS)].mean().round(4).to_dict(orient="index")
    print(f"[dpop] reference: {len(summary)} pairs scored with {cfg.reference.backend}; mean log-probs {means}",
          flush=True)
    return {"rows": len(summary), "backend": cfg.reference.backend, "mean_logps_by_split": means}
