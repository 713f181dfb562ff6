"""`reference` stage (Ray Data actor pool): pairs + the reference model's log-probs of both completions.

Each actor holds one engine (`ENGINES`): a `vllm.LLM` (backend `vllm`) that scores prompt+completion token ids with
prompt log-probs, or a transformers model (backend `hf`); the eval stage uses the same engines. Both sum log p over completion tokens only and write
`ref_chosen_logp`, `ref_rejected_logp` (float64) beside the pair columns. Pairs with a non-finite log-prob are
dropped and counted. Output is written as it is scored, so a rerun after a crash scores only what is missing.
"""
import math
from collections import Counter

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from pipeline import storage
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


class VLLMEngine:
    """One vLLM engine: summed completion log-probs (prompt log-probs of prompt+completion) and greedy answers."""

    def __init__(self, model: str, tokenizer: str | None, dtype: str, tensor_parallel_size: int,
                 gpu_memory_utilization: float, max_model_len: int, max_num_batched_tokens: int,
                 enforce_eager: bool, trust_remote_code: bool, seed: int):
        from vllm import LLM

        model = storage.local_dir(model)
        self.llm = LLM(
            model=model,
            tokenizer=tokenizer or model,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            # One GPU: run in this process (starts in seconds instead of spawning and re-importing vLLM).
            distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp",
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=True,  # sequences longer than one step's budget are scored over several
            # Cached prefix tokens produce no prompt log-probs; every token must be computed.
            enable_prefix_caching=False,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            seed=seed,
        )

    def logps(self, prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # prompt_logprobs=0: the log-prob of each actual prompt token, no alternatives.
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        sequences = [p + c for p, c in zip(prompts, completions)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        # prompt_logprobs[i] is {token_id: Logprob} for token i given tokens < i (None at i = 0).
        return [sum(output.prompt_logprobs[i][sequence[i]].logprob for i in range(len(prompt), len(sequence)))
                for output, sequence, prompt in zip(outputs, sequences, prompts)]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop: list[str]) -> list[str]:
        """Greedy answers, cut before the first stop string (and at the end-of-sequence token)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=stop)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [cut_at_stop(output.outputs[0].text, stop) for output in outputs]


class HFEngine:
    """A transformers model: the same summed completion log-probs through pipeline.logprobs, and greedy answers."""

    def __init__(self, model: str, dtype: str, use_gpu: bool, micro_batch_size: int, trust_remote_code: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if use_gpu else "cpu")
        model = storage.local_dir(model)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        self.micro_batch_size = micro_batch_size

    def logps(self, prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
        import torch

        from pipeline.logprobs import completion_logps, layout_for, make_batch

        # Completions after the same prompt (a pair's two, a question's choices) form one group, which shares the
        # prompt's computation; groups go shortest first, so a micro-batch holds groups of similar length.
        members: dict[tuple, list[int]] = {}
        for i, prompt in enumerate(prompts):
            members.setdefault(tuple(prompt), []).append(i)
        groups = sorted(members.values(), key=lambda g: len(prompts[g[0]]) + sum(len(completions[i]) for i in g))
        layout = layout_for(self.model)
        logps = [0.0] * len(prompts)
        with torch.inference_mode():
            for start in range(0, len(groups), self.micro_batch_size):
                chunk = groups[start:start + self.micro_batch_size]
                batch = make_batch([(prompts[g[0]], [completions[i] for i in g]) for g in chunk], self.pad_id, layout)
                scores = completion_logps(self.model, batch.to(self.device)).double().tolist()
                for i, score in zip((i for g in chunk for i in g), scores):
                    logps[i] = score
            # A NaN or inf in one sequence's activations reaches every sequence it shares a packed row with
            # (masked attention weighs it by 0, and 0 * NaN is NaN): each such sequence is scored again alone.
            for i, score in enumerate(logps):
                if not math.isfinite(score):
                    alone = make_batch([(prompts[i], [completions[i]])], self.pad_id, "padded")
                    logps[i] = completion_logps(self.model, alone.to(self.device)).double().item()
        return logps

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop: list[str]) -> list[str]:
        import torch

        answers = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.micro_batch_size):
                chunk = prompts[start:start + self.micro_batch_size]
                width = max(map(len, chunk))
                # Left padding: every prompt ends where generation starts.
                input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=self.device)
                attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                                              device=self.device)
                generated = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                                max_new_tokens=max_new_tokens, do_sample=False,
                                                pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id)
                for row in generated[:, width:].tolist():
                    answers.append(cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), stop))
        return answers


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


ENGINES = {"vllm": VLLMEngine, "hf": HFEngine}


class PairScorer:
    """Ray Data actor: the reference columns for a batch of pairs."""

    def __init__(self, backend: str, engine_kwargs: dict):
        self.engine = ENGINES[backend](**engine_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts, completions = _sequences(batch)
        return _with_reference(batch, self.engine.logps(prompts, completions))


def engine_actor(cfg: Config, model: str, max_length: int, backend: str) -> dict:
    """`map_batches` arguments for an actor pool whose actors each hold one `backend` engine of `model` (the
    reference section's precision and actor resources), scoring sequences of up to `max_length` tokens. The
    reference and eval stages share it, so policy and reference are scored alike."""
    ref = cfg.reference
    if backend == "vllm":
        engine_kwargs = dict(
            model=model,
            # The policy folders hold the tokenizer saved with them; the reference may name its own.
            tokenizer=cfg.model.tokenizer if model == cfg.model.name_or_path else None,
            dtype=ref.dtype,
            tensor_parallel_size=ref.tensor_parallel_size,
            gpu_memory_utilization=ref.gpu_memory_utilization,
            max_model_len=max_length + 1,  # + the one token vLLM must generate after a scored sequence
            max_num_batched_tokens=ref.max_num_batched_tokens,
            enforce_eager=ref.enforce_eager,
            trust_remote_code=cfg.model.trust_remote_code,
            seed=cfg.run.seed,
        )
        # Set in the actor's own process, before vLLM is imported there.
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if ref.tensor_parallel_size == 1 else {}
        runtime_env = {"env_vars": env}
    else:
        engine_kwargs = dict(model=model, dtype=ref.dtype, use_gpu=ref.use_gpu, micro_batch_size=ref.micro_batch_size,
                             trust_remote_code=cfg.model.trust_remote_code)
        runtime_env = None
    return dict(
        fn_constructor_kwargs={"backend": backend, "engine_kwargs": engine_kwargs},
        batch_format="pyarrow",
        concurrency=ref.num_actors,
        num_gpus=ref.tensor_parallel_size if ref.use_gpu else 0,
        num_cpus=ref.cpus_per_actor,
        runtime_env=runtime_env,
    )


def score_pairs(ds, cfg: Config):
    """Add the reference columns to a Ray Dataset of pairs (lazy; nothing runs until it is consumed)."""
    return ds.map_batches(PairScorer, batch_size=cfg.reference.batch_size,
                          **engine_actor(cfg, cfg.model.name_or_path, cfg.data.max_length, cfg.reference.backend))


NONFINITE_IDS_KEPT = 100  # pair ids listed in the manifest; the count covers them all


def is_finite(batch: pa.Table) -> pa.Array:
    """Both reference log-probs finite. A NaN or ±inf (float16 overflow, a broken model) would make training fail
    blaming β, or let a −inf pair contribute nothing while it seems to train."""
    return pa.compute.and_(pa.compute.is_finite(batch[REF_COLUMNS[0]]), pa.compute.is_finite(batch[REF_COLUMNS[1]]))


def _output_files(out: str) -> list[str]:
    """The stage's Parquet files (its `_`-prefixed bookkeeping files aside)."""
    return [uri for uri, info in storage.list_files(out, recursive=False)
            if info.base_name.endswith(".parquet") and not info.base_name.startswith(("_", "."))]


def keep_finished_files(out: str, wanted: Counter) -> Counter:
    """After an interrupted run: keep the output files it finished and return the pair ids they hold. A file cut by
    the kill has no Parquet footer and is deleted. A repeated pair id (identical pairs share one) must end up with
    all its copies or none: a file holding some copies of an id whose other copies no file holds is rewritten
    without them, so those pairs are scored again, every copy."""
    by_file = {}
    for file in _output_files(out):
        try:
            by_file[file] = Counter(storage.read_parquet(file, ["pair_id"]).column(0).to_pylist())
        except (pa.ArrowInvalid, OSError):
            storage.delete_file(file)
    done = sum(by_file.values(), Counter())
    incomplete = {pair_id for pair_id, n in done.items() if n != wanted.get(pair_id, 0)}
    incomplete_array = pa.array(sorted(incomplete), pa.string())
    for file, ids in list(by_file.items()):
        if incomplete & ids.keys():
            table = _not_in(storage.read_parquet(file), incomplete_array)
            storage.write_parquet(table, file)
            by_file[file] = Counter(table["pair_id"].to_pylist())
    return sum(by_file.values(), Counter())


def _not_in(batch: pa.Table, done: pa.Array) -> pa.Table:
    return batch.filter(pa.compute.invert(pa.compute.is_in(batch["pair_id"], value_set=done)))


def compute_reference(cfg: Config, stage) -> dict:
    """Score every pair and write the finite ones as they are scored (files of reference.rows_per_file pairs); the
    rest are dropped and counted as `nonfinite_reference` (documented choice: they stay out of training, the
    manifest names them, and the run goes on). Rerun after an interruption, it keeps the finished files and scores
    only the pairs they lack."""
    import ray

    from pipeline.runner import StageFailed

    pairs = ray.data.read_parquet(stage.inputs["pairs"])
    # One column read here with pyarrow: through Ray Data it took 6 s of read tasks on the demo's 480 pairs.
    wanted = Counter(storage.read_parquet(stage.inputs["pairs"], ["pair_id"]).column(0).to_pylist())
    done = keep_finished_files(stage.out, wanted) if stage.resuming else Counter()
    todo = pairs
    if done:
        todo = pairs.map_batches(_not_in, fn_kwargs={"done": pa.array(sorted(done))}, batch_format="pyarrow")
        print(f"[dpop] reference: resuming: {done.total()} pairs already scored by the interrupted run are kept; "
              f"scoring the other {wanted.total() - done.total()}", flush=True)
    if wanted.total() > done.total():
        # Blocks of rows_per_file pairs: each is scored by one actor call chain and written as its own file as soon
        # as it is done (a whole Parquet file read as one block would be written only at the very end).
        todo = todo.repartition(target_num_rows_per_block=cfg.reference.rows_per_file)
        score_pairs(todo, cfg).map_batches(lambda b: b.filter(is_finite(b)), batch_format="pyarrow").write_parquet(
            stage.out, min_rows_per_file=cfg.reference.rows_per_file)

    columns = ["pair_id", "split", *REF_COLUMNS]
    files = _output_files(stage.out)
    written = pa.concat_tables([storage.read_parquet(f, columns) for f in files]).to_pandas() if files else \
        pa.table({c: [] for c in columns}).to_pandas()
    nonfinite = wanted - Counter(written.pair_id)  # every pair is written or dropped, and nothing else is written
    assert not Counter(written.pair_id) - wanted, "the reference output holds pairs that are not in the input"
    accounting = {"rows_in": wanted.total(), "rows_out": len(written), "rows_dropped": nonfinite.total()}
    assert accounting["rows_in"] == accounting["rows_out"] + accounting["rows_dropped"], accounting
    if nonfinite:
        print(f"[dpop] WARNING: reference: dropped {nonfinite.total()} pair(s) whose reference log-prob is not "
              f"finite (nonfinite_reference), e.g. {sorted(nonfinite)[:5]}", flush=True)
    fields = {"rows": len(written), **accounting, "backend": cfg.reference.backend,
              "dropped": {"nonfinite_reference": nonfinite.total()} if nonfinite else {},
              "nonfinite_pair_ids": sorted(nonfinite)[:NONFINITE_IDS_KEPT],
              "resumed": {"pairs_kept": done.total(), "pairs_scored": wanted.total() - done.total()} if done else None}
    if not len(written):
        raise StageFailed(f"reference: every one of {wanted.total()} pairs has a non-finite reference log-prob "
                          f"(reference.dtype {cfg.reference.dtype}; a broken model or float16 overflow)", fields)
    means = written.groupby("split")[list(REF_COLUMNS)].mean().round(4).to_dict(orient="index")
    print(f"[dpop] reference: {len(written)} pairs scored with {cfg.reference.backend}; mean log-probs {means}",
          flush=True)
    return {**fields, "mean_logps_by_split": means}
